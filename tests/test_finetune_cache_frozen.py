"""finetune --cache-frozen: the split is exact, the views are the symmetries asked for, training on
cached outputs freezes what it should, starts from the probe, resumes exactly and refuses clearly."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featbank
import featbank.finetuning as ft
from featbank.backbones import load_backbone
from featbank.bundles import load_bundle
from featbank.cli.main import cli
from featbank.errors import ConfigError
from featbank.finetuning._cache_frozen import FrozenCache, apply_view, split_features, view_group
from featbank.inference import predict_proba

FAST = dict(backbone="test_tiny", epochs=2, batch_size=8, num_workers=0, progress=False)


def _state(bundle_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(bundle_path) / "model.safetensors"))


def _freeze_before(features: nn.Module, prefix: str) -> None:
    hit = False
    for n, p in features.named_parameters():
        hit = hit or n.startswith(prefix)
        p.requires_grad_(hit)


@pytest.mark.parametrize("name,first,units", [
    ("test_tiny", "stage2.", ["stage2.0", "stage2.1", "stage2.2", "pool"]),
    pytest.param("resnet18", "layer3.", ["layer3.0", "layer3.1", "layer4.0", "layer4.1", "avgpool", "fc"],
                 marks=pytest.mark.slow),
    pytest.param("efficientnet_lite0", "blocks.5.", ["blocks.5", "blocks.6", "conv_head", "bn2", "global_pool",
                                                     "classifier"], marks=pytest.mark.slow),
])
def test_split_is_exact(name: str, first: str, units: list[str]) -> None:
    """suffix(prefix(x)) equals the backbone's own forward pass, cut before the first trainable unit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(name, weights="random" if name != "test_tiny" else None)
    features = bb.features.eval()
    _freeze_before(features, first)
    split = split_features(features, bb.preprocess.input_size, name)
    assert split.suffix_names == units
    assert all(not p.requires_grad for p in split.prefix.parameters())
    x = torch.randn(3, 3, *bb.preprocess.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split.suffix(split.prefix(x)), features(x).flatten(1), atol=1e-5, rtol=1e-5)


def test_split_refuses_what_it_cannot_cut() -> None:
    class Residual(nn.Module):  # forward is not the chain of its children
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.pool(h + self.b(h))

    net = Residual()
    net.a.requires_grad_(False)
    with pytest.raises(ConfigError, match="not the plain chain"):
        split_features(net, (8, 8), "residual")
    with pytest.raises(ConfigError, match="nothing at the input"):
        split_features(Residual(), (8, 8), "residual")


def test_views_are_the_symmetries_asked_for() -> None:
    x = torch.arange(2 * 5 * 5 * 3, dtype=torch.uint8).view(2, 5, 5, 3)
    ref = x.numpy()
    expect = {"identity": ref, "hflip": ref[:, :, ::-1], "vflip": ref[:, ::-1], "rot180": ref[:, ::-1, ::-1]}
    from featbank.finetuning._cache_frozen import VIEW_NAMES

    for v, name in VIEW_NAMES.items():
        if name in expect:
            np.testing.assert_array_equal(apply_view(x, v).numpy(), expect[name])
    sizes = {flags: len(view_group(*flags)) for flags in
             [(False, False, False), (True, False, False), (True, True, False), (False, False, True), (True, False, True)]}
    assert sizes == {(False, False, False): 1, (True, False, False): 2, (True, True, False): 4,
                     (False, False, True): 4, (True, False, True): 8}
    assert view_group(True, False, True, square=False) == [(0, False), (0, True)]
    # every view is distinct, identity first
    vs = view_group(True, True, True)
    assert vs[0] == (0, False) and len({apply_view(x, v).numpy().tobytes() for v in vs}) == 8


@pytest.mark.slow
def test_cached_partial_trains_only_the_suffix(image_folder: Path, tmp_path: Path) -> None:
    base = load_backbone("test_tiny").features.state_dict()
    rep = ft.finetune(image_folder, tmp_path / "m", strategy="partial", trainable_from="stage2", lr=0.05,
                      cache_frozen=True, vflip=True, **FAST)
    after = _state(rep.path)
    for k, v in base.items():
        changed = not torch.equal(after[f"features.{k}"], v)
        if k.startswith(("stem.", "stage1.")):
            assert not changed, k
        elif k.startswith("stage2.") and not k.endswith("num_batches_tracked"):
            assert changed, k
    assert rep.cache_seconds > 0 and "cached in" in rep.summary()
    info = load_bundle(rep.path).manifest["finetune"]
    assert info["cache_frozen"]["suffix"] == ["stage2.0", "stage2.1", "stage2.2", "pool"]
    assert info["cache_frozen"]["n_views"] == 4
    assert info["augmentation"]["train"]["views"] == ["identity", "rot180", "hflip", "vflip"]
    # The final metrics come from the full network on the images, like an uncached run's.
    pred = predict_proba(rep.path, [image_folder / p for p in featbank.scan_folder(image_folder).paths], device="cpu")
    assert pred.ok.all()


