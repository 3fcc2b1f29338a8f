"""`featbank extract` and `featbank backbones`: wiring, messages and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featbank.cache import open_cache
from featbank.cli.main import cli
from featbank.extraction import default_cache_path

try:  # tests/ may be run as a package (tests/__init__.py) or as plain folder
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder  # type: ignore[no-redef]

TINY = ["--backbone", "test_tiny", "--engine", "torch", "--num-workers", "0", "--quiet"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_extract_default_location_printed_and_reused(image_folder: Path) -> None:
    r = run("extract", str(image_folder), *TINY)
    assert r.exit_code == 0, r.output
    expected = default_cache_path(image_folder, "test_tiny")
    assert f"Cache: {expected}" in r.output and "24 embedded" in r.output
    r = run("extract", str(image_folder), *TINY)
    assert r.exit_code == 0 and "up to date" in r.output and f"Cache: {expected}" in r.output


def test_extract_options_reach_the_library(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    r = run("extract", str(image_folder), "--out", str(out), *TINY, "--dtype", "float16", "--batch-size", "5",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    with open_cache(out) as c:
        assert c.metadata["dtype"] == "float16" and c.metadata["backbone"] == "test_tiny"
        assert c.metadata["engine"] == "torch" and c.n_samples == 24
    r = run("extract", str(image_folder), "--out", str(out), *TINY)
    assert r.exit_code == 2 and "dtype" in r.output and "--overwrite" in r.output
    r = run("extract", str(image_folder), "--out", str(out), *TINY, "--overwrite")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case", ["missing", "empty", "single"])
def test_extract_dataset_errors_exit_2(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "single":
        make_image_folder(data, classes=("only",), n_per_class=1)
    r = run("extract", str(data), *TINY)
    assert r.exit_code == 2
    assert {"missing": "does not exist", "empty": "No images", "single": "one class"}[case] in r.output
    assert "Traceback" not in r.output


def test_extract_usage_errors_exit_2(image_folder: Path) -> None:
    r = run("extract", str(image_folder), "--backbone", "resnet19", "--quiet")
    assert r.exit_code == 2 and "Did you mean 'resnet18'" in r.output
    r = run("extract", str(image_folder), *TINY, "--batch-size", "0")
    assert r.exit_code == 2
    r = run("extract", str(image_folder), *TINY, "--weights-file", str(image_folder / "nope.pt"))
    assert r.exit_code == 2 and "does not exist" in r.output


def test_extract_strict_exits_3_and_lists_skipped(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    (data / "b" / "zero.png").write_bytes(b"")
    out = tmp_path / "c.h5"
    r = run("extract", str(data), "--out", str(out), *TINY[:-1])
    assert r.exit_code == 0 and "b/zero.png: empty file" in r.output and "1 skipped" in r.output
    r = run("extract", str(data), "--out", str(out), *TINY, "--strict")
    assert r.exit_code == 3 and "b/zero.png" in r.output
    with open_cache(out) as c:
        assert c.n_samples == 4


def test_help_has_examples() -> None:
    r = run("extract", "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "--engine" in r.output and "--strict" in r.output
    r = run("--help")
    assert "130" in r.output and "extract" in r.output


def test_backbones_lists_the_registry() -> None:
    r = run("backbones")
    assert r.exit_code == 0 and "efficientnet_lite0" in r.output and "test_tiny" in r.output
    rows = json.loads(run("backbones", "--json").output)
    lite0 = next(row for row in rows if row["name"] == "efficientnet_lite0")
    assert lite0["embed_dim"] == 1280 and lite0["available"] is True


@pytest.mark.slow
def test_real_subprocess(image_folder: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("featbank")
    out = tmp_path / "sub.h5"
    proc = subprocess.run([str(exe), "extract", str(image_folder), "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert f"Cache: {out}" in proc.stdout
    with open_cache(out) as c:
        assert c.n_samples == 24
    proc = subprocess.run([str(exe), "extract", str(tmp_path / "nowhere"), *TINY], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


_HOLD_LOCK = """
import sys, time
from featbank.cache import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_holder_is_taken_over(image_folder: Path, tmp_path: Path) -> None:
    """Two extract runs into one cache would share its staging file: the second gets exit 2 at once."""
    out = tmp_path / "c.h5"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny",
                                       "--engine", "torch", "--num-workers", "0", "-q"])
        assert res.exit_code == 2, res.output
        assert f"Another process (pid {holder.pid}) is writing" in res.output and "Traceback" not in res.output
        assert not out.exists() and not (tmp_path / "c.h5.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead process's lock; its lock file is left behind and taken over.
    assert (tmp_path / "c.h5.lock").exists()
    res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny",
                                   "--engine", "torch", "--num-workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert len(open_cache(out)) == 24 and not (tmp_path / "c.h5.lock").exists()


def test_a_staging_file_open_elsewhere_is_left_alone(image_folder: Path, tmp_path: Path) -> None:
    """HDF5's own file lock (another program has the unfinished part open): exit 2, file kept."""
    import featbank
    from featbank.cache._parts import parts_dir
    from featbank.errors import Interrupted

    out = tmp_path / "c.h5"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        featbank.extract(image_folder, out, backbone="test_tiny", engine="torch", num_workers=0, batch_size=4,
                         progress=False, on_progress=stop)
    (staging,) = parts_dir(out).glob(".part-*.partial")
    code = ("import h5py, sys, time\nf = h5py.File(sys.argv[1], 'r+')\nprint('open', flush=True)\ntime.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code, str(staging)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "open"
        res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny",
                                       "--engine", "torch", "--num-workers", "0", "-q"])
        assert res.exit_code == 2 and "open in another program" in res.output, res.output
        assert staging.exists() and not out.exists()
    finally:
        other.kill()
        other.wait()


