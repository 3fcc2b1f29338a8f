"""A job array through the public CLI (`featbank extract DATA --out CACHE --rank R --world W`, then
`--finalize`), the ExtractConfig every run stores in its index, and the launcher registry."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.errors import CacheError, ConfigError
from featbank.extraction import ExtractConfig, read_extract_config
from featbank.extraction.config import CONFIG_ATTR
from featbank.extraction.launchers import LAUNCHERS, get_launcher, launcher_name

from conftest import make_image_folder

TINY = ["--backbone", "test_tiny", "--engine", "torch", "--num-workers", "0", "--batch-size", "4", "-q"]
KW = dict(backbone="test_tiny", engine="torch", num_workers=0, batch_size=4, progress=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=10, size=(24, 20))


def _reference(data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ref.h5"
    featbank.extract(data, out, **KW)
    return out


def _assert_same_cache(got: Path, ref: Path) -> None:
    """Every row, label, split, fingerprint and embedding equal to the last bit."""
    with featbank.open_cache(got) as a, featbank.open_cache(ref) as b:
        assert a.paths == b.paths and a.classes == b.classes and a.cache_key == b.cache_key
        for name in ("labels", "splits", "fingerprints"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.embeddings[...], b.embeddings[...])
        assert a.skipped == b.skipped


def _run(*args: str):
    return CliRunner().invoke(cli, ["extract", *args], catch_exceptions=False)


def test_ranks_in_any_order_then_finalize_equal_one_process(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "array.h5"
    common = [str(folder), "--out", str(out), "--shard-size", "4", *TINY]
    r = _run(*common, "--rank", "2", "--world", "3")
    assert r.exit_code == 0, r.output
    assert "slice 2 of 3 done" in r.output and "--finalize" in r.output
    assert not out.exists()  # a slice publishes nothing
    r = _run(*common, "--finalize", "--world", "3")
    assert r.exit_code == 2
    assert "no part" in r.output and "Ranks that owe them (of --world 3): 0, 1." in r.output
    assert not out.exists()
    for rank in (0, 1, 0):  # a rerun of a finished slice costs nothing
        assert _run(*common, "--rank", str(rank), "--world", "3").exit_code == 0
    r = _run(*common, "--finalize")
    assert r.exit_code == 0, r.output
    assert "30 rows" in r.output
    _assert_same_cache(out, _reference(folder, tmp_path))
    stored = read_extract_config(out)
    assert stored is not None and stored.finalize and stored.rank is None
    assert _run(*common).output.count("up to date") == 1  # a plain rerun finds the array's cache complete


@pytest.mark.slow
def test_two_ranks_as_separate_processes_then_finalize_equal_one_process(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "slurm.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "featbank.cli", "extract", str(folder), "--out", str(out), "--shard-size", "7", *TINY]
    ranks = [subprocess.Popen([*cmd, "--rank", str(r), "--world", "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]  # both at once, like an array
    for p in ranks:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        assert "nothing published yet" in stdout
    res = subprocess.run([*cmd, "--finalize"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_cache(out, _reference(folder, tmp_path))


@pytest.mark.parametrize(("args", "words"), [
    (["--rank", "2", "--world", "2"], "--rank must lie in [0, 2)"),
    (["--rank", "-1", "--world", "2"], "--rank must lie in [0, 2)"),
    (["--rank", "0", "--world", "0"], "--world must be the number of jobs"),
    (["--rank", "0"], "--world must be the number of jobs"),
    (["--world", "4"], "needs --rank R"),
    (["--rank", "0", "--world", "2", "--finalize"], "give one or the other"),
    (["--rank", "0", "--world", "2", "--overwrite"], "--overwrite does not combine with --rank"),
    (["--rank", "0", "--world", "2", "--procs", "2"], "does not combine with"),
    (["--rank", "0", "--world", "2", "--launcher", "ray"], "does not combine with"),
    (["--rank", "one", "--world", "2"], "'one' is not a valid integer"),
])
def test_bad_slices_exit_2_with_a_message_before_any_work(folder: Path, tmp_path: Path, args: list[str],
                                                         words: str) -> None:
    out = tmp_path / "c.h5"
    r = _run(str(folder), "--out", str(out), *TINY, *args)
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert not out.exists() and not out.with_name("c.h5.parts").exists()


def test_the_index_stores_the_config_of_its_run(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    config = ExtractConfig(str(image_folder), str(out), shard_size=5, label_column="", **KW)
    featbank.extract(config)
    assert read_extract_config(out) == config
    assert config.label_column is None  # "" means no such column, spelled once
    with h5py.File(out, "r") as f:
        stored = json.loads(f.attrs[CONFIG_ATTR])
    assert stored["backbone"] == "test_tiny" and stored["shard_size"] == 5 and stored["data"] == str(image_folder)
    with featbank.open_cache(out) as c:  # the reader takes the new attribute in its stride
        assert len(c.paths) == 24


def test_the_cli_stores_what_was_typed(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    r = _run(str(image_folder), "--out", str(out), *TINY, "--window", "lung", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    got = read_extract_config(out)
    assert got == ExtractConfig(str(image_folder), str(out), window="lung", dtype="float16", **KW)


def test_a_cache_without_a_stored_config_still_opens(image_folder: Path, tmp_path: Path) -> None:
    out = _reference(image_folder, tmp_path)
    with h5py.File(out, "a") as f:
        del f.attrs[CONFIG_ATTR]
    assert read_extract_config(out) is None
    with featbank.open_cache(out) as c:
        assert len(c.paths) == 24
    assert featbank.extract(image_folder, out, **KW).up_to_date


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '{"out": "x.h5"}', '{"data": "d", "batch_size": -3}',
                                 '{"data": "d", "engine": "tensorrt"}', '{"data": 7}', '{"data": "d", "layers": {}}',
                                 "[" * 100_000])
def test_a_damaged_stored_config_is_a_cache_error(image_folder: Path, tmp_path: Path, raw: str) -> None:
    out = _reference(image_folder, tmp_path)
    with h5py.File(out, "a") as f:
        f.attrs[CONFIG_ATTR] = raw
    with pytest.raises(CacheError, match="extract config stored in .* is damaged"):
        read_extract_config(out)
    with featbank.open_cache(out) as c:  # the cache itself still reads
        assert len(c.paths) == 24


def test_a_stored_config_from_a_newer_featbank_keeps_what_it_knows(tmp_path: Path) -> None:
    config = ExtractConfig("data", batch_size=8)
    assert ExtractConfig.from_dict({**config.to_dict(), "some_future_option": 3}) == config


@pytest.mark.parametrize(("kw", "words"), [
    ({"batch_size": 0}, "'batch_size' parameter"),
    ({"batch_size": True}, "'batch_size' parameter"),
    ({"procs": 0}, "'procs' parameter"),
    ({"engine": "tensorrt"}, "'engine' parameter"),
    ({"device": "tpu"}, "'device' parameter"),
    ({"launcher": 3}, "'launcher' parameter must be a string"),
    ({"label_from": "xml"}, "'label_from' parameter"),
    ({"decode": "nvjpeg"}, "'decode' parameter"),
    ({"max_retries": -1}, "'max_retries' parameter"),
    ({"num_gpus": -0.5}, "'num_gpus' parameter"),
    ({"shard_size": 0}, "'shard_size' parameter"),
    ({"strict": "yes"}, "'strict' parameter"),
    ({"window": "sideways"}, "window"),
    ({"backbone": "test_tiny@32@64"}, "@"),
    ({"weights": 3}, "'weights' parameter"),
    ({"views": "4"}, "'views' parameter must be an integer >= 0"),
    ({"layers": {"stage3": 1}}, "'layers' parameter must be a spec"),
    ({"layers": ["stage3", 4]}, "'layers' parameter must be a spec"),
])
def test_the_config_refuses_bad_values_when_built(kw: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ExtractConfig("data", **kw)


def test_extract_takes_the_config_alone(image_folder: Path, tmp_path: Path) -> None:
    config = ExtractConfig(str(image_folder), str(tmp_path / "c.h5"), **KW)
    with pytest.raises(ConfigError, match="takes the ExtractConfig alone.*batch_size"):
        featbank.extract(config, batch_size=8)
    assert featbank.extract(dataclasses.replace(config, batch_size=8)).n_embedded == 24


def test_launchers_are_picked_by_name_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # featbank's own (others may be registered: docs/at-scale.md registers one when its example runs)
    assert {"local", "torchrun", "ray", "slice", "finalize"} <= set(LAUNCHERS)
    for name, launcher in LAUNCHERS.items():
        assert get_launcher(name) is launcher and callable(launcher.run)
    with pytest.raises(ConfigError, match="Unknown launcher 'slurm'"):
        get_launcher("slurm")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher_name(ExtractConfig("d")) == "local"
    assert launcher_name(ExtractConfig("d", launcher="ray")) == "ray"
    assert launcher_name(ExtractConfig("d", rank=1, world=2)) == "slice"
    assert launcher_name(ExtractConfig("d", finalize=True, world=2)) == "finalize"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_name(ExtractConfig("d")) == "torchrun"


def test_a_registered_launcher_runs_an_extract(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featbank.extraction.launchers import LocalLauncher, register_launcher

    calls = []
    monkeypatch.setattr("featbank.extraction.launchers.LAUNCHERS", dict(LAUNCHERS))  # the registry is restored after

    @register_launcher("inline")
    class InlineLauncher(LocalLauncher):
        def run(self, prepared, config, on_rows=None):
            calls.append((len(prepared.jobs), config.launcher))
            return super().run(prepared, config, on_rows)

    out = tmp_path / "inline.h5"
    report = featbank.extract(image_folder, out, launcher="inline", **KW)
    assert calls == [(1, "inline")] and report.n_embedded == 24
    _assert_same_cache(out, _reference(image_folder, tmp_path))
    for name in ("slice", "slurm"):  # the job array's launchers are picked by --rank / --finalize
        with pytest.raises(ConfigError, match="'launcher' parameter must be one of .*--rank R --world W, then --finalize"):
            featbank.extract(image_folder, tmp_path / "never.h5", launcher=name, **KW)
    assert not (tmp_path / "never.h5").exists()


def test_the_job_says_who_locks_cleans_and_publishes(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from featbank.extraction.job import resolve_job

    def job(**kw):
        return resolve_job(ExtractConfig(str(image_folder), str(tmp_path / "c.h5"), **{**KW, **kw}))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plain, piece, final = job(), job(rank=1, world=3), job(finalize=True)
    assert (plain.launcher, plain.holds_lock, plain.distributed, plain.rank, plain.world) == ("local", True, False, 0, 1)
    assert (piece.launcher, piece.holds_lock, piece.distributed, piece.rank, piece.world) == ("slice", False, True, 1, 3)
    assert (final.launcher, final.holds_lock, final.distributed) == ("finalize", True, False)
    assert job(engine="auto", device="cpu").engine == "onnxruntime" and plain.features is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ranked = job()
    assert (ranked.launcher, ranked.holds_lock, ranked.distributed, ranked.rank, ranked.world) == ("torchrun", False, True, 1, 2)
