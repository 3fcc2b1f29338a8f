"""A cache is only its own parts, every declared size is checked before it sizes an array, and no
special file hangs a reader (issue "Trust, round 2", the cache side).

Each attack is a real file an attacker can write: an index whose table of parts (and its sizes,
mtimes and sha256) agrees with what it points at, parts with HDF5 external or virtual storage,
FIFOs and ``/dev/zero`` where a part or a cache should be. Each goes through ``open_cache`` and the
commands (``fit``, ``cache info|verify|export``) and must be refused with a message naming the field
and the value, exit 2, and never a hang (a pytest timeout turns a regression into a failure).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _v1cache import to_v1
from click.testing import CliRunner

import featbank
from featbank._files import NotRegularFileError, lock_holders, open_regular_file, sha256_file
from featbank.cache import open_cache, writer_lock
from featbank.cache._index import _write_table, read_parts_table, write_index
from featbank.cache._parts import describe_part, parts_dir
from featbank.cache._tools import export_cache
from featbank.cli.main import cli
from featbank.errors import CacheError, ConfigError

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)
pytestmark = pytest.mark.timeout(60)


def _run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output


def _refresh_table(index: Path) -> None:
    """Record the parts as they are now (size, mtime, sha256), as an attacker who writes the index would."""
    with h5py.File(index, "r+") as f:
        table = [describe_part(parts_dir(index) / p.name) for p in read_parts_table(f)]
        del f["parts"]
        _write_table(f.create_group("parts"), table)


def _table_entry(index: Path, **values: object) -> None:
    """Set columns of the table's only entry (``sizes``, ``names`` ...) to ``values``."""
    with h5py.File(index, "r+") as f:
        for name, value in values.items():
            f["parts"][name][0] = value


def _index_over(index: Path, parts: list, classes: list[str] | None = None) -> None:
    """Rewrite ``index`` with featbank's own index writer over ``parts`` (table and virtual datasets agree)."""
    with h5py.File(index, "r") as f:
        attrs = dict(f.attrs)
        classes = [c.decode() for c in f["classes"][...]] if classes is None else classes
    write_index(index, parts, classes, attrs)


def _refused_everywhere(path: Path, *words: str, tmp_path: Path) -> None:
    with pytest.raises(CacheError) as e:
        open_cache(path)
    for w in words:
        assert w in str(e.value), str(e.value)
    for args in (("fit", path, "--head", "linear", "--out", tmp_path / "m"), ("cache", "verify", path),
                 ("cache", "export", path, "--out", tmp_path / "x")):
        code, out = _run(*args)
        assert code == 2 and "Traceback" not in out and all(w in out for w in words), (args, out)
    code, out = _run("cache", "info", path)  # info lists the problem and reads no row
    assert code == 0 and "PROBLEM" in out and words[0] in out, out


@pytest.fixture
def other_cache(tmp_path: Path) -> Path:
    """A second, real cache beside ``tiny_cache``: what a hostile index points at."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "other-data", classes=("x", "y"), n_per_class=6, seed=3)
    out = tmp_path / "other.h5"
    featbank.extract(data, out, **TINY)
    return out


# -- 1. a cache reads only its own parts -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_table_naming_another_caches_part_is_refused(how: str, tiny_cache: Path, other_cache: Path,
                                                       image_folder: Path, tmp_path: Path) -> None:
    theirs = read_parts_table(other_cache)[0]
    target = parts_dir(other_cache) / theirs.name
    name = f"../{parts_dir(other_cache).name}/{theirs.name}" if how == "dotdot" else str(target)
    _index_over(tiny_cache, [dataclasses.replace(theirs, name=name)], classes=["cat", "dog", "fox"])
    with h5py.File(tiny_cache, "r") as f:  # what the attack relies on: plain h5py reads the other cache's rows
        assert f["embeddings"].shape[0] == theirs.n_rows
    _refused_everywhere(tiny_cache, "'parts/names'", repr(name), tmp_path=tmp_path)
    before = tiny_cache.read_bytes()
    with pytest.raises(CacheError, match="'parts/names'.*untouched"):  # an extract rerun refuses it too
        featbank.extract(image_folder, tiny_cache, **TINY)
    assert tiny_cache.read_bytes() == before and target.exists()


def test_a_part_that_links_out_of_its_folder_is_refused(tiny_cache: Path, other_cache: Path, tmp_path: Path) -> None:
    ours = parts_dir(tiny_cache) / read_parts_table(tiny_cache)[0].name
    theirs = parts_dir(other_cache) / read_parts_table(other_cache)[0].name
    ours.unlink()
    ours.symlink_to(theirs)
    _index_over(tiny_cache, [describe_part(ours)])  # a plain name, table and mapping agreeing with the link
    _refused_everywhere(tiny_cache, "outside the cache's parts folder", tmp_path=tmp_path)


def _external(part: Path, name: str, target: str) -> None:
    """Replace the part's dataset ``name`` by one of the same shape stored in ``target`` (HDF5 external storage)."""
    with h5py.File(part, "r+") as f:
        ds = f[name]
        shape, dtype = ds.shape, ds.dtype
        if target != "/dev/zero":
            Path(target).write_bytes(ds[...].tobytes())
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, external=[(target, 0, int(np.prod(shape)) * dtype.itemsize)])


