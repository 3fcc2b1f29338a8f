"""featbank._device: the one place that resolves devices, mixed precision and decoding workers."""

from __future__ import annotations

import pytest
import torch

from featbank._device import autocast_dtype, default_num_workers, precision_name, resolve_device
from featbank.errors import ConfigError


def test_resolve_device_returns_a_torch_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ConfigError, match="The 'device' parameter must be one of"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_precision_and_workers():
    assert autocast_dtype("cpu") is None and precision_name("cpu") == "float32"
    if torch.cuda.is_available():
        assert precision_name("cuda") in ("bfloat16", "float16")
    assert default_num_workers("cpu") >= 2  # extraction: at least two decoders
    assert default_num_workers(torch.device("cpu"), training=True) >= 0
    assert default_num_workers("cuda", training=True) <= default_num_workers("cuda")


def test_extract_refuses_an_unknown_device(image_folder, tmp_path):
    import featbank

    with pytest.raises(ConfigError, match="'device' parameter"):
        featbank.extract(image_folder, tmp_path / "c.h5", backbone="test_tiny", device="tpu", progress=False)
