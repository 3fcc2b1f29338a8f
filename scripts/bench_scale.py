"""Benchmark the schema-v2 cache at scale, ratios measured in one run.

1. Incremental add of 10 images to caches of 10^4, 10^5, 10^6 rows (synthetic embeddings written
   through the real part writer and index; the 10 new rows' "embeddings" are synthetic too, so
   what is timed is the cache update, not the backbone): v2 rewrites one part (copying its
   unchanged rows) and the index; v1 (``write_cache``, today's path) rewrites the whole file.
   Planning (replan + row digests, pure Python over every key) is reported apart: it is O(N) like
   the folder scan that precedes it, but microseconds per row.
2. Reading all embeddings of a v2 cache vs the same rows in one contiguous dataset read with h5py:
   featbank's read (``load_embeddings()``: straight from the part files, every value checked) on an
   open cache and as the first read after ``open_cache`` (see read_times), the same rows written as
   ONE part read by featbank (so index-vs-one-part isolates what the index and the parts cost, the
   value check on both sides) and, for information, plain h5py through the index's virtual dataset.
   Repeats are interleaved (the order rotates) and the ratio is of the best times, so CPU drift
   on a shared machine cancels; the ratio of median CPU times is printed too.
3. ``--procs 1`` vs ``--procs 2`` extraction throughput with the ``test_tiny`` backbone.
4. ``--sim``: k = 1, 2, 4, 8 workers (``--procs`` and Ray) on 12,000 and 50,000 tiny real 8x8 PNGs
   with ``test_sleep`` (a fixed wait per batch that uses no CPU: a simulated accelerator, so scaling
   is measurable on 2 cores; default 0.2 s per batch of 64, i.e. at most 320 rows/s per worker),
   work units vs today's whole shards side by side. Every run is a fresh ``featbank extract``
   process from no cache. Launchers: ``procs`` (``--procs k``), ``ray`` (``RAY_ADDRESS=local``, the
   launcher's own private cluster, started inside the run) and ``ray-cluster`` (a cluster of k CPUs
   started beforehand with ``ray start --head``, as users at scale run one; its start is not timed,
   it is stopped after its runs). Two times per run: end to end, from starting the command to the
   index written (its mtime), and the steady state, from the first batch of any simulated
   accelerator starting to the last one ending (test_sleep's trace); and the start-up, the first
   batch's start after the command's. Speed-up = the one-worker run's time (``--procs 1``, the same
   for every launcher) / the k-worker run's. The start-up bound is the best end-to-end speed-up any
   scheduler could reach given the run's measured start-up S_k: one worker's end to end / (S_k +
   one worker's steady state / k); where it is below 0.9k, start-up, not scheduling, misses the
   target. A run that did not put exactly N rows through the accelerators and into the index
   stops the benchmark: no ratio is printed from it.

Usage:
    python scripts/bench_scale.py --sizes 10000 100000 1000000 --embed-dim 128 --work /tmp/bench_scale
    python scripts/bench_scale.py --skip-incremental --skip-procs    # the read comparison alone
    python scripts/bench_scale.py --sim --work /tmp/bench_sim        # work units vs whole shards, k = 1..8
    python scripts/bench_scale.py --sim --sim-sizes 12000 --sim-launchers procs ray --work /tmp/bench_sim
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featbank.cache import write_cache
from featbank.cache._index import IndexContents, PlannedPart, finalize_index
from featbank.cache._parts import PartRows, PartWriter, ShardRows, parts_dir, rows_digest, write_part
from featbank.extraction._plan import DEFAULT_SHARD_SIZE, assign_rows, plan_shards, replan
from featbank.extraction.units import _reuse_rows

KEY = "bench" + "0" * 59
CLASSES = ["a", "b"]


def _keys(n: int) -> list[str]:
    return [f"{'ab'[i * 2 // n]}/{i:09d}.png" for i in range(n)]


def _rows(keys: list[str]) -> PartRows:
    n = len(keys)
    fps = np.stack([np.full(n, 1000), np.arange(n)], 1).astype(np.int64)
    return PartRows(keys, fps, np.array([0 if k[0] == "a" else 1 for k in keys], np.int64), np.zeros(n, np.int8))


def build_v2(index: Path, keys: list[str], dim: int, shard_size: int) -> None:
    plan = plan_shards(keys, shard_size)
    where = assign_rows(plan, keys)
    rng = np.random.default_rng(0)
    planned = []
    for i, s in enumerate(plan.shards):
        rows = _rows([keys[r] for r in np.flatnonzero(where == i)])
        write_part(parts_dir(index), ShardRows(s.shard_id, KEY, rows, CLASSES), rng.standard_normal((len(rows), dim), np.float32))
        planned.append(PlannedPart(s.shard_id, len(rows), rows_digest(rows, CLASSES)))
    finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "synthetic"}, plan_json=plan.to_json()))


def add_v2(index: Path, keys: list[str], new: list[str], dim: int) -> dict[str, float]:
    """The v2 incremental path for 10 new rows: replan, one part rewritten (reuse + 10 rows), index."""
    from featbank.cache._index import read_parts_table
    from featbank.extraction._plan import Plan

    t0 = time.perf_counter()
    with h5py.File(index, "r") as f:
        old = Plan.from_json(f.attrs["plan"])
    table = {p.shard_id: p for p in read_parts_table(index)}
    all_keys = sorted(keys + new)
    plan = replan(old, all_keys)
    where = assign_rows(plan, all_keys)
    touched = set(assign_rows(plan, new).tolist())
    planned, jobs = [], []
    for i, s in enumerate(plan.shards):
        if i in touched:
            rows = _rows([all_keys[r] for r in np.flatnonzero(where == i)])
            planned.append(PlannedPart(s.shard_id, len(rows), rows_digest(rows, CLASSES)))
            jobs.append((s.shard_id, rows))
        else:
            p = table[s.shard_id]  # untouched: its digest is the one the index recorded
            planned.append(PlannedPart(s.shard_id, p.n_rows, p.rows_digest))
    t_plan = time.perf_counter() - t0
    t1 = time.perf_counter()
    folder = parts_dir(index)
    for sid, rows in jobs:
        w = PartWriter.create(folder, ShardRows(sid, KEY, rows, CLASSES), dim, "float32")
        _reuse_rows(w, folder, [table[sid].name])
        todo = np.flatnonzero(~w.done_mask())
        w.write_rows(todo, np.ones((len(todo), dim), np.float32))
        w.finish({})
    finalize_index(index, planned, KEY, IndexContents(CLASSES, {"backbone": "synthetic"}, plan_json=plan.to_json()),
                   known=list(table.values()))
    return {"plan_s": t_plan, "write_s": time.perf_counter() - t1}


def build_v1(path: Path, n: int, dim: int) -> None:
    """A v1 cache of ``n`` synthetic rows, written by today's writer."""
    src = path.with_name("src.h5")
    with h5py.File(src, "w") as f:
        ds = f.create_dataset("embeddings", (n, dim), np.float32)
        rng = np.random.default_rng(0)
        for s in range(0, n, 1 << 16):
            ds[s:s + (1 << 16)] = rng.standard_normal((min(1 << 16, n - s), dim), np.float32)
    _write_v1(path, [("old", src, np.arange(n))], _keys(n), dim)
    src.unlink()