@pytest.mark.parametrize("target", ["file", "/dev/zero"])
def test_a_part_with_external_storage_is_refused(target: str, tiny_cache: Path, tmp_path: Path) -> None:
    part = parts_dir(tiny_cache) / read_parts_table(tiny_cache)[0].name
    where = str(tmp_path / "elsewhere.bin") if target == "file" else target
    _external(part, "embeddings", where)
    _refresh_table(tiny_cache)
    with h5py.File(part, "r") as f:  # plain h5py reads it without a word
        assert f["embeddings"].shape[0] == 24
    _refused_everywhere(tiny_cache, "'embeddings'", "HDF5 external storage", where, tmp_path=tmp_path)


def test_a_part_with_a_virtual_dataset_is_refused(tiny_cache: Path, other_cache: Path, tmp_path: Path) -> None:
    part = parts_dir(tiny_cache) / read_parts_table(tiny_cache)[0].name
    with h5py.File(part, "r+") as f:
        layout = h5py.VirtualLayout(shape=f["labels"].shape, dtype=f["labels"].dtype)
        layout[:] = h5py.VirtualSource(str(tmp_path / "labels.h5"), "labels", shape=f["labels"].shape)
        with h5py.File(tmp_path / "labels.h5", "w") as g:
            g["labels"] = np.zeros(f["labels"].shape, f["labels"].dtype)
        del f["labels"]
        f.create_virtual_dataset("labels", layout)
    _refresh_table(tiny_cache)
    _refused_everywhere(tiny_cache, "'labels'", "is a virtual dataset", tmp_path=tmp_path)


def test_a_v1_cache_with_external_storage_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    to_v1(tiny_cache)
    with h5py.File(tiny_cache, "r+") as f:
        labels = f["labels"][...]
        (tmp_path / "labels.bin").write_bytes(labels.tobytes())
        del f["labels"]
        f.create_dataset("labels", shape=labels.shape, dtype=labels.dtype,
                         external=[(str(tmp_path / "labels.bin"), 0, labels.nbytes)])
    _refused_everywhere(tiny_cache, "'labels'", "HDF5 external storage", tmp_path=tmp_path)


def test_verify_runs_the_label_check_open_cache_runs(tiny_cache: Path, tmp_path: Path) -> None:
    with h5py.File(tiny_cache, "r+") as f:
        f["labels"][3] = 7  # lands in the part through the virtual dataset
    _refresh_table(tiny_cache)  # every hash agrees
    code, out = _run("cache", "verify", tiny_cache)
    assert code == 2 and "'labels'" in out and "value 7" in out, out
    with pytest.raises(CacheError, match="'labels' has value 7"):
        export_cache(tiny_cache, tmp_path / "x")


