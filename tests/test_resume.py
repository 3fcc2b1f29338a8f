"""Crash safety: kill a real extraction process at random points, then resume it.

Each trial runs ``featbank.extract`` in a subprocess, kills it (SIGKILL, or SIGINT to its process
group as a terminal's Ctrl-C does), checks that whatever cache file is on disk is still a valid
featbank cache, and reruns to completion: the result must hold each image exactly once and equal
an uninterrupted run within 1e-5.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featbank
from featbank.cache import open_cache
from featbank.cache._parts import parts_dir

try:  # tests/ may be run as a package (tests/__init__.py) or as plain folder
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder  # type: ignore[no-redef]

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)

# The child reports "start" before extracting and each progress call after it, then sleeps a
# little per batch so that the parent has time to kill it mid-run.
CHILD = r"""
import sys, time
import featbank
data, out, marker, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
def note(text):
    with open(marker, "a") as f:
        f.write(text + "\n")
def on_progress(done, total):
    note(f"{done}")
    time.sleep(delay)
note("start")
featbank.extract(data, out, backbone="test_tiny", engine="torch", batch_size=4, num_workers=0,
                 progress=False, on_progress=on_progress)
note("done")
"""


def _lines(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def run_and_kill(data: Path, out: Path, marker: Path, point: tuple, delay: float = 0.04) -> bool:
    """Start the child, kill it with SIGKILL at ``point``; True if it was killed before finishing.

    ``point`` is ``("start", seconds)``: that long after the child starts extracting;
    ``("progress", k)``: within the batch after the k-th; ``("end", total, jitter)``: after the
    last batch's callback (``delay``) plus ``jitter`` seconds, i.e. around the commit.
    """
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(out), str(marker), str(delay)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kind, value = point[0], point[1]
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            lines = _lines(marker)
            if kind == "start" and "start" in lines:
                time.sleep(value)
                break
            if kind == "progress" and len(lines) - 1 >= value:
                time.sleep(random.Random(int(value * 1000)).uniform(0, delay))
                break
            if kind == "end" and str(int(value)) in lines:
                time.sleep(max(0.0, delay + point[2]))
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}): {err.decode()[-2000:]}")
    return proc.returncode == -signal.SIGKILL


def partials(out: Path) -> list[Path]:
    """The unfinished parts of a cache (``.part-<shard>-<digest>.h5.partial`` in its parts folder)."""
    return sorted(parts_dir(out).glob(".part-*.partial")) if parts_dir(out).is_dir() else []


def assert_valid_subset(out: Path, reference: dict[str, np.ndarray]) -> int:
    """``out`` opens as a featbank cache whose rows are unique and equal the reference."""
    with open_cache(out) as c:
        assert len(set(c.paths)) == len(c.paths)
        emb = c.load_embeddings()
        for p, e in zip(c.paths, emb):
            np.testing.assert_allclose(e, reference[p], atol=1e-5)
        return c.n_samples


def assert_equal_to(out: Path, ref: Path) -> None:
    with open_cache(out) as a, open_cache(ref) as b:
        assert a.paths == b.paths and len(set(a.paths)) == len(a.paths)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.load_embeddings(), b.load_embeddings(), atol=1e-5, rtol=0)
        assert a.metadata["complete"]
    assert not partials(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("resume") / "data", classes=("a", "b"), n_per_class=40,
                             size=(16, 16))


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    featbank.extract(folder, out, **TINY)
    with open_cache(out) as c:
        return out, dict(zip(c.paths, c.load_embeddings()))


@pytest.fixture(scope="module")
def half_cache(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete cache of every other file: the later run then has an existing file to protect."""
    hidden = sorted(folder.rglob("*_0[0-9][13579].*"))
    for p in hidden:
        p.rename(p.with_name("." + p.name))
    try:
        out = tmp_path_factory.mktemp("half") / "half.h5"
        featbank.extract(folder, out, **TINY)
    finally:
        for p in hidden:
            p.with_name("." + p.name).rename(p)
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(folder: Path, reference, half_cache: Path, tmp_path: Path) -> None:
    ref_path, ref = reference
    rng = random.Random(20240601)
    # (existing cache?, kill points in order); each trial ends with an uninterrupted rerun.
    trials = [
        (True, [("start", rng.uniform(0.0, 0.3))]),  # scanning, loading, creating the staging file
        (False, [("start", rng.uniform(0.2, 0.8))]),
        (True, [("progress", rng.randint(1, 4)), ("progress", rng.randint(1, 3))]),
        (False, [("progress", rng.randint(5, 15)), ("start", rng.uniform(0.0, 0.5))]),
        (True, [("end", 40, rng.uniform(-0.02, 0.005))]),  # after the last batch: around the commit
        (False, [("end", 80, rng.uniform(-0.01, 0.005)), ("progress", 2)]),
    ]
    killed = 0
    for t, (existing, points) in enumerate(trials):
        out = tmp_path / f"trial{t}.h5"
        if existing:  # a v2 cache moves with its parts folder, under its own name
            shutil.copytree(half_cache.parent, tmp_path / f"trial{t}")
            out = tmp_path / f"trial{t}" / half_cache.name
        for k, point in enumerate(points):
            was_killed = run_and_kill(folder, out, tmp_path / f"m{t}_{k}", point)
            print(f"trial {t} kill {k} at {point}: {'killed' if was_killed else 'had finished'}")
            killed += was_killed
            if existing or out.exists():
                n = assert_valid_subset(out, ref)
                assert n >= (40 if existing else 0), (t, point, n)
        report = featbank.extract(folder, out, **TINY)
        assert report.n_images == 80 and report.n_embedded + report.n_reused + report.n_resumed == 80
        assert_equal_to(out, ref_path)
    assert killed >= 6, killed


