"""Crafted caches that carry featbank's attributes: each is refused (exit 2) naming the file and field.

Every attack starts from a real cache written by featbank.extract and changes one thing with h5py,
then goes through ``open_cache``, ``featbank fit`` (CliRunner) and an ``extract`` rerun.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from _v1cache import to_v1
from click.testing import CliRunner

import featbank
from featbank.cache import EXTREME_VALUE, choose_cache, find_latest_cache, open_cache
from featbank.cli.main import cli
from featbank.errors import CacheError, ExtremeEmbeddingsWarning

TINY = dict(backbone="test_tiny", engine="torch", num_workers=0, progress=False)


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f[name] = data


# name -> (mutation, field named in the message, a fragment of the value/reason)
STRUCTURAL: dict[str, tuple[Callable[[h5py.File], None], str, str]] = {
    "missing_embeddings": (lambda f: f.__delitem__("embeddings"), "'embeddings'", "missing"),
    "missing_labels": (lambda f: f.__delitem__("labels"), "'labels'", "missing"),
    "schema_version_str": (lambda f: f.attrs.__setitem__("schema_version", "one"), "'schema_version'", "'one'"),
    "schema_version_float": (lambda f: f.attrs.__setitem__("schema_version", 1.5), "'schema_version'", "1.5"),
    "label_out_of_range": (lambda f: f["labels"].__setitem__(0, 99), "'labels'", "value 99"),
    "label_below_minus_one": (lambda f: f["labels"].__setitem__(2, -7), "'labels'", "value -7"),
    "labels_short": (lambda f: _replace(f, "labels", f["labels"][:-3]), "'labels'", "(21,)"),
    "labels_long": (lambda f: _replace(f, "labels", np.zeros(30, np.int64)), "'labels'", "(30,)"),
    "split_code_bad": (lambda f: _replace(f, "splits", np.full(24, 5, np.int8)), "'splits'", "value 5"),
    "embeddings_1d": (lambda f: _replace(f, "embeddings", np.zeros(24, np.float32)), "'embeddings'", "(24,)"),
    "embeddings_int": (lambda f: _replace(f, "embeddings", np.zeros((24, 32), np.int32)), "'embeddings'", "int32"),
    "embeddings_short": (lambda f: f["embeddings"].resize((20, 32)), "'paths'", "20 rows"),
    "paths_short": (lambda f: _replace(f, "paths", f["paths"][:5]), "'paths'", "(5,)"),
    "fingerprints_shape": (lambda f: _replace(f, "fingerprints", np.zeros((24, 3), np.int64)), "'fingerprints'", "(24, 3)"),
    "bad_json_transform": (lambda f: f.attrs.__setitem__("transform", "{not json"), "'transform'", "not valid JSON"),
    "bad_json_split_names": (lambda f: f.attrs.__setitem__("split_names", "[train"), "'split_names'", "not valid JSON"),
    "split_names_not_list": (lambda f: f.attrs.__setitem__("split_names", "5"), "'split_names'", "5"),
    "bad_json_classes": (lambda f: f.attrs.__setitem__("classes_json", "['a'"), "'classes_json'", "not valid JSON"),
    "skipped_lengths": (lambda f: _replace(f["skipped"], "reasons", np.array([b"x"])), "'skipped'", "lengths"),
}


# Schema v2 (what extract writes): a virtual dataset cannot be resized; cut it to a real one instead.
STRUCTURAL_V2 = {
    **STRUCTURAL,
    "embeddings_short": (lambda f: _replace(f, "embeddings", f["embeddings"][:20]), "'embeddings'", "20 rows"),
    # Written through the virtual dataset into the part (a real dataset in its place maps no part: refused first).
    "split_code_bad": (lambda f: f["splits"].__setitem__(slice(None), np.full(24, 5, np.int8)), "'splits'", "value 5"),
}


def _refresh_table(index: Path) -> None:
    """Record the parts as they are now (size, mtime, sha256): a hostile index whose table agrees with
    its parts, so that only featbank's own validation of the rows can refuse it."""
    from featbank.cache._index import _write_table, read_parts_table
    from featbank.cache._parts import describe_part, parts_dir

    with h5py.File(index, "r+") as f:
        table = [describe_part(parts_dir(index) / p.name) for p in read_parts_table(f)]
        del f["parts"]
        _write_table(f.create_group("parts"), table)


