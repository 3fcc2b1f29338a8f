"""A backbone at another input size, NAME@SIZE: parsing, identity and key, and the whole route to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

try:  # tests/ may or may not be a package
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder  # type: ignore[no-redef]

import featbank
from featbank.backbones import load_backbone, peek_identity
from featbank.backbones._factory import split_image_size
from featbank.cli.main import cli
from featbank.errors import CacheKeyMismatch, ConfigError


def test_split_image_size() -> None:
    assert split_image_size("efficientnet_lite0@300") == ("efficientnet_lite0", 300)
    assert split_image_size("timm:resnet50.a1_in1k@288") == ("timm:resnet50.a1_in1k", 288)
    assert split_image_size("efficientnet_lite0") == ("efficientnet_lite0", None)
    for bad in ("efficientnet_lite0@", "efficientnet_lite0@3", "efficientnet_lite0@3000", "efficientnet_lite0@30.5",
                "efficientnet_lite0@-300", "efficientnet_lite0@300px"):
        with pytest.raises(ConfigError, match="whole number of pixels from 16 to 2048"):
            split_image_size(bad)


def test_tiny_at_size_feeds_the_whole_image() -> None:
    plain, big = load_backbone("test_tiny"), load_backbone("test_tiny@48")
    assert big.name == "test_tiny@48" and big.preprocess.input_size == (48, 48) and big.preprocess.resize_size == 48
    assert big.preprocess.mean == plain.preprocess.mean and big.preprocess.interpolation == plain.preprocess.interpolation
    ident = big.identity()
    assert ident["backbone"] == "test_tiny@48" and ident["transform"]["input_size"] == [48, 48]
    assert ident["weights_sha256"] == plain.identity()["weights_sha256"]


def test_lite0_at_300_identity_is_cheap_and_exact() -> None:
    """The identity read without building the network (to recognise a cache fast) is the built one's."""
    bb = load_backbone("efficientnet_lite0@300")
    assert bb.preprocess.input_size == (300, 300) and bb.embed_dim == 1280
    assert peek_identity("efficientnet_lite0@300") == bb.identity()
    assert peek_identity("efficientnet_lite0@300") != peek_identity("efficientnet_lite0")


def test_a_network_that_takes_one_size_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match=r"does not accept 320x320 inputs.*Use its own size 224"):
        load_backbone("timm:vit_tiny_patch16_224@320", weights="random")


def test_cli_bad_size_is_exit_2(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=2)
    r = CliRunner().invoke(cli, ["extract", str(data), "--backbone", "test_tiny@0"])
    assert r.exit_code == 2 and "whole number of pixels" in r.output and "Traceback" not in r.output


def test_another_size_is_another_cache(tmp_path: Path) -> None:
    """The size is in the key (and in the default cache name): never a cache embedded at another size."""
    data = make_image_folder(tmp_path / "data", n_per_class=3)
    kw = dict(engine="torch", num_workers=0, progress=False)
    a = featbank.extract(data, backbone="test_tiny", **kw).path
    b = featbank.extract(data, backbone="test_tiny@48", **kw).path
    assert a != b and "test_tiny-48" in b.name
    assert featbank.open_cache(b).embeddings.shape == featbank.open_cache(a).embeddings.shape
    with pytest.raises(CacheKeyMismatch):
        featbank.extract(data, a, backbone="test_tiny@48", **kw)
    # The embeddings do differ: the network saw other pixels.
    assert not np.allclose(featbank.open_cache(a).embeddings[:], featbank.open_cache(b).embeddings[:])


@pytest.mark.slow
def test_fit_export_predict_at_size(tmp_path: Path) -> None:
    """extract -> fit -> export -> predict at 48 px: the bundle and the ONNX graph carry the size, parity holds."""
    data = make_image_folder(tmp_path / "data", n_per_class=6, size=(52, 60))
    runner = CliRunner()
    cache = tmp_path / "c.h5"
    r = runner.invoke(cli, ["extract", str(data), "--backbone", "test_tiny@48", "--out", str(cache), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["fit", str(cache), "--head", "linear", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    bundle = featbank.load_bundle(tmp_path / "m")
    assert bundle.backbone["backbone"] == "test_tiny@48"
    assert bundle.load_backbone().preprocess.input_size == (48, 48)
    r = runner.invoke(cli, ["export", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert session.get_inputs()[0].shape[1:] == [48, 48, 3]
    images = sorted((data / "cat").iterdir())[:3]
    py = featbank.predict(tmp_path / "m", images)
    onnx = featbank.predict(tmp_path / "m.onnx", images)
    assert [p.label for p in onnx] == [p.label for p in py]
    np.testing.assert_allclose([p.probability for p in onnx], [p.probability for p in py], atol=1e-4)


def test_check_backbone_name_takes_sizes() -> None:
    """What compare checks before any work: the name, with its @SIZE, as load_backbone reads it."""
    from featbank.backbones import check_backbone_name

    check_backbone_name("test_tiny@48")
    check_backbone_name("efficientnet_lite0@300")
    with pytest.raises(ConfigError, match="Unknown backbone 'nope'"):
        check_backbone_name("nope@48")
    with pytest.raises(ConfigError, match="whole number of pixels"):
        check_backbone_name("test_tiny@5")
