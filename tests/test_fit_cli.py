"""featbank fit / evaluate / predict through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featbank.cli.main import cli

VENV_FEATBANK = Path(sys.executable).parent / "featbank"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("head,params", [("linear", []), ("mlp", ["--param", "hidden_sizes=(8,)", "--param", "max_epochs=20"]),
                                         ("KNeighborsClassifier", ["--param", "n_neighbors=3"])])
def test_each_head_end_to_end(tiny_cache, image_folder, tmp_path, head, params):
    runner = CliRunner()
    out = tmp_path / "models"
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--head", head, *params, "--out", str(out / "m"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["metrics"]["val"]["top1"] >= 0.6 and Path(info["path"]).is_dir()
    res = runner.invoke(cli, ["evaluate", str(out / "m"), str(tiny_cache)])
    assert res.exit_code == 0, res.output
    assert "top-1" in res.output
    res = runner.invoke(cli, ["predict", str(out / "m"), str(image_folder / "dog"), "--json", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.output)
    assert len(preds) == 8 and sum(p["label"] == "dog" for p in preds) >= 6
    assert len(preds[0]["top_k"]) == 2


@pytest.mark.slow
def test_fit_without_cache_uses_the_latest_and_says_so(tiny_cache, tmp_path, monkeypatch):
    import shutil

    from featbank.cache import default_cache_dir

    d = default_cache_dir() / "caches"
    d.mkdir(parents=True, exist_ok=True)
    # A schema-v2 cache is its index plus the parts folder beside it: move both, under the same name.
    shutil.copy(tiny_cache, d / tiny_cache.name)
    shutil.copytree(tiny_cache.with_name(tiny_cache.name + ".parts"), d / (tiny_cache.name + ".parts"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["fit", "--param", "C=1.0"])
    assert res.exit_code == 0, res.output
    assert "Using cache" in res.output and tiny_cache.name in res.output and "the only complete cache" in res.output
    assert (tmp_path / "models" / f"{tiny_cache.stem}-linear" / "manifest.json").is_file()


def test_refusals_exit_2_and_write_nothing(tiny_cache, tmp_path):
    runner = CliRunner()
    out = tmp_path / "models"
    for args, msg in [
        (["fit", str(tmp_path / "missing.h5")], "does not exist"),
        (["fit", str(tiny_cache), "--head", "LogisticRegresion"], "Did you mean"),
        (["fit", str(tiny_cache), "--param", "nonsense"], "key=value"),
        (["fit", str(tiny_cache), "--max-memory", "lots"], "--max-memory"),
        (["evaluate", str(tmp_path / "nope"), str(tiny_cache)], "does not exist"),
    ]:
        res = runner.invoke(cli, [*args[:1], *args[1:], *(["--out", str(out / "m")] if args[0] == "fit" else [])])
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output
    assert not out.exists()


def test_help_ends_with_examples():
    for cmd in ("fit", "evaluate", "predict"):
        res = CliRunner().invoke(cli, [cmd, "--help"])
        assert res.exit_code == 0
        assert res.output.rstrip().splitlines()[-1].strip().startswith("featbank ")
        assert "Examples:" in res.output


@pytest.mark.slow
def test_real_subprocess_fit(tiny_cache, tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([str(VENV_FEATBANK), "fit", str(tiny_cache), "--param", "C=1.0", "--out", str(tmp_path / "m" / "sub")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Bundle:" in proc.stdout and (tmp_path / "m" / "sub" / "head.safetensors").is_file()
    bad = subprocess.run([str(VENV_FEATBANK), "fit", str(tmp_path / "none.h5")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("args,msg", [
    (["--param", "C=-1"], "The 'C' parameter of LinearHead must be a float > 0. Got -1 instead."),
    (["--param", "max_iter=abc"], "The 'max_iter' parameter of LinearHead must be an int >= 1. Got 'abc' instead."),
    (["--param", "tol=-0.5"], "The 'tol' parameter of LinearHead"),
    (["--head", "mlp", "--param", "dropout=2"], "The 'dropout' parameter of MLPHead must be a float in [0, 1). Got 2 instead."),
    (["--head", "mlp", "--param", "hidden_sizes=(0,)"], "The 'hidden_sizes' parameter of MLPHead"),
    (["--head", "mlp", "--param", "lr=abc"], "The 'lr' parameter of MLPHead"),
    (["--head", "mlp", "--param", "max_epochs=2.5"], "The 'max_epochs' parameter of MLPHead"),
    (["--head", "SVC", "--param", "C=-1"], "The 'C' parameter of SVC"),
])
def test_bad_head_parameters_exit_2_before_any_work(tiny_cache, tmp_path, args, msg):
    out = tmp_path / "models"
    res = CliRunner().invoke(cli, ["fit", str(tiny_cache), *args, "--out", str(out / "m")])
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_out_is_the_bundle_folder_and_name_goes_under_models(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--param", "C=1.0", "--out", "elsewhere/x", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "elsewhere" / "x" / "manifest.json").is_file()
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--param", "C=1.0", "--name", "y", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "models" / "y" / "manifest.json").is_file()
    # Refitting into an existing bundle folder replaces it only with --overwrite.
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--param", "C=1.0", "--out", "models/y", "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--param", "C=1.0", "--out", "models/y", "-q", "--overwrite"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,msg", [
    # The old form: --out was the root of bundles named by --name.
    (["--out", "models", "--name", "x"], "--out models/x"),
    # A folder of other bundles is not a bundle folder.
    (["--out", "models"], "not a featbank bundle"),
    (["--out", "/proc/models"], "Cannot write"),
    (["--out", "afile/x"], "is a file, not a folder"),
])
def test_bad_output_locations_exit_2_before_fitting(tiny_cache, tmp_path, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "manifest.json").write_text("{}")
    (tmp_path / "afile").write_text("not a folder")
    res = CliRunner().invoke(cli, ["fit", str(tiny_cache), "--param", "C=1.0", *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert "Bundle:" not in res.output and "metrics" not in res.output.lower()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["other"]


def test_fit_help_quotes_parentheses_and_offers_quiet():
    import re

    res = CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200)
    assert res.exit_code == 0
    # (512,) unquoted is a shell syntax error: every example with parentheses is quoted.
    assert re.findall(r"\S*hidden_sizes=\(", res.output)
    assert all(m.startswith("'") for m in re.findall(r"\S*hidden_sizes=\(", res.output)), res.output
    assert "--quiet" in res.output and "-q" in res.output


def test_fit_options_map_onto_one_fit_config():
    """cli/fit.py's one mapping: every click option of fit becomes the FitConfig field of the same name."""
    from featbank.cli.fit import fit as fit_command
    from featbank.cli.fit import fit_config
    from featbank.errors import ConfigError
    from featbank.fitting import FitConfig

    ctx = fit_command.make_context("fit", ["c.h5", "--head", "SVC", "--param", "C=10", "--param", "kernel=rbf",
                                           "--class-weight", "balanced", "--shots", "3", "--seeds", "0,1",
                                           "--tta", "off", "--max-memory", "2GB", "--out", "m", "--no-refit"])
    options = {k: v for k, v in ctx.params.items() if k not in ("cache", "as_json", "quiet")}
    config = fit_config(options)
    assert config == FitConfig(head="SVC", params={"C": 10, "kernel": "rbf"}, class_weight="balanced", shots=3,
                               seeds=(0, 1), tta="off", max_memory="2GB", out="m", refit=False)
    assert set(options) - {"params", "seeds"} <= {f for f in FitConfig.__dataclass_fields__}
    ctx = fit_command.make_context("fit", ["c.h5", "--seeds", "0,x"])
    with pytest.raises(ConfigError, match="--seeds must be comma-separated integers"):
        fit_config({k: v for k, v in ctx.params.items() if k not in ("cache", "as_json", "quiet")})
    res = CliRunner().invoke(cli, ["fit", "missing.h5", "--class-weight", "balanced", "--auto"])
    assert res.exit_code == 2 and "--class-weight does not combine with --auto" in res.output
