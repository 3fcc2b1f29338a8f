"""The bundle manifest: typed sections and the one validating reader both ends go through.

Both builders (``fitting/probe.fit``, ``finetuning/_loop.finetune``) make theirs with
:func:`build_manifest` from typed parts, ``save_bundle`` checks it with :func:`parse_manifest`
before a byte is written, and ``load_bundle`` reads every manifest with it, so a field has one
definition. A manifest is data
written by whoever made the bundle: every field is type-checked, and every file name in it must
be a bare name inside the bundle folder, before any file is opened.

Errors name the manifest file and the field, e.g.
``'models/x/manifest.json': field 'backbone.embed_dim' must be a positive integer; got 'abc'.``
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import open_regular_file
from ..errors import BundleError
from ..features import FeatureSpec, FeatureSpecError
from ._fields import FieldReader, check_file_name
from ._search_section import check_search

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "KINDS",
    "HEAD_TYPES",
    "BackboneIdentity",
    "WeightsSection",
    "HeadSection",
    "FinetuneSection",
    "Manifest",
    "parse_manifest",
    "read_manifest",
    "check_file_name",
    "build_manifest",
]

BUNDLE_FORMAT = "featbank-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
#: A manifest larger than this is refused before it is parsed (a 102-candidate leaderboard is ~100 kB).
MAX_MANIFEST_BYTES = 16 << 20
KINDS = ("head", "finetuned")
HEAD_TYPES = ("linear", "mlp", "sklearn")


@dataclass(frozen=True)
class BackboneIdentity:
    """What made the embeddings: ``Backbone.identity()`` as recorded in a manifest."""

    backbone: str
    weights: str | None = None
    weights_sha256: str | None = None
    transform: dict[str, Any] | None = None
    embed_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "transform": self.transform, "embed_dim": self.embed_dim}


@dataclass(frozen=True, kw_only=True)
class WeightsSection:
    """The section naming the bundle's weights file (a bare name) and its sha256."""

    file: str
    sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class HeadSection(WeightsSection):
    """``manifest["head"]`` of a head bundle: the head's file and what it is."""

    type: str
    estimator: str | None = None


