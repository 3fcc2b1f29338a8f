"""``fit --auto`` and ``fit --cv K``: the search over candidates by repeated K-fold CV on train+val.

Real test_tiny caches (conftest's ``layered``: every layer, 2 dihedral views, train/test split; and
``tiny_cache``: final layer, no views, no split), the real head families, real bundles.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.errors import BundleError, ConfigError
from featbank.fitting._auto import bootstrap_interval, idle_cores, search_threads
from featbank.fitting._layers import FeatureTable
from featbank.fitting._scored import Candidate, Scored
from featbank.fitting._search import AutoSearch, _ranked, make_folds, parse_budget
from featbank.fitting._spec_family import half_decades
from featbank.heads import HEAD_FAMILIES, PREPROCESSES, SKLEARN_C_GRID

try:
    from ._hostile import rewrite
    from .conftest import make_image_folder
except ImportError:  # pragma: no cover - pytest without rootdir package
    from _hostile import rewrite  # type: ignore[no-redef]

    from conftest import make_image_folder  # type: ignore[no-redef]


pytestmark = pytest.mark.usefixtures("one_thread")


class Recording:
    """A real head family that also records the matrices and folds the search hands it."""

    def __init__(self, family):
        self.family, self.name = family, family.name
        self.preprocesses = getattr(family, "preprocesses", ("standardize",))
        self.seen: list[tuple[tuple[int, int], list]] = []
        self.matrices: list[np.ndarray] = []

    def default_grid(self, *a):
        return self.family.default_grid(*a)

    def cv_scores(self, X, y, folds, grid, **kw):
        self.seen.append((X.shape, [(np.asarray(a).copy(), np.asarray(b).copy()) for a, b in folds]))
        self.matrices.append(X)
        return self.family.cv_scores(X, y, folds, grid, **kw)

    def build(self, params, **kw):
        return self.family.build(params, **kw)

    def relative_cost(self, *a):
        return self.family.relative_cost(*a)


@pytest.fixture(scope="module")
def auto_bundle(layered, tmp_path_factory) -> tuple[Path, featbank.FitResult]:
    _, cache = layered
    out = tmp_path_factory.mktemp("auto") / "m"
    return out, featbank.fit(cache, auto=True, cv=3, budget="60s", out=out)


def test_a_family_the_loader_cannot_check_is_searched_but_not_saved(layered, tmp_path) -> None:
    _, cache = layered
    rec = Recording(HEAD_FAMILIES["linear"])
    with pytest.raises(ConfigError, match=r"\['linear'\] are not those of featbank.heads.HEAD_FAMILIES"):
        featbank.fit(cache, auto=True, cv=3, budget="60s", out=tmp_path / "m", families={"linear": rec})
    assert not (tmp_path / "m").exists() and not rec.seen  # refused before any work


def _board(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.search["leaderboard"]]


def test_folds_are_over_images_and_every_row_handed_to_the_search_is_one_image(layered) -> None:
    _, cache = layered
    rec = Recording(HEAD_FAMILIES["linear"])
    res = featbank.fit(cache, auto=True, cv=3, budget="60s", save=False, families={"linear": rec})
    with featbank.open_cache(cache) as c:
        n_train = int(c.split_mask("train").sum())
        assert c.n_views == 2 and len(c.layers) > 2
    # Every matrix has one row per training image (plain, or its views pooled): no view is a row,
    # so no image's views can fall on both sides of a fold; and no test image is in it.
    assert rec.seen and {shape[0] for shape, _ in rec.seen} == {n_train}
    views = {row["views"] for row in res.search["leaderboard"]}
    assert views == {"plain", "pooled"}
    for _, folds in rec.seen:
        for fit_rows, held in folds:
            assert not set(fit_rows) & set(held) and len(fit_rows) + len(held) == n_train
    y = np.repeat(np.arange(3), 8)
    for repeat in make_folds(y, 4, 2, seed=0):
        held = np.concatenate([b for _, b in repeat])
        assert sorted(held) == list(range(24))  # each image held out exactly once per repeat
        assert all(np.bincount(y[b]).tolist() == [2, 2, 2] for _, b in repeat)  # stratified


def test_auto_writes_a_bundle_whose_leaderboard_winner_is_its_head(auto_bundle, layered) -> None:
    out, res = auto_bundle
    board = res.search["leaderboard"]
    assert [r["rank"] for r in board] == list(range(1, len(board) + 1))
    assert all(0.0 <= r["cv_mean"] <= 1.0 and r["n_folds"] >= 1 for r in board) and board[0]["n_folds"] >= 3
    assert {r["head"] for r in board} <= set(HEAD_FAMILIES) and {r["preprocessing"] for r in board} <= set(PREPROCESSES)
    win = board[0]
    assert res.chosen == win["params"] and res.head == win["head"]
    lo, hi = res.headline["top1_ci95"]
    assert lo <= res.headline["top1"] <= hi
    m = json.loads((out / "manifest.json").read_text())
    assert m["search"]["leaderboard"] == json.loads(json.dumps(board))
    assert m["head"]["family"] == win["head"] and m["features"]["layers"] == win["layers"]
    from featbank.bundles import load_bundle
    from featbank.export._head_only import feature_spec

    std = feature_spec(load_bundle(out))["standardisation"]  # what a head-only export's metadata says
    assert std["preprocess"] == win["preprocessing"] and std["l2_normalize"] == (win["preprocessing"] == "l2")
    assert bool(m["features"].get("view_pool")) == (win["views"] == "pooled")
    # The saved head predicts as the search's refitted winner scored: evaluate reads it back.
    ev = featbank.evaluate(out, layered[1])
    assert ev.metrics["top1"] == pytest.approx(res.headline["top1"])
    summary = res.summary()
    assert "| rank | features | views | preprocessing | head |" in summary and "95% bootstrap interval" in summary
    sets, chosen = res.search["feature_sets"], res.search["auto_layers"]
    with featbank.open_cache(layered[1]) as c:
        assert sets["final"] == ["final"] and sets["all"] == list(c.layers) and chosen
    assert f"greedy layer selection (feature set auto): {', '.join(chosen)}" in summary
    if "auto" not in sets:  # the selection chose another set's layers: said, scored once under that name
        same = next(n for n, ls in sets.items() if ls == chosen)
        assert f"the layers of {same}: scored once, as {same}" in summary
    assert any(line.startswith("  round 1: ") and line.endswith(" on 1 fold") for line in summary.splitlines())
    # --budget covers the layer selection and loading: the search got what they left (at least 20%)
    s = res.search
    assert s["total_budget_s"] == 60 and s["budget_s"] == pytest.approx(max(60 - s["prep_s"], 12), abs=2e-3)
    assert s["seconds"] <= 1.2 * s["budget_s"] and s["threads"] >= 1 and set(s["calibration"]) <= set(HEAD_FAMILIES)
    assert "measured speed against the cost estimates" in summary


@pytest.mark.slow
def test_an_auto_bundle_exports_checked_on_its_caches_images(auto_bundle, layered, tmp_path, monkeypatch) -> None:
    """An --auto bundle records no validation images (every train+val image was in a fold): export and
    --head-only export check parity on the images of the cache it was fitted on, test images first."""
    out, _ = auto_bundle
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    from featbank.bundles import load_bundle
    from featbank.export._parity import collect_images

    with featbank.open_cache(layered[1]) as c:
        test = [Path(c.abspath(c.paths[r])) for r in np.flatnonzero(c.split_mask("test"))]
        n_images = len(c.paths)
    images, source = collect_images(load_bundle(out), None, 64)
    assert images[:len(test)] == test and len(images) == min(n_images, 64)
    for kw in ({}, {"head_only": True}):
        report = featbank.export_model(out, tmp_path / f"auto{len(kw)}.onnx", **kw)
        p = report.parity
        assert p["passed"] and p["image_source"] == source == "the fit's cache, test images first"
        assert p["n_images"] == len(images)
        assert f"Parity check on {p['n_images']} image(s) (the fit's cache, test images first)" in report.summary()


@pytest.mark.parametrize("cache_now", ["gone", "fifo", "garbage", "another cache"])
def test_a_cv_bundle_whose_cache_is_gone_asks_for_check_images(layered, tmp_path, cache_now) -> None:
    """A --cv bundle records no validation images; where the cache its manifest names is gone, or is now
    a FIFO (never opened: no hang), not a cache, or another cache, export says what to pass."""
    from featbank.errors import ConfigError as Refused

    src = layered[1]
    parts = src.with_name(src.name + ".parts")  # a cache is its index and its parts folder, under one name
    (tmp_path / "c").mkdir()
    cache = tmp_path / "c" / src.name
    shutil.copy(src, cache)
    if parts.is_dir():
        shutil.copytree(parts, tmp_path / "c" / parts.name)
    out = featbank.fit(cache, "linear", cv=3, out=tmp_path / "m").path
    shutil.rmtree(tmp_path / "c")
    if cache_now != "gone":
        (tmp_path / "c").mkdir()
    if cache_now == "fifo":
        os.mkfifo(cache)
    elif cache_now == "garbage":
        cache.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    elif cache_now == "another cache":  # a real cache of other images under the same path
        other = make_image_folder(tmp_path / "other", n_per_class=3, splits=("train", "test"))
        featbank.extract(other, cache, backbone="test_tiny", engine="torch", num_workers=0, progress=False)
    with pytest.raises(Refused, match=r"records no validation images .* are not here, and --check-images was not given"):
        featbank.export_model(out, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["search"]["leaderboard"][0].update(cv_mean="0.9"), "cv_mean"),
    (lambda m: m["search"]["leaderboard"][0].update(cv_mean=float("nan")), "cv_mean"),
    (lambda m: m["search"]["leaderboard"][0].update(cv_std=-0.1), "cv_std"),
    (lambda m: m["search"]["leaderboard"][0].update(rank=2), "rank"),
    (lambda m: m["search"]["leaderboard"][0].update(views="tta"), "views"),
    (lambda m: m["search"]["leaderboard"][0].update(n_folds=True), "n_folds"),
    (lambda m: m["search"].update(leaderboard=[]), "leaderboard"),
    (lambda m: m["search"]["leaderboard"][0].update(head="knn-from-elsewhere"), "head.family"),
    (lambda m: m["search"]["leaderboard"][0]["params"].update(C=123.0), "head.chosen"),
    (lambda m: m["search"]["leaderboard"][0].update(layers=["stage9"]), "features.layers"),
    (lambda m: m["search"]["leaderboard"][0].update(views="pooled" if "view_pool" not in m["features"] else "plain"),
     "features.view_pool"),
    (lambda m: m["search"]["leaderboard"][0].update(preprocessing="whiten"), "head.preprocess"),
    (lambda m: m.update(search="the best"), "search"),
    (lambda m: m["search"]["leaderboard"].__setitem__(0, "row"), "leaderboard"),
    (lambda m: m["search"].update(cv=1), "cv"),
    (lambda m: m["search"]["leaderboard"][0].update(params=[1, 2]), "params"),
    (lambda m: m["search"]["leaderboard"][0].update(sample="yes"), "sample"),
    (lambda m: m["search"]["auto_selection"].update(layers=["stage9"]), "auto_selection"),
    (lambda m: m["search"].update(auto_selection="garbage"), "auto_selection"),
    (lambda m: m["search"].pop("feature_sets"), "feature_sets"),
    (lambda m: m["search"]["feature_sets"].update(final=None), "feature_sets"),
    (lambda m: m["search"].update(auto_layers={"a": 1}), "auto_layers"),
    (lambda m: m["search"].update(auto_layers=["stage9"]), "auto_layers"),
    (lambda m: m["search"]["leaderboard"][1].update(features="mine"), "does not list"),
    (lambda m: m["search"]["leaderboard"][1].update(head="made-up-family"), "neither a head family"),
    (lambda m: m["search"]["leaderboard"][1].update(preprocessing="nonsense"), "neither a head family"),
    (lambda m: m["search"]["leaderboard"][1].update(head="x" * 10**4), "at most 200 characters"),
    (lambda m: m["search"]["leaderboard"][0].update(rank=1.0), "rank"),
    (lambda m: m.update(metrics=[1]), "metrics"),
    (lambda m: m["metrics"]["cv"].update(n_folds=True), "n_folds"),
    (lambda m: m["search"]["auto_selection"].update(val_score=7), "auto_selection.val_score"),
    (lambda m: m["search"]["auto_selection"].update(rounds="lots"), "auto_selection.rounds"),
])
def test_a_leaderboard_that_lies_is_refused_on_load(auto_bundle, tmp_path, edit, field) -> None:
    out, _ = auto_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    rewrite(copy, edit)
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        featbank.load_bundle(copy)


def _retell_winner(m: dict, **row: str) -> None:
    """Change the winner's row and head section together, and its name in every round: a consistent lie."""
    win = m["search"]["leaderboard"][0]
    old = "/".join(win[k] for k in ("features", "views", "preprocessing", "head"))
    win.update(row)
    new = "/".join(win[k] for k in ("features", "views", "preprocessing", "head"))
    for rd in m["search"]["rounds"]:
        rd["candidates"] = [new if c == old else c for c in rd["candidates"]]
    m["head"].update({{"head": "family", "preprocessing": "preprocess"}[k]: v for k, v in row.items()})


