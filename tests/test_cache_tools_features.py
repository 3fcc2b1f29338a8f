"""featbank cache info|verify|export and the free-space check on caches with layers and views.

Real caches extracted with the ``test_tiny`` backbone from PIL images (``--layers``, ``--views``,
several parts), damaged the way a crash, a disk or a buggy writer would damage them.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from test_parts import _cache

import featbank
from featbank._files import sha256_file
from featbank.cache._index import read_parts_table, write_index
from featbank.cache._parts import describe_part, parts_dir
from featbank.cache._tools import CacheSummary, check_cache, describe_cache, export_cache
from featbank.cache._writer import estimate_bytes, feature_values_per_row
from featbank.cli.main import cli
from featbank.errors import CacheError, ConfigError
from featbank.extraction._spec import resolve_features

from conftest import make_image_folder

pq = pytest.importorskip("pyarrow.parquet")

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)
FEATURES = dict(layers="stem,stage1", views=2, augment="dihedral")
ROW_NAMES = ("embeddings", "labels", "splits", "paths", "fingerprints", "layers/stem", "layers/stage1",
             "views/embeddings", "views/layers/stem", "views/layers/stage1")


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.fixture(scope="module")
def lv_cache(tmp_path_factory) -> Path:
    """24 images, layers stem and stage1, 2 dihedral views, in 3 parts (shard size 10)."""
    tmp = tmp_path_factory.mktemp("lv")
    data = make_image_folder(tmp / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEATBANK_CACHE_DIR", str(tmp / "fc"))
    try:
        featbank.extract(data, tmp / "c.h5", shard_size=10, **FEATURES, **TINY)
    finally:
        mp.undo()
    return tmp / "c.h5"


def _copy(src: Path, dst_dir: Path) -> Path:
    """The index and its parts folder (parts keep their mtimes, so the table still matches)."""
    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    shutil.copytree(parts_dir(src), parts_dir(dst), copy_function=shutil.copy2)
    return dst


def _republish(index: Path) -> None:
    """Rewrite the index over its (edited) parts, as a buggy writer would have published them."""
    with h5py.File(index, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        classes = [c.decode() for c in f["classes"][...]]
    parts = [describe_part(parts_dir(index) / p.name) for p in read_parts_table(index)]
    write_index(index, parts, classes, attrs, row_datasets=ROW_NAMES)


def _retable(index: Path, k: int) -> None:
    """Record part ``k`` as it is now (size, mtime, sha256) in the index's table, as a buggy writer would."""
    part = parts_dir(index) / read_parts_table(index)[k].name
    st = part.stat()
    with h5py.File(index, "r+") as f:
        f["parts/sizes"][k] = st.st_size
        f["parts/mtimes_ns"][k] = st.st_mtime_ns
        f["parts/sha256"][k] = sha256_file(part)


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def test_info_lists_layers_widths_pooling_and_views(lv_cache):
    res = _run("cache", "info", lv_cache)
    assert res.exit_code == 0, res.output
    assert "layers     3: stem (40), stage1 (80), final (32); pooling gap+2x2" in res.output, res.output
    assert "views      2 per image, dihedral" in res.output and "PROBLEM" not in res.output
    assert "3 part(s)" in res.output and "24 x 32 (float32)" in res.output
    s = describe_cache(lv_cache)
    assert s.features.layer_dims == {"stem": 40, "stage1": 80, "final": 32}
    assert (s.features.n_views, s.features.augment, s.features.pooling) == (2, "dihedral", "gap+2x2")


def test_info_of_a_plain_cache_says_final_only_and_no_views(tmp_path):
    index, *_ = _cache(tmp_path)
    res = _run("cache", "info", index)
    assert res.exit_code == 0 and "layers     1: final (8)\n" in res.output and "views      none" in res.output


def test_info_shows_layers_that_disagree_as_a_problem_and_verify_exits_2(lv_cache, tmp_path):
    path = _copy(lv_cache, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layer_dims"] = '{"stem": 41, "stage1": 80, "final": 32}'
    res = _run("cache", "info", path)
    assert res.exit_code == 0 and "PROBLEM" in res.output and "'layers/stem'" in res.output, res.output
    res = _run("cache", "verify", path)
    assert res.exit_code == 2 and "'layers/stem'" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_reads_layers_and_views_of_every_part(lv_cache):
    res = _run("cache", "verify", lv_cache)
    assert res.exit_code == 0 and "ok: 24 rows in 3 intact part(s)" in res.output, res.output


def test_verify_reports_a_truncated_part(lv_cache, tmp_path):
    path = _copy(lv_cache, tmp_path)
    victim = parts_dir(path) / read_parts_table(path)[1].name
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)  # the tail: view and layer rows, not the metadata in front
    res = _run("cache", "verify", path)
    assert res.exit_code == 2 and victim.name in res.output and "truncated" in res.output, res.output


def _nan_in_views(part: Path) -> None:
    with h5py.File(part, "r+") as f:
        block = f["views/layers/stage1"][3]
        block[1, 5] = np.nan
        f["views/layers/stage1"][3] = block