def test_temporaries_of_a_killed_commit_are_removed(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    stale = [tmp_path / ".c.h5.tmp4242", tmp_path / "c.h5.partial.tmp4243"]
    kept = [tmp_path / ".other.h5.tmp4242", tmp_path / "c.h5.tmpnotapid"]
    for p in stale + kept:
        p.write_bytes(b"half-written")
    res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "-b", "test_tiny",
                                   "--engine", "torch", "--num-workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_an_out_that_cannot_be_written_exits_2(image_folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    res = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(blocker / "c.h5"), "-b", "test_tiny",
                                   "--engine", "torch", "--num-workers", "0", "-q"])
    assert res.exit_code == 2, res.output
    assert "Cannot write next to" in res.output and "Traceback" not in res.output
    assert blocker.read_text() == "a file where a folder should be"


# -- schema v2 through the command line: kill and resume, incremental cost per part -------------------


def _part_states(out: Path) -> dict[str, tuple[int, str]]:
    """Published part -> (mtime_ns, sha256 of its bytes)."""
    import hashlib

    from featbank.cache._parts import parts_dir

    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(parts_dir(out).glob("part-*.h5"))}


def _assert_same_rows(a: Path, b: Path) -> None:
    import numpy as np

    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.paths == cb.paths and len(set(ca.paths)) == len(ca.paths)
        np.testing.assert_array_equal(ca.labels, cb.labels)
        np.testing.assert_array_equal(ca.fingerprints, cb.fingerprints)
        np.testing.assert_allclose(ca.load_embeddings(), cb.load_embeddings(), rtol=0, atol=1e-5)
        assert ca.cache_key == cb.cache_key and ca.metadata["complete"]


@pytest.mark.slow
def test_sigkill_mid_extract_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """A real `featbank extract` killed (SIGKILL) with parts finished and one in flight: the rerun keeps the
    finished parts as they are (not recomputed), resumes the one in flight and equals an uninterrupted run."""
    import signal
    import time

    from featbank.cache._parts import parts_dir

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=60, size=(160, 160))
    out = tmp_path / "c.h5"
    exe = Path(sys.executable).with_name("featbank")
    cmd = [str(exe), "extract", str(data), "--out", str(out), *TINY, "--batch-size", "2", "--shard-size", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if parts_dir(out).is_dir() and any(parts_dir(out).glob("part-*.h5")) and any(parts_dir(out).glob(".*.partial")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make the images larger"
    assert not out.exists()  # the index is published last
    finished = _part_states(out)
    assert 1 <= len(finished) < 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    after = _part_states(out)
    assert {k: v for k, v in after.items() if k in finished} == finished  # kept byte for byte, same mtime
    assert len(after) == 6 and not list(parts_dir(out).glob(".*.partial"))
    ref = tmp_path / "ref.h5"
    assert subprocess.run([*cmd[:4], str(ref), *cmd[5:]], capture_output=True, timeout=300).returncode == 0
    _assert_same_rows(out, ref)


def test_incremental_change_in_one_shard_rewrites_only_its_part(image_folder: Path, tmp_path: Path) -> None:
    """Add, change and delete files of one shard (dog) of a 3-shard cache: only the dog part is rewritten; the
    cat and fox parts keep their bytes and mtimes, and the cache equals a fresh extraction."""
    from PIL import Image

    from featbank.cache._parts import parts_dir

    out = tmp_path / "c.h5"
    res = run("extract", str(image_folder), "--out", str(out), *TINY, "--shard-size", "8")
    assert res.exit_code == 0 and "24 embedded" in res.output, res.output
    before = _part_states(out)
    assert len(before) == 3
    Image.new("RGB", (30, 30), (1, 2, 3)).save(image_folder / "dog" / "dog_new.png")  # added
    changed = next(image_folder.glob("dog/dog_003.*"))
    Image.new("RGB", (40, 48), (9, 200, 9)).save(changed)  # same name, new content
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    next(image_folder.glob("dog/dog_005.*")).unlink()  # deleted
    res = run("extract", str(image_folder), "--out", str(out), *TINY)  # the stored plan keeps its shards
    assert res.exit_code == 0, res.output
    assert "2 embedded, 22 reused, 2 dropped" in res.output, res.output
    after = _part_states(out)
    kept = {k: v for k, v in before.items() if not k.startswith("part-000001-")}
    assert len(kept) == 2 and {k: after.get(k) for k in kept} == kept
    (new_dog,) = [k for k in after if k not in before]
    assert new_dog.startswith("part-000001-") and len(after) == 3  # the old dog part was removed
    fresh = tmp_path / "fresh.h5"
    assert run("extract", str(image_folder), "--out", str(fresh), *TINY, "--shard-size", "8").exit_code == 0
    _assert_same_rows(out, fresh)
    assert sorted(p.name for p in parts_dir(out).iterdir()) == sorted(after)
