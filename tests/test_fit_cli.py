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
    res = runner.invoke(cli, ["fit", str(tiny_cache), "--head", head, *params, "--out", str(out), "--name", "m", "--json"])
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
    shutil.copy(tiny_cache, d / "latest.h5")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["fit", "--param", "C=1.0"])
    assert res.exit_code == 0, res.output
    assert "Using the most recent cache" in res.output and "latest.h5" in res.output
    assert (tmp_path / "models" / "latest-linear" / "manifest.json").is_file()


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
        res = runner.invoke(cli, [*args[:1], *args[1:], *(["--out", str(out)] if args[0] == "fit" else [])])
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
    proc = subprocess.run([str(VENV_FEATBANK), "fit", str(tiny_cache), "--param", "C=1.0", "--out", str(tmp_path / "m"), "--name", "sub"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Bundle:" in proc.stdout and (tmp_path / "m" / "sub" / "head.safetensors").is_file()
    bad = subprocess.run([str(VENV_FEATBANK), "fit", str(tmp_path / "none.h5")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