@pytest.mark.parametrize("edit, why", [
    (lambda m: (m["head"].update(chosen={**m["head"]["chosen"], "C": 1e-3}),
                m["search"]["leaderboard"][0]["params"].update(C=1e-3)), "has C="),
    (lambda m: _retell_winner(m, head="mlp"), "builds no head"),
    (lambda m: _retell_winner(m, preprocessing="l2"), "'l2'"),
])
def test_a_manifest_that_agrees_with_itself_but_not_with_its_head_is_refused(layered, tmp_path, edit, why) -> None:
    """The leaderboard's winner is checked against head.family/chosen/preprocess on load, and those
    against the head file's estimator when it is loaded: a lie told consistently is still refused."""
    out = featbank.fit(layered[1], "linear", cv=3, out=tmp_path / "m").path
    assert featbank.load_bundle(out).load_head() is not None
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    rewrite(copy, edit)
    with pytest.raises(BundleError, match=why):
        featbank.load_bundle(copy).load_head()


def test_manifest_reading_is_bounded_and_its_messages_short(auto_bundle, tmp_path) -> None:
    """An oversized manifest is refused before it is parsed; a repeated key is refused; a refusal quotes
    at most a few hundred characters of a huge value."""
    from featbank.bundles.manifest import MAX_MANIFEST_BYTES

    out, _ = auto_bundle
    for name, text in {
        "big": lambda raw: raw + " " * (MAX_MANIFEST_BYTES + 1 - len(raw)),
        "dup": lambda raw: raw.replace('"kind":', '"kind": "head", "kind":', 1),
    }.items():
        copy = tmp_path / name
        shutil.copytree(out, copy)
        mf = copy / "manifest.json"
        mf.write_text(text(mf.read_text()))
        with pytest.raises(BundleError, match="larger than|appears twice"):
            featbank.load_bundle(copy)
    copy = tmp_path / "long"
    shutil.copytree(out, copy)
    rewrite(copy, lambda m: m["search"]["leaderboard"][0].update(params={f"k{i}": i for i in range(10**5)}))
    with pytest.raises(BundleError) as e:
        featbank.load_bundle(copy)
    assert "head.chosen" in str(e.value) and len(str(e.value)) < 1000


def _raise_a_later_row(m: dict) -> None:
    """The row under one of equal rounds (compared on the same folds) scored above it."""
    board = m["search"]["leaderboard"]
    i = next(i for i in range(1, len(board)) if board[i]["rounds"] == board[i - 1]["rounds"] == 1)
    board[i]["cv_mean"] = min(1.0, board[i - 1]["cv_mean"] + 0.01)
    board[i - 1]["cv_mean"] = board[i]["cv_mean"] - 0.01


def _rename_winners_features(m: dict) -> None:
    win = m["search"]["leaderboard"][0]
    win["features"] = "final" if win["features"] != "final" else "all"


def _copy_winner_down(m: dict) -> None:
    board = m["search"]["leaderboard"]
    board[1] = {**board[0], "rank": 2}


# Well-typed edits that only the section's agreement with itself (and with metrics.cv) gives away.
@pytest.mark.parametrize("edit, what", [
    (lambda m: m["search"]["leaderboard"][0].update(cv_mean=0.5), "metrics.cv says"),
    (lambda m: m["metrics"]["cv"].update(top1=0.5), "metrics.cv says"),
    (lambda m: m["search"]["leaderboard"][0].update(rounds=m["search"]["leaderboard"][0]["rounds"] + 1),
     "reached round|folds, but round"),
    (lambda m: m["search"]["leaderboard"][-1].update(rounds=99), "reached round 99 of a search of"),
    (lambda m: m["search"]["leaderboard"][-1].update(n_folds=m["search"]["leaderboard"][-1]["n_folds"] + 1),
     "folds, but round"),
    (_raise_a_later_row, "above the"),
    (_copy_winner_down, "are the same candidate"),
    (_rename_winners_features, "names feature set"),
    (lambda m: m["search"].update(n_scored=m["search"]["n_scored"] - 1), "n_scored is"),
    (lambda m: m["search"].update(n_candidates=m["search"]["n_candidates"] + 5), "n_candidates is"),
    (lambda m: m["search"]["rounds"][0]["candidates"].pop(), "round 1 scored"),
    (lambda m: m["search"]["rounds"][0].update(complete="yes"), "complete"),
    (lambda m: m["search"].update(rounds=[]), "search.rounds"),
    # numbers a float cannot hold, and the sample flags of a search that screened no sample
    (lambda m: m["metrics"]["cv"].update(top1=10**400), "metrics.cv.top1"),
    (lambda m: m["search"]["leaderboard"][-1].update(seconds=10**400), "seconds"),
    (lambda m: m["search"]["rounds"][0].update(sample={}), "says sample"),
    (lambda m: m["search"]["rounds"][0].update(sample="x"), r"rounds\[0\]\.sample"),
    (lambda m: m["search"]["leaderboard"][-1].update(sample=True), "says sample"),
])
def test_a_leaderboard_that_contradicts_itself_is_refused_on_load(auto_bundle, tmp_path, edit, what) -> None:
    out, _ = auto_bundle
    featbank.load_bundle(out)  # as written: consistent
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    rewrite(copy, edit)
    with pytest.raises(BundleError, match=what) as err:
        featbank.load_bundle(copy)
    assert "re-create it" in str(err.value)


@pytest.mark.slow
def test_test_labels_cannot_change_any_choice(layered) -> None:
    """The same cache twice, the second with every test image's label changed: the search must not notice."""
    _, cache = layered
    cheap = {n: HEAD_FAMILIES[n] for n in ("linear", "svm-rbf", "knn")}
    results = []
    for scramble in (False, True):
        with featbank.open_cache(cache) as c:
            if scramble:
                test = np.flatnonzero(c.split_mask("test"))
                c.labels = c.labels.copy()
                c.labels[test] = (c.labels[test] + 1) % len(c.classes)  # every test image another class
            # A budget that does not bind: the choice is then the same on any machine.
            results.append(featbank.fit(c, auto=True, cv=3, budget="30m", save=False, families=cheap))
    a, b = results
    assert _board(a) == _board(b) and a.chosen == b.chosen and a.head == b.head
    # The greedy layer selection too, score by score (its choice alone could survive a leak unchanged).
    assert a.search["auto_selection"]["rounds"] and a.search["auto_selection"] == b.search["auto_selection"]
    assert a.search["skipped"] == b.search["skipped"] == []
    assert a.headline["top1"] != b.headline["top1"]  # the test labels did differ, and only the final score saw them


