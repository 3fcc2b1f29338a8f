"""Audit a feature cache: duplicates and train/test leakage, likely label errors, outliers.

``featbank audit CACHE --report DIR`` is a thin layer over :func:`audit` and :func:`write_report`::

    from featbank.audit import AuditSettings, audit, write_report
    result = audit("runs/elpv.h5", AuditSettings(threshold=0.9))
    write_report(result, "runs/elpv-audit")

* duplicates: exact cosine nearest neighbours of every image, block by block
  (:func:`knn_search`; faiss when installed, else torch, CUDA when asked for), pairs at or above
  ``threshold`` (:data:`DEFAULT_THRESHOLD`, measured in ``scripts/bench_audit.py``); identical
  embeddings (and identical file bytes) told apart from near ones.
  With ``verify="pixels"`` every pair of k-nearest neighbours is scored on grey thumbnails
  (:func:`pixel_scores`), which finds JPEG, resized, cropped and brightened copies that no
  cosine threshold separates from look-alikes.
* label errors: out-of-fold probabilities of featbank's :class:`~featbank.heads.LinearHead`,
  then confident learning (:func:`find_label_issues`, Northcutt et al., JAIR 2021).
* outliers: the mean distance to the k nearest images, and the top out-of-fold probability.
"""

from __future__ import annotations

from ._findings import Pairs, best_match, find_pairs, knn_outlier_scores, rescore_pairs
from ._ivf import IvfSettings, ivf_search
from ._labels import LabelIssues, confident_joint, find_label_issues, out_of_fold_proba
from ._neighbors import BACKENDS, Neighbors, knn_search, plan_blocks
from ._report import check_report_dir, write_report
from ._run import (
    DEFAULT_THRESHOLD,
    IVF_FROM_ROWS,
    SEARCHES,
    AuditResult,
    AuditSettings,
    audit,
    resolve_search,
    run_labels,
    run_neighbors,
    verify_on_pixels,
)
from ._verify import CROPS, DEFAULT_PIXEL_THRESHOLD, THUMB, VERIFY, pixel_descriptor, pixel_scores

__all__ = [
    "audit",
    "AuditSettings",
    "AuditResult",
    "write_report",
    "run_neighbors",
    "run_labels",
    "check_report_dir",
    "DEFAULT_THRESHOLD",
    "DEFAULT_PIXEL_THRESHOLD",
    "VERIFY",
    "CROPS",
    "THUMB",
    "pixel_descriptor",
    "pixel_scores",
    "verify_on_pixels",
    "SEARCHES",
    "IVF_FROM_ROWS",
    "resolve_search",
    "ivf_search",
    "IvfSettings",
    "knn_search",
    "plan_blocks",
    "Neighbors",
    "BACKENDS",
    "Pairs",
    "find_pairs",
    "rescore_pairs",
    "best_match",
    "knn_outlier_scores",
    "LabelIssues",
    "find_label_issues",
    "confident_joint",
    "out_of_fold_proba",
]