def _drop_layer(part: Path) -> None:
    with h5py.File(part, "r+") as f:
        del f["layers/stem"]


def _truncate(part: Path) -> None:
    with open(part, "r+b") as fh:
        fh.truncate(part.stat().st_size - 4096)


# (damage to part 1, how it was published, what verify names). Each leaves the table of parts
# matching the damaged file, so hashing alone passes: only reading the layer/view datasets finds it.
DAMAGES = {
    "nan_in_a_view_layer": (_nan_in_views, _republish, "dataset 'views/layers/stage1' has NaN"),
    "layer_missing_in_one_part": (_drop_layer, _republish, "has no dataset 'layers/stem'"),
    "truncated_part_retabled": (_truncate, lambda p: _retable(p, 1), "is not a readable HDF5 file"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_finds_damage_that_only_the_layer_and_view_datasets_show(lv_cache, tmp_path, damage):
    path = _copy(lv_cache, tmp_path)
    victim = parts_dir(path) / read_parts_table(path)[1].name
    hurt, publish, words = DAMAGES[damage]
    hurt(victim)
    publish(path)
    res = _run("cache", "verify", path)
    assert res.exit_code == 2, res.output
    assert victim.name in res.output and words in res.output and "Traceback" not in res.output, res.output
    assert "featbank extract" in res.output


def test_the_fix_verify_gives_works(lv_cache, tmp_path):
    path = _copy(lv_cache, tmp_path)
    victim = parts_dir(path) / read_parts_table(path)[1].name
    _nan_in_views(victim)
    _republish(path)
    with pytest.raises(CacheError, match="Remove the part file"):
        check_cache(path)
    victim.unlink()  # what the message says: remove it and extract again
    with h5py.File(path, "r") as f:
        data = f.attrs["root"]
    report = featbank.extract(data, path, shard_size=10, **FEATURES, **TINY)
    assert report.n_embedded == 10 and check_cache(path).n_samples == 24


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def test_export_defaults_to_the_final_embeddings_and_says_so(lv_cache, tmp_path):
    out = tmp_path / "v"
    res = _run("cache", "export", lv_cache, "--out", out)
    assert res.exit_code == 0 and "layers final" in res.output, res.output
    got = np.concatenate([np.load(out / f"embeddings-{i:05d}.npy") for i in range(3)])
    with featbank.open_cache(lv_cache) as c:
        np.testing.assert_array_equal(got, c.load_embeddings())
    meta = pq.read_table(out / "metadata-00000.parquet").schema.metadata
    assert b'"layers": ["final"]' in meta[b"featbank"]


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_export_chosen_layers_of_an_augmented_view(lv_cache, tmp_path, fmt):
    out = tmp_path / "v"
    res = _run("cache", "export", lv_cache, "--out", out, "--format", fmt, "--layers", "stem,final", "--view", 1)
    assert res.exit_code == 0, res.output
    if fmt == "npy":
        got = np.concatenate([np.load(out / f"embeddings-{i:05d}.npy") for i in range(3)])
        schema = pq.read_table(out / "metadata-00002.parquet").schema
    else:
        tables = [pq.read_table(out / f"embeddings-{i:05d}.parquet") for i in range(3)]
        got = np.array([e for t in tables for e in t.column("embedding").to_pylist()], np.float32)
        schema = tables[2].schema
    with featbank.open_cache(lv_cache) as c:
        np.testing.assert_array_equal(got, c.load_features(layers=("stem", "final"), view=1))
    assert b'"layers": ["stem", "final"], "layer_dims": [40, 32], "view": 1' in schema.metadata[b"featbank"]


def test_export_refuses_layers_or_views_the_cache_does_not_hold(lv_cache, tmp_path):
    res = _run("cache", "export", lv_cache, "--out", tmp_path / "v", "--layers", "stage2")
    assert res.exit_code == 2 and "stem, stage1, final" in res.output, res.output
    res = _run("cache", "export", lv_cache, "--out", tmp_path / "v", "--view", 2)
    assert res.exit_code == 2 and "views 0..1" in res.output, res.output
    index, *_ = _cache(tmp_path)
    with pytest.raises(ConfigError, match="no augmented views"):
        export_cache(index, tmp_path / "w", view=0)
    assert not (tmp_path / "v").exists() and not (tmp_path / "w").exists()


def test_export_refuses_nan_in_an_exported_layer(lv_cache, tmp_path):
    path = _copy(lv_cache, tmp_path)
    _nan_in_views(parts_dir(path) / read_parts_table(path)[1].name)
    _republish(path)
    export_cache(path, tmp_path / "ok", layers="stem")  # other datasets export fine
    res = _run("cache", "export", path, "--out", tmp_path / "v", "--layers", "stage1", "--view", 1)
    row = read_parts_table(path)[0].n_rows + 3
    assert res.exit_code == 2 and "'views/layers/stage1'" in res.output and f"row {row}" in res.output, res.output


# ---------------------------------------------------------------------------------------------
# free space
# ---------------------------------------------------------------------------------------------


def test_estimate_counts_every_layer_and_view_value():
    opts = resolve_features("test_tiny", None, None, layers="all", views=7, augment="dihedral")
    values = feature_values_per_row(opts.datasets())
    assert values == (40 + 80 + 160) + 7 * (40 + 80 + 160 + 32)  # layers/<tap> + views/{embeddings,layers/<tap>}
    assert feature_values_per_row(None) == 0
    paths = [f"cat/{i:04d}.png" for i in range(1000)]
    for dtype in ("float32", "float16"):
        plain = estimate_bytes(1000, 32, dtype, paths)
        grown = estimate_bytes(1000, 32, dtype, paths, extra_values=values)
        assert abs((grown - plain) - 1000 * values * np.dtype(dtype).itemsize * 1.05) <= 1


@pytest.fixture
def file_size_limit():
    """Lower this process's soft RLIMIT_FSIZE for the test (a write past it fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def set_limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX only")
def test_layers_and_views_that_do_not_fit_are_refused_before_writing(tmp_path, file_size_limit):
    data = make_image_folder(tmp_path / "data")
    args = ["extract", data, "--backbone", "test_tiny", "--engine", "torch", "--num-workers", "0", "-q"]
    opts = resolve_features("test_tiny", None, None, layers="all", views=7, augment="dihedral")
    paths = [str(p.relative_to(data)) for p in data.rglob("*.*")]
    need = estimate_bytes(24, 32, "float32", paths, extra_values=feature_values_per_row(opts.datasets()))
    limit = 150_000
    assert estimate_bytes(24, 32, "float32", paths) < limit < need  # the plain cache fits, the larger one not
    file_size_limit(limit)
    plain = _run(*args, "--out", tmp_path / "plain.h5")
    assert plain.exit_code == 0, plain.output  # the limit leaves room for a plain cache
    out = tmp_path / "lv.h5"
    res = _run(*args, "--out", out, "--layers", "all", "--views", 7, "--augment", "dihedral")
    assert res.exit_code == 2, res.output
    assert "Not enough space" in res.output and "ulimit -f" in res.output and str(out) in res.output, res.output
    assert "Traceback" not in res.output and not out.exists() and not list(parts_dir(out).glob("*part-*"))
    said = float(re.search(r"about ([\d.]+) (kB|MB) needed", res.output).group(1))
    assert said * (1e3 if "kB needed" in res.output else 1e6) >= need * 0.99


def test_info_names_the_seed_of_crops_views_only():
    from featbank.features import FeatureSpec

    crops = CacheSummary(Path("c.h5"), 2, 4, 8, "float32", [], {}, {}, "b", "w", "k", 1, 0,
                         features=FeatureSpec(("final",), {"final": 8}, "gap", 4, "crops", 3))
    assert "views      4 per image, crops, view seed 3" in crops.lines()
    assert "layers     1: final (8)" in crops.lines()  # one layer: its pooling says nothing


def test_verify_of_a_v1_cache_reads_it_through(tiny_cache):
    from _v1cache import to_v1

    to_v1(tiny_cache)
    assert check_cache(tiny_cache).n_samples == 24
    with h5py.File(tiny_cache, "r+") as f:
        f["embeddings"][7, 3] = np.nan
    res = _run("cache", "verify", tiny_cache)
    assert res.exit_code == 2 and "dataset 'embeddings' has NaN" in res.output and "row 7" in res.output, res.output
    assert "--overwrite" in res.output


def test_info_and_verify_through_a_symlink(lv_cache, tmp_path):
    link = tmp_path / "link.h5"
    link.symlink_to(lv_cache)  # the parts lie beside the target, not beside the link
    assert _run("cache", "info", link).exit_code == 0 and "PROBLEM" not in _run("cache", "info", link).output
    res = _run("cache", "verify", link)
    assert res.exit_code == 0, res.output
    files = export_cache(link, tmp_path / "v", layers="stage1")
    with featbank.open_cache(lv_cache) as c:
        np.testing.assert_array_equal(np.concatenate([np.load(p) for p in files[::2]]), c.load_features(layers="stage1"))


def test_reading_a_truncated_retabled_part_is_a_cache_error_not_a_crash(lv_cache, tmp_path):
    """What verify reports, fit must not crash on: a CacheError naming the part (exit 2), never a raw OSError."""
    path = _copy(lv_cache, tmp_path)
    victim = parts_dir(path) / read_parts_table(path)[1].name
    _truncate(victim)
    _retable(path, 1)
    with pytest.raises(CacheError, match=victim.name):
        with featbank.open_cache(path) as c:
            c.load_features(layers=c.layers)
    res = _run("fit", path, "--head", "linear", "--layers", "all", "--out", tmp_path / "m")
    assert res.exit_code == 2 and victim.name in res.output and "Traceback" not in res.output, res.output
