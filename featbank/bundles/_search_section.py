"""``search`` of a ``fit --auto`` / ``fit --cv K`` bundle's manifest, checked on load.

The section is the search's own account (``AutoSearch.report``): settings, rounds, skips and the
leaderboard. Nothing in it is re-run on load, but it must agree with itself and with the head the
bundle holds, so a leaderboard edited after the fact (a score raised, a row copied, a round
claimed) is refused rather than shown:

- each row well typed: rank in order, the candidate, finite scores in range, folds and rounds;
- each row a head family with one of its preprocessings (or the one head a ``--cv`` search scores);
- no candidate twice; each row's feature set listed (``feature_sets``, ``auto_layers``) and its
  layers that set's; ``auto_layers`` among the sets' layers;
- ``n_scored`` the rows, ``n_candidates`` the rows and the skipped;
- each round's candidates exactly the rows that reached it, and each row's folds those of its last round;
- rows ranked as the search ranks them: later complete rounds first, then by CV mean among the rows
  compared on the same folds (``featbank.fitting._search._ranked``);
- the first row the head the manifest describes (family, parameters, preprocessing, layers, views), with
  the CV score the manifest's ``metrics.cv`` gives it. That the head file holds that head is
  checked when it is loaded (``Bundle.load_head``: :func:`featbank.heads.family_mismatch`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BundleError
from ..features import FeatureSpec
from ._fields import FieldReader, shown

__all__ = ["check_search"]

_VIEW_MODES = ("plain", "pooled")
#: The longest feature set, preprocessing or head name a row may give (featbank's are under 40).
_MAX_NAME = 200
#: Slack when comparing stored CV means (the search ranks on means rounded to 12 digits).
_TOL = 1e-9


def check_search(r: FieldReader, raw: Mapping[str, Any], features: FeatureSpec | None, is_head: bool) -> None:
    """Refuse a ``search`` section that is ill-typed, disagrees with itself, or does not describe this head."""
    s = r.section(raw, "search", required=False)
    if s is None:
        return
    if not is_head:
        raise r.fail("search", "absent from a fine-tuned bundle", "present")
    cv = s.get("cv")
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 2:
        raise r.fail("search.cv", "an integer >= 2", cv)
    board = s.get("leaderboard")
    if not isinstance(board, list) or not board:
        raise r.fail("search.leaderboard", "a non-empty list", board)
    for i, row in enumerate(board):
        _check_row(r, row, i)
    _check_candidates(r, board)
    _check_winner(r, raw["head"], features, board[0])
    _check_headline(r, raw.get("metrics"), board[0])
    _check_feature_sets(r, s, board)
    _check_selection(r, s)
    _check_counts(r, s, board)
    rounds = _rounds(r, s)
    _check_rounds(r, rounds, board)
    _check_order(r, rounds, board)


def _check_row(r: FieldReader, row: Any, i: int) -> None:
    """One leaderboard row: its rank, what the candidate was, and finite scores."""
    p = f"search.leaderboard[{i}]."
    if not isinstance(row, dict):
        raise r.fail(p[:-1], "an object", row)
    if not isinstance(row.get("rank"), int) or isinstance(row.get("rank"), bool) or row["rank"] != i + 1:
        raise r.fail(p + "rank", f"{i + 1} (rows in rank order)", row.get("rank"))
    for key in ("features", "preprocessing", "head"):
        if len(r.text(row, key, p)) > _MAX_NAME:
            raise r.fail(p + key, f"a name of at most {_MAX_NAME} characters", row[key])
    layers = row.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(t, str) and t for t in layers):
        raise r.fail(p + "layers", "a non-empty list of layer names", layers)
    if row.get("views") not in _VIEW_MODES:
        raise r.fail(p + "views", f"one of {', '.join(_VIEW_MODES)}", row.get("views"))
    if not isinstance(row.get("params"), dict):
        raise r.fail(p + "params", "an object", row.get("params"))
    r.number(row, "cv_mean", p, 0.0, 1.0)
    r.number(row, "cv_std", p, 0.0, 1.0)
    r.number(row, "seconds", p, 0.0, math.inf)
    for key in ("n_folds", "rounds"):
        r.positive_int(row, key, p, required=True)
    if "sample" in row and row["sample"] is not True:  # scored on round 1's sample of fold 1 alone
        raise r.fail(p + "sample", "true or absent", row["sample"])


def _check_candidates(r: FieldReader, board: Sequence[Mapping[str, Any]]) -> None:
    """Every row a head family with one of its preprocessings, or (``fit --cv`` of one ``--head``) the winner's head."""
    from ..heads import HEAD_FAMILIES

    win = board[0]
    for row in board:
        fam = HEAD_FAMILIES.get(row["head"])
        if fam is not None and row["preprocessing"] in fam.preprocesses:
            continue
        if (row["head"], row["preprocessing"]) != (win["head"], win["preprocessing"]):
            raise _lie(r, f"row {row['rank']} is a {row['head']!r} head with preprocessing {row['preprocessing']!r}: "
                          "neither a head family's preprocessing nor the one head a --cv search scores")