class Timed(Recording):
    """The real family; ``times`` holds the wall seconds of each ``cv_scores`` call."""

    def __init__(self, family):
        super().__init__(family)
        self.times: list[float] = []

    def cv_scores(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.family.cv_scores(*a, **kw)
        self.times.append(time.perf_counter() - t0)
        return out


class Scaled(Timed):
    """The real family, timed, with its cost estimate multiplied by ``factor`` (how wrong it is here)."""

    def __init__(self, family, factor: float):
        super().__init__(family)
        self.factor = factor

    def relative_cost(self, *a):
        return self.family.relative_cost(*a) * self.factor


@pytest.mark.slow
@pytest.mark.parametrize("factor, screen_rows", [(1e-3, None), (1.0, None), (1e3, None), (1.0, 40)])
def test_the_search_stays_within_its_budget_and_uses_it(factor, screen_rows) -> None:
    """Real folds on the wall clock, with estimates 1000x too low, as the family makes them, and 1000x
    too high, and with round 1 on a sample of its fold: the measured speed plans the search, so the
    budget holds within 20% and is used."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    X = rng.normal(size=(120, 16)).astype(np.float32) + y[:, None] * 0.2
    fam = Scaled(HEAD_FAMILIES["knn"], factor)  # milliseconds a fold: the clock, not one long fold, decides
    cands = [Candidate(f"set{i}", ("final",), "plain", "standardize", "knn") for i in range(5000)]
    fam.cv_scores(X, y, make_folds(y, 5, 1, 0)[0][:1], fam.default_grid(96, 16, 4))  # imports done before the clock
    fam.times.clear()
    t0 = time.perf_counter()
    search = AutoSearch(cands, {"knn": fam}, cv=5, repeats=3, budget_s=5.0, screen_rows=screen_rows).fit(
        {(("final",), "plain"): X}, y)
    wall = time.perf_counter() - t0
    # The budget within 20%, plus the one fold the guard cannot interrupt (milliseconds on an idle
    # machine; on one shared by many jobs a fold can stall for seconds).
    assert wall <= 6.0 + max(fam.times), (wall, max(fam.times))
    # used (5000 candidates cannot all be scored in 5 s): at least half, as the per-fold seconds the plan
    # measured in round 1 may differ from those of later rounds on a busy machine
    assert wall >= 0.5 * 5.0, wall
    assert search.skipped_ and {r["reason"] for r in search.skipped_} == {"budget"}
    assert search.rounds_[0]["n_candidates"] >= 3 and max(s.scores.shape[1] for s in search.scored_) >= 5
    assert (search.screen_ is None) == (screen_rows is None)
    if screen_rows is not None:  # the sample's folds are estimated at its own rows: the ratio below is for whole folds
        return
    assert search.calibration_["knn"] == pytest.approx(sum(fam.times) / (sum(
        fam.family.relative_cost(96, 16, 6) * factor for _ in fam.times)), rel=0.05)  # its timing includes a little more


def test_auto_on_a_cache_without_layers_views_or_test_split(tiny_cache, tmp_path) -> None:
    out = tmp_path / "m"
    res = featbank.fit(tiny_cache, auto=True, cv=3, budget="60s", out=out)
    board = res.search["leaderboard"]
    assert {r["features"] for r in board} == {"final"} and {r["views"] for r in board} == {"plain"}
    assert res.eval_split == "cv" and res.notes and "no test split" in res.notes[0]
    bundle = featbank.load_bundle(out)
    assert bundle.manifest["search"]["leaderboard"][0]["head"] == res.head


def test_fit_cv_sweeps_a_single_head_by_k_fold(layered, tmp_path) -> None:
    _, cache = layered
    res = featbank.fit(cache, "LogisticRegression", cv=3, budget="60s", out=tmp_path / "lr")
    (row,) = res.search["leaderboard"]
    assert row["head"] == "LogisticRegression" and row["n_folds"] >= 3 and row["features"] == "final"
    # the C values fit's validation sweep can reach (its coarse grid, then half a decade either side of the best)
    assert res.chosen["C"] in half_decades(SKLEARN_C_GRID) and len(half_decades(SKLEARN_C_GRID)) == 11
    assert featbank.load_bundle(tmp_path / "lr").manifest["head"]["chosen"] == res.chosen
    # one candidate: its K folds of one repeat; no layer selection was made, so none is said
    assert "candidate-folds, 1 repeat, seed" in res.summary() and "of up to" not in res.summary()
    assert "s of loading (features loaded in" in res.summary()
    lin = featbank.fit(cache, "linear", cv=3, layers="stage1,final", pool_views=True, save=False)
    (row,) = lin.search["leaderboard"]
    assert (row["head"], row["views"], row["layers"]) == ("linear", "pooled", ["stage1", "final"])


def test_cli_auto_prints_the_leaderboard_and_json(layered, tmp_path) -> None:
    _, cache = layered
    r = CliRunner().invoke(cli, ["fit", str(cache), "--auto", "--cv", "3", "--budget", "1m", "--json",
                                 "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["leaderboard"][0]["rank"] == 1 and doc["search"]["cv"] == 3


@pytest.mark.parametrize("args, needle", [
    (["--auto", "--budget", "2x"], "--budget must be"),
    (["--auto", "--budget", "0s"], "positive"),
    (["--auto", "--budget", "-1m"], "--budget must be"),
    (["--auto", "--cv", "1"], "--cv"),
    (["--auto", "--cv", "9"], "at least 9"),  # 8 training images per class
    (["--head", "LogisticRegression", "--cv", "abc"], "--cv"),
    (["--auto", "--shots", "2"], "--shots"),
    # --auto chooses these itself: given, they would be ignored, so they are refused (defaults too)
    (["--auto", "--head", "linear"], "so --head would be ignored"),
    (["--auto", "--head", "knn"], "so --head would be ignored"),
    (["--auto", "--layers", "final"], "so --layers would be ignored"),
    (["--auto", "--standardize"], "so --standardize would be ignored"),
    (["--auto", "--layers", "all", "--pool-views"], "so --layers, --pool-views would be ignored"),
    (["--auto", "--l2-normalize"], "so --l2-normalize would be ignored"),
    # options of the one-validation-split protocol that K-fold CV would ignore
    (["--auto", "--no-refit"], "--no-refit keeps a head fitted on train alone"),
    (["--head", "linear", "--cv", "3", "--no-refit"], "--cv 3 chooses by K-fold CV"),
    (["--cv", "3", "--val-split", "0.3"], "--val-split 0.3 holds out one validation split; --cv 3"),
    (["--auto", "--no-train-views"], "--no-train-views: --auto trains on one row per image"),
    (["--cv", "3", "--seeds", "1"], "--seeds repeats K-shot sampling"),
    (["--budget", "10s", "--no-refit"], "; --budget chooses by K-fold CV"),
    (["--seeds", "2"], "--seeds repeats K-shot sampling"),  # without --shots: ignored before, in any mode
    # a family's grid is CV's to sweep; a head name close to a family's is pointed at it
    (["--head", "knn", "--param", "k=3", "--cv", "3"], "the knn family sweeps its own grid"),
    (["--head", "svm_rbf", "--cv", "3"], "Did you mean 'svm-rbf'"),
    (["--head", "nope"], "a head family of --auto with --cv K (svm-rbf, svm-linear, knn)"),
    # a family preprocesses as one of its own: flags it has no equivalent for are refused, not ignored
    (["--head", "knn", "--cv", "3", "--no-standardize"], "--no-standardize alone (raw features) is neither"),
    (["--head", "linear", "--cv", "3", "--l2-normalize"], "the linear family preprocesses as ['standardize'] only"),
    (["--head", "mlp", "--cv", "3", "--l2-normalize"], "the mlp family preprocesses as ['standardize'] only"),
])
def test_cli_bad_budget_or_cv_exits_2(layered, tmp_path, args, needle) -> None:
    _, cache = layered
    r = CliRunner().invoke(cli, ["fit", str(cache), *args, "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "m").exists()


def test_cv_of_a_family_says_what_it_did(layered, tmp_path) -> None:
    """``--head <family> --cv``: --l2-normalize gives the family's l2; layers given are named once; a budget
    that ends the search before the winner saw every fold says so, and a round it never reached says why."""
    _, cache = layered
    run = lambda *a: CliRunner().invoke(cli, ["fit", str(cache), *a, "--out", str(tmp_path / "m"), "--overwrite"])  # noqa: E731
    r = run("--head", "svm-rbf", "--cv", "3", "--l2-normalize", "--layers", "stage1,final")
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("| 1 |"))
    assert "| stage1,final | plain | l2 | svm-rbf |" in row, row
    assert "Warning: the budget" not in r.output and "TTA off (--tta off)" not in r.output
    r = run("--head", "svm-rbf", "--cv", "5", "--budget", "1ms")
    assert r.exit_code == 0, r.output
    assert "Warning: the budget let the winner be scored on 1 of the 5 folds of one 5-fold CV" in r.output
    assert "round 2: none on 5 folds: the budget left could not score a candidate there" in r.output


def test_parse_budget_and_bootstrap() -> None:
    assert [parse_budget(t) for t in ("90s", "2m", "1h", "1.5min", "500ms", 30)] == [90, 120, 3600, 90, 0.5, 30]
    for bad in ("", "m", "2 minutes", "nan", "1e3s", "0", 10**400, -(10**400), 10**5000):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    correct = np.array([1] * 80 + [0] * 20)
    lo, hi = bootstrap_interval(correct, seed=0)
    assert lo < 0.8 < hi and (lo, hi) == bootstrap_interval(correct, seed=0) and hi - lo < 0.2
    assert all(math.isnan(v) for v in bootstrap_interval(np.zeros(0)))


def test_pooled_search_rows_are_the_rows_predict_makes(layered) -> None:
    _, cache = layered
    rec = Recording(HEAD_FAMILIES["linear"])
    layers = ("stem", "stage2", "final")
    featbank.fit(cache, "linear", cv=3, layers=",".join(layers), pool_views=True, save=False, families={"linear": rec})
    with featbank.open_cache(cache) as c:
        table = FeatureTable(c, layers, pooled=True)
        train = np.flatnonzero(c.split_mask("train"))
        np.testing.assert_array_equal(rec.matrices[0], table.load_embeddings(train))


class Costly(Recording):
    """The real knn family, whose cost estimate says it is far too slow for the budget."""

    def relative_cost(self, *a):
        return 1e6


def test_the_plan_skips_what_its_estimates_cannot_afford_and_repeats_only_the_best() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    X = rng.normal(size=(60, 8)).astype(np.float32) + y[:, None]
    fams = {"knn": HEAD_FAMILIES["knn"], "slow-knn": Costly(HEAD_FAMILIES["knn"])}
    cands = [Candidate(f"s{i}", ("final",), "plain", pre, h) for i in range(3) for pre in ("standardize", "l2")
             for h in fams]
    runs = [AutoSearch(cands, fams, cv=3, repeats=3, budget_s=600.0, seed=4).fit({(("final",), "plain"): X}, y)
            for _ in range(2)]
    a, b = runs
    assert [r["reason"] for r in a.skipped_] == ["budget"] * 6 and {r["head"] for r in a.skipped_} == {"slow-knn"}
    assert fams["slow-knn"].seen == []  # never scored
    # one fold each, then a third goes on: the other 2 folds of repeat 1, then all of repeat 2
    assert [(rnd["n_candidates"], rnd["n_folds"]) for rnd in a.rounds_] == [(6, 1), (2, 3), (1, 6)]
    assert a.best_.scores.shape[1] == 6 and a.scored_[1].scores.shape[1] == 3 and a.scored_[2].scores.shape[1] == 1
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.leaderboard()]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.leaderboard()]  # reproducible


class SimClock:
    """Simulated seconds for the search's ``clock``: the ``Fixed`` families below advance it by their true cost."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Fixed:
    """A head family with preset held-out scores, true seconds per fold and cost estimates: the search's
    planning alone, on real arrays, with time simulated (``clock``) so every assertion is exact."""

    preprocesses = ("standardize",)

    def __init__(self, name: str, score: float, cost: float, clock: SimClock | None = None,
                 estimate: float | None = None):
        self.name, self.score, self.cost, self.clock = name, score, cost, clock
        self.estimate = cost if estimate is None else estimate
        self.folds = 0
        self.later: float | None = None  # seconds of every fold after the first, when not ``cost``

    def default_grid(self, *a):
        return [{"k": 1}]

    def cv_scores(self, X, y, folds, grid, **kw):
        for _ in folds:
            if self.clock is not None:
                self.clock.t += self.later if self.folds and self.later is not None else self.cost
            self.folds += 1
        return np.full((len(grid), len(folds)), self.score)

    def build(self, params, **kw):
        raise NotImplementedError

    def relative_cost(self, *a):
        return self.estimate


def _fixed_search(fams, clock, **kw):
    cands = [Candidate("final", ("final",), "plain", "standardize", h) for h in fams]
    y = np.repeat(np.arange(2), 10)
    return AutoSearch(cands, fams, clock=clock, **kw).fit({(("final",), "plain"): np.zeros((20, 2), np.float32)}, y)


def test_a_round_the_budget_cut_short_promotes_no_one() -> None:
    clock = SimClock()
    # best: the best score, but its other folds do not fit the budget; the next one does.
    fams = {"best": Fixed("best", 0.9, 5.0, clock), "good": Fixed("good", 0.8, 0.5, clock),
            "ok": Fixed("ok", 0.7, 0.5, clock), "poor": Fixed("poor", 0.6, 0.5, clock)}
    s = _fixed_search(fams, clock, cv=5, repeats=2, budget_s=20.0)
    # round 1: 3 x 0.5 s + 5 s = 6.5 s (leaving 6.5 s for the later rounds at 0.5 s a fold); round 2
    # keeps 2: best's 4 folds (20 s, as timed) do not fit, good's (2 s) do
    assert [r["n_candidates"] for r in s.rounds_][:2] == [4, 1] and not s.rounds_[1]["complete"]
    assert fams["best"].folds == 1 and fams["good"].folds == 5 and clock.t == pytest.approx(8.5)
    assert s.scored_[0].candidate.head == "best"  # not "good", which alone got more folds
    assert [x.candidate.head for x in s.scored_] == ["best", "good", "ok", "poor"]


def test_the_plan_follows_the_measured_speed_when_the_estimates_are_3x_too_high() -> None:
    """A quiet machine: every fold takes a third of its estimate. Planning by the estimates alone would
    fit 3 of 12 candidates in round 1 with the later rounds (9 s + 18 s); timed, all 12 fit, and the
    budget is used."""
    clock = SimClock()
    fams = {f"h{i}": Fixed(f"h{i}", 0.5 + 0.01 * i, 1.0, clock, estimate=3.0) for i in range(12)}
    s = _fixed_search(fams, clock, cv=3, repeats=2, budget_s=30.0)
    assert s.skipped_ == [] and s.rounds_[0]["n_candidates"] == 12
    # 12 x 1 fold (12 s), the best 4 x 2 folds (8 s), the best 2 x 3 folds of repeat 2 (6 s): 26 s
    assert [(r["n_candidates"], r["n_folds"]) for r in s.rounds_] == [(12, 1), (4, 3), (2, 6)]
    assert 0.8 * 30.0 <= clock.t <= 30.0
    assert s.best_.candidate.head == "h11" and s.calibration_ == {f"h{i}": 0.3333 for i in range(12)}


def test_the_plan_follows_the_measured_speed_when_the_estimates_are_3x_too_low() -> None:
    """A busy machine: every fold takes 3x its estimate. The first timed fold rescales the rest, so the
    search stops within its budget instead of planning 3x too much."""
    clock = SimClock()
    fams = {f"h{i}": Fixed(f"h{i}", 0.5 + 0.01 * i, 3.0, clock, estimate=1.0) for i in range(12)}
    s = _fixed_search(fams, clock, cv=3, repeats=2, budget_s=30.0)
    # round 1: h0 (3 s), then each at 3 s while it fits in the budget less the later rounds' reserve,
    # which is capped at half the budget (ROUND1_SHARE): 5 candidates, 15 s; round 2: the best 2 x 2
    # folds (12 s, 27 s in all); round 3 (h4 on 3 folds, 9 s) does not fit and is not started
    assert s.rounds_[0]["n_candidates"] == 5 and len(s.skipped_) == 7
    assert {r["reason"] for r in s.skipped_} == {"budget"} and all(r["predicted_s"] == 9.0 for r in s.skipped_)
    assert [(r["n_candidates"], r["n_folds"], r["complete"]) for r in s.rounds_] == [(5, 1, True), (2, 3, True),
                                                                                     (0, 6, False)]
    assert clock.t == pytest.approx(27.0) and s.best_.candidate.head == "h4"
    # planned by the estimates alone (1 s a fold), all 12 would have fitted round 1 (36 s): over budget


def test_a_candidate_slower_than_predicted_is_stopped_between_its_folds() -> None:
    clock = SimClock()
    # "slow" takes 1 s on its first fold (as estimated), then 10 s a fold: the guard stops it part-way
    fams = {"slow": Fixed("slow", 0.9, 1.0, clock), "fast": Fixed("fast", 0.5, 0.1, clock)}
    fams["slow"].later = 10.0
    s = _fixed_search(fams, clock, cv=5, repeats=1, budget_s=20.0)
    # round 2: slow (the best) is predicted at 4 x 1 s; its first fold there takes 10 s (11.1 s in all),
    # and another at that speed would end past 20 s: stopped, keeping none of that round's folds
    assert s.rounds_[0]["n_candidates"] == 2 and s.rounds_[1]["n_candidates"] == 0
    assert s.clock_cut_ == ["round 2: final/plain/standardize/slow (stopped after a fold)"]
    assert fams["slow"].folds == 2 and s.best_.scores.shape[1] == 1 and clock.t == pytest.approx(11.1)


def test_the_search_threads_are_the_idle_cores_and_are_given_back(monkeypatch) -> None:
    import os

    import torch
    from threadpoolctl import threadpool_info

    cores = len(os.sched_getaffinity(0))
    assert 1 <= idle_cores() <= cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert idle_cores() == 1  # an explicit setting caps it
    before = torch.get_num_threads()
    with search_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert torch.get_num_threads() == before


def test_busy_cpus_counts_what_runs_now_on_the_usable_cpus(tmp_path) -> None:
    """A real busy process pinned to one usable CPU: that CPU reads busy, and idle_cores leaves it out;
    an unreadable or foreign stat file gives None (then the load average decides)."""
    import os
    import subprocess
    import sys

    from featbank._machine import busy_cpus

    usable = sorted(os.sched_getaffinity(0))
    cpu = usable[-1]
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        time.sleep(0.3)
        assert busy_cpus({cpu}) >= 0.8
        if len(usable) >= 2:
            assert idle_cores() <= len(usable) - 1
    finally:
        spin.kill()
        spin.wait()
    assert 0.0 <= busy_cpus(set(usable), window=0.1) <= len(usable)
    assert busy_cpus({cpu}, stat=str(tmp_path / "missing")) is None
    (tmp_path / "stat").write_text("cpu0 not numbers at all\nintr 1 2 3\n")
    assert busy_cpus({0}, window=0.01, stat=str(tmp_path / "stat")) is None
    (tmp_path / "stat").write_text("cpu  1 2 3 4\ncpu7 1 2 3 4\n")
    assert busy_cpus({0}, window=0.01, stat=str(tmp_path / "stat")) is None  # names none of them


def test_round_one_goes_breadth_first_over_feature_sets_and_families() -> None:
    """One candidate of every (feature set, family) before any variant of views or preprocessing, so a
    budget that binds still tries every family on every feature set; pass 1 cheapest first, pass 2 the
    most promising family first."""
    clock = SimClock()
    fams = {"x": Fixed("x", 0.6, 1.0, clock), "y": Fixed("y", 0.7, 2.0, clock)}
    cands = [Candidate(f, (f,), v, "standardize", h) for v in ("plain", "pooled") for f in ("a", "b") for h in fams]
    data = {((f,), v): np.zeros((20, 2), np.float32) for f in ("a", "b") for v in ("plain", "pooled")}
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=1e4, clock=clock).fit(data, np.repeat(np.arange(2), 10))
    # pass 2, the variants: the family that scored best on pass 1 (y: 0.7) first, then x (0.6)
    assert s.rounds_[0]["candidates"] == ["a/plain/standardize/x", "b/plain/standardize/x", "a/plain/standardize/y",
                                          "b/plain/standardize/y", "a/pooled/standardize/y", "b/pooled/standardize/y",
                                          "a/pooled/standardize/x", "b/pooled/standardize/x"]
    # a budget that binds: the first pass fits (6 s), no variant does (a pooled y, 2 s, or x, 1 s, with the
    # reserve for round 2 - the best 2 on 4 folds, 12 s, capped at half the budget, 6.75 s - would end at
    # 14.75 / 13.75 s) (cheapest first alone would have taken the 4 x candidates, then 2 y)
    clock.t = 0.0
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=13.5, clock=clock).fit(data, np.repeat(np.arange(2), 10))
    assert s.rounds_[0]["candidates"] == ["a/plain/standardize/x", "b/plain/standardize/x", "a/plain/standardize/y",
                                          "b/plain/standardize/y"] and len(s.skipped_) == 4