@pytest.mark.slow
def test_resume_after_the_folder_changed(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_per_class=30, size=(16, 16), seed=3)
    out = tmp_path / "c.h5"
    assert run_and_kill(data, out, tmp_path / "m", ("progress", 6))
    assert partials(out) and not out.exists()
    (data / "a" / "a_000.png").unlink()  # finished by the killed run
    (data / "b" / "b_029.jpg").unlink()  # not reached yet
    Image.new("RGB", (16, 16), (3, 4, 5)).save(data / "a" / "zzz_new.png")
    report = featbank.extract(data, out, **TINY)
    assert report.n_images == 59
    # The killed run flushed >= 6 batches of 4 rows; all but a_000 are still current and are not embedded again.
    assert report.n_embedded <= 59 - 23, report
    assert not partials(out)
    assert_equal_to(out, featbank.extract(data, tmp_path / "fresh.h5", **TINY).path)


_LOST_CONSUMER = """
import os, socket, sys, time
from multiprocessing import resource_sharer
if sys.argv[1] == "quiet":
    from featbank._device import quiet_worker_init
    quiet_worker_init(0)
r, w = os.pipe()
resource_sharer.DupFd(r)  # what pickling a tensor's shared memory does in a DataLoader worker: starts the sharer
address = resource_sharer._resource_sharer._address  # a Unix socket's path on Linux, else (host, port)
with socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET) as s:
    s.connect(address)  # a consumer that leaves mid-handshake (the main process on Ctrl-C)
time.sleep(0.5)
sys.excepthook(ValueError, ValueError("still reported"), None)
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_a_decode_worker_is_quiet_when_its_consumer_leaves(mode: str) -> None:
    """The real multiprocessing resource sharer, its consumer gone mid-handshake: a worker set up by
    ``quiet_worker_init`` prints no traceback for it (Python's default hook does), and still reports
    any other error."""
    proc = subprocess.run([sys.executable, "-c", _LOST_CONSUMER, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: still reported" in proc.stderr
    # the sharer's own traceback (BrokenPipeError, ConnectionResetError or EOFError, as the timing falls)
    assert ("Traceback" in proc.stderr) == (mode == "default"), proc.stderr


def _flat_images(data: Path) -> Path:
    """400 flat 8x8 images in two class folders: next to nothing to decode, for runs timed by test_sleep."""
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(200):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(data / c / f"{i:03d}.png")
    return data


def _ctrl_c_mid_run(cmd: list[str], out: Path, after: float) -> str:
    """Run ``cmd``, press Ctrl-C ``after`` seconds past its first ``.partial``; check it stopped as it should
    (exit 130, what is kept said, no traceback, the partials kept, no index) and return its stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not partials(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(after)
    assert proc.poll() is None, "finished before Ctrl-C: give it more work"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Run the same command again to resume" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert partials(out) and not out.exists()
    return stderr


@pytest.mark.slow
def test_ctrl_c_with_procs_exits_130_without_a_traceback_per_worker_and_resumes(tmp_path: Path) -> None:
    data = _flat_images(tmp_path / "data")
    out = tmp_path / "c.h5"
    exe = Path(sys.executable).with_name("featbank")
    cmd = [str(exe), "extract", str(data), "--out", str(out), "--backbone", "test_sleep", "--weights", "0.2",
           "--engine", "torch", "--procs", "2", "--batch-size", "8", "--shard-size", "1000"]
    stderr = _ctrl_c_mid_run(cmd, out, after=1.0)  # the workers get it too
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]

    report = featbank.extract(data, out, backbone="test_sleep", weights="0.2", engine="torch", procs=2, batch_size=8,
                              shard_size=1000, progress=False)
    assert report.n_resumed > 0 and report.n_resumed + report.n_embedded == 400 and not partials(out)


@pytest.mark.slow
def test_stopping_from_on_progress_with_procs_stops_every_worker_and_resumes(tmp_path: Path) -> None:
    """The API's way to stop a run (on_progress raises KeyboardInterrupt) leaves no worker running behind the
    caller that caught it, and loses no finished part."""
    import multiprocessing

    data = _flat_images(tmp_path / "data")
    out = tmp_path / "c.h5"
    opts = dict(backbone="test_sleep", weights="0.2", engine="torch", procs=2, batch_size=8, shard_size=100,
                progress=False)
    seen = []

    def stop(done: int, total: int) -> None:
        seen.append(done)
        raise KeyboardInterrupt

    with pytest.raises(featbank.errors.Interrupted, match="Run the same command again to resume"):
        featbank.extract(data, out, on_progress=stop, **opts)
    assert len(seen) == 1 and 0 < seen[0] < 400
    assert multiprocessing.active_children() == []  # none outlives the call
    assert not out.exists()
    report = featbank.extract(data, out, **opts)
    kept = report.n_reused + report.n_resumed  # finished parts, and rows of unfinished ones
    assert kept >= seen[0] and kept + report.n_embedded == 400 and not partials(out)


@pytest.mark.slow
def test_ctrl_c_with_decode_workers_exits_130_and_resumes(tmp_path: Path) -> None:
    # Large smooth JPEGs take tens of ms each to decode: time to press Ctrl-C mid-run.
    data = tmp_path / "data"
    y, x = np.mgrid[0:1400, 0:1400]
    grad = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    src = tmp_path / "src.jpg"
    Image.fromarray(grad).save(src, quality=85)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(100):
            shutil.copy(src, data / c / f"{i:03d}.jpg")
    out = tmp_path / "c.h5"
    exe = Path(sys.executable).with_name("featbank")
    cmd = [str(exe), "extract", str(data), "--out", str(out), "--backbone", "test_tiny", "--engine", "torch",
           "--num-workers", "2", "--batch-size", "4"]
    _ctrl_c_mid_run(cmd, out, after=0.7)

    proc = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not partials(out)
    with open_cache(out) as c:
        assert c.n_samples == 200 and len(set(c.paths)) == 200
        emb = c.load_embeddings()
    np.testing.assert_allclose(emb, np.broadcast_to(emb[0], emb.shape), atol=1e-5)  # identical images