def _label(row: Mapping[str, Any]) -> str:
    """A row's candidate as the rounds name it (``features/views/preprocessing/head``)."""
    return f"{row['features']}/{row['views']}/{row['preprocessing']}/{row['head']}"


def _lie(r: FieldReader, what: str) -> BundleError:
    what = what if len(what) <= 300 else what[:297] + "..."
    return BundleError(f"{r.source!r}: the search section contradicts itself: {what}. The bundle is corrupt or "
                       "was edited; re-create it.")


def _check_counts(r: FieldReader, s: Mapping[str, Any], board: Sequence[Mapping[str, Any]]) -> None:
    """``n_scored`` is the rows, ``n_candidates`` the rows and the skipped, and no candidate is there twice."""
    n_scored = r.positive_int(s, "n_scored", "search.", required=True)
    n_cands = r.positive_int(s, "n_candidates", "search.", required=True)
    skipped = s.get("skipped")
    if not isinstance(skipped, list):
        raise r.fail("search.skipped", "a list", skipped)
    if n_scored != len(board):
        raise _lie(r, f"n_scored is {n_scored} but the leaderboard has {len(board)} rows")
    if n_cands != n_scored + len(skipped):
        raise _lie(r, f"n_candidates is {n_cands} but {n_scored} were scored and {len(skipped)} skipped")
    seen: dict[str, int] = {}  # a candidate by its name (its feature set names its layers: _check_feature_sets)
    for row in board:
        if _label(row) in seen:
            raise _lie(r, f"rows {seen[_label(row)]} and {row['rank']} are the same candidate ({_label(row)})")
        seen[_label(row)] = row["rank"]


def _check_feature_sets(r: FieldReader, s: Mapping[str, Any], board: Sequence[Mapping[str, Any]]) -> None:
    """Each row's layers are those of the feature set it names, and the greedy selection's among the sets' layers."""
    sets = s.get("feature_sets")
    if not isinstance(sets, dict) or not sets:
        raise r.fail("search.feature_sets", "an object naming each feature set's layers", sets)
    named = {**sets, **({"auto": s["auto_layers"]} if "auto_layers" in s else {})}
    for name, layers in named.items():
        if not isinstance(layers, list) or not layers or not all(isinstance(t, str) and t for t in layers):
            raise r.fail("search.auto_layers" if name == "auto" and "auto" not in sets else
                         f"search.feature_sets[{shown(name)}]", "a non-empty list of layer names", layers)
    held = {t for layers in sets.values() for t in layers}
    if not set(named.get("auto", ())) <= held:
        raise _lie(r, f"auto_layers {shown(named['auto'])} are not all among the feature sets' layers ({shown(sorted(held))})")
    for row in board:
        want = named.get(row["features"])
        if want is None:
            raise _lie(r, f"row {row['rank']} names feature set {row['features']!r}, which search.feature_sets does not list")
        if want != row["layers"]:
            raise _lie(r, f"row {row['rank']} names feature set {row['features']!r} with layers {shown(row['layers'])}, "
                          f"but that set is {shown(want)}")


def _check_selection(r: FieldReader, s: Mapping[str, Any]) -> None:
    """``auto_selection``, where present: the greedy selection's record, whose layers are ``auto_layers``."""
    sel = s.get("auto_selection")
    if sel is None:
        return
    layers = s.get("auto_layers")
    if not isinstance(sel, dict) or not isinstance(layers, list) or sel.get("layers") != layers:
        raise r.fail("search.auto_selection", "the greedy selection's record, its layers those of search.auto_layers",
                     sel.get("layers") if isinstance(sel, dict) else sel)
    if not isinstance(sel.get("rounds"), list) or not all(isinstance(x, dict) for x in sel["rounds"]):
        raise r.fail("search.auto_selection.rounds", "a list of rounds", sel.get("rounds"))
    r.number(sel, "val_score", "search.auto_selection.", 0.0, 1.0)  # a validation top-1