def test_auto_adds_suffix_spans_for_the_gram_sharing_families_only(auto_bundle) -> None:
    from featbank.fitting._auto import spans

    ten = ("stem", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "head_conv", "final")
    assert spans(ten) == {"last2": ("head_conv", "final"), "last4": ("s6", "s7", "head_conv", "final")}
    assert list(spans(tuple(f"l{i}" for i in range(17)))) == ["last2", "last4", "last8"]
    assert spans(("a", "final")) == {} and spans(("final",)) == {}
    # test_tiny taps stem, stage1, stage2, final: one span, last2, scored by the SVMs and knn alone
    _, res = auto_bundle
    rows = res.search["leaderboard"] + res.search["skipped"]
    span_rows = [r for r in rows if r["features"] == "last2"]
    assert span_rows and all(r["layers"] == ["stage2", "final"] for r in span_rows)
    assert {r["head"] for r in span_rows} == {"svm-rbf", "svm-linear", "knn"}
    assert {r["features"] for r in rows} == {"final", "last2", "auto", "all"} - (
        set() if any(r["features"] == "auto" for r in rows) else {"auto"})
    k = res.search["kernels"]
    assert k["computed"] >= 1 and k["reused"] >= 1 and k["refused"] == 0  # the families shared Gram matrices
    assert f"Gram matrices (one per features, preprocessing and fold, shared by the SVMs and knn): {k['computed']} " \
        f"computed, {k['reused']} reused" in res.summary()
    # the sets share layers: their Gram matrices are summed from one per layer, reused across sets
    assert k["blocks_computed"] >= 1 and k["blocks_reused"] >= 1
    assert f"summed from layer blocks: {k['blocks_computed']} computed, {k['blocks_reused']} reused" in res.summary()