def test_valid_v1_and_v2_caches_still_open_and_verify(tiny_cache: Path, tmp_path: Path) -> None:
    code, out = _run("cache", "verify", tiny_cache)
    assert code == 0 and "ok: 24 rows in 1 intact part(s)" in out, out
    v1 = to_v1(tiny_cache, tmp_path / "v1.h5")
    with open_cache(v1) as c:
        assert c.n_samples == 24 and c.load_embeddings().shape == (24, c.embed_dim)
    code, out = _run("cache", "verify", v1)
    assert code == 0 and "ok: 24 rows" in out, out


# -- 2. declared sizes are checked before anything is allocated -------------------------------------------


def test_a_table_declaring_10e12_rows_is_a_clean_error(tiny_cache: Path, tmp_path: Path) -> None:
    part = read_parts_table(tiny_cache)[0]
    _index_over(tiny_cache, [dataclasses.replace(part, n_rows=10**12)])
    _refused_everywhere(tiny_cache, "'parts/n_rows'", "1000000000000", tmp_path=tmp_path)


def test_a_v1_file_declaring_rows_it_never_stored_is_a_clean_error(tiny_cache: Path, tmp_path: Path) -> None:
    to_v1(tiny_cache)
    with h5py.File(tiny_cache, "r+") as f:  # every per-row dataset grown to 2*10^8 rows: the file stays small
        for name in ("embeddings", "labels", "splits", "paths", "fingerprints"):
            f[name].resize(2 * 10**8, axis=0)
    assert tiny_cache.stat().st_size < 1 << 20
    _refused_everywhere(tiny_cache, "'embeddings'", "fill values", tmp_path=tmp_path)


def test_more_class_names_than_rows_are_refused_before_any_matrix(tiny_cache: Path, tmp_path: Path) -> None:
    with h5py.File(tiny_cache, "r+") as f:
        del f["classes"]
        f.create_dataset("classes", data=np.array([f"c{i}" for i in range(10**6)], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
    _refused_everywhere(tiny_cache, "'classes'", "1000000 names for 24 rows", tmp_path=tmp_path)


# -- 4. no special file hangs a run -----------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_part_that_is_a_fifo_or_dev_zero_is_refused_not_hashed_forever(kind: str, tiny_cache: Path,
                                                                        tmp_path: Path) -> None:
    part = parts_dir(tiny_cache) / read_parts_table(tiny_cache)[0].name
    part.unlink()
    if kind == "fifo":
        os.mkfifo(part)
    else:
        part.symlink_to("/dev/zero")
    _table_entry(tiny_cache, sizes=0, mtimes_ns=0)  # size 0 agrees with what stat says of either
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    _refused_everywhere(tiny_cache, f"is {what}, not a regular file", tmp_path=tmp_path)


@pytest.mark.timeout(30)
def test_regular_file_helpers_refuse_special_files_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for special, kind in ((fifo, "a FIFO (named pipe)"), ("/dev/zero", "a character device"), (tmp_path, "a folder")):
        with pytest.raises(NotRegularFileError, match="not a regular file") as e:
            open_regular_file(special)
        assert e.value.kind == kind
        with pytest.raises(NotRegularFileError):
            sha256_file(special)
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 1000)
    with open_regular_file(f) as fh:
        assert fh.read() == b"abc" * 1000
    assert sha256_file(f, max_bytes=10**9) == sha256_file(f)  # the bound only cuts a file that grew
    assert sha256_file(f, max_bytes=5) != sha256_file(f)


