"""featbank audit: blocked neighbour search, duplicates across splits, label errors, outliers, report, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featbank.audit import AuditSettings, audit, find_label_issues, knn_search, plan_blocks, write_report
from featbank.cli.main import cli
from featbank.errors import CacheError, ConfigError

from _fitdata import blobs, write_synthetic_cache


def _brute(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(S, idx, axis=1)


def _reader(X: np.ndarray):
    return lambda rows: X[rows]


@pytest.mark.parametrize("block_rows", [1, 7, 64, 300])
@pytest.mark.parametrize("max_memory", [4_000, 1 << 30])
def test_blocked_search_equals_brute_force(block_rows: int, max_memory: int) -> None:
    """Whatever the block size and however many passes the memory budget forces, the result is brute force's."""
    X = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    want_i, want_s = _brute(X, 5)
    nb = knn_search(_reader(X), 300, 16, 5, max_memory=max_memory, block_rows=block_rows, backend="torch")
    np.testing.assert_array_equal(nb.index, want_i)
    np.testing.assert_allclose(nb.similarity, want_s, atol=1e-5)


def test_faiss_backend_equals_torch() -> None:
    pytest.importorskip("faiss")
    X = np.random.default_rng(1).normal(size=(200, 32)).astype(np.float32)
    a = knn_search(_reader(X), 200, 32, 4, max_memory=20_000, block_rows=13, backend="faiss")
    b = knn_search(_reader(X), 200, 32, 4, backend="torch")
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-5)


def test_fewer_rows_than_k_leaves_empty_slots() -> None:
    X = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    nb = knn_search(_reader(X), 3, 4, 5, backend="torch")
    assert (nb.index[:, 2:] == -1).all() and np.isnan(nb.similarity[:, 2:]).all()
    assert set(nb.index[0, :2]) == {1, 2}


@pytest.mark.parametrize("n,dim,budget", [(10**6, 1280, 1 << 30), (10**4, 1280, 1 << 30), (10**6, 64, 1 << 28)])
def test_memory_bounded_by_construction(n: int, dim: int, budget: int) -> None:
    """Resident rows + one block of similarities stay within the budget, whatever N is."""
    resident, block = plan_blocks(n, dim, budget)
    assert resident * dim * 4 + block * resident * 4 <= budget
    assert resident >= 1 and block >= 1