def test_the_search_shares_one_gram_matrix_per_fold_and_scores_as_without() -> None:
    """svm-rbf, svm-linear and knn on the same (features, preprocessing, fold) compute one Gram matrix;
    the leaderboard is the one computed without sharing (kernel_bytes=0: every family computes its own)."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 30)
    X = rng.normal(size=(90, 12)).astype(np.float32) + 0.7 * y[:, None]
    fams = {n: HEAD_FAMILIES[n] for n in ("svm-rbf", "svm-linear", "knn")}
    cands = [Candidate("final", ("final",), "plain", pre, h) for pre in ("standardize", "l2") for h in fams]
    data = {(("final",), "plain"): X}
    shared = AutoSearch(cands, fams, cv=3, repeats=2, budget_s=600.0, seed=2).fit(data, y)
    alone = AutoSearch(cands, fams, cv=3, repeats=2, budget_s=600.0, seed=2, kernel_bytes=0).fit(data, y)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in shared.leaderboard()]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in alone.leaderboard()]
    folds = {(s.candidate.preprocess, r["repeat"], f) for s in shared.scored_ for r in shared.rounds_
             if _label(s.candidate) in r["candidates"] for f in r["folds"]}
    n_fits = sum(s.scores.shape[1] for s in shared.scored_)
    assert shared.kernels_["computed"] == len(folds) < n_fits and shared.kernels_["reused"] == n_fits - len(folds)
    assert alone.kernels_["computed"] == 0 and alone.kernels_["refused"] == n_fits


def test_column_blocks_are_each_layers_columns_in_every_matrix(layered) -> None:
    """A block named (layer, views) holds the same numbers in every key's matrix: the layer's own matrix."""
    from featbank.fitting import column_blocks, feature_matrices

    _, cache = layered
    with featbank.open_cache(cache) as c:
        held = tuple(c.layers)
        keys = [(held, "plain"), (held, "pooled"), (held[-2:], "pooled"), (("final",), "plain"), (held[:1] + held[-1:], "plain")]
        rows = np.flatnonzero(c.split_mask("train"))
        data = feature_matrices(c, keys, rows)
        own = feature_matrices(c, [((t,), v) for t in held for v in ("plain", "pooled")], rows)
        blocks = column_blocks(c, keys)
    assert list(blocks) == keys
    for key, key_blocks in blocks.items():
        assert [name for name, _ in key_blocks] == [(t, key[1]) for t in key[0]]
        assert sorted(np.concatenate([cols for _, cols in key_blocks])) == list(range(data[key].shape[1]))
        for (t, views), cols in key_blocks:
            np.testing.assert_array_equal(data[key][:, cols], own[((t,), views)])


def test_feature_sets_that_share_layers_share_their_blocks_and_score_as_without(layered) -> None:
    """With column blocks, final, last2 and all layers cost one Gram matrix per layer, preprocessing and
    fold: each block is computed once, the shared ones reused by the other sets; every family's fold
    scores are those computed without any sharing (to one held-out row: the sums round differently)."""
    from featbank.fitting import column_blocks, feature_matrices
    from featbank.heads import FoldKernels

    _, cache = layered
    with featbank.open_cache(cache) as c:
        held = tuple(c.layers)
        keys = [(held, "plain"), (held[-2:], "plain"), (("final",), "plain"), (held[-2:], "pooled")]
        rows = np.flatnonzero(c.split_mask("train"))
        data, blocks, y = feature_matrices(c, keys, rows), column_blocks(c, keys), c.labels[rows]
    fams = {n: HEAD_FAMILIES[n] for n in ("svm-rbf", "knn")}
    names = ("all", "last2", "final", "last2")
    cands = [Candidate(name, key[0], key[1], pre, h) for name, key in zip(names, keys, strict=True)
             for pre in ("standardize", "sqrt", "l2") for h in fams]
    search = AutoSearch(cands, fams, cv=3, repeats=1, budget_s=600.0, seed=1).fit(data, y, blocks)
    assert len(search.leaderboard()) == len(cands)
    made = {(s.candidate.key, s.candidate.preprocess, r["repeat"], f) for s in search.scored_
            for r in search.rounds_ if _label(s.candidate) in r["candidates"] for f in r["folds"]}
    layer_folds = {((t, key[1]), pre, r, f) for key, pre, r, f in made for t in key[0]}
    k = search.kernels_
    assert k["computed"] + k["reused"] == sum(s.scores.shape[1] for s in search.scored_)  # one ask per fold
    assert k["blocks_computed"] == len(layer_folds)  # each (layer, views, preprocessing, fold) once
    assert k["blocks_reused"] >= sum(len(m[0][0]) for m in made) - len(layer_folds) > 0
    folds = search.folds_[0]
    one_row = 1.0 / min(len(h) for _, h in folds)
    for pre in ("standardize", "sqrt", "l2"):
        store = FoldKernels()
        for key in keys:
            store.register(data[key], blocks[key])
        for key in keys:  # all first: the others sum its stored blocks
            for name, fam in fams.items():
                grid = fam.default_grid(len(folds[0][0]), data[key].shape[1], 3)
                a = fam.cv_scores(data[key], y, folds, grid, preprocess=pre, kernels=store)
                b = fam.cv_scores(data[key], y, folds, grid, preprocess=pre)
                assert np.abs(a - b).max() <= one_row + 1e-12 and (a == b).mean() >= 0.9, (key, pre, name)
        assert store.blocks_reused >= 2 * len(folds)  # last2 and final from all's blocks, on every fold


def _label(c: Candidate) -> str:
    return f"{c.features}/{c.views}/{c.preprocess}/{c.head}"


class Sharing(Fixed):
    """A Fixed family that says it works from a shared Gram matrix (so its candidates form groups)."""

    def kernel_cost(self, *a):
        return 0.5 * self.estimate


def test_round_one_takes_tier_1_leads_after_tier_0_and_a_gram_group_together() -> None:
    """Tier 1 (the spans) leads after tier 0's; in pass 2, once a Gram-sharing candidate is scored, the
    other Gram-sharing candidates of its (features, preprocessing) come next."""
    clock = SimClock()
    fams = {"x": Sharing("x", 0.6, 1.0, clock), "y": Sharing("y", 0.7, 1.5, clock)}
    cands = [Candidate(f, (f,), v, "standardize", h, tier=int(f == "c")) for v in ("plain", "pooled")
             for f in ("c", "a", "b") for h in fams]  # c listed first: its tier, not its place, puts it after
    data = {((f,), v): np.zeros((20, 2), np.float32) for f in ("a", "b", "c") for v in ("plain", "pooled")}
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=1e4, clock=clock).fit(data, np.repeat(np.arange(2), 10))
    assert s.rounds_[0]["candidates"] == [
        "a/plain/standardize/x", "b/plain/standardize/x", "a/plain/standardize/y", "b/plain/standardize/y",
        "c/plain/standardize/x", "c/plain/standardize/y",  # tier 1 after tier 0
        # pass 2: the best family (y) first (ties: the listed order), each followed by the rest of its
        # Gram matrix's group (without: c/y, a/y, b/y, then the x's)
        "c/pooled/standardize/y", "c/pooled/standardize/x", "a/pooled/standardize/y", "a/pooled/standardize/x",
        "b/pooled/standardize/y", "b/pooled/standardize/x"]


def test_candidates_of_one_round_are_ranked_on_the_folds_they_share() -> None:
    """Two candidates through round 2 (5 folds), one also scored on round 3's 5 folds where the last
    round is incomplete: they are compared on the same 5 folds, not on a 5- against a 10-fold mean."""
    c = Candidate("a", ("final",), "pooled", "standardize", "svm-rbf")
    longer = Scored(c, [{"C": 1.0}], np.array([[0.81] * 5 + [0.79] * 5]), rounds=3)  # 0.807 on 5, 0.800 on 10
    shorter = Scored(c, [{"C": 1.0}], np.array([[0.805] * 5]), rounds=2)
    assert _ranked([shorter, longer], complete=2, cv=5) == [longer, shorter]
    # were round 3 complete, it would rank first on its own round, whatever its mean
    worse = Scored(c, [{"C": 1.0}], np.array([[0.70] * 10]), rounds=3)
    assert _ranked([shorter, worse], complete=3, cv=5) == [worse, shorter]
    # the grid point is chosen on the shared folds too
    two = Scored(c, [{"C": 1.0}, {"C": 10.0}], np.array([[0.80] * 5 + [0.60] * 5, [0.78] * 10]), rounds=3)
    assert _ranked([shorter, two], complete=2, cv=5) == [shorter, two]  # 0.80 < 0.805 on the 5 shared folds


class ByData(Fixed):
    """A Fixed family whose held-out score is the value its feature matrix is filled with."""

    preprocesses = ("standardize", "l2", "sqrt")

    def cv_scores(self, X, y, folds, grid, **kw):
        super().cv_scores(X, y, folds, grid, **kw)
        return np.full((len(grid), len(folds)), float(X[0, 0]))


def test_round_one_scores_the_variants_of_the_best_relative_first() -> None:
    """Pass 2 is renewed by the scores so far: once pooled views beat the plain ones, the other
    preprocessings of the pooled views come before those of the plain views (a static order would
    take the plain ones first, as the cheaper listed first), and a budget that binds spends itself there."""
    clock = SimClock()
    fams = {"y": ByData("y", 0.0, 1.0, clock)}
    cands = [Candidate("a", ("a",), v, pre, "y") for v in ("plain", "pooled") for pre in ("standardize", "l2", "sqrt")]
    data = {(("a",), "plain"): np.full((20, 2), 0.7, np.float32), (("a",), "pooled"): np.full((20, 2), 0.8, np.float32)}
    y = np.repeat(np.arange(2), 10)
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=1e4, clock=clock).fit(data, y)
    assert s.rounds_[0]["candidates"] == ["a/plain/standardize/y", "a/pooled/standardize/y", "a/pooled/l2/y",
                                          "a/pooled/sqrt/y", "a/plain/l2/y", "a/plain/sqrt/y"]
    clock.t = 0.0
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=8.0, clock=clock).fit(data, y)
    assert s.rounds_[0]["candidates"] == ["a/plain/standardize/y", "a/pooled/standardize/y", "a/pooled/l2/y",
                                          "a/pooled/sqrt/y"]
    assert [(r["views"], r["preprocessing"]) for r in s.skipped_] == [("plain", "l2"), ("plain", "sqrt")]


def test_a_later_round_promotes_only_as_many_as_the_budget_left_can_score() -> None:
    """Round 2 would keep the best 3 (4 folds, 4 s each) with 11 s left: it promotes the best 2, which
    complete it and are ranked on its 5 folds, instead of starting 3, cutting the third and ranking
    everyone on round 1's one fold."""
    clock = SimClock()
    fams = {f"h{i}": Fixed(f"h{i}", 0.5 + 0.01 * i, 1.0, clock) for i in range(9)}
    s = _fixed_search(fams, clock, cv=5, repeats=1, budget_s=20.0)
    assert [(r["n_candidates"], r["complete"]) for r in s.rounds_] == [(9, True), (2, True)]
    assert s.rounds_[1]["candidates"] == ["final/plain/standardize/h8", "final/plain/standardize/h7"]
    assert s.rounds_[1]["trimmed"] == ["final/plain/standardize/h6"]  # said, not silently dropped
    assert [x.scores.shape[1] for x in s.scored_[:3]] == [5, 5, 1] and s.clock_cut_ == []
    assert clock.t == pytest.approx(17.0)