@pytest.mark.timeout(30)
def test_a_fifo_as_the_cache_is_refused_at_open(tmp_path: Path) -> None:
    fifo = tmp_path / "cache.h5"
    os.mkfifo(fifo)
    with pytest.raises(CacheError, match="is a FIFO \\(named pipe\\), not a regular file"):
        open_cache(fifo)
    for args in (("fit", fifo, "--head", "linear", "--out", tmp_path / "m"), ("cache", "info", fifo),
                 ("cache", "verify", fifo), ("cache", "export", fifo, "--out", tmp_path / "x")):
        code, out = _run(*args)
        assert code == 2 and "FIFO" in out and "Traceback" not in out, (args, out)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fifos_refused_by_the_commands_in_real_processes(tiny_cache: Path, image_folder: Path, tmp_path: Path) -> None:
    """The same through the installed command line: each command exits 2 within its timeout."""
    code, out = _run("fit", tiny_cache, "--head", "linear", "--out", tmp_path / "model")
    assert code == 0, out
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    runs = {
        "evaluate": ["evaluate", str(tmp_path / "model"), str(fifo)],
        "extract --out": ["extract", str(image_folder), "--backbone", "test_tiny", "--out", str(fifo)],
        "fit": ["fit", str(fifo), "--head", "linear", "--out", str(tmp_path / "m2")],
    }
    for what, args in runs.items():
        r = subprocess.run([sys.executable, "-m", "featbank.cli.main", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "FIFO (named pipe)" in r.stderr + r.stdout, (what, r.stdout, r.stderr)
    assert fifo.exists() and not fifo.is_file()  # extract left the FIFO alone


# -- 7. export into an earlier export; a lock held by a killed writer's workers ----------------------------


def test_export_into_an_earlier_export_is_refused_or_replaced(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "vectors"
    first = export_cache(tiny_cache, out, rows_per_file=5)
    assert len(first) == 10  # 5 shards of npy + parquet
    code, text = _run("cache", "export", tiny_cache, "--out", out)
    assert code == 2 and "earlier export" in text and "--overwrite" in text, text
    assert sorted(out.iterdir()) == sorted(first)  # nothing touched
    (out / "notes.txt").write_text("mine")
    code, text = _run("cache", "export", tiny_cache, "--out", out, "--overwrite")
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["embeddings-00000.npy", "metadata-00000.parquet", "notes.txt"]
    assert np.load(out / "embeddings-00000.npy").shape[0] == 24
    with pytest.raises(ConfigError, match="earlier export"):
        export_cache(tiny_cache, out, format="parquet")


_HOLDER = textwrap.dedent("""
    import os, sys, time
    from featbank.cache import writer_lock
    with writer_lock(sys.argv[1]):
        child = os.fork()
        if child == 0:  # a DataLoader worker: inherits the locked file, outlives its parent for a while
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1), os.dup2(null, 2)  # not the test's pipe: subprocess.run returns at the parent's exit
            time.sleep(float(sys.argv[2]))
            os._exit(0)
        print(child, flush=True)
        os._exit(0)  # killed: no release
""")


@pytest.mark.timeout(60)
def test_a_lock_held_by_a_killed_writers_workers_says_so(tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    r = subprocess.run([sys.executable, "-c", _HOLDER, str(cache), "30"], capture_output=True, text=True, timeout=60)
    worker = int(r.stdout.split()[0])
    try:
        assert worker in lock_holders(str(cache) + ".lock")
        with pytest.raises(CacheError) as e, writer_lock(cache):
            pass
        msg = str(e.value)
        assert f"pid {worker}" in msg and "Retry in a few seconds" in msg and "killed" in msg, msg
    finally:
        os.kill(worker, 9)
    for _ in range(100):  # once the worker is gone the lock is free
        if not lock_holders(str(cache) + ".lock"):
            break
        time.sleep(0.05)
    with writer_lock(cache):
        pass


@pytest.mark.parametrize(("name", "plain"), [
    ("part-000001-0123456789ab.h5", True), ("../x.h5.parts/part-000001-0123456789ab.h5", False),
    ("/tmp/part.h5", False), ("sub/part.h5", False), (".part-000001-0123456789ab.h5.partial", False),
    ("part..h5", False), ("part\\x.h5", False), ("part-1.h5\0", False), ("", False),
])
def test_only_plain_part_names_are_accepted(name: str, plain: bool) -> None:
    from featbank.cache._parts import is_part_name

    assert is_part_name(name) is plain


def test_a_table_listing_more_parts_than_its_folder_holds_is_refused_before_it_is_read(tiny_cache: Path,
                                                                                       tmp_path: Path) -> None:
    n = 5000
    with h5py.File(tiny_cache, "r+") as f:
        g = f["parts"]
        for name in list(g):
            col = g[name][...]
            del g[name]
            g.create_dataset(name, data=np.repeat(col, n), compression="gzip")  # small on disk, large in memory
    _refused_everywhere(tiny_cache, f"lists {n} parts", "holds only", tmp_path=tmp_path)