@dataclass(frozen=True, kw_only=True)
class FinetuneSection(WeightsSection):
    """``manifest["finetune"]`` of a fine-tuned bundle: the network's file and its base architecture."""

    base_backbone: BackboneIdentity
    strategy: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` keeps every field, typed or not (metrics, training, ...)."""

    kind: str
    classes: tuple[str, ...]
    backbone: BackboneIdentity
    cache_key: str | None
    head: HeadSection | None
    finetune: FinetuneSection | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    features: FeatureSpec | None = None

    @property
    def weights(self) -> WeightsSection:
        """The section naming the weights file (``head`` or ``finetune``)."""
        return self.finetune if self.kind == "finetuned" else self.head  # type: ignore[return-value]

    @property
    def weights_section(self) -> str:
        return "finetune" if self.kind == "finetuned" else "head"


def _identity(r: FieldReader, obj: Mapping[str, Any], prefix: str) -> BackboneIdentity:
    name = r.text(obj, "backbone", prefix)
    transform = r.section(obj, "transform", prefix, required=False)
    weights = obj.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise r.fail(prefix + "weights", "a string", weights)
    return BackboneIdentity(backbone=name, weights=weights, weights_sha256=r.sha(obj, "weights_sha256", prefix),
                            transform=transform, embed_dim=r.positive_int(obj, "embed_dim", prefix))


def _classes(r: FieldReader, raw: Mapping[str, Any]) -> tuple[str, ...]:
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise r.fail("classes", "a non-empty list of class names (strings)", classes)
    if len(set(classes)) != len(classes):
        dup = sorted(c for c, n in Counter(classes).items() if n > 1)[:10]
        raise r.fail("classes", f"a list of distinct class names (repeated: {dup})", classes)
    return tuple(classes)


def _base_backbone(r: FieldReader, ft: Mapping[str, Any]) -> BackboneIdentity:
    base = _identity(r, r.section(ft, "base_backbone", "finetune."), "finetune.base_backbone.")
    # The base is an architecture name (registry, torchvision, timm), never a folder: a bundle
    # whose base is a bundle would load itself forever.
    if "/" in base.backbone or "\\" in base.backbone or base.backbone.startswith("."):
        raise r.fail("finetune.base_backbone.backbone", "a backbone name (not a folder)", base.backbone)
    return base


def _features(r: FieldReader, raw: Mapping[str, Any]) -> FeatureSpec | None:
    f = r.section(raw, "features", required=False)
    if f is None:
        return None
    try:
        return FeatureSpec.from_dict(f)
    except FeatureSpecError as e:
        raise r.fail(f"features.{e.field}", e.want, e.value) from None


def parse_manifest(raw: Any, source: str, *, written: bool = True) -> Manifest:
    """Validate a manifest dict and return its typed view.

    Args:
        raw: the parsed JSON (or the dict a builder passes to ``save_bundle``).
        source: what to name in messages (the manifest file).
        written: ``True`` for a manifest read from disk (format, version, sha256 of the weights
            and the file table must be there); ``False`` for one about to be saved.

    Raises:
        BundleError: a missing field or a value of the wrong type, naming ``source`` and the field.
    """
    r = FieldReader(source)
    if not isinstance(raw, dict):
        raise BundleError(f"{source!r} is not a featbank bundle manifest (a JSON object); got {type(raw).__name__}.")
    if written and raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{source!r} is not a featbank bundle manifest (format != {BUNDLE_FORMAT!r}).")
    if written and raw.get("bundle_version") != BUNDLE_VERSION:
        from .. import __version__

        raise BundleError(
            f"Bundle {str(Path(source).parent)!r} has bundle_version {raw.get('bundle_version')!r}; this featbank "
            f"({__version__}) reads version {BUNDLE_VERSION}. Re-create it with this featbank version."
        )
    kind = raw.get("kind")
    if kind not in KINDS:
        raise r.fail("kind", f"one of {', '.join(KINDS)}", kind)
    classes = _classes(r, raw)
    backbone = _identity(r, r.section(raw, "backbone"), "backbone.")
    cache_key = r.text(raw, "cache_key", required=False)
    head = finetune = None
    if kind == "head":
        h = r.section(raw, "head")
        if h.get("type") not in HEAD_TYPES:
            raise r.fail("head.type", f"one of {', '.join(HEAD_TYPES)}", h.get("type"))
        head = HeadSection(type=h["type"], file=r.file_name(h, "file", "head."), sha256=r.sha(h, "sha256", "head."),
                           estimator=r.text(h, "estimator", "head.", required=False))
    else:
        ft = r.section(raw, "finetune")
        finetune = FinetuneSection(file=r.file_name(ft, "file", "finetune."), base_backbone=_base_backbone(r, ft),
                                   sha256=r.sha(ft, "sha256", "finetune."),
                                   strategy=r.text(ft, "strategy", "finetune.", required=False))
    m = Manifest(kind=kind, classes=classes, backbone=backbone, cache_key=cache_key, head=head, finetune=finetune,
                 raw=raw, features=_features(r, raw))
    check_search(r, m.raw, m.features, m.head is not None)
    if written:
        _check_written(r, m)
    return m


def _check_written(r: FieldReader, m: Manifest) -> None:
    section = m.weights_section
    if m.weights.sha256 is None:
        raise r.fail(f"{section}.sha256", "the sha256 of the weights file", None)
    files = r.section(m.raw, "files", required=False) or {}
    for name in files:
        r.file_name({"name": name}, "name", "files.")
        r.sha(files, name, "files.")
    validation = r.section(m.raw, "validation", required=False)
    if validation is not None:
        paths = validation.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise r.fail("validation.paths", "a list of strings", paths)
        if validation.get("root") is not None and not isinstance(validation.get("root"), str):
            raise r.fail("validation.root", "a string", validation.get("root"))


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``<bundle>/manifest.json``.

    Raises:
        BundleError: missing, unreadable, not JSON, or any field of the wrong type.
    """
    mf = Path(path) / MANIFEST
    if mf.is_symlink() or not mf.is_file():
        raise BundleError(f"{str(Path(path))!r} has no {MANIFEST}; it is not a featbank model bundle.")
    try:
        with open_regular_file(mf) as fh:  # a FIFO swapped in after the check above is refused, not waited on
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"Cannot read {str(mf)!r}: {e}. Check the bundle folder's permissions.") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{str(mf)!r} is larger than {MAX_MANIFEST_BYTES} bytes, the most a bundle manifest may be "
                          "(featbank writes a few hundred kB at most); refusing to read it. Re-create the bundle.")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_distinct_keys)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested beyond Python's stack
        raise BundleError(f"{str(mf)!r} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the bundle is corrupt. "
                          "Re-create it.") from None
    return parse_manifest(raw, str(mf))


def _distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are distinct (a repeated key means whatever each reader picks: refused)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup[:80]!r} appears twice in one object")
    return out


def build_manifest(
    kind: str,
    classes: list[str],
    backbone: BackboneIdentity,
    *,
    cache_key: str | None = None,
    head: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The manifest dict ``save_bundle`` takes, built from typed parts and checked now.

    ``head`` / ``finetune`` are the weights section (``type``/``file`` ... for a head,
    ``file``/``base_backbone`` ... for a fine-tuned network); ``sections`` are the free-form
    ones (``metrics``, ``validation``, ``training``, ``data``).

    Raises:
        BundleError: a field of the wrong type (the builder's bug, caught before any work).
    """
    raw: dict[str, Any] = {"format": BUNDLE_FORMAT, "bundle_version": BUNDLE_VERSION, "kind": kind,
                           "classes": list(classes), "backbone": backbone.to_dict(), "cache_key": cache_key}
    if head is not None:
        raw["head"] = dict(head)
    if finetune is not None:
        ft = dict(finetune)
        if isinstance(ft.get("base_backbone"), BackboneIdentity):
            ft["base_backbone"] = ft["base_backbone"].to_dict()
        raw["finetune"] = ft
    raw.update(sections)
    parse_manifest(raw, f"the {kind} manifest being built", written=False)
    return raw