def _write_v1(path: Path, sources: list, keys: list[str], dim: int) -> None:
    write_cache(path, sources=sources, rows=_rows(keys), classes=CLASSES, skipped=[], embed_dim=dim, dtype="float32",
                attrs={"cache_key": KEY})


def add_v1(path: Path, keys: list[str], new: list[str], dim: int) -> float:
    """Today's path: the 10 new rows in a staging file, then the whole cache rewritten."""
    staging = path.with_name("new.h5")
    with h5py.File(staging, "w") as f:
        f["embeddings"] = np.ones((len(new), dim), np.float32)
    all_keys = sorted(keys + new)
    pos = {k: i for i, k in enumerate(keys)}
    newpos = {k: i for i, k in enumerate(new)}
    old_map = np.array([pos.get(k, -1) for k in all_keys], np.int64)
    new_map = np.array([newpos.get(k, -1) for k in all_keys], np.int64)
    t0 = time.perf_counter()
    _write_v1(path, [("old", path, old_map), ("new", staging, new_map)], all_keys, dim)
    return time.perf_counter() - t0


def _read_h5py(path: Path) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as f:
        f["embeddings"][...]
    return time.perf_counter() - t0, time.process_time() - c0


def _read_featbank(cache: Any) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    cache.load_embeddings()
    return time.perf_counter() - t0, time.process_time() - c0