def test_cv_grid_of_a_scikit_learn_head_reaches_what_the_validation_sweep_reaches() -> None:
    """``--head SVC --cv K`` sweeps every C that fit's validation sweep can visit: the coarse grid and half a
    decade either side, so a best C at the coarse grid's edge (100) is followed to 316, as on one split."""
    from featbank.fitting._select import HeadSpec
    from featbank.fitting._spec_family import SpecFamily

    grid = [p["C"] for p in SpecFamily(HeadSpec("SVC")).default_grid(100, 8, 2)]
    assert grid == sorted(grid) and len(grid) == 11
    assert grid[0] == pytest.approx(0.01 / 10**0.5) and grid[-1] == pytest.approx(100 * 10**0.5)
    assert set(SKLEARN_C_GRID) <= set(grid) and 100 * 10**0.5 in grid  # the sweep's own numbers, not rounded
    assert half_decades([1.0, 10**0.5]) == pytest.approx([10**-0.5, 1.0, 10**0.5, 10.0])  # a value two give is kept once
    # C fixed: no grid; every setting names the fixed parameters (the leaderboard and chosen show them)
    assert SpecFamily(HeadSpec("SVC", params={"C": 2.0, "kernel": "linear"})).default_grid(100, 8, 2) == [
        {"C": 2.0, "kernel": "linear"}]
    assert all(p["kernel"] == "linear" for p in SpecFamily(HeadSpec("SVC", params={"kernel": "linear"})).default_grid(100, 8, 2))


class WhenBudgetAllows(Fixed):
    """A Fixed family that runs only when the budget allows (as the MLP)."""

    when_budget_allows = True


def test_round_one_tries_a_family_that_runs_when_the_budget_allows_after_every_other() -> None:
    """The MLP's kind of family comes after every other candidate was scored or skipped, however cheap its
    estimate and however good its score; with a budget that binds it is what is skipped; alone, it is scored."""
    clock = SimClock()
    fams = {"x": Sharing("x", 0.6, 1.0, clock), "m": WhenBudgetAllows("m", 0.9, 0.1, clock)}
    cands = [Candidate(f, (f,), v, "standardize", h) for v in ("plain", "pooled") for f in ("a", "b") for h in fams]
    data = {((f,), v): np.zeros((20, 2), np.float32) for f in ("a", "b") for v in ("plain", "pooled")}
    y = np.repeat(np.arange(2), 10)
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=1e4, clock=clock).fit(data, y)
    order = s.rounds_[0]["candidates"]
    assert [c.split("/")[-1] for c in order] == ["x"] * 4 + ["m"] * 4, order
    assert s.best_.candidate.head == "m"  # last tried, not last ranked
    # a budget that binds: every x scored on round 1, the m's skipped for it
    clock = SimClock()
    fams = {"x": Sharing("x", 0.6, 1.0, clock), "m": WhenBudgetAllows("m", 0.9, 1.0, clock)}
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=9.0, clock=clock).fit(data, y)
    assert all(c.endswith("/x") for c in s.rounds_[0]["candidates"]) and len(s.rounds_[0]["candidates"]) == 4
    assert {r["head"] for r in s.skipped_} == {"m"}
    # alone, its first candidate is always scored
    clock = SimClock()
    fams = {"m": WhenBudgetAllows("m", 0.9, 50.0, clock)}
    s = AutoSearch([c for c in cands if c.head == "m"], fams, cv=5, repeats=1, budget_s=1.0, clock=clock).fit(data, y)
    assert len(s.rounds_[0]["candidates"]) == 1 and len(s.skipped_) == 3