def _rounds(r: FieldReader, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    rounds = s.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise r.fail("search.rounds", "a non-empty list", rounds)
    for i, rd in enumerate(rounds):
        p = f"search.rounds[{i}]."
        if not isinstance(rd, dict):
            raise r.fail(p[:-1], "an object", rd)
        r.positive_int(rd, "n_folds", p, required=True)
        if not isinstance(rd.get("complete"), bool):
            raise r.fail(p + "complete", "true or false", rd.get("complete"))
        names = rd.get("candidates")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise r.fail(p + "candidates", "a list of candidate names", names)
    return rounds


def _check_rounds(r: FieldReader, rounds: Sequence[Mapping[str, Any]], board: Sequence[Mapping[str, Any]]) -> None:
    """Each round scored exactly the rows that reached it; each row has the folds of its last round.
    (Linear in the section's size: a row is found by its name, and the rows reaching a round counted.)"""
    reached_by = {}  # row name -> the rounds it reached
    n_ending = [0] * (len(rounds) + 1)  # rows whose last round is k (1-based)
    for row in board:
        if row["rounds"] > len(rounds):
            raise _lie(r, f"row {row['rank']} reached round {row['rounds']} of a search of {len(rounds)} rounds")
        want = rounds[row["rounds"] - 1]["n_folds"]
        if row["n_folds"] != want:
            raise _lie(r, f"row {row['rank']} has {row['n_folds']} folds, but round {row['rounds']} ends with {want}")
        reached_by[_label(row)] = row["rounds"]  # names are unique (_check_counts)
        n_ending[row["rounds"]] += 1
    n_reaching = len(board)
    for k, rd in enumerate(rounds):
        names = rd["candidates"]
        if len(names) != n_reaching or len(set(names)) != len(names) or any(reached_by.get(n, 0) <= k for n in names):
            raise _lie(r, f"round {k + 1} scored {len(names)} candidates, but {n_reaching} rows say they reached it "
                          "(or not the same ones)")
        n_reaching -= n_ending[k + 1]


def _check_order(r: FieldReader, rounds: Sequence[Mapping[str, Any]], board: Sequence[Mapping[str, Any]]) -> None:
    """Rows in the search's order: the last complete round reached first; within it, the CV mean of the
    rows whose every fold is that round's (a row scored further is compared there on fewer folds than
    it shows, and round 1 of a sampled search on the sample, neither of which the row holds)."""
    complete = max(1, next((i for i, rd in enumerate(rounds) if not rd["complete"]), len(rounds)))
    sampled = _sampled(r, rounds, board)
    tier_before, mean_before = math.inf, math.inf
    for row in board:
        tier = min(row["rounds"], complete)
        if tier > tier_before:
            raise _lie(r, f"row {row['rank']} reached round {tier}, further than the row above it")
        if tier < tier_before:
            tier_before, mean_before = tier, math.inf
        if row["rounds"] == tier and not (tier <= 1 and sampled):
            if row["cv_mean"] > mean_before + _TOL:
                raise _lie(r, f"row {row['rank']} has CV mean {row['cv_mean']:.4f}, above the {mean_before:.4f} "
                              "of a row ranked before it on the same folds")
            mean_before = row["cv_mean"]


def _sampled(r: FieldReader, rounds: Sequence[Mapping[str, Any]], board: Sequence[Mapping[str, Any]]) -> bool:
    """Whether round 1 screened on a sample of fold 1: then exactly the rows that went no further say
    ``sample``; otherwise no row does."""
    sample = rounds[0].get("sample")
    if sample is not None and not isinstance(sample, dict):
        raise r.fail("search.rounds[0].sample", "an object (round 1's sample)", sample)
    for row in board:
        if row.get("sample", False) != (sample is not None and row["rounds"] == 1):
            raise _lie(r, f"row {row['rank']} says sample = {row.get('sample', False)!r} after {row['rounds']} "
                          f"round(s) of a search whose round 1 {'was' if sample is not None else 'was not'} on a sample")
    return sample is not None


def _check_winner(r: FieldReader, head: Mapping[str, Any], f: FeatureSpec | None, win: Mapping[str, Any]) -> None:
    """The leaderboard's first row must describe the head the bundle holds."""
    claims = {"head.family": (head.get("family"), win["head"]), "head.chosen": (head.get("chosen"), win["params"]),
              "head.preprocess": (head.get("preprocess"), win["preprocessing"]),
              "features.layers": (list(f.layers) if f else ["final"], win["layers"]),
              "features.view_pool": ("pooled" if f is not None and f.view_pool else "plain", win["views"])}
    for name, (have, said) in claims.items():
        if have != said:
            raise BundleError(
                f"{r.source!r}: the leaderboard's winner says {name} = {shown(said)} but the bundle holds {shown(have)}; the "
                "search section does not describe this head. The bundle is corrupt or was edited; re-create it."
            )


def _check_headline(r: FieldReader, metrics: Any, win: Mapping[str, Any]) -> None:
    """The winner's CV mean and folds are those of the manifest's ``metrics.cv`` (where it has one)."""
    if metrics is not None and not isinstance(metrics, dict):
        raise r.fail("metrics", "an object", metrics)
    cv = metrics.get("cv") if metrics is not None else None
    if cv is None:
        return
    if not isinstance(cv, dict):
        raise r.fail("metrics.cv", "an object", cv)
    top1 = r.number(cv, "top1", "metrics.cv.", 0.0, 1.0)
    n_folds = r.positive_int(cv, "n_folds", "metrics.cv.", required=True)
    if abs(top1 - win["cv_mean"]) > _TOL or n_folds != win["n_folds"]:
        raise _lie(r, f"the winner's CV mean is {win['cv_mean']:.4f} on {win['n_folds']} folds, but metrics.cv says "
                      f"{top1:.4f} on {n_folds}")
