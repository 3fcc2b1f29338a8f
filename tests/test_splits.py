"""Validation hold-outs and K-shot samples (featbank.splits), as fit and finetune use them."""

from __future__ import annotations

import numpy as np
import pytest

import featbank
from featbank.errors import ConfigError
from featbank.finetuning import _data as ft_data
from featbank.splits import n_holdout, sample_shots, stratified_holdout

from conftest import make_image_folder


def test_stratified_holdout_is_scikit_learns_split():
    from sklearn.model_selection import train_test_split

    rows = np.arange(100, 160)
    labels = np.repeat([0, 1, 2], 20)
    train, val = stratified_holdout(rows, labels, 12, seed=3)
    ref_train, ref_val = train_test_split(rows, test_size=12, random_state=3, stratify=labels)
    assert np.array_equal(val, np.sort(ref_val)) and np.array_equal(train, np.sort(ref_train))
    assert np.bincount(labels[val - 100]).tolist() == [4, 4, 4]
    assert not set(train) & set(val) and len(train) + len(val) == 60


def test_stratified_holdout_refuses_what_cannot_be_stratified():
    with pytest.raises(ConfigError, match="at least 2 images"):
        stratified_holdout(np.arange(5), np.array([0, 0, 1, 1, 2]), 3, seed=0)
    with pytest.raises(ConfigError, match="stratified"):
        stratified_holdout(np.arange(4), np.array([0, 0, 1, 1]), 3, seed=0)
    assert n_holdout(100, 3, 0.2) == 20 and n_holdout(10, 4, 0.1) == 4


def test_sample_shots_takes_k_per_class_reproducibly():
    rows = np.arange(50)
    labels = np.repeat([0, 1], 25)
    a = sample_shots(rows, labels, 5, seed=1)
    assert np.array_equal(a, sample_shots(rows, labels, 5, seed=1))
    assert not np.array_equal(a, sample_shots(rows, labels, 5, seed=2))
    assert np.bincount(labels[a]).tolist() == [5, 5]
    with pytest.raises(ConfigError, match="class 'a' has only 25"):
        sample_shots(rows, labels, 30, seed=0, class_names=["a", "b"])


def test_finetune_holds_out_a_stratified_validation_split(tmp_path):
    index = featbank.scan_folder(make_image_folder(tmp_path / "d", n_per_class=10))
    split = ft_data.split_index(index, 0.2, seed=0)
    assert np.bincount(index.labels[split.val]).tolist() == [2, 2, 2]
    assert len(split.train) == 24 and not set(split.train) & set(split.val)
    again = ft_data.split_index(index, 0.2, seed=0)
    assert np.array_equal(split.val, again.val)
    assert not np.array_equal(split.val, ft_data.split_index(index, 0.2, seed=1).val)