def _craft(tiny_cache: Path, mutate: Callable[[h5py.File], None], schema: str = "v2") -> Path:
    """``mutate`` the cache with h5py: a schema-v1 file (``to_v1`` first) or the v2 index (writes to
    its virtual datasets land in the part files, whose table is then made to agree)."""
    if schema == "v1":
        to_v1(tiny_cache)
    with h5py.File(tiny_cache, "r+") as f:
        mutate(f)
    if schema == "v2":
        _refresh_table(tiny_cache)
    return tiny_cache


def _fit(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["fit", *args, "--head", "linear"])
    return r.exit_code, r.output


@pytest.mark.parametrize("schema", ["v1", "v2"])
@pytest.mark.parametrize("attack", sorted(STRUCTURAL))
def test_structural_attack_refused_everywhere(attack: str, schema: str, tiny_cache: Path, image_folder: Path,
                                              tmp_path: Path) -> None:
    mutate, field, value = (STRUCTURAL if schema == "v1" else STRUCTURAL_V2)[attack]
    path = _craft(tiny_cache, mutate, schema)
    before = path.read_bytes()
    with pytest.raises(CacheError) as e:
        open_cache(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg and value in msg, msg
    assert f"featbank extract {image_folder}" in msg or "schema_version" in field, msg  # what to run
    code, out = _fit(str(path), "--out", str(tmp_path / "m"))
    assert code == 2 and str(path) in out and field in out and "Traceback" not in out, out
    with pytest.raises(CacheError, match="untouched") as e:
        featbank.extract(image_folder, path, **TINY)
    assert field in str(e.value)
    assert path.read_bytes() == before  # the rerun refused and kept the file
    assert featbank.extract(image_folder, path, **{**TINY, "overwrite": True}).n_embedded == 24
    open_cache(path).close()


def test_short_embeddings_not_reported_up_to_date(tiny_cache: Path, image_folder: Path) -> None:
    """Fewer embeddings than paths used to be 'up to date' for extract and crash fit later."""
    _craft(tiny_cache, lambda f: f["embeddings"].resize((20, 32)), "v1")
    with pytest.raises(CacheError, match="'paths' has shape \\(24,\\), but 'embeddings' has 20 rows"):
        featbank.extract(image_folder, tiny_cache, **TINY)


@pytest.mark.parametrize("schema", ["v1", "v2"])
def test_nan_rows_refused_on_read(schema: str, tiny_cache: Path, tmp_path: Path) -> None:
    _craft(tiny_cache, lambda f: f["embeddings"].__setitem__(5, np.nan), schema)
    with h5py.File(tiny_cache, "r") as f:
        name = f["paths"][5].decode()
    with open_cache(tiny_cache) as c:  # opening stays lazy: no pass over the embeddings
        with pytest.raises(CacheError, match=f"NaN or infinite.*row 5 .*{name}"):
            c.load_embeddings()
        c.load_embeddings([0, 1, 2])  # rows that are fine still read
        with pytest.raises(CacheError, match="NaN"):
            list(c.iter_chunks(np.arange(24), 4))
    code, out = _fit(str(tiny_cache), "--out", str(tmp_path / "m"))
    assert code == 2 and "NaN or infinite" in out and name in out and str(tiny_cache) in out, out


@pytest.mark.parametrize("schema", ["v1", "v2"])
def test_extreme_row_refused_by_default_and_named_in_a_warning(schema: str, tiny_cache: Path, tmp_path: Path) -> None:
    _craft(tiny_cache, lambda f: f["embeddings"].__setitem__(7, 1e38), schema)
    with h5py.File(tiny_cache, "r") as f:
        name = f["paths"][7].decode()
    with open_cache(tiny_cache) as c:
        with pytest.raises(CacheError, match=f"row 7 .*{name}"):
            c.load_embeddings()
    with open_cache(tiny_cache, extreme="warn") as c:
        with pytest.warns(ExtremeEmbeddingsWarning, match=name):
            X = c.load_embeddings()
        assert X[7, 0] == np.float32(1e38) and c.extreme_rows == {7}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c.load_embeddings()  # each row is reported once
    with open_cache(tiny_cache, extreme="ignore") as c:
        assert c.load_embeddings().shape == (24, 32)
    code, out = _fit(str(tiny_cache), "--out", str(tmp_path / "m"))
    assert code == 2 and name in out and f"{EXTREME_VALUE:g}" in out, out
    # Large but below the bound: read without a word (the file is v1 already, or a v2 index).
    _craft(tiny_cache, lambda f: f["embeddings"].__setitem__(7, EXTREME_VALUE / 2), "v2" if schema == "v2" else "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_cache(tiny_cache).load_embeddings()


@pytest.mark.parametrize("schema", ["v1", "v2"])
def test_incomplete_cache(schema: str, tiny_cache: Path, image_folder: Path, tmp_path: Path) -> None:
    _craft(tiny_cache, lambda f: f.attrs.__setitem__("complete", False), schema)
    with pytest.raises(CacheError, match=f"incomplete.*featbank extract {image_folder} --out {tiny_cache}"):
        open_cache(tiny_cache)
    open_cache(tiny_cache, allow_incomplete=True).close()
    code, out = _fit(str(tiny_cache), "--out", str(tmp_path / "m"))
    assert code == 2 and "incomplete" in out and "featbank extract" in out, out
    rep = featbank.extract(image_folder, tiny_cache, **TINY)  # a rerun finishes it, even with all rows there
    assert not rep.up_to_date and open_cache(tiny_cache).metadata["complete"] is True
    assert open_cache(tiny_cache).metadata["schema_version"] == 2  # a v1 file was migrated


def test_fit_on_a_text_file_does_not_advise_overwriting_it(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, out = _fit(str(notes))
    assert code == 2 and "not a featbank cache" in out and "--overwrite" not in out, out
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("kind", ["text", "foreign_hdf5"])
def test_extract_never_overwrites_a_file_that_is_not_a_cache(kind: str, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    if kind == "text":
        out.write_text("precious")
    else:
        with h5py.File(out, "w") as f:
            f["x"] = np.arange(3)
    before = out.read_bytes()
    r = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(out), "--backbone", "test_tiny",
                                 "--engine", "torch", "--num-workers", "0", "--overwrite", "-q"])
    assert r.exit_code == 2 and "not a featbank cache" in r.output and str(out) in r.output, r.output
    assert out.read_bytes() == before


# -- which cache `fit` takes when none is named (issue 12) -----------------------------------------


def test_choice_skips_incomplete_and_damaged_caches(image_folder: Path, _isolated_cache_dir: Path) -> None:
    a = featbank.extract(image_folder, **TINY).path
    b = featbank.extract(image_folder, **{**TINY, "dtype": "float16"}).path
    with h5py.File(b, "r+") as f:
        f.attrs["complete"] = False
    os.utime(b, ns=(time.time_ns(), time.time_ns() + 10**9))  # newest, but incomplete
    junk = a.with_name("junk.h5")
    junk.write_text("not a cache")
    choice = choose_cache()
    assert choice.path == a and "only complete cache" in choice.reason and str(image_folder) in choice.reason
    assert {p for p, _ in choice.passed_over} == {b, junk}
    with h5py.File(a, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="(?s)No complete feature cache.*incomplete"):
        find_latest_cache()


def test_choice_refuses_caches_of_two_data_folders(image_folder: Path, tmp_path: Path, _isolated_cache_dir: Path) -> None:
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", classes=("a", "b"), n_per_class=3)
    a = featbank.extract(image_folder, **TINY).path
    b = featbank.extract(other, **TINY).path
    with pytest.raises(CacheError, match="2 data folders") as e:
        choose_cache()
    assert str(a) in str(e.value) and str(b) in str(e.value) and "Pass the cache" in str(e.value)
    code, out = _fit()
    assert code == 2 and "2 data folders" in out, out
    code, out = _fit(str(b), "--out", str(tmp_path / "m"), "--json")  # naming one works
    assert code == 0 and json.loads(out)["path"], out


# -- the file at --out: symlinks are written through, permission bits kept -------------------------


def test_extract_writes_through_a_symlink_and_keeps_the_mode(image_folder: Path, tmp_path: Path) -> None:
    real = tmp_path / "store" / "real.h5"
    real.parent.mkdir()
    featbank.extract(image_folder, real, **TINY)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    os.chmod(real, 0o444)
    from conftest import make_image_folder

    make_image_folder(image_folder, n_per_class=10, seed=5)  # rewrites the 24 images and adds 6
    rep = featbank.extract(image_folder, link, **TINY)
    assert rep.n_embedded == 30 and link.is_symlink() and os.readlink(link) == str(real)
    assert (os.stat(real).st_mode & 0o777) == 0o444
    with open_cache(real) as c:  # the target got the new rows (it used to keep stale ones)
        assert c.n_samples == 30
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["real.h5", "real.h5.parts"]
    with open_cache(link) as c:  # read through the link too: the parts lie beside the target
        assert c.n_samples == 30
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".partial")]
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "store" / "new.h5")
    featbank.extract(image_folder, dangling, **TINY)
    assert dangling.is_symlink() and (tmp_path / "store" / "new.h5").is_file()