def _read_featbank_first(index: Path) -> tuple[float, float]:
    from featbank.cache import open_cache

    with open_cache(index) as cache:  # the index's checks are not timed; opening the part files is
        return _read_featbank(cache)


def read_times(index: Path, contiguous: Path, one_part: Path, repeats: int) -> dict[str, float]:
    """Best wall time and median CPU time of each way to read every embedding, repeats interleaved.

    ``featbank``: ``load_embeddings()`` on an open cache (part files already open: a second read,
    or a streaming epoch); ``featbank_first``: the first read after ``open_cache`` (opening each part
    file, ~0.4 ms each, included; the first large allocation after open_cache's own reads also
    costs more, a memory effect outside the read path); ``vds``: plain h5py through the index's
    virtual dataset, without featbank's value check; ``featbank_one_part``: ``load_embeddings()`` of
    the same rows written as one part (one contiguous dataset, read with featbank's checks), so
    ``featbank / featbank_one_part`` is the cost of the index and the parts alone.
    """
    from featbank.cache import open_cache

    with open_cache(index) as cache, open_cache(one_part) as one:
        ways = {"contiguous": lambda: _read_h5py(contiguous), "featbank": lambda: _read_featbank(cache),
                "featbank_one_part": lambda: _read_featbank(one),
                "featbank_first": lambda: _read_featbank_first(index), "vds": lambda: _read_h5py(index)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        names = list(ways)
        for r in range(repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always runs after another
                times[k].append(ways[k]())
    out = {f"read_{k}_s": min(w for w, _ in v) for k, v in times.items()}
    out.update({f"read_{k}_cpu_s": float(np.median([c for _, c in v])) for k, v in times.items()})
    return out


def contiguous_copy(index: Path, out: Path) -> None:
    with h5py.File(index, "r") as src, h5py.File(out, "w") as dst:
        ds = dst.create_dataset("embeddings", src["embeddings"].shape, np.float32)  # contiguous layout
        for s in range(0, ds.shape[0], 1 << 16):
            ds[s:s + (1 << 16)] = src["embeddings"][s:s + (1 << 16)]


def bench_incremental(work: Path, sizes: list[int], dim: int, shard_size: int, repeats: int = 3) -> dict:
    """Median of ``repeats`` incremental adds per size (v2); one full rewrite (v1) per size."""
    out = {}
    for n in sizes:
        d = work / f"n{n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        keys = _keys(n)
        build_v2(d / "v2.h5", keys, dim, shard_size)
        runs = []
        for r in range(repeats):
            new = [f"a/{n // 4 + r * 7:09d}.new{j}.png" for j in range(10)]  # 10 files landing in one shard
            os.sync()  # flush the build's dirty pages: an fsync must not pay for them (ext4 data=ordered)
            runs.append(add_v2(d / "v2.h5", keys, new, dim))
            keys = sorted(keys + new)
        build_v1(d / "v1.h5", n, dim)
        os.sync()
        v1 = add_v1(d / "v1.h5", _keys(n), [f"a/{n // 4:09d}.new{j}.png" for j in range(10)], dim)
        row = {"rows": n, "v2_write_s": float(np.median([x["write_s"] for x in runs])),
               "v2_plan_s": float(np.median([x["plan_s"] for x in runs])), "v1_rewrite_s": v1}
        out[n] = row
        print(json.dumps(row), flush=True)
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_read(work: Path, n: int, dim: int, shard_size: int, repeats: int) -> dict:
    """Read every embedding of an n x dim cache: featbank, plain h5py through the index, one contiguous dataset."""
    d = work / f"read{n}x{dim}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    build_v2(d / "v2.h5", _keys(n), dim, shard_size)
    contiguous_copy(d / "v2.h5", d / "contiguous.h5")
    build_v2(d / "one.h5", _keys(n), dim, n)  # the same rows in one part
    os.sync()
    row = {"rows": n, "embed_dim": dim, "repeats": repeats,
           **read_times(d / "v2.h5", d / "contiguous.h5", d / "one.h5", repeats)}
    for k in ("featbank", "featbank_first", "vds", "featbank_one_part"):  # relative to the contiguous file: 1.0 = as fast
        row[f"{k}_over_contiguous"] = row["read_contiguous_s"] / row[f"read_{k}_s"]
        row[f"{k}_over_contiguous_cpu"] = row["read_contiguous_cpu_s"] / row[f"read_{k}_cpu_s"]
    # Through the index (many parts) vs one contiguous part, featbank's checks on both sides.
    row["featbank_over_featbank_one_part"] = row["read_featbank_one_part_s"] / row["read_featbank_s"]
    print(json.dumps(row), flush=True)
    shutil.rmtree(d, ignore_errors=True)
    return row


def bench_procs(work: Path, n_images: int, shard_size: int) -> dict:
    from PIL import Image

    from featbank.extraction import ExtractConfig
    from featbank.extraction.job import resolve_job
    from featbank.extraction.launchers import run_prepared
    from featbank.extraction.units import RowSource, prepare
    from featbank.sources import scan_folder

    data = work / "images"
    shutil.rmtree(data, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        (data / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(data / "ab"[i % 2] / f"{i:05d}.png")
    out = {}
    for procs in (1, 2):
        index = work / f"procs{procs}.h5"
        job = resolve_job(ExtractConfig(str(data), str(index), backbone="test_tiny", engine="torch",
                                               num_workers=0, shard_size=shard_size, overwrite=True))
        prep = prepare(RowSource.from_index(scan_folder(data)), job)
        t0 = time.perf_counter()
        run_prepared(prep, procs=procs)
        out[procs] = n_images / (time.perf_counter() - t0)
        print(json.dumps({"procs": procs, "images_per_s": out[procs]}), flush=True)
    return out


# ------------------------------------------------------------------------------------------
# 4. Scaling with a simulated accelerator (test_sleep: a fixed wait per batch, no CPU)
# ------------------------------------------------------------------------------------------


def _tiny_images(folder: Path, n: int) -> Path:
    """``n`` real 8x8 PNGs in two classes (decoding them costs next to nothing)."""
    from PIL import Image

    if folder.exists() and sum(1 for _ in folder.rglob("*.png")) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")
    return folder


def _whole_shards(jobs: Any, workers: int, plan_rows: Any = None) -> Any:
    """Today's hand-out before work units: whole shards, in plan order."""
    from featbank.extraction._schedule import Schedule

    return Schedule(list(jobs), [(j.shard_id, 0) for j in jobs])


def _run_one(argv: list[str]) -> None:
    """The timed command itself (a fresh process): ``featbank extract ...``, or with whole shards handed
    out (``--whole`` first: every launcher module's ``plan_work`` replaced, whatever its name)."""
    import importlib
    import pkgutil

    if argv and argv[0] == "--whole":
        argv = argv[1:]
        import featbank.extraction as ex
        from featbank.extraction import _schedule

        for m in pkgutil.iter_modules(ex.__path__):
            mod = importlib.import_module(f"featbank.extraction.{m.name}")
            if mod is not _schedule and getattr(mod, "plan_work", None) is _schedule.plan_work:
                mod.plan_work = _whole_shards
    from featbank.cli.main import cli

    cli.main(["extract", *argv], prog_name="featbank", standalone_mode=True)


def _timed_extract(data: Path, out: Path, launcher: str, k: int, seconds: float, batch: int, n: int,
                   whole: bool = False, cluster: RayCluster | None = None) -> dict[str, float]:
    """One ``featbank extract`` in a fresh process: end-to-end and steady-state seconds, checked.

    End to end: from starting the command to the index written (its mtime). Steady state: the first
    batch of the simulated accelerators starting to the last one ending (test_sleep's trace).
    Raises SystemExit (no ratio printed) unless the command embedded exactly ``n`` rows, each once
    through an accelerator, and the index holds ``n`` rows. ``cluster``: run on that running Ray
    cluster (launcher ``ray-cluster``), whose workers log their batches in the cluster's trace folder.
    """
    import subprocess

    from featbank.backbones._tiny import SLEEP_TRACE_ENV, read_sleep_trace
    from featbank.cache import open_cache

    for p in out.parent.glob(f"{out.name}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if cluster is not None:
        trace = cluster.clear_trace()
    else:
        trace = Path(tempfile.mkdtemp(prefix="sleep-trace-", dir=out.parent))
    env = {**os.environ, SLEEP_TRACE_ENV: str(trace),
           "RAY_ADDRESS": cluster.address if cluster is not None else "local"}
    cmd = [sys.executable, __file__, "--run-one", *(["--whole"] if whole else []), str(data), "--out", str(out),
           "--backbone", "test_sleep", "--weights", str(seconds), "--engine", "torch", "--num-workers", "0",
           "--batch-size", str(batch), "--procs", str(k), "--launcher", "local" if launcher == "procs" else "ray"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    what = f"{launcher} k={k}{' whole shards' if whole else ''} on {n} rows"
    if res.returncode != 0:
        raise SystemExit(f"{what} failed ({res.returncode}): {res.stderr[-2000:]}")
    end = out.stat().st_mtime_ns / 1e9
    batches = read_sleep_trace(trace)
    if cluster is None:
        shutil.rmtree(trace)
    embedded = sum(rows for _, _, rows in batches)
    with open_cache(out) as cache:
        n_index = len(cache)
    if f"{n} embedded" not in res.stdout + res.stderr or embedded != n or n_index != n:
        raise SystemExit(f"{what}: {embedded} rows through the accelerators, {n_index} in the index, not {n}: "
                         f"no ratio printed.\n{res.stdout[-500:]}")
    return {"end_to_end_s": end - t0, "steady_s": batches[-1][1] - batches[0][0] if batches else float("nan"),
            "first_batch_after_s": batches[0][0] - t0, "after_last_batch_s": end - max(b for _, b, _ in batches),
            "batches": len(batches)}


class RayCluster:
    """A Ray cluster of ``cpus`` CPUs started beforehand (``ray start --head --block``), the way a user at
    scale runs one; its workers log test_sleep's batches in ``trace``. Stopped by signalling the
    ``ray start`` process this benchmark started (which stops the cluster's own processes)."""

    def __init__(self, cpus: int, work: Path, port: int = 6379):
        import subprocess

        from featbank.backbones._tiny import SLEEP_TRACE_ENV

        self.trace = work / f"cluster-trace-{cpus}"
        self.trace.mkdir(parents=True, exist_ok=True)
        self.address = "auto"  # as users do: the cluster this node runs (ray start wrote where it is)
        code = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "start", "--head", "--block", "--num-cpus", str(cpus), "--port", str(port),
             "--include-dashboard=false", "--disable-usage-stats"],
            env={**os.environ, SLEEP_TRACE_ENV: str(self.trace)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_up(port)

    def _wait_up(self, port: int, timeout: float = 120.0) -> None:
        import socket

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start --head exited with code {self.proc.returncode}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0 and Path("/tmp/ray/ray_current_cluster").exists():
                    time.sleep(5.0)  # the GCS answers before the raylet has registered its node
                    return
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"no Ray cluster on port {port} after {timeout:.0f} s")

    def clear_trace(self) -> Path:
        for p in self.trace.glob("sleep-*.txt"):
            p.unlink()
        return self.trace

    def stop(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a cluster that does not stop is killed
            self.proc.kill()
            self.proc.wait()


def _start_up_bound(base: dict[str, float], run: dict[str, float], k: int) -> float:
    """The best end-to-end speed-up any scheduler could reach given this run's start-up: the one-worker
    run's end-to-end time over (this run's first batch after + the one-worker steady state / k)."""
    return base["end_to_end_s"] / (run["first_batch_after_s"] + base["steady_s"] / k)


def bench_sim(work: Path, sizes: list[int], ks: list[int], launchers: list[str], seconds: float, batch: int) -> list[dict]:
    """k workers over one worker (``--procs 1``), work units and today's whole shards side by side.

    Every figure comes from a fresh ``featbank extract`` process; ratios are of the one-worker run's
    time over the k-worker run's, end to end and in the steady state (see :func:`_timed_extract`).
    """
    out: list[dict] = []
    for n in sizes:
        data = _tiny_images(work / f"sim{n}", n)
        base = _timed_extract(data, work / "sim.h5", "procs", 1, seconds, batch, n)
        print(json.dumps({"rows": n, "launcher": "procs", "k": 1, **_rounded(base)}), flush=True)
        for launcher in launchers:
            for k in [k for k in ks if k > 1]:
                cluster = RayCluster(k, work) if launcher == "ray-cluster" else None
                try:
                    row = _sim_row(data, work, launcher, k, seconds, batch, n, base, cluster)
                finally:
                    if cluster is not None:
                        cluster.stop()
                out.append(row)
                print(json.dumps(_rounded(row)), flush=True)
        out.append({"rows": n, "launcher": "procs", "k": 1, "units": base, "whole": base, "units_speedup": 1.0,
                    "whole_speedup": 1.0, "units_steady_speedup": 1.0, "whole_steady_speedup": 1.0,
                    "units_bound": 1.0, "whole_bound": 1.0})
    return out


def _sim_row(data: Path, work: Path, launcher: str, k: int, seconds: float, batch: int, n: int,
             base: dict[str, float], cluster: RayCluster | None) -> dict[str, Any]:
    row: dict[str, Any] = {"rows": n, "launcher": launcher, "k": k}
    for name, whole in (("units", False), ("whole", True)):
        t = _timed_extract(data, work / "sim.h5", launcher, k, seconds, batch, n, whole, cluster)
        row[name] = t
        row[f"{name}_speedup"] = base["end_to_end_s"] / t["end_to_end_s"]
        row[f"{name}_steady_speedup"] = base["steady_s"] / t["steady_s"]
        row[f"{name}_bound"] = _start_up_bound(base, t, k)
    return row


def _rounded(d: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def print_sim_table(rows: list[dict], seconds: float, batch: int) -> None:
    print(f"\ntest_sleep: {seconds:g} s per batch of {batch} ({batch / seconds:.0f} rows/s per worker at most); "
          "speed-up = one worker's time / k workers' time")
    print("start-up: the first batch of any worker, seconds after the command started; start-up bound: the best "
          "end-to-end speed-up any scheduler could reach with that start-up (one worker's end to end / (start-up + "
          "one worker's steady state / k)); reachable: whether that bound is >= 0.9k")
    print("| rows | launcher | k | end to end: units | end to end: whole shards | steady state: units | "
          "steady state: whole shards | start-up (s): units / whole | start-up bound: units | "
          "target 0.9k end to end / steady | 0.9k reachable with this start-up |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"procs": 0, "ray": 1, "ray-cluster": 2}
    for r in sorted(rows, key=lambda r: (r["rows"], order.get(r["launcher"], 3), r["k"])):
        goal = 0.9 * r["k"]
        ok = "/".join("met" if r[key] >= goal else "MISSED" for key in ("units_speedup", "units_steady_speedup"))
        print(f"| {r['rows']} | {r['launcher']} | {r['k']} | {r['units_speedup']:.2f} | {r['whole_speedup']:.2f} | "
              f"{r['units_steady_speedup']:.2f} | {r['whole_steady_speedup']:.2f} | "
              f"{r['units']['first_batch_after_s']:.1f} / {r['whole']['first_batch_after_s']:.1f} | "
              f"{r['units_bound']:.2f} | {ok if r['k'] > 1 else '-'} | "
              f"{('yes' if r['units_bound'] >= goal else 'no') if r['k'] > 1 else '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--embed-dim", type=int, default=128, help="128 keeps 10^6 rows at 512 MB per copy")
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    ap.add_argument("--images", type=int, default=240, help="images for the --procs comparison")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--skip-procs", action="store_true")
    ap.add_argument("--skip-incremental", action="store_true")
    ap.add_argument("--read", nargs="*", default=["1000000x128", "100000x1280"],
                    help="caches of ROWSxDIM to read in full (1280: EfficientNet-Lite0's width); none: skip")
    ap.add_argument("--read-repeats", type=int, default=7)
    ap.add_argument("--sim", action="store_true", help="only the simulated-accelerator scaling (section 4)")
    ap.add_argument("--sim-sizes", type=int, nargs="+", default=[12_000, 50_000])
    ap.add_argument("--sim-workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sim-launchers", nargs="+", default=["procs", "ray", "ray-cluster"],
                    choices=["procs", "ray", "ray-cluster"],
                    help="ray: RAY_ADDRESS=local (a private cluster started inside each run); ray-cluster: a cluster "
                    "of k CPUs started beforehand with 'ray start --head' (not timed), as at scale")
    ap.add_argument("--sim-seconds", type=float, default=0.2, help="test_sleep's wait per batch")
    ap.add_argument("--sim-batch", type=int, default=64)
    if sys.argv[1:2] == ["--run-one"]:
        return _run_one(sys.argv[2:])
    args = ap.parse_args()
    if args.sim:
        args.work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("FEATBANK_CACHE_DIR", str(args.work / "featbank-cache"))
        rows = bench_sim(args.work, args.sim_sizes, args.sim_workers, args.sim_launchers, args.sim_seconds, args.sim_batch)
        print_sim_table(rows, args.sim_seconds, args.sim_batch)
        return
    os.environ.setdefault("FEATBANK_CACHE_DIR", str(args.work / "featbank-cache"))
    summary: dict = {"embed_dim": args.embed_dim, "shard_size": args.shard_size}
    inc = {}
    if not args.skip_incremental:
        inc = bench_incremental(args.work, args.sizes, args.embed_dim, args.shard_size)
        lo, hi = inc[min(args.sizes)], inc[max(args.sizes)]
        summary.update({
            "v2_write_ratio_largest_over_smallest": hi["v2_write_s"] / lo["v2_write_s"],
            "v2_total_ratio_largest_over_smallest": (hi["v2_write_s"] + hi["v2_plan_s"]) / (lo["v2_write_s"] + lo["v2_plan_s"]),
            "v1_over_v2_at_largest": hi["v1_rewrite_s"] / hi["v2_write_s"],
        })
    for shape in args.read:
        n, dim = (int(v) for v in shape.lower().split("x"))
        rd = bench_read(args.work, n, dim, args.shard_size, args.read_repeats)
        # Speed relative to one contiguous dataset read with h5py (1.0 = as fast): featbank's read, and
        # plain h5py through the virtual dataset; best wall times (and median CPU times, _cpu).
        for k in ("featbank_over_contiguous", "featbank_first_over_contiguous", "vds_over_contiguous",
                  "featbank_one_part_over_contiguous"):
            for tail in ("", "_cpu"):
                summary[f"read_{k}_at_{n}x{dim}{tail}"] = rd[k + tail]
        # The "through the index vs one contiguous file", featbank's value check on both sides.
        summary[f"read_featbank_index_over_featbank_one_part_at_{n}x{dim}"] = rd["featbank_over_featbank_one_part"]
    if not args.skip_procs:
        procs = bench_procs(args.work, args.images, max(1, args.images // 8))
        summary["procs2_over_procs1_throughput"] = procs[2] / procs[1]
    print(json.dumps({"rows": inc, "summary": summary}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
