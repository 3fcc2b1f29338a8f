"""Skipped inputs have one home, ``skipped/`` in the cache: unreadable files and rows refused while listing.

Real manifests, real images made with PIL, real extraction with the tiny test backbone, real HDF5 files
read with plain h5py; an index in the old form (listing rows in the attribute ``listing_skipped``) is
written by featbank's own index writer and still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featbank.cache import describe_cache, open_cache, read_listed, read_parts_table
from featbank.cache._index import write_index
from featbank.cli.main import cli
from featbank.errors import CacheError

# The rows refused while listing the manifest: a file that is not there.
MISSING = ("imgs/no.png", "file not found", (0, 0))


def _run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _extract(tmp_path: Path) -> Path:
    """A cache of a manifest with 4 images, 1 file that is not an image and 1 missing file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        rows.append(f"imgs/im{i}.png,{'ab'[i % 2]}")
    (folder / "fake.png").write_text("not an image")
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join([*rows, "imgs/fake.png,a", f"{MISSING[0]},b"]) + "\n")
    out = tmp_path / "c.h5"
    res = _run("extract", tmp_path / "m.csv", "--out", out, "--backbone", "test_tiny", "--engine", "torch",
               "--num-workers", "0", "--shard-size", "2")
    assert res.exit_code == 0, res.output
    return out


def _to_old_form(out: Path) -> None:
    """Rewrite the index as featbank wrote it before skipped/ held the listing rows: attribute listing_skipped."""
    parts = read_parts_table(out)
    with h5py.File(out, "r") as f:
        classes = [c.decode() for c in f["classes"][...]]
        attrs = {k: v for k, v in f.attrs.items()}
        plan = str(f.attrs["plan"])
    attrs["listing_skipped"] = json.dumps([[MISSING[0], MISSING[1], list(MISSING[2])]])
    write_index(out, parts, classes, attrs, plan_json=plan)


def test_every_skipped_input_is_under_skipped_and_shown_by_info_and_verify(tmp_path):
    out = _extract(tmp_path)
    with h5py.File(out, "r") as f:  # plain h5py, no featbank: one place to look
        paths = [p.decode() for p in f["skipped/paths"][...]]
        reasons = [r.decode() for r in f["skipped/reasons"][...]]
        assert paths == ["imgs/fake.png", MISSING[0]]
        assert reasons[0].startswith("not an image") and reasons[1] == MISSING[1]
        assert f["skipped/fingerprints"][...].shape == (2, 2) and f["skipped/fingerprints"][1].tolist() == [0, 0]
        assert "listing_skipped" not in f.attrs
        assert read_listed(f) == [MISSING]
    with open_cache(out) as c:
        assert c.n_samples == 4 and sorted(p for p, _ in c.skipped) == sorted(paths)  # each once
        assert c.skipped_fingerprints.shape == (2, 2)
    assert describe_cache(out).n_skipped == 2
    res = _run("cache", "info", out)
    assert res.exit_code == 0 and "skipped    2 (inputs not embedded" in res.output, res.output
    res = _run("cache", "verify", out)
    assert res.exit_code == 0 and "ok: 4 rows in" in res.output and "2 skipped input(s) under skipped/" in res.output


def test_a_rerun_with_nothing_new_leaves_the_index_alone(tmp_path):
    out = _extract(tmp_path)
    before = os.stat(out).st_mtime_ns
    res = _run("extract", tmp_path / "m.csv", "--out", out, "--backbone", "test_tiny", "--engine", "torch",
               "--num-workers", "0", "--shard-size", "2")
    assert res.exit_code == 0, res.output
    assert os.stat(out).st_mtime_ns == before


def test_an_old_cache_keeps_its_listing_attribute_readable_and_a_rerun_moves_it(tmp_path):
    out = _extract(tmp_path)
    _to_old_form(out)
    with h5py.File(out, "r") as f:
        assert [p.decode() for p in f["skipped/paths"][...]] == ["imgs/fake.png"] and "listing" not in f
        assert read_listed(f) == [MISSING]
    with open_cache(out) as c:
        assert sorted(p for p, _ in c.skipped) == ["imgs/fake.png", MISSING[0]]
        assert dict(c.skipped)[MISSING[0]] == MISSING[1]
    assert describe_cache(out).n_skipped == 2
    assert "2 skipped input(s)" in _run("cache", "verify", out).output
    res = _run("extract", tmp_path / "m.csv", "--out", out, "--backbone", "test_tiny", "--engine", "torch",
               "--num-workers", "0", "--shard-size", "2")
    assert res.exit_code == 0, res.output
    with h5py.File(out, "r") as f:  # the rerun wrote the index again, with its listing rows in skipped/
        assert "listing_skipped" not in f.attrs
        assert [p.decode() for p in f["skipped/paths"][...]] == ["imgs/fake.png", MISSING[0]]


def _replace(out: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(out, "r+") as f:
        del f[name]
        if data.dtype == object:
            f.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8"))
        else:
            f.create_dataset(name, data=data)


@pytest.mark.parametrize(("name", "data", "says"), [
    ("listing/fingerprints", np.zeros((1, 3), np.int64), "group 'listing'"),
    ("listing/reasons", np.array([1.5]), "group 'listing'"),
    ("listing/paths", np.array(["a", "b"], dtype=object), "group 'listing'"),
])
def test_a_damaged_listing_group_is_refused_by_name(tmp_path, name, data, says):
    out = _extract(tmp_path)
    _replace(out, name, data)
    with pytest.raises(CacheError, match=says):
        open_cache(out)
    res = _run("cache", "verify", out)
    assert res.exit_code == 2 and "listing" in res.output, res.output


def test_listing_rows_that_skipped_does_not_map_are_refused(tmp_path):
    """More rows in listing/ than skipped/ maps after the parts' rows: the counts disagree, named."""
    out = _extract(tmp_path)
    _replace(out, "listing/paths", np.array(["x", "y"], dtype=object))
    _replace(out, "listing/reasons", np.array(["r", "s"], dtype=object))
    _replace(out, "listing/fingerprints", np.zeros((2, 2), np.int64))
    with pytest.raises(CacheError, match=r"'skipped/paths' has 2 rows, its table of parts lists 3"):
        open_cache(out)


def test_an_index_with_listing_rows_ignores_a_stray_listing_attribute(tmp_path):
    """Both homes at once (an attribute set by hand beside listing/): each skipped input is counted once."""
    out = _extract(tmp_path)
    with h5py.File(out, "r+") as f:
        f.attrs["listing_skipped"] = json.dumps([[MISSING[0], MISSING[1], list(MISSING[2])]])
    with open_cache(out) as c:
        assert sorted(p for p, _ in c.skipped) == ["imgs/fake.png", MISSING[0]]
    assert describe_cache(out).n_skipped == 2
