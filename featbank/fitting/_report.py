"""The printed form of a ``fit --auto`` / ``fit --cv K`` search: what the budget allowed and the leaderboard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["search_lines", "format_leaderboard", "format_params"]


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def format_leaderboard(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The leaderboard as a Markdown table: rank, features, views, preprocessing, head, parameters, CV, seconds."""
    out = ["| rank | features | views | preprocessing | head | parameters | CV mean ± std | folds | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        named = r["features"] in ("final", "all") or r["features"] == ",".join(r["layers"])  # --cv: the layers given
        feats = r["features"] if named else f"{r['features']} ({','.join(r['layers'])})"
        out.append(f"| {r['rank']} | {feats} | {r['views']} | {r['preprocessing']} | {r['head']} | "
                   f"{format_params(r['params'])} | {r['cv_mean']:.4f}{_spread(r)} | {r['n_folds']}"
                   f"{' (sample)' if r.get('sample') else ''} | "
                   f"{r['seconds']:.1f} |")
    return out


def _spread(row: Mapping[str, Any]) -> str:
    """`` ± std`` over the row's folds; nothing for a row scored on one fold (it has no spread)."""
    return f" ± {row['cv_std']:.4f}" if row["n_folds"] > 1 else ""


def _threads_words(search: Mapping[str, Any]) -> str:
    n = search.get("threads")
    return "" if n is None else f" on {n} thread{'s' if n != 1 else ''} (the cores left idle by other work)"


def _repeats_words(search: Mapping[str, Any]) -> str:
    done = 1 + max((r.get("repeat", 0) for r in search.get("rounds") or []), default=0)
    words = f"{done} repeat{'s' if done != 1 else ''}"
    # A lone candidate (``--head X --cv K``) ends after the K folds of one repeat: no "of up to".
    return words if search.get("n_candidates") == 1 else f"{words} of up to {search['repeats']}"


def _budget_words(search: Mapping[str, Any]) -> str:
    total = search.get("total_budget_s")
    if total is None:  # a search run on its own (no layer selection or loading before it)
        return f"a {search['budget_s']:g} s budget"
    what = "layer selection and loading" if search.get("layer_selection", True) else "loading"
    return (f"the {total:g} s budget less {search.get('prep_s', 0.0):.1f} s of {what} "
            f"(features loaded in {search.get('load_s', 0.0):.1f} s)")


def search_lines(search: Mapping[str, Any], headline: Mapping[str, Any]) -> list[str]:
    """What the search did (candidates, folds, budget, skips), its leaderboard, and the winner's test interval."""
    lines = [
        f"Search: {search['n_scored']} of {search['n_candidates']} candidates scored by {search['cv']}-fold CV on "
        f"train+val ({search['n_fold_fits']} candidate-folds, {_repeats_words(search)}, seed {search['seed']}) "
        f"in {search['seconds']:.1f} s{_threads_words(search)}; {_budget_words(search)}; winner refitted in "
        f"{search.get('refit_s', 0.0):.1f} s.",
    ]
    lines += _plan_lines(search) + _round_lines(search) + _skip_lines(search)
    lines += format_leaderboard(search["leaderboard"]) + _short_lines(search)
    ci = headline.get("top1_ci95")
    if ci is not None and "top1" in headline:
        lines.append(f"Winner on test (scored once): top-1 {headline['top1']:.4f}, 95% bootstrap interval "
                     f"[{ci[0]:.4f}, {ci[1]:.4f}] (1000 resamples); CV {search['leaderboard'][0]['cv_mean']:.4f}"
                     + (" (on round 1's sample of fold 1)" if search["leaderboard"][0].get("sample") else ""))
    return lines


def _short_lines(search: Mapping[str, Any]) -> list[str]:
    """A warning when the budget let the winner be scored on fewer folds than one K-fold CV has."""
    board, k = search.get("leaderboard") or [], search["cv"]
    if not board or board[0]["n_folds"] >= k:
        return []
    n = board[0]["n_folds"]
    return [f"Warning: the budget let the winner be scored on {n} of the {k} folds of one {k}-fold CV"
            + (" (on a sample)" if board[0].get("sample") else "")
            + f": it was chosen on {'that fold' if n == 1 else 'those folds'} alone. Raise --budget for a choice by "
            f"{k}-fold CV."]


def _plan_lines(search: Mapping[str, Any]) -> list[str]:
    """The layer selection's choice, the measured speeds the plan scaled by, the Gram matrices shared."""
    lines: list[str] = []
    sets, chosen = search.get("feature_sets") or {}, search.get("auto_layers")
    if chosen is not None and len(sets) > 1:  # a cache of one layer has nothing to select
        same = next((n for n, ls in sets.items() if n != "auto" and ls == chosen), None)
        lines.append(f"  greedy layer selection (feature set auto): {', '.join(chosen)}"
                     + (f", the layers of {same}: scored once, as {same}" if same and "auto" not in sets else ""))
    if search.get("calibration"):
        ratios = ", ".join(f"{f} x{r:.2g}" for f, r in search["calibration"].items())
        lines.append(f"  measured speed against the cost estimates (the plan's scale): {ratios}")
    k = search.get("kernels")
    if isinstance(k, dict) and k.get("computed", 0) + k.get("reused", 0) + k.get("refused", 0):
        lines.append(f"  Gram matrices (one per features, preprocessing and fold, shared by the SVMs and knn): "
                     f"{k.get('computed', 0)} computed, {k.get('reused', 0)} reused"
                     + (f", {k['refused']} too large to share" if k.get("refused") else "")
                     + (f"; summed from layer blocks: {k['blocks_computed']} computed, {k.get('blocks_reused', 0)} reused"
                        if k.get("blocks_computed") else ""))
    return lines


def _round_lines(search: Mapping[str, Any]) -> list[str]:
    """Each round: its candidates and folds (round 1's sample), and who the budget did not promote."""
    lines: list[str] = []
    for rnd in search.get("rounds", []):
        trimmed = rnd.get("trimmed") or []
        folds = "1 fold" if rnd["n_folds"] == 1 else f"{rnd['n_folds']} folds"
        sample = rnd.get("sample")
        if isinstance(sample, dict):
            folds += (f" (a stratified sample: {sample.get('fit_rows')} of its {sample.get('of_fit_rows')} fit rows, "
                      f"{sample.get('held_out_rows')} of {sample.get('of_held_out_rows')} held out)")
        if not rnd["n_candidates"]:
            lines.append(f"  round {rnd['round'] + 1}: none on {folds}: the budget left could not score a candidate there")
            continue
        lines.append(f"  round {rnd['round'] + 1}: {rnd['n_candidates']} candidate(s) on {folds}"
                     + (f"; not promoted, as the budget left could not score them too: {', '.join(trimmed)}"
                        if trimmed else ""))
    return lines


def _skip_lines(search: Mapping[str, Any]) -> list[str]:
    """What was skipped for the budget, left out (and why), or cut by the clock."""
    lines: list[str] = []
    skipped = search.get("skipped", [])
    if skipped:
        names = ", ".join(f"{s['features']}/{s['views']}/{s['preprocessing']}/{s['head']}" for s in skipped[:8])
        more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        lines.append(f"  skipped for the budget ({len(skipped)}): {names}{more}")
    for left in search.get("excluded") or []:
        lines.append(f"  left out: {left['head']}" + (f" ({left['reason']})" if left.get("reason") else ""))
    if search.get("cut_by_clock"):
        lines.append(f"  not promoted or stopped for the budget in later rounds: {len(search['cut_by_clock'])}")
    return lines
