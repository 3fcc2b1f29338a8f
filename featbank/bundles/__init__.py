"""Model bundles: a folder holding a trained head (or fine-tuned network) and its manifest.

The rooms: :mod:`~featbank.bundles.bundle` (the opened :class:`Bundle`, :func:`load_bundle`),
:mod:`~featbank.bundles.manifest` (the typed manifest and its one validating reader),
:mod:`~featbank.bundles.store` (atomic writes: :func:`save_bundle`),
:mod:`featbank.heads.skops` (the trusted scikit-learn format, re-exported here) and
:mod:`~featbank.bundles.network` (a head bundle's features as torch modules) and
:mod:`~featbank.bundles._finetuned` (a fine-tuned bundle's network, built for
:meth:`Bundle.finetuned_network`); both need torch, so they are imported on demand.
"""

from __future__ import annotations

from ..heads.skops import load_skops, serialize_sklearn, trusted_skops_types
from .bundle import Bundle, backbone_of_bundle, is_bundle_folder, load_bundle
from .manifest import BUNDLE_FORMAT, BUNDLE_VERSION, BackboneIdentity, Manifest, build_manifest, parse_manifest
from .store import check_bundle_target, recover, save_bundle, sha256_bytes, sha256_file

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "BackboneIdentity",
    "Manifest",
    "build_manifest",
    "parse_manifest",
    "save_bundle",
    "load_bundle",
    "recover",
    "check_bundle_target",
    "sha256_bytes",
    "sha256_file",
    "serialize_sklearn",
    "load_skops",
    "trusted_skops_types",
    "backbone_of_bundle",
    "is_bundle_folder",
]