@pytest.mark.slow
def test_cached_lpft_starts_from_the_probe(image_folder: Path, tmp_path: Path) -> None:
    from featbank.fitting import fit

    cache = featbank.extract(image_folder, tmp_path / "c.h5", backbone="test_tiny", engine="torch", num_workers=0,
                             progress=False).path
    probe = fit(cache, "linear", out=tmp_path / "models" / "probe").path
    c = featbank.open_cache(cache)
    ref = load_bundle(probe).predict_proba(c.load_embeddings())
    rep = ft.finetune(image_folder, tmp_path / "lpft", strategy="partial", trainable_from="stage2",
                      init_head=str(probe), lr=1e-12, cache_frozen=True, **FAST)
    pred = predict_proba(rep.path, [c.root / p for p in c.paths], device="cpu")
    np.testing.assert_allclose(pred.proba, ref, atol=1e-5)
    # At step 0 the cached path's validation loss is the probe's on the val images (float16 cache).
    val_rows = np.array([c.paths.index(p) for p in load_bundle(rep.path).manifest["validation"]["paths"]])
    p_val = ref[val_rows, c.labels[val_rows]]
    assert rep.history[0]["val_loss"] == pytest.approx(float(-np.log(p_val).mean()), abs=2e-3)


_KILL = """
import os, signal, sys
import featbank.finetuning as ft
def stop(epoch, row):
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ft.finetune(sys.argv[1], sys.argv[2], backbone="test_tiny", epochs=3, batch_size=8, lr=0.05, patience=0,
            strategy="partial", trainable_from="stage2", cache_frozen=True, rot90=True,
            num_workers=0, progress=False, on_epoch_end=stop)
"""


@pytest.mark.slow
def test_cached_kill_then_resume_equals_uninterrupted(image_folder: Path, tmp_path: Path) -> None:
    settings = dict(backbone="test_tiny", epochs=3, batch_size=8, lr=0.05, patience=0, strategy="partial",
                    trainable_from="stage2", cache_frozen=True, rot90=True, num_workers=0, progress=False)
    whole = ft.finetune(image_folder, tmp_path / "whole", **settings)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL, str(image_folder), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    with pytest.raises(ConfigError, match="other settings"):
        ft.finetune(image_folder, out, resume=True, **{**settings, "cache_frozen": False})
    resumed = ft.finetune(image_folder, out, resume=True, **settings)
    assert resumed.resumed_from == 1
    a, b = _state(whole.path), _state(resumed.path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # and training moved: the trainable stage differs from the start
    assert not torch.equal(a["features.stage2.0.weight"], load_backbone("test_tiny").features.state_dict()["stage2.0.weight"])


def test_cache_frozen_refusals_exit_2(image_folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["finetune", str(image_folder), "-b", "test_tiny", "--epochs", "1", "-q", "--num-workers", "0", "--cache-frozen"]
    cases = [
        (["--strategy", "full"], "--strategy full freezes none"),
        (["--trainable-from", "stage1", "--train-bn"], "--train-bn makes their BatchNorm"),
        (["--trainable-from", "stem"], "nothing at the input"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        res = runner.invoke(cli, base + extra + ["--out", str(out)])
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output and "Traceback" not in res.output, (extra, res.output)
        assert not out.exists()


def test_memory_estimate() -> None:
    assert FrozenCache.nbytes(1000, 8, (112, 14, 14)) == 1000 * 8 * 112 * 14 * 14 * 2


def test_a_cache_that_would_not_fit_is_refused(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import featbank.finetuning._cache_frozen as frozen

    monkeypatch.setattr(frozen, "available_memory", lambda: 9)
    pattern = r"needs \d+\.\d KiB of memory for \d+ training image\(s\) x 8 view\(s\) .* 9 bytes are available"
    with pytest.raises(ConfigError, match=pattern):
        ft.finetune(image_folder, tmp_path / "m", strategy="partial", trainable_from="stage2", cache_frozen=True,
                    vflip=True, rot90=True, **FAST)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.ckpt").exists()