def test_auto_refuses_feature_matrices_over_max_memory_before_loading(layered, tmp_path) -> None:
    """--max-memory bounds the search as it bounds fit: matrices over it exit 2 with what they need, the bound
    and what to do, before anything is loaded or written (before, --auto ignored it)."""
    _, cache = layered
    out = tmp_path / "m"
    r = CliRunner().invoke(cli, ["fit", str(cache), "--auto", "--max-memory", "20kB", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "over the 19.5 KiB of --max-memory 20kB" in r.output and "Traceback" not in r.output
    assert "candidate feature matrices" in r.output and "--max-memory 19.5KiB streams its rows" in r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, ["fit", str(cache), "--auto", "--max-memory", "lots"])
    assert r.exit_code == 2 and "--max-memory must look like 2GB" in r.output
    res = featbank.fit(cache, auto=True, cv=3, budget="30s", max_memory="1GB", save=False)  # within it: as before
    assert res.search["excluded"] == [] and res.search["n_scored"] >= 1


def test_gram_families_are_left_out_of_auto_where_their_matrix_exceeds_the_bound(layered) -> None:
    """20,000 train+val images: a Gram matrix (and the refit's kernel) of 11.9 GiB, over a 1 GB bound. --auto
    leaves the SVMs out and says why; the same head alone by --cv is refused; kNN (its own neighbour search is
    chunked, and the shared Gram store is bounded), the linear head and the MLP stay."""
    from featbank.fitting._auto import _union_table
    from featbank.fitting._memory import gram_bytes, plan_memory
    from featbank.fitting._report import search_lines

    _, cache = layered
    cands = [Candidate("final", ("final",), "plain", "standardize", h) for h in HEAD_FAMILIES]
    assert gram_bytes(20_000) == 12_800_000_000
    with featbank.open_cache(cache) as c:
        dims = _union_table(c, [(tuple(c.layers), "plain")]).layer_dims
        kept, excluded = plan_memory(dims, cands, HEAD_FAMILIES, auto=True, n_images=20_000, bound=10**9, given="1GB")
        assert {k.head for k in kept} == {"linear", "mlp", "knn"} and set(excluded) == {"svm-rbf", "svm-linear"}
        assert "takes 11.9 GiB, with the feature matrices 11.9 GiB, over the 953.7 MiB of --max-memory 1GB" in excluded["svm-rbf"]
        report = {"n_scored": 2, "n_candidates": 2, "cv": 5, "n_fold_fits": 2, "seed": 0, "seconds": 1.0, "repeats": 3,
                  "budget_s": 90, "leaderboard": [], "excluded": [{"head": "svm-rbf", "reason": excluded["svm-rbf"]}]}
        lines = search_lines(report, {})
        assert any(line.startswith("  left out: svm-rbf (its Gram matrix of the 20,000") for line in lines)
        svms = [k for k in cands if k.head.startswith("svm")]
        with pytest.raises(ConfigError, match=r"--head svm-rbf --cv: its Gram matrix .* Raise --max-memory above 11.9 GiB"):
            plan_memory(dims, svms[:1], HEAD_FAMILIES, auto=False, n_images=20_000, bound=10**9, given=None)
        with pytest.raises(ConfigError, match=r"--auto: its Gram matrix"):  # every family given holds one
            plan_memory(dims, svms, HEAD_FAMILIES, auto=True, n_images=20_000, bound=10**9, given=None)
        kept, excluded = plan_memory(dims, cands, HEAD_FAMILIES, auto=True, n_images=2_000, bound=10**9, given=None)
        assert kept == cands and excluded == {}  # 64 MB: everyone stays


def test_the_default_memory_bound_is_half_the_smaller_of_the_machine_and_its_container(tmp_path) -> None:
    """Without --max-memory: half the physical memory, or of a cgroup limit where lower (a container, a batch
    job); "max", garbage or an absent file are no limit; --max-memory wins outright."""
    from featbank._machine import memory_limit
    from featbank.fitting import _memory

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    files = (str(limit), str(tmp_path / "absent"))
    for text, expect in (("max\n", physical), ("1000000\n", 1_000_000), ("12ab", physical), (str(physical * 4), physical)):
        limit.write_text(text)
        assert memory_limit(files) == expect, text
    assert _memory.search_memory_bound(None) == int(memory_limit() * _memory.MEMORY_SHARE) <= physical // 2
    assert _memory.search_memory_bound(123) == 123


def test_the_layer_selection_reads_a_bounded_sample_of_validation_rows(layered) -> None:
    """The greedy selection of --auto reads every layer of its validation rows: a stratified sample of a
    fixed size where there are many more (so it is bounded whatever the images), all of them otherwise."""
    from featbank.fitting._layers import sample_rows

    _, cache = layered
    with featbank.open_cache(cache) as c:
        rows = np.flatnonzero(c.split_mask("train"))
        k = len(c.classes)
        few = sample_rows(c, rows, k * 2, seed=0)
        assert len(few) == 2 * k and set(few) <= set(rows) and (np.bincount(c.labels[few]) == 2).all()
        assert np.array_equal(sample_rows(c, rows, len(rows) - 1, seed=0), rows)  # not many more: all
        assert np.array_equal(sample_rows(c, rows, k * 2, seed=0), few)  # seeded



def _screening_problem():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), [120, 90, 60, 30])
    X = rng.normal(size=(len(y), 10)).astype(np.float32) + 0.6 * y[:, None]
    fams = {n: Recording(HEAD_FAMILIES[n]) for n in ("svm-rbf", "knn", "linear")}
    cands = [Candidate("final", ("final",), "plain", pre, h) for h in fams for pre in fams[h].preprocesses]
    return X, y, fams, cands


def test_round_one_screens_on_a_stratified_sample_of_a_large_fold_and_later_means_are_over_whole_folds() -> None:
    """Fold 1 with more fit rows than ``screen_rows``: round 1 scores every candidate on a stratified
    sample of it (every class, in proportion); round 2 scores the survivors on fold 1 whole, round 3
    on the other K - 1 folds, and their means are those of the whole folds alone (the sample's score
    set aside)."""
    X, y, fams, cands = _screening_problem()
    data = {(("final",), "plain"): X}
    s = AutoSearch(cands, fams, cv=3, repeats=2, budget_s=600.0, seed=3, screen_rows=60).fit(data, y)
    (fit0, held0), (sfit, sheld) = s.folds_[0][0], s.screen_
    assert s.rounds_[0]["sample"] == {"fit_rows": len(sfit), "of_fit_rows": 200,
                                      "held_out_rows": len(sheld), "of_held_out_rows": 100}
    assert len(sfit) == 60 and len(sheld) == 60
    assert np.isin(sfit, fit0).all() and np.isin(sheld, held0).all()
    for rows, whole in ((sfit, fit0), (sheld, held0)):  # stratified: each class in proportion, none missing
        share = np.bincount(y[rows], minlength=4) / len(rows)
        assert np.abs(share - np.bincount(y[whole], minlength=4) / len(whole)).max() < 0.02
    # round 1 handed every candidate the sample; round 2 fold 1 whole; round 3 the others of repeat 1
    assert s.rounds_[0]["n_candidates"] == len(cands)
    for fam in fams.values():
        first = fam.seen[0][1]
        assert len(first) == 1 and np.array_equal(first[0][0], sfit) and np.array_equal(first[0][1], sheld)
    # (7 candidates: 3 go on to round 2, 1 to round 3, which completes repeat 1 and ends the search)
    assert [(r["repeat"], r["folds"], r["n_folds"], r["n_candidates"]) for r in s.rounds_] == [
        (0, [0], 1, 7), (0, [0], 1, 3), (0, [1, 2], 3, 1)]
    later = [t for t in s.scored_ if t.rounds >= 2]
    assert all(t.scores.shape[1] == {2: 1, 3: 3}[t.rounds] for t in later) and len(later) == 3
    for t in later:  # the scores of the whole folds, and nothing else
        fam = fams[t.candidate.head].family
        folds = [s.folds_[0][0]] if t.rounds == 2 else [f for r in range(t.rounds - 2) for f in s.folds_[r]]
        want = fam.cv_scores(X, y, folds, t.grid, preprocess=t.candidate.preprocess)
        np.testing.assert_allclose(t.scores, want, rtol=1e-9, atol=1e-12)
    board = s.leaderboard()
    assert [r["n_folds"] for r in board] == [t.scores.shape[1] for t in s.scored_]
    assert all(r["n_folds"] == 1 and r["sample"] is True for r in board if r["rounds"] == 1)
    assert not any("sample" in r for r in board if r["rounds"] > 1)
    # every fold scored counts, the sample's included (a survivor's sample column is set aside, not unscored)
    assert s.report()["n_fold_fits"] == len(cands) + sum(r["n_folds"] for r in board if r["rounds"] > 1)


def test_small_folds_and_a_lone_candidate_are_never_screened() -> None:
    X, y, fams, cands = _screening_problem()
    data = {(("final",), "plain"): X}
    whole = AutoSearch(cands, fams, cv=3, repeats=2, budget_s=600.0, seed=3, screen_rows=None).fit(data, y)
    big = AutoSearch(cands, fams, cv=3, repeats=2, budget_s=600.0, seed=3, screen_rows=200).fit(data, y)
    assert whole.screen_ is None and big.screen_ is None and "sample" not in big.rounds_[0]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in whole.leaderboard()]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in big.leaderboard()]
    lone = AutoSearch(cands[:1], fams, cv=3, repeats=2, budget_s=600.0, seed=3, screen_rows=60).fit(data, y)
    assert lone.screen_ is None and lone.scored_[0].scores.shape[1] == 3


def test_the_summary_names_round_ones_sample() -> None:
    from featbank.fitting._report import search_lines

    X, y, fams, cands = _screening_problem()
    s = AutoSearch(cands, fams, cv=3, repeats=1, budget_s=600.0, seed=3, screen_rows=60).fit(
        {(("final",), "plain"): X}, y)
    lines = search_lines(s.report(), {})
    n_fit, n_held = len(s.screen_[0]), len(s.screen_[1])
    assert any(f"round 1: {len(cands)} candidate(s) on 1 fold (a stratified sample: {n_fit} of its 200 fit rows, "
               f"{n_held} of 100 held out)" in line for line in lines), lines


class Sized(Fixed):
    """A ``Fixed`` family whose score and true seconds differ on round 1's sample (at most ``small`` fit
    rows) and on whole folds; its estimate is the same for both (``relative_cost`` ignores the rows)."""

    def __init__(self, name, clock, *, screen: tuple[float, float], whole: tuple[float, float], small: int,
                 estimate: float = 1.0):
        super().__init__(name, screen[0], screen[1], clock, estimate)
        self.screen, self.whole, self.small = screen, whole, small

    def cv_scores(self, X, y, folds, grid, **kw):
        out = []
        for fit, _held in folds:
            score, cost = self.screen if len(fit) <= self.small else self.whole
            self.clock.t += cost
            out.append(score)
        return np.tile(np.asarray(out, dtype=np.float64), (len(grid), 1))


