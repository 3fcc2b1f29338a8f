"""Hostile bundles: a corpus of malicious and malformed bundles against every command that opens one.

Each attack is built here from a good bundle (the attacker rewrites the manifest so every sha256
matches). For every command that opens bundles (predict, evaluate, export, finetune --init-head,
extract --backbone) the run must exit 2 with a message naming the bundle and the reason, and the
canary file a payload would create must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import copy_bundle, pickle_payload, rewrite, skops_with_call
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.fitting import fit

try:
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _finetuned_bundle(path: Path, classes: list[str]) -> Path:
    """A fine-tuned bundle of test_tiny, written the way finetune writes it (real safetensors)."""
    import hashlib

    import torch
    from safetensors.torch import save

    from featbank.backbones import load_backbone
    from featbank.bundles import save_bundle

    bb = load_backbone("test_tiny")
    state = {f"features.{k}": v.contiguous() for k, v in bb.features.state_dict().items()}
    head = torch.nn.Linear(bb.embed_dim, len(classes))
    state.update({f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    data = save(state)
    manifest = {
        "kind": "finetuned", "classes": classes, "cache_key": None,
        "backbone": {**bb.identity(), "backbone": "finetuned:test_tiny", "weights": "finetuned",
                     "weights_sha256": hashlib.sha256(data).hexdigest()},
        "finetune": {"file": "model.safetensors", "base_backbone": bb.identity(), "base_family": bb.family,
                     "strategy": "full"},
    }
    return save_bundle(path, manifest, {"model.safetensors": data})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_image_folder(root / "data", n_per_class=4)
    cache = featbank.extract(data, root / "c.h5", backbone="test_tiny", engine="torch", num_workers=0,
                             progress=False).path
    skl = fit(cache, "LogisticRegression", out=root / "models" / "skl").path
    lin = fit(cache, "linear", out=root / "models" / "lin").path
    classes = json.loads((skl / "manifest.json").read_text())["classes"]
    ft = _finetuned_bundle(root / "models" / "ft", classes)
    outside = root / "outside"
    outside.mkdir()
    canary = root / "CANARY"
    (outside / "head.skops").write_bytes(
        skops_with_call((skl / "head.skops").read_bytes(), "numpy.testing._private.utils", "runstring", canary))
    shutil.copy(ft / "model.safetensors", outside / "model.safetensors")
    image = next(p for p in sorted(data.rglob("*.png")))
    return {"root": root, "data": data, "cache": cache, "skl": skl, "lin": lin, "ft": ft, "outside": outside,
            "canary": canary, "image": image}


# --------------------------------------------------------------------------------------------
# The corpus: name -> (good bundle it starts from, how to spoil it, reason the message gives)
# --------------------------------------------------------------------------------------------


def _head_file(b: Path, name: str, data: bytes, w) -> None:
    (b / "head.skops").unlink()
    (b / name).write_bytes(data)
    rewrite(b, lambda m: m["head"].update(file=name))


def _skops_call(module: str, name: str):
    def build(b: Path, w) -> None:
        (b / "head.skops").write_bytes(skops_with_call((b / "head.skops").read_bytes(), module, name, w["canary"]))
        rewrite(b, lambda m: None)
    return build


def _name(field: str, value_of):
    def build(b: Path, w) -> None:
        rewrite(b, lambda m: m[field].update(file=value_of(b, w)))
    return build


def _symlink_out(section: str, fname: str):
    def build(b: Path, w) -> None:
        (b / fname).unlink()
        os.symlink(w["outside"] / fname, b / fname)
        rewrite(b, lambda m: None)
    return build


def _manifest(edit):
    def build(b: Path, w) -> None:
        rewrite(b, lambda m: edit(m, b))
    return build


def _sub_folder(b: Path, w) -> str:
    (b / "sub").mkdir()
    shutil.copy(w["outside"] / "head.skops", b / "sub" / "head.skops")
    return "sub/head.skops"


def _bad_json(b: Path, w) -> None:
    (b / "manifest.json").write_text('{"format": "featbank-bundle", "kind": "head", ')


def _deep_json(b: Path, w) -> None:
    """Nested past Python's recursion limit: json.loads raises RecursionError, not ValueError."""
    (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _manifest_symlink(b: Path, w) -> None:
    (w["outside"] / "manifest.json").write_text((b / "manifest.json").read_text())
    (b / "manifest.json").unlink()
    os.symlink(w["outside"] / "manifest.json", b / "manifest.json")


HEAD_ATTACKS = {
    "pickle-named-joblib": (lambda b, w: _head_file(b, "head.joblib", pickle_payload(w["canary"]), w), "no pickle"),
    "pickle-named-skops": (lambda b, w: ((b / "head.skops").write_bytes(pickle_payload(w["canary"])),
                                         rewrite(b, lambda m: None)), "Cannot read head file"),
    "skops-runstring": (_skops_call("numpy.testing._private.utils", "runstring"), "does not trust.*runstring"),
    "skops-builtins-eval": (_skops_call("builtins", "eval"), "does not trust.*builtins.eval"),
    "skops-os-system": (_skops_call("os", "system"), "does not trust.*os.system"),
    "traversal": (_name("head", lambda b, w: "../../outside/head.skops"), "not a bare file name"),
    "absolute": (_name("head", lambda b, w: str(w["outside"] / "head.skops")), "not a bare file name"),
    "separator": (_name("head", _sub_folder), "not a bare file name"),
    "symlink-out": (_symlink_out("head", "head.skops"), "symlink .*outside"),
    "classes-int": (_manifest(lambda m, b: m.update(classes=5)), "field 'classes'"),
    "classes-str": (_manifest(lambda m, b: m.update(classes="abcd")), "field 'classes'"),
    "classes-too-many": (_manifest(lambda m, b: m.update(classes=m["classes"] + ["extra"])),
                         "disagree|was fitted on classes"),
    "embed-dim-str": (_manifest(lambda m, b: m["backbone"].update(embed_dim="abc")), "field 'backbone.embed_dim'"),
    "head-type-unknown": (_manifest(lambda m, b: m["head"].update(type="pickle")), "field 'head.type'"),
    "missing-kind": (_manifest(lambda m, b: m.pop("kind")), "field 'kind'"),
    "missing-backbone": (_manifest(lambda m, b: m.pop("backbone")), "field 'backbone'"),
    "missing-head": (_manifest(lambda m, b: m.pop("head")), "field 'head'"),
    "bad-json": (_bad_json, "not valid JSON"),
    "deep-json": (_deep_json, "not valid JSON"),
    "manifest-symlink": (_manifest_symlink, "no manifest.json"),
}

FT_ATTACKS = {
    "ft-traversal": (_name("finetune", lambda b, w: "../../outside/model.safetensors"), "not a bare file name"),
    "ft-absolute": (_name("finetune", lambda b, w: str(w["outside"] / "model.safetensors")), "not a bare file name"),
    "ft-symlink-out": (_symlink_out("finetune", "model.safetensors"), "symlink .*outside"),
    "ft-base-is-itself": (_manifest(lambda m, b: m["finetune"]["base_backbone"].update(backbone=str(b))),
                          "field 'finetune.base_backbone.backbone'"),
    "ft-pickle-weights": (lambda b, w: ((b / "model.safetensors").write_bytes(pickle_payload(w["canary"])),
                                        rewrite(b, lambda m: None)), "Cannot read"),
    "ft-classes-too-many": (_manifest(lambda m, b: m.update(classes=m["classes"] + ["extra"])), "disagree|do not fit"),
    "ft-classes-int": (_manifest(lambda m, b: m.update(classes=5)), "field 'classes'"),
    "ft-embed-dim-str": (_manifest(lambda m, b: m["backbone"].update(embed_dim="abc")), "field 'backbone.embed_dim'"),
}


def _commands(w: dict, bundle: Path, tmp: Path, kind: str) -> dict[str, list[str]]:
    common = {
        "predict": ["predict", str(bundle), str(w["image"])],
        "export": ["export", str(bundle), "--out", str(tmp / "x.onnx"), "--no-check"],
    }
    if kind == "head":
        return {**common,
                "evaluate": ["evaluate", str(bundle), str(w["cache"])],
                "finetune --init-head": ["finetune", str(w["data"]), "--backbone", "test_tiny", "--init-head",
                                         str(bundle), "--epochs", "1", "--num-workers", "0", "--out",
                                         str(tmp / "ft-out")]}
    return {**common, "extract --backbone": ["extract", str(w["data"]), "--backbone", str(bundle), "--out",
                                             str(tmp / "x.h5"), "--num-workers", "0"]}


def _check(w: dict, good: str, attack, reason: str, tmp_path: Path, kind: str) -> None:
    bundle = copy_bundle(w[good], tmp_path / "victim")
    attack(bundle, w)
    for command, args in _commands(w, bundle, tmp_path, kind).items():
        res = CliRunner().invoke(cli, args)
        out = res.output
        assert not w["canary"].exists(), f"{command}: the bundle ran code"
        assert res.exit_code == 2, f"{command}: rc {res.exit_code}\n{out}\n{res.exception!r}"
        assert "victim" in out, f"{command}: the message does not name the bundle: {out}"
        assert __import__("re").search(reason, out), f"{command}: expected {reason!r} in: {out}"
        assert "Traceback" not in out


@pytest.mark.parametrize("name", sorted(HEAD_ATTACKS))
def test_hostile_head_bundle_is_refused_by_every_command(world, name, tmp_path):
    build, reason = HEAD_ATTACKS[name]
    _check(world, "skl" if name != "classes-too-many-linear" else "lin", build, reason, tmp_path, "head")


@pytest.mark.parametrize("name", sorted(FT_ATTACKS))
def test_hostile_finetuned_bundle_is_refused_by_every_command(world, name, tmp_path):
    build, reason = FT_ATTACKS[name]
    _check(world, "ft", build, reason, tmp_path, "finetuned")


def test_linear_head_with_more_classes_than_outputs_is_refused(world, tmp_path):
    _check(world, "lin", *HEAD_ATTACKS["classes-too-many"], tmp_path, "head")


def test_good_bundles_work_with_the_same_commands(world, tmp_path):
    """The harness itself: the unspoilt bundles pass where the hostile ones are refused."""
    for good in ("skl", "ft"):
        res = CliRunner().invoke(cli, ["predict", str(world[good]), str(world["image"])])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["evaluate", str(world["skl"]), str(world["cache"])])
    assert res.exit_code == 0, res.output


def test_runstring_skops_refused_in_a_real_process(world, tmp_path):
    bundle = copy_bundle(world["skl"], tmp_path / "victim")
    HEAD_ATTACKS["skops-runstring"][0](bundle, world)
    proc = subprocess.run([sys.executable, "-m", "featbank.cli.main", "predict", str(bundle), str(world["image"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "runstring" in proc.stderr and "victim" in proc.stderr and "Traceback" not in proc.stderr
    assert not world["canary"].exists()
