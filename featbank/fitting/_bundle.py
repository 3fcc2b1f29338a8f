"""The one place ``fit`` builds a head bundle: the head saved by its kind, the report, the manifest, the folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import slugify
from ..bundles.manifest import BackboneIdentity, build_manifest
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..cache import FeatureCache
    from ..heads import Estimator, HeadSpec

__all__ = ["MODELS_ROOT", "FittedHead", "HeadBundle", "backbone_identity", "bundle_dir", "save_head_bundle"]


def _slug(text: str) -> str:
    return slugify(text, "model").lower()


#: Where bundles named by ``name`` (and unnamed ones) go.
MODELS_ROOT = Path("models")


def bundle_dir(out: str | Path | None, name: str | None, default_name: str) -> Path:
    """The bundle folder: ``out`` itself, else ``models/<name>`` (``name`` defaults to ``default_name``).

    Raises:
        ConfigError: both ``out`` and ``name`` are given (the old form, where ``--out`` was the
            root folder of bundles named by ``--name``).
    """
    if out is not None and name is not None:
        target = Path(out) / _slug(name)
        raise ConfigError(
            f"--out is the bundle folder itself and --name the name of a bundle under {MODELS_ROOT}/; give one of "
            f"them, e.g. --out {target} (or --name {_slug(name)} for {MODELS_ROOT / _slug(name)})."
        )
    if out is not None:
        return Path(out).expanduser()
    return MODELS_ROOT / _slug(name or default_name)


@dataclass
class FittedHead:
    """A fitted head as a bundle stores it: the estimator, the spec it was built from, the chosen setting."""

    estimator: Estimator
    spec: HeadSpec
    chosen: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # more of the manifest's head section (family, ...)


@dataclass
class HeadBundle:
    """The rest of a head bundle: its manifest sections and the evaluated rows its report plots."""

    metrics: dict[str, Any]
    features: dict[str, Any]
    training: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)  # validation, search, fit_config
    report_metrics: dict[str, Any] | None = None
    eval_rows: np.ndarray | None = None
    eval_proba: np.ndarray | None = None


def backbone_identity(cache: FeatureCache) -> BackboneIdentity:
    """The manifest's ``backbone`` of a head fitted on ``cache``."""
    md = cache.metadata
    return BackboneIdentity(backbone=md.get("backbone"), weights=md.get("weights"),
                            weights_sha256=md.get("weights_sha256"), transform=md.get("transform"),
                            embed_dim=int(cache.embed_dim))


def save_head_bundle(path: Path, cache: FeatureCache, head: FittedHead, parts: HeadBundle, *,
                     overwrite: bool) -> Path:
    """Write the bundle of ``head`` fitted on ``cache`` at ``path`` (atomically; see ``save_bundle``)."""
    from ..bundles import save_bundle
    from ..heads import kind_of
    from ..report import write_report_files

    head_info, files = kind_of(head.estimator).save(head.estimator, head.chosen, head.spec)
    head_info.update(head.extra)
    rows = parts.eval_rows
    if rows is not None:
        paths = [str(cache.abspath(cache.paths[r])) for r in rows]
        files.update(write_report_files(parts.report_metrics or {}, cache.classes, paths, cache.labels[rows],
                                        parts.eval_proba))
    manifest = build_manifest("head", list(cache.classes), backbone_identity(cache), cache_key=cache.cache_key,
                              head=head_info, metrics=parts.metrics, features=parts.features, training=parts.training,
                              **parts.sections)
    return save_bundle(path, manifest, files, overwrite=overwrite)