def _dup_cache(path: Path) -> tuple[Path, np.ndarray]:
    """Train rows 0-59, test rows 60-99, with test row 60 an exact copy of train row 3 and test row 61 a
    near copy of train row 4; labels in 2 classes."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(100, 32)).astype(np.float32)
    X[60] = X[3]
    X[61] = X[4] + rng.normal(0, 0.05, 32).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    splits = np.where(np.arange(100) < 60, 0, 2).astype(np.int8)
    return write_synthetic_cache(path, X, y, splits=splits), X


def test_planted_exact_and_near_duplicates_found_across_splits(tmp_path: Path) -> None:
    cache, X = _dup_cache(tmp_path / "dups.h5")
    res = audit(cache, AuditSettings(threshold=0.95, backend="torch", n_folds=2))
    pairs = {(int(a), int(b)): bool(e) for a, b, e in zip(res.pairs.a, res.pairs.b, res.pairs.exact)}
    assert pairs == {(3, 60): True, (4, 61): False}
    d = res.summary["duplicates"]
    assert d["cross_split_pairs"] == 2 and d["cross_split"] == {"test<->train": 2} and d["within_split_pairs"] == 0
    assert d["exact_pairs"] == 1 and d["near_pairs"] == 1
    assert list(res.summary)[:3] == ["cache", "n_images", "features"]
    assert list(d)[2] == "cross_split_pairs"  # cross-split counts come first


def test_a_rule_that_flags_more_pairs_than_images_says_so(tmp_path: Path) -> None:
    """Look-alike images (ELPV's cells) put thousands of pairs over the cosine rule: the text says so,
    and how to confirm pairs on pixels; the exact/near counts are over all pairs, on their own line."""
    cache, _ = _dup_cache(tmp_path / "dups.h5")
    quiet = audit(cache, AuditSettings(threshold=0.95, backend="torch", n_folds=2))
    assert not any(n.startswith("Duplicates:") for n in quiet.summary["notes"])
    loud = audit(cache, AuditSettings(threshold=-1.0, backend="torch", n_folds=2))
    assert len(loud.pairs.a) > loud.summary["n_images"]
    assert any(n.startswith("Duplicates:") and "--verify pixels" in n for n in loud.summary["notes"])
    assert "All duplicate pairs: exact" in loud.text() and "Within-split duplicate pairs:" in loud.text()


def test_planted_label_flips_found_on_separable_data(tmp_path: Path) -> None:
    X, y = blobs(40, 16, 4, sep=3.0, seed=4)
    rng = np.random.default_rng(5)
    flips = rng.choice(len(y), 8, replace=False)
    noisy = y.copy()
    noisy[flips] = (y[flips] + 1 + rng.integers(0, 3, 8)) % 4
    cache = write_synthetic_cache(tmp_path / "flips.h5", X, noisy)
    res = audit(cache, AuditSettings(backend="torch"))
    flagged = set(res.label_rows[res.issues.flagged].tolist())
    assert len(flagged & set(flips.tolist())) >= 7
    assert len(flagged - set(flips.tolist())) <= 2
    # suggested labels of the flips found are their true labels
    pos = {int(r): i for i, r in enumerate(res.label_rows)}
    assert all(res.issues.suggested[pos[f]] == y[f] for f in flagged & set(flips.tolist()))
    assert res.summary["label_issues"]["n_flagged"] == len(flagged)


def test_confident_learning_by_hand() -> None:
    """Thresholds are the per-class mean self-probabilities; an example confidently of another class is flagged."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    for method in ("confident_joint", "prune_by_noise_rate"):
        iss = find_label_issues(labels, proba, method)
        np.testing.assert_allclose(iss.thresholds, [(0.9 + 0.8 + 0.1) / 3, (0.8 + 0.7 + 0.9) / 3])
        assert iss.flagged.tolist() == [False, False, True, False, False, False]
        assert iss.suggested[2] == 1 and iss.order.tolist() == [2]
    # row 4 (p = 0.3, 0.7) clears neither threshold (0.6, 0.8), so it is not counted
    assert find_label_issues(labels, proba).joint.tolist() == [[2, 1], [0, 2]]


@pytest.mark.slow
def test_block_size_does_not_change_the_audit(tmp_path: Path) -> None:
    cache, _ = _dup_cache(tmp_path / "dups.h5")
    a = audit(cache, AuditSettings(threshold=0.95, backend="torch", n_folds=2, block_rows=3, max_memory=5_000))
    b = audit(cache, AuditSettings(threshold=0.95, backend="torch", n_folds=2))
    np.testing.assert_array_equal(a.pairs.a, b.pairs.a)
    np.testing.assert_array_equal(a.knn_outliers, b.knn_outliers)
    np.testing.assert_allclose(a.knn_score, b.knn_score, atol=1e-5)


def test_unlabelled_cache_gets_duplicates_and_outliers_only(tmp_path: Path) -> None:
    X = np.random.default_rng(6).normal(size=(50, 8)).astype(np.float32)
    X[10] = X[20]
    cache = write_synthetic_cache(tmp_path / "flat.h5", X, -np.ones(50, np.int64))
    res = audit(cache, AuditSettings(backend="torch"))
    assert res.issues is None and not res.summary["label_issues"]["checked"]
    assert any("no labels" in n for n in res.summary["notes"])
    assert any("in no split" in n for n in res.summary["notes"])
    assert (10, 20) in zip(res.pairs.a.tolist(), res.pairs.b.tolist())
    assert res.summary["outliers"]["knn"] >= 1 and res.summary["outliers"]["unclaimed"] == 0
    out = write_report(res, tmp_path / "report")
    assert not (out.parent / "label_issues.csv").exists() and (out.parent / "outliers.csv").exists()


def test_one_class_cache_says_why_labels_are_not_checked(tmp_path: Path) -> None:
    X = np.random.default_rng(7).normal(size=(30, 8)).astype(np.float32)
    res = audit(write_synthetic_cache(tmp_path / "one.h5", X, np.zeros(30, np.int64)), AuditSettings(backend="torch"))
    assert res.issues is None and any("fewer than 2 classes" in n for n in res.summary["notes"])


def test_nan_rows_are_refused_with_the_row_named(tmp_path: Path) -> None:
    X = np.random.default_rng(8).normal(size=(20, 8)).astype(np.float32)
    X[5, 2] = np.nan
    cache = write_synthetic_cache(tmp_path / "nan.h5", X, np.arange(20) % 2)
    with pytest.raises(CacheError, match="NaN"):
        audit(cache, AuditSettings(backend="torch"))
    r = CliRunner().invoke(cli, ["audit", str(cache)])
    assert r.exit_code == 2 and "NaN" in r.output and "Traceback" not in r.output


def test_empty_cache_exits_2(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "empty.h5", np.zeros((1, 8), np.float32), np.zeros(1, np.int64))
    r = CliRunner().invoke(cli, ["audit", str(cache)])
    assert r.exit_code == 2 and "at least 2" in r.output


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    cache, _ = _dup_cache(tmp_path / "dups.h5")
    with pytest.raises(ConfigError, match="threshold"):
        audit(cache, AuditSettings(threshold=1.5))
    r = CliRunner().invoke(cli, ["audit", str(cache), "--outlier-percentile", "100"])
    assert r.exit_code == 2 and "--outlier-percentile" in r.output


def test_report_folder_that_exists_is_refused(tmp_path: Path) -> None:
    cache, _ = _dup_cache(tmp_path / "dups.h5")
    report = tmp_path / "report"
    report.mkdir()
    (report / "keep.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["audit", str(cache), "--report", str(report)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (report / "keep.txt").read_text() == "mine"
    r = CliRunner().invoke(cli, ["audit", str(cache), "--report", str(report), "--overwrite", "--folds", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["duplicates"]["cross_split_pairs"] == 2
    assert not (report / "keep.txt").exists() and (report / "summary.json").exists()


@pytest.mark.slow
def test_html_report_on_a_real_cache_with_an_unreadable_image(image_folder: Path, tmp_path: Path) -> None:
    """A real test_tiny cache of real images with one planted copy; one image is broken after extraction."""
    from PIL import PngImagePlugin

    import featbank

    info = PngImagePlugin.PngInfo()
    info.add_text("note", "same pixels, other bytes")
    Image.open(image_folder / "cat" / "cat_000.png").save(image_folder / "dog" / "copy_of_cat.png", pnginfo=info)
    cache = tmp_path / "cache.h5"
    featbank.extract(image_folder, cache, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    broken = image_folder / "fox" / "fox_001.jpg"
    r = CliRunner().invoke(cli, ["audit", str(cache), "--report", str(tmp_path / "rep"), "--folds", "2",
                                 "--outlier-percentile", "80", "--threshold", "0.999"])
    assert r.exit_code == 0, r.output
    assert "Cross-split duplicate pairs" in r.output
    broken.write_bytes(b"not an image")
    res = audit(cache, AuditSettings(threshold=0.999, n_folds=2, outlier_percentile=80))
    page = write_report(res, tmp_path / "rep", overwrite=True, top=100)
    text = page.read_text()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert srcs and all((page.parent / s).is_file() for s in srcs)
    assert Image.open(page.parent / srcs[0]).size[0] > 0
    rows = (page.parent / "duplicates.csv").read_text().splitlines()
    assert any("copy_of_cat.png" in row and "cat_000.png" in row and "exact embedding" in row for row in rows[1:])
    summary = json.loads((page.parent / "summary.json").read_text())
    shown = {p for line in (page.parent / "outliers.csv").read_text().splitlines()[1:] for p in [line.split(",")[0]]}
    if "fox/fox_001.jpg" in shown or "fox/fox_001.jpg" in (page.parent / "duplicates.csv").read_text():
        assert any(s["path"] == "fox/fox_001.jpg" and "unreadable" in s["reason"] for s in summary["thumbnails_skipped"])


@pytest.mark.slow
def test_identical_files_are_told_apart(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    import featbank

    shutil.copy(image_folder / "cat" / "cat_000.png", image_folder / "cat" / "same_bytes.png")
    cache = tmp_path / "cache.h5"
    featbank.extract(image_folder, cache, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    res = audit(cache, AuditSettings(threshold=0.999, n_folds=2))
    assert res.summary["duplicates"]["identical_bytes_pairs"] == 1 and res.summary["duplicates"]["exact_pairs"] >= 1


@pytest.mark.slow
def test_layered_cache_with_views(layered: tuple[Path, Path]) -> None:
    _, cache = layered
    res = audit(cache, AuditSettings(n_folds=2, layers="all"))
    assert "augmented views not used" in res.summary["features"]
    assert res.knn_score.shape == (48,) and res.issues is not None


def _png_bytes(seed: int) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_webdataset_cache_duplicates_and_thumbnails_from_the_shards(tmp_path: Path) -> None:
    """Two tar shards; s003 of the second is the same picture as s001 of the first."""
    import io
    import tarfile

    import featbank

    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(2):
        with tarfile.open(shards / f"{t:06d}.tar", "w") as tf:
            for i in range(4):
                img = _png_bytes(1) if (t, i) == (1, 3) else _png_bytes(10 * t + i)
                for ext, payload in (("png", img), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    cache = tmp_path / "w.h5"
    featbank.extract(str(shards / "{000000..000001}.tar"), cache, backbone="test_tiny", engine="torch", num_workers=0,
                     progress=False)
    res = audit(cache, AuditSettings(threshold=0.9999, n_folds=2))
    with featbank.open_cache(cache) as c:
        found = {(c.paths[a], c.paths[b]) for a, b in zip(res.pairs.a, res.pairs.b)}
    assert ("000000.tar/s001", "000001.tar/s003") in found
    page = write_report(res, tmp_path / "rep")
    assert res.summary["thumbnails_skipped"] == []
    assert (page.parent / "sheets" / "duplicates.png").is_file()


# ------------------------------------------------------------------------------------------------
# Approximate search, pixel verification, thumbnails of unreadable images, one split
# ------------------------------------------------------------------------------------------------


def test_ivf_search_finds_the_planted_pairs_that_exact_search_finds(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(3000, 32)).astype(np.float32)
    src = rng.choice(1500, 30, replace=False)
    X[1500 + src] = X[src] + rng.normal(0, 0.1, (30, 32)).astype(np.float32)
    splits = np.where(np.arange(3000) < 1500, 0, 2).astype(np.int8)
    cache = write_synthetic_cache(tmp_path / "big.h5", X, -np.ones(3000, np.int64), splits=splits)
    approx = audit(cache, AuditSettings(search="ivf", threshold=0.9, block_rows=700))
    exact = audit(cache, AuditSettings(search="exact", threshold=0.9, backend="torch"))
    assert approx.summary["duplicates"]["search"] == "ivf" and exact.summary["duplicates"]["search"] == "exact"
    want = {(int(a), int(a) + 1500) for a in src}
    assert set(zip(exact.pairs.a.tolist(), exact.pairs.b.tolist())) == want
    assert set(zip(approx.pairs.a.tolist(), approx.pairs.b.tolist())) == want
    np.testing.assert_allclose(np.sort(approx.pairs.similarity), np.sort(exact.pairs.similarity), atol=1e-5)
    assert approx.summary["duplicates"]["cross_split_pairs"] == 30


def test_best_match_keeps_mutual_best_pairs_only() -> None:
    from featbank.audit import best_match

    a, b = np.array([0, 0, 1, 2]), np.array([1, 2, 2, 3])
    keep = best_match(a, b, np.array([0.9, 0.5, 0.95, np.nan]))
    # 1-2 (0.95) is best for both 1 and 2; 0-1 loses row 1 to 1-2; 0-2 is nobody's best; NaN never wins
    assert keep.tolist() == [False, False, True, False]


def _texture(seed: int, size: int = 160) -> Image.Image:
    """A smooth random grey texture (distinct per seed)."""
    small = np.random.default_rng(seed).integers(0, 256, (10, 10), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC).convert("RGB")


def _jpeg_copy(im: Image.Image) -> bytes:
    import io

    w, h = im.size
    im = im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((int(w * 0.72), int(h * 0.72)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=30)
    return buf.getvalue()


def test_pixel_verification_finds_a_jpeg_copy_that_cosine_misses(tmp_path: Path) -> None:
    """Rows are real image files: row 30 (test) is a cropped, resized JPEG q30 copy of row 3 (train) whose
    embedding is only loosely similar; row 10's file is broken and falls back to cosine."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(40, 16)).astype(np.float32)
    X[30] = X[3] + rng.normal(0, 0.8, 16).astype(np.float32)
    splits = np.where(np.arange(40) < 20, 0, 2).astype(np.int8)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, -np.ones(40, np.int64), splits=splits)
    for i in range(40):
        _texture(i).save(tmp_path / f"img_{i:05d}.png")
    (tmp_path / "img_00030.png").write_bytes(_jpeg_copy(_texture(3)))
    (tmp_path / "img_00010.png").write_bytes(b"not an image")
    cosine = audit(cache, AuditSettings(threshold=0.95, backend="torch"))
    assert (3, 30) not in set(zip(cosine.pairs.a.tolist(), cosine.pairs.b.tolist()))
    res = audit(cache, AuditSettings(verify="pixels", pixel_threshold=0.95, k=39, backend="torch"))
    assert set(zip(res.pairs.a.tolist(), res.pairs.b.tolist())) == {(3, 30)}
    assert res.pairs.pixel is not None and res.pairs.pixel[0] > 0.95 and res.pairs.similarity[0] < 0.95
    d = res.summary["duplicates"]
    assert d["verify"] == "pixels" and d["cross_split_pairs"] == 1
    assert any("could not be read" in n and "img_00010.png" in n for n in res.summary["notes"])
    out = write_report(res, tmp_path / "rep")
    rows = (out.parent / "duplicates.csv").read_text().splitlines()
    assert rows[0].split(",")[3] == "pixel_correlation" and float(rows[1].split(",")[3]) > 0.95


def test_unreadable_thumbnails_are_skipped_with_a_reason(tmp_path: Path) -> None:
    """The pair (0, 1) is shown in the report; image 1 is broken and image 2 is missing: both are skipped with
    their reason, the page is still written, and the readable image gets its thumbnail."""
    X = np.random.default_rng(13).normal(size=(30, 8)).astype(np.float32)
    X[1], X[2] = X[0], X[0] * 1.0001
    cache = write_synthetic_cache(tmp_path / "c.h5", X, -np.ones(30, np.int64))
    for i in range(30):
        if i != 2:
            _texture(i, 48).save(tmp_path / f"img_{i:05d}.png")
    (tmp_path / "img_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = audit(cache, AuditSettings(threshold=0.99, backend="torch"))
    page = write_report(res, tmp_path / "rep")
    skipped = {s["path"]: s["reason"] for s in json.loads((page.parent / "summary.json").read_text())["thumbnails_skipped"]}
    assert skipped["img_00001.png"].startswith("unreadable") and skipped["img_00002.png"].startswith("not found")
    assert "img_00000.png" not in skipped and re.findall(r"<img src='([^']+)'", page.read_text())


def test_cache_in_one_split_says_leakage_cannot_be_checked(tmp_path: Path) -> None:
    X = np.random.default_rng(14).normal(size=(20, 8)).astype(np.float32)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, np.arange(20) % 2, splits=np.zeros(20, np.int8))
    r = CliRunner().invoke(cli, ["audit", str(cache), "--folds", "2", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["duplicates"]["cross_split_pairs"] == 0
    assert any("all 20 images are in split 'train'" in n for n in summary["notes"])


def test_new_settings_are_checked(tmp_path: Path) -> None:
    cache, _ = _dup_cache(tmp_path / "dups.h5")
    for bad in ({"verify": "hash"}, {"pixel_threshold": 2.0}, {"search": "hnsw"}, {"nprobe": 0}):
        with pytest.raises(ConfigError):
            audit(cache, AuditSettings(**bad))
    assert AuditSettings().neighbors == 10 and AuditSettings(verify="pixels").neighbors == 50
    assert AuditSettings(verify="pixels", k=7).neighbors == 7
    r = CliRunner().invoke(cli, ["audit", str(cache), "--search", "hnsw"])
    assert r.exit_code == 2 and "hnsw" in r.output and "Traceback" not in r.output


def test_cli_options_map_onto_the_audit_settings():
    """One mapping: every click option of audit but the report's and the output's is an AuditSettings field."""
    from dataclasses import fields



    names = {p.name for p in cli.commands["audit"].params} - {"cache", "report_dir", "top", "overwrite", "as_json",
                                                                     "quiet"}
    assert names == {f.name for f in fields(AuditSettings)} - {"block_rows"}