def _sized_search(fams, budget_s):
    cands = [Candidate("final", ("final",), "plain", "standardize", h) for h in fams]
    y = np.repeat(np.arange(2), 30)
    return AutoSearch(cands, fams, cv=5, repeats=1, budget_s=budget_s, clock=fams["a"].clock, screen_rows=20).fit(
        {(("final",), "plain"): np.zeros((60, 2), np.float32)}, y)


def test_a_round_cut_short_after_a_sampled_round_one_ranks_everyone_on_the_sample() -> None:
    """b leads on the sample but cannot afford round 2 (fold 1 whole); a is scored on it alone (0.95 on
    whole folds, and goes on to the other folds), so round 2 is cut short: the ranking falls back to
    round 1, on the sample for every candidate (b's 0.85 over a's 0.80), not a's whole folds against
    the others' sample."""
    clock = SimClock()
    fams = {"a": Sized("a", clock, screen=(0.80, 0.1), whole=(0.95, 0.1), small=20, estimate=0.1),
            "b": Sized("b", clock, screen=(0.85, 1.0), whole=(0.99, 1.0), small=20, estimate=1.0),
            "c": Sized("c", clock, screen=(0.50, 0.1), whole=(0.50, 0.1), small=20, estimate=0.1),
            "d": Sized("d", clock, screen=(0.40, 0.1), whole=(0.40, 0.1), small=20, estimate=0.1)}
    s = _sized_search(fams, 2.0)
    assert s.rounds_[0]["n_candidates"] == 4 and s.rounds_[1]["candidates"] == ["final/plain/standardize/a"]
    assert not s.rounds_[1]["complete"] and s.clock_cut_ == ["round 2: final/plain/standardize/b"]
    assert [t.candidate.head for t in s.scored_] == ["b", "a", "c", "d"]
    a = s.leaderboard()[1]
    assert a["n_folds"] == 5 and a["rounds"] == 3 and a["cv_mean"] == pytest.approx(0.95)  # its whole folds


def test_whole_folds_correct_the_speed_measured_on_round_ones_sample() -> None:
    """A candidate timed on the sample alone is predicted on whole folds at its own speed times how much
    faster whole folds of its family ran against their estimates than its sample folds did (not
    another family's: 1 until its own have run)."""
    from featbank.fitting._clock import Clock

    clock = Clock(100.0, SimClock())
    a = Scored(Candidate("final", ("final",), "plain", "standardize", "svm-rbf"), [{}], np.zeros((1, 1)),
               seconds=0.6, estimate=5.0, est_done=1.0, screen_seconds=0.6, screen_est=1.0, screen_scale=0.2)
    assert clock.predict(a, 5, 5) == pytest.approx(5.0 * 0.6)  # nothing whole timed yet: the sample's speed
    assert clock.predict(a, 1, 5, scale=0.2) == pytest.approx(0.2 * 0.6)
    clock.record("svm-rbf", 1.0, 0.6, screen=True)
    clock.record("knn", 2.0, 0.4, screen=True)
    clock.record("knn", 10.0, 1.0)  # knn's whole folds: 0.1 of their estimate, against 0.2 on the sample
    assert clock.whole_factor("svm-rbf") == 1.0 and clock.predict(a, 5, 5) == pytest.approx(5.0 * 0.6)
    clock.record("svm-rbf", 5.0, 1.0)  # svm-rbf's whole folds: 0.2 of their estimate, against 0.6
    assert clock.whole_factor("svm-rbf") == pytest.approx(1 / 3) and clock.whole_factor("knn") == pytest.approx(0.5)
    assert clock.predict(a, 5, 5) == pytest.approx(5.0 * 0.6 / 3)
    a.seconds, a.est_done = 1.6, 6.0  # once it has whole folds of its own, their speed
    assert clock.predict(a, 5, 5) == pytest.approx(5.0 * 1.0 / 5.0)


def test_a_later_round_plans_again_after_the_candidates_it_could_afford() -> None:
    """Round 2 (6 folds) affords the best alone (3 s predicted each, 5 s left); it runs in 1 s, so once it
    is done the next is planned again with the 4 s left, fits and is scored: the round completes with
    both and trims no one."""
    clock = SimClock()
    fams = {n: Fixed(n, sc, 0.5, clock, estimate=1.0) for n, sc in (("a", 0.9), ("b", 0.8), ("c", 0.5), ("d", 0.4))}
    for f in fams.values():
        f.later = 1 / 6
    s = _fixed_search(fams, clock, cv=7, repeats=1, budget_s=7.0)
    assert [(r["n_candidates"], r["complete"]) for r in s.rounds_] == [(4, True), (2, True)]
    assert s.rounds_[1]["candidates"] == ["final/plain/standardize/a", "final/plain/standardize/b"]
    assert s.rounds_[1]["trimmed"] == [] and s.clock_cut_ == []
    assert clock.t == pytest.approx(4 * 0.5 + 2 * 1.0)


@pytest.mark.parametrize("counts, n, want", [
    ([120, 90, 60, 30], 60, [24, 18, 12, 6]),
    ([10] * 201, 2000, None),  # exactly n, each class 9 or 10
    ([500, 3, 2], 100, None),  # exactly n, the small classes kept
    ([5] * 40, 30, [1] * 40),  # fewer rows than classes: one of each, more than n
])
def test_the_sample_is_stratified_and_of_its_size(counts, n, want) -> None:
    from featbank.splits import stratified_sample

    y = np.repeat(np.arange(len(counts)), counts)
    rows = np.arange(len(y))
    got = stratified_sample(rows, y, n, 0)
    per = np.bincount(y[got], minlength=len(counts))
    assert len(np.unique(got)) == len(got) and (per >= 1).all() and (per <= counts).all()
    if want is not None:
        assert per.tolist() == want
    else:
        assert len(got) == n and np.abs(per - np.asarray(counts) * n / len(y)).max() < 2  # one each pushes it over by <1
    assert np.array_equal(stratified_sample(rows, y, len(y), 0), rows)


def test_a_fold_under_twice_the_sample_is_not_sampled_and_knn_grids_fit_the_sample() -> None:
    X, y, fams, cands = _screening_problem()  # fold 1: 200 fit rows
    data = {(("final",), "plain"): X}
    assert AutoSearch(cands, fams, cv=3, repeats=1, budget_s=600.0, screen_rows=101).fit(data, y).screen_ is None
    s = AutoSearch(cands, fams, cv=3, repeats=1, budget_s=600.0, screen_rows=30).fit(data, y)
    assert len(s.screen_[0]) == 30
    knn = [t for t in s.scored_ if t.candidate.head == "knn"]
    assert knn and all(max(p["k"] for p in t.grid) <= 15 for t in knn)  # k <= rows / 2 of the sample


class TwoSpeed(Fixed):
    """A ``Fixed`` family whose first fold scores ``score`` in ``cost`` s and every later fold ``later_score``
    in ``later`` s."""

    def __init__(self, name, clock, score, later_score, cost, later):
        super().__init__(name, score, cost, clock, estimate=cost)
        self.later, self.later_score = later, later_score

    def cv_scores(self, X, y, folds, grid, **kw):
        out = []
        for _ in folds:
            out.append(self.score if self.folds == 0 else self.later_score)
            self.clock.t += self.later if self.folds else self.cost
            self.folds += 1
        return np.tile(np.asarray(out, dtype=np.float64), (len(grid), 1))


def test_one_the_plan_added_and_the_clock_stopped_is_trimmed_not_a_cut_round() -> None:
    """Round 2 plans a and b, which run fast, so it plans again and adds c, whose folds are slow: the clock
    stops c part-way. The round still completes with a and b (c trimmed), and b, best on 5 folds, wins;
    it is not thrown back to round 1's one fold (where a led)."""
    clock = SimClock()
    fams = {"a": TwoSpeed("a", clock, 0.9, 0.6, 1.0, 0.25), "b": TwoSpeed("b", clock, 0.85, 0.95, 1.0, 0.25),
            "c": TwoSpeed("c", clock, 0.8, 0.5, 1.0, 3.0)}
    fams.update({f"x{i}": TwoSpeed(f"x{i}", clock, 0.5, 0.5, 0.1, 0.1) for i in range(4)})
    cands = [Candidate("final", ("final",), "plain", "standardize", h) for h in fams]
    s = AutoSearch(cands, fams, cv=5, repeats=1, budget_s=13.4, clock=clock).fit(
        {(("final",), "plain"): np.zeros((60, 2), np.float32)}, np.repeat(np.arange(2), 30))
    r2 = s.rounds_[1]
    assert r2["complete"] and r2["candidates"] == ["final/plain/standardize/a", "final/plain/standardize/b"]
    assert r2["trimmed"] == ["final/plain/standardize/c"]
    assert s.clock_cut_ == ["round 2: final/plain/standardize/c (stopped after a fold)"]
    assert [t.candidate.head for t in s.scored_[:3]] == ["b", "a", "c"]


def test_the_printed_leaderboard_gives_no_spread_for_a_one_fold_row() -> None:
    from featbank.fitting._report import format_leaderboard

    row = {"rank": 1, "features": "final", "layers": ["final"], "views": "plain", "preprocessing": "standardize",
           "head": "linear", "params": {"C": 1.0}, "cv_mean": 0.8, "cv_std": 0.0, "n_folds": 1, "seconds": 0.1}
    one, three = format_leaderboard([row, {**row, "rank": 2, "cv_std": 0.02, "n_folds": 3}])[2:]
    assert "| 0.8000 | 1 |" in one and "±" not in one
    assert "| 0.8000 ± 0.0200 | 3 |" in three
