"""The head-kind registry: every registered kind builds, selects, refits, saves, loads and exports its heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featbank.errors import BundleError, ConfigError
from featbank.heads import (
    DEFAULT_KIND,
    HEAD_KINDS,
    Features,
    HeadKind,
    HeadSpec,
    ValSplit,
    estimator_proba,
    head_kind,
    kind_of,
    register_head_kind,
)

from _fitdata import blobs

pytestmark = pytest.mark.usefixtures("one_thread")

#: A --head value of each kind (the scikit-learn kind is any classifier class name).
HEADS = {"linear": "linear", "mlp": "mlp", "sklearn": "LogisticRegression"}


def test_every_registered_kind_has_a_head_here_and_a_manifest_head_type():
    from featbank.bundles.manifest import HEAD_TYPES

    assert set(HEADS) == set(HEAD_KINDS) == set(HEAD_TYPES)


@pytest.mark.parametrize("name", sorted(HEAD_KINDS))
def test_a_kind_selects_refits_saves_loads_and_exports(name):
    X, y = blobs(30, 6, 3, sep=1.0, seed=1)
    tr, va = np.arange(len(y)) % 3 != 0, np.arange(len(y)) % 3 == 0
    kind = HEAD_KINDS[name]
    spec = HeadSpec(HEADS[name], params={"max_epochs": 20} if name == "mlp" else {}, device="cpu",
                    grid=(0.01, 1.0) if name != "mlp" else None)
    assert spec.kind is kind and head_kind(spec.head) is kind
    est = kind.build(spec, seed=0)
    sel = kind.select(est, ValSplit(Features(X[tr]), y[tr], Features(X[va]), y[va], 3), spec)
    assert sel.val_proba is not None and sel.val_proba.shape == (int(va.sum()), 3)
    assert ("C" in sel.chosen) == (name != "mlp") and ("epochs" in sel.chosen) == (name == "mlp")
    kind.refit(sel.estimator, sel.chosen, Features(X), y, spec)
    assert kind_of(sel.estimator) is kind
    section, files = kind.save(sel.estimator, sel.chosen, spec)
    assert section["type"] == name and section["chosen"] == sel.chosen and set(files) == {section["file"]}
    back = kind.load(files[section["file"]], section, "test bundle")
    np.testing.assert_allclose(estimator_proba(back, X, 3), estimator_proba(sel.estimator, X, 3), atol=1e-6)
    module = kind.export(back)
    with torch.no_grad():
        got = module(torch.from_numpy(X.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(got, estimator_proba(back, X, 3), atol=1e-4)


def test_a_head_name_that_is_no_kind_is_a_scikit_learn_classifier():
    assert head_kind("SVC") is head_kind("KNeighborsClassifier") is HEAD_KINDS[DEFAULT_KIND]
    with pytest.raises(ConfigError, match="Unknown head 'SVX'"):
        HeadSpec("SVX").kind.build(HeadSpec("SVX"), seed=0)


def test_kind_of_refuses_an_estimator_no_kind_holds():
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(ConfigError, match="LogisticRegression is no head kind's estimator"):
        kind_of(LogisticRegression())  # a bare classifier: featbank's sklearn heads are pipelines


def test_the_sklearn_kind_loads_skops_files_only():
    with pytest.raises(BundleError, match="is not .skops"):
        HEAD_KINDS["sklearn"].load(b"\x80\x04K.", {"file": "head.pkl"}, "Bundle 'b'")


def test_register_head_kind_adds_a_kind_by_name():
    @register_head_kind
    class Centroid(HeadKind):
        name = "centroid-test"

    try:
        assert isinstance(head_kind("centroid-test"), Centroid) and HEAD_KINDS["centroid-test"].name == "centroid-test"
        from featbank.fitting import FitConfig

        assert FitConfig(head="centroid-test", save=False).head == "centroid-test"  # fit takes it by its name
    finally:
        del HEAD_KINDS["centroid-test"]
    with pytest.raises(ValueError, match="has no name"):
        register_head_kind(type("Nameless", (HeadKind,), {}))
