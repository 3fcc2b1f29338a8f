"""Model bundles: a folder holding a trained head (or fine-tuned network) and its manifest.

Layout (format v1, shared by ``fit``, ``finetune``, ``export``, ``evaluate`` and ``predict``)::

    models/<name>/
      manifest.json       what the model is: classes, backbone identity, cache key, head, metrics
      head.safetensors    torch heads (linear, mlp): tensors + their parameters in the metadata
      head.skops          scikit-learn heads, loaded only if every type in it is one featbank writes
      model.safetensors   fine-tuned bundles: the full network state (features.* and head.*)
      metrics.json, confusion_matrix.png, per_class_recall.png, misclassified.png

Trust model: a bundle is data and opening it never runs code. There is no pickle path; a skops
file is loaded only when every type it names is in :func:`trusted_skops_types` (exact names of the
estimators featbank saves and the types their state needs, never a module prefix). Every file
name in the manifest must be a bare name inside the folder (no ``..``, no absolute path, no
symlink out), every field is type-checked (:mod:`featbank.bundles.manifest`), and every weights file has
its sha256 in the manifest, checked before it is read. The sha256 detects corruption, not an
attacker (who rewrites the manifest too).

Writing (:func:`save_bundle`): one writer per bundle (a lock), a temporary folder swapped in
atomically, an existing bundle replaced only with ``overwrite=True``; see :mod:`featbank.bundles.store`.

Probabilities: :meth:`Bundle.predict_proba` is the canonical mapping embeddings -> (N, C)
probabilities (ONNX export must match it): :func:`featbank.heads.estimator_proba`. Images and
caches go through :mod:`featbank.inference` (predict, evaluate), for bundles and ONNX files alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError
from ..features import FeatureSpec
from ._fields import shown
from .manifest import MANIFEST, Manifest, check_file_name, parse_manifest, read_manifest
from .store import recover, sha256_bytes

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator
    from torch import nn

    from ..backbones import Backbone
    from ..cache import FeatureCache
    from ..heads import Estimator

__all__ = ["Bundle", "load_bundle", "backbone_of_bundle", "is_bundle_folder"]


class Bundle:
    """A model bundle opened for use. Use :func:`load_bundle`.

    Attributes:
        path: the bundle folder.
        manifest: the parsed manifest.json (a plain dict, validated).
        info: the same manifest, typed (:class:`featbank.bundles.manifest.Manifest`).
        kind: ``"head"`` (a head fitted on cached embeddings) or ``"finetuned"``.
        classes: class names; column ``i`` of :meth:`predict_proba` is ``classes[i]``.
        backbone: identity dict of the backbone (backbone, weights, weights_sha256, transform,
            embed_dim).
        cache_key: key of the cache the head was fitted on (``None`` for fine-tuned bundles).
    """

    def __init__(self, path: Path, manifest: Manifest | dict[str, Any]):
        if isinstance(manifest, dict):
            manifest = parse_manifest(manifest, str(Path(path) / MANIFEST))
        self.path = Path(path)
        self.info = manifest
        self.manifest: dict[str, Any] = manifest.raw
        self.kind: str = manifest.kind
        self.classes: list[str] = list(manifest.classes)
        self.backbone: dict[str, Any] = dict(manifest.raw["backbone"])
        self.cache_key: str | None = manifest.cache_key
        self._head: BaseEstimator | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def embed_dim(self) -> int | None:
        return self.info.backbone.embed_dim

    @property
    def features(self) -> FeatureSpec:
        """What the head reads (layers, views, TTA); the plain embedding for bundles without the section."""
        if self.info.features is not None:
            return self.info.features
        return FeatureSpec(("final",), {"final": self.embed_dim} if self.embed_dim else {})

    @property
    def feature_dim(self) -> int | None:
        """Width of the head's input: the embedding, or the selected layers concatenated."""
        return self.info.features.dim if self.info.features is not None else self.embed_dim

    @property
    def bundle_id(self) -> str:
        return str(self.manifest.get("bundle_id", ""))

    @property
    def head_info(self) -> dict[str, Any]:
        return dict(self.manifest.get("head") or {})

    def validation_paths(self) -> list[Path]:
        """Absolute paths of the validation images recorded at fit time (may no longer exist)."""
        val = self.manifest.get("validation") or {}
        root = Path(val.get("root") or ".")
        return [Path(p) if Path(p).is_absolute() else root / p for p in val.get("paths", [])]

    def file(self, name: str) -> Path:
        """The path of ``name`` inside the bundle, refusing anything that leads outside it.

        Raises:
            BundleError: not a bare name, or a symlink whose target is outside the folder.
        """
        try:
            check_file_name(name)
        except BundleError as e:
            raise BundleError(f"Bundle {str(self.path)!r}: {e}") from None
        f = self.path / name
        root = self.path.resolve()
        if f.is_symlink() and root not in f.resolve().parents:
            raise BundleError(f"Bundle {str(self.path)!r}: {name} is a symlink to {os.readlink(f)!r}, outside the "
                              "bundle; refusing to open it.")
        return f

    def read_weights(self) -> bytes:
        """The bytes of the weights file (``head.file`` / ``finetune.file``), sha256-checked.

        Raises:
            BundleError: missing, outside the bundle, or changed since it was written.
        """
        sec = self.info.weights
        f = self.file(sec.file)
        if not f.is_file():
            raise BundleError(f"Bundle {str(self.path)!r} is incomplete: {sec.file} is missing. Re-create the bundle.")
        data = f.read_bytes()
        if sha256_bytes(data) != sec.sha256:
            raise BundleError(
                f"{str(f)!r} does not match the sha256 recorded in the manifest (got "
                f"{sha256_bytes(data)[:12]}..., recorded {str(sec.sha256)[:12]}...): the file was changed or "
                "corrupted. Refusing to load it; re-create the bundle."
            )
        return data

    def load_backbone(self, weights_file: str | os.PathLike | None = None) -> Backbone:
        """The :class:`featbank.backbones.Backbone` whose embeddings this bundle's head reads.

        Head bundles: the backbone named in the manifest with the recorded weights, checked
        against the recorded sha256, and the window rule its cache was extracted with
        (``backbone.transform.window``; absent means ``none``) in its ``preprocess``, so predict,
        evaluate and export read images as extract did. Fine-tuned bundles: the fine-tuned network itself.

        Args:
            weights_file: the weights file, for bundles fitted on a backbone loaded with
                ``--weights-file`` (the manifest records its sha256, not where it lives).

        Raises:
            BundleError: the weights came from a file and none was given, or the weights on
                this machine are not the ones the bundle was fitted with.
        """
        if self.kind == "finetuned":
            return self.finetuned_network()[0]
        from ..backbones import load_backbone as load_named
        from ..backbones import with_window

        ident = self.info.backbone
        if weights_file is None and str(ident.weights or "").startswith("file:"):
            raise BundleError(
                f"Bundle {str(self.path)!r} was fitted on backbone {ident.backbone!r} with weights from a file "
                f"({ident.weights}); pass that file with --weights-file PATH."
            )
        bb = load_named(ident.backbone, weights=None if weights_file else ident.weights, weights_file=weights_file)
        if ident.weights_sha256 and bb.weights_sha256 != ident.weights_sha256:
            raise BundleError(
                f"The weights of backbone {ident.backbone!r} on this machine (sha256 {bb.weights_sha256[:12]}...) are "
                f"not the ones bundle {str(self.path)!r} was fitted with ({ident.weights_sha256[:12]}...). Install the "
                "same weights (or pass them with --weights-file), or re-fit the bundle."
            )
        return with_window(bb, (ident.transform or {}).get("window", "none"))

    def finetuned_network(self) -> tuple[Backbone, nn.Linear]:
        """The fine-tuned network of this bundle: ``(backbone, head)``.

        ``backbone.embedder()`` maps uint8 NHWC images to embeddings, ``head`` maps embeddings to
        logits (``softmax`` gives the bundle's probabilities, columns in ``manifest["classes"]``).
        ``backbone.identity()`` keys caches on the sha256 of ``model.safetensors``.

        Raises:
            BundleError: not a fine-tuned bundle, weights missing or changed (sha256), or weights
                that do not fit the recorded base architecture.
        """
        if self.kind != "finetuned":
            raise BundleError(
                f"{str(self.path)!r} is a {self.kind!r} bundle (a head fitted on cached embeddings), not a fine-tuned "
                "network; as --backbone pass the backbone it was fitted on, or a bundle made by 'featbank finetune'."
            )
        from ._finetuned import build_finetuned

        data = self.read_weights()  # confined to the bundle folder, sha256-checked
        return build_finetuned(self.path, self.manifest["finetune"], data, self.classes, self.backbone.get("backbone"))

    def check_cache(self, cache: FeatureCache) -> None:
        """Check that an open cache holds embeddings this bundle's head can read.

        Raises:
            BundleError: another embedding size, another cache key (backbone, weights,
                transform, dtype), or for a fine-tuned bundle embeddings of other weights.
        """
        bundle = self
        if bundle.embed_dim is not None and bundle.embed_dim != cache.embed_dim:
            raise BundleError(
                f"Model {str(bundle.path)!r} expects {bundle.embed_dim}-d embeddings "
                f"({bundle.backbone.get('backbone')!r}) but cache {str(cache.path)!r} holds {cache.embed_dim}-d "
                f"embeddings ({cache.metadata.get('backbone')!r}). Extract the data with the model's backbone."
            )
        if bundle.cache_key and bundle.cache_key != cache.cache_key:
            raise BundleError(
                f"Model {str(bundle.path)!r} was fitted on embeddings with cache key {bundle.cache_key[:12]}... but "
                f"{str(cache.path)!r} has key {cache.cache_key[:12]}... (backbone {cache.metadata.get('backbone')!r}, "
                f"weights {cache.metadata.get('weights')!r}): its embeddings come from other settings. Extract with "
                f"'featbank extract DATA --backbone {bundle.backbone.get('backbone')}' and the same weights/dtype."
            )
        if bundle.cache_key is None and bundle.backbone.get("weights_sha256") not in (None, cache.metadata.get("weights_sha256")):
            raise BundleError(
                f"Model {str(bundle.path)!r} needs embeddings of its own fine-tuned backbone; cache "
                f"{str(cache.path)!r} was made with other weights. Extract with '--backbone {bundle.path}'."
            )

    def load_head(self) -> BaseEstimator:
        """The fitted estimator mapping embeddings -> probabilities (preprocessing included).

        For ``kind="head"``: a :class:`featbank.heads.LinearHead` / ``MLPHead``, or a scikit-learn
        estimator (usually a ``Pipeline`` with the stored preprocessing). For fine-tuned bundles
        whose head is one linear layer, a ``LinearHead`` built from ``head.*`` of the network.

        Raises:
            BundleError: missing file, sha256 mismatch, untrusted types, unreadable content, or
                a head whose number of classes is not the manifest's.
        """
        if self._head is not None:
            return self._head
        if self.kind == "finetuned":
            self._head = self._load_finetuned_head()
            return self._head
        from ..heads import head_kind

        head = self.info.head
        data = self.read_weights()
        f = self.path / head.file
        try:
            est = head_kind(head.type).load(data, self.head_info, f"Bundle {str(self.path)!r}: {f.name}")
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt bundle
            raise BundleError(f"Cannot read head file {str(f)!r}: {type(e).__name__}: {e}. Re-create the bundle.") from None
        self._check_head_classes(est)
        self._check_head_width(est)
        self._check_head_family(est)
        self._head = est
        return est

    def _check_head_family(self, est: Estimator) -> None:
        # A searched head's manifest names its family, parameters and preprocessing (and its leaderboard's winner
        # must agree with them): the head itself must be what they build, else the manifest describes another head.
        info = self.head_info
        if "family" not in info:
            return
        from ..heads import family_mismatch, searched_as_spec

        chosen, pre, fit = info.get("chosen"), info.get("preprocess"), self.info.raw.get("fit_config") or {}
        if not (isinstance(chosen, dict) and isinstance(pre, str) and isinstance(fit, dict)):
            why = f"head.chosen is {shown(chosen)}, head.preprocess {shown(pre)} and fit_config {shown(fit)}"
        else:
            spec = searched_as_spec(info["family"], bool(fit.get("params")), auto=bool(fit.get("auto")))
            why = family_mismatch(est, info["family"], chosen, pre, spec=spec)
        if why is not None:
            raise BundleError(f"Bundle {str(self.path)!r}: its manifest says the head is family {shown(info['family'])} "
                              f"but {why[:300]}. The bundle is corrupt or was edited; re-create it.")

    def _check_head_width(self, est: Estimator) -> None:
        # The manifest says what the head reads (embedding, layers, pooled views); the head must read that many
        # columns, else a manifest edited to add or drop a layer or the view pooling fails later with a traceback.
        width = getattr(est, "n_features_in_", None)
        if width is not None and (isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1):
            raise BundleError(
                f"Bundle {str(self.path)!r}: its head's n_features_in_ is {width!r}, not a number of features (>= 1); the "
                "head file is corrupt or was edited. Re-create the bundle."
            )
        if self.feature_dim is not None and isinstance(width, (int, np.integer)) and int(width) != self.feature_dim:
            raise BundleError(
                f"Bundle {str(self.path)!r}: its head reads {int(width)} features but the manifest describes "
                f"{self.feature_dim} ({self.reads}); the manifest and the head disagree. Re-create the bundle."
            )

    @property
    def reads(self) -> str:
        """What the head reads, in words (for messages): the embedding, layers, pooled views."""
        feats = self.info.features
        if feats is None:
            return "the embedding"
        return f"layers {','.join(feats.layers)}" + (f", pooled {feats.view_pool} over views" if feats.view_pool else "")

    def _check_head_classes(self, est: Estimator) -> None:
        # A head predicts every class of the manifest, in order; a head fitted on a subset of the
        # classes says so in head.classes_seen. Anything else is a manifest that lies about the head.
        cols = np.asarray(getattr(est, "classes_", []))
        seen = self.head_info.get("classes_seen")
        want = list(range(self.n_classes)) if seen is None else seen
        if cols.ndim != 1 or [c.item() if hasattr(c, "item") else c for c in cols] != want or (
                seen is not None and not set(seen) <= set(range(self.n_classes))):
            raise BundleError(
                f"Bundle {str(self.path)!r}: its head predicts classes {cols.tolist()[:10]} but the manifest names "
                f"{self.n_classes} classes {self.classes[:10]}; the manifest and the head disagree. Re-create the bundle."
            )

    def _load_finetuned_head(self) -> BaseEstimator:
        from safetensors.numpy import load as st_load

        from ..heads import LinearHead

        data = self.read_weights()
        try:
            state = st_load(data)
        except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt bundle
            raise BundleError(f"Cannot read {str(self.path / self.info.weights.file)!r}: {type(e).__name__}: {e}. "
                              "Re-create the bundle.") from None
        tensors = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        weights = [k for k, v in tensors.items() if v.ndim == 2]
        biases = [k for k, v in tensors.items() if v.ndim == 1]
        if len(weights) != 1 or len(biases) > 1:
            raise BundleError(
                f"Fine-tuned bundle {str(self.path)!r} has a head that is not one linear layer "
                f"(head tensors: {sorted(tensors)}); load it with featbank.finetuning.load_finetuned_model instead."
            )
        w = tensors[weights[0]].astype(np.float32)
        if w.shape[0] != self.n_classes:
            raise BundleError(f"Bundle {str(self.path)!r}: its network has {w.shape[0]} outputs but the manifest names "
                              f"{self.n_classes} classes; the manifest and the weights disagree. Re-create the bundle.")
        b = tensors[biases[0]].astype(np.float32) if biases else np.zeros(w.shape[0], np.float32)
        return LinearHead.from_coef(w, b, classes=np.arange(w.shape[0]))

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) probabilities for (N, D) embeddings, columns in the order of :attr:`classes`."""
        from ..heads import estimator_proba

        X = np.asarray(embeddings, dtype=np.float32)
        if X.ndim != 2:
            raise BundleError(f"Embeddings must be a 2-D array (n_samples, embed_dim); got shape {X.shape}.")
        if self.feature_dim is not None and X.shape[1] != self.feature_dim:
            raise BundleError(
                f"Embeddings have dimension {X.shape[1]} but bundle {str(self.path)!r} expects "
                f"{self.feature_dim} (backbone {self.backbone.get('backbone')!r}, layers "
                f"{','.join(self.features.layers)})."
            )
        return estimator_proba(self.load_head(), X, self.n_classes)

    def __repr__(self) -> str:
        return (
            f"Bundle({str(self.path)!r}, kind={self.kind!r}, head={self.head_info.get('estimator')!r}, "
            f"n_classes={self.n_classes}, backbone={self.backbone.get('backbone')!r})"
        )


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a model bundle folder (or its manifest.json).

    A bundle left without its folder by a writer killed mid-swap is restored first.

    Raises:
        BundleError: the folder or manifest is missing, unreadable, not a featbank bundle, of
            another bundle version, has a field of the wrong type, names a file outside the
            folder, or is incomplete (the weights file is missing). Hashes are checked when the
            weights are read (:meth:`Bundle.load_head`).

    Example:
        >>> bundle = load_bundle("models/elpv-linear")
        >>> probs = bundle.predict_proba(embeddings)
    """
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        path = path.parent
    recover(path)
    if not path.exists():
        raise BundleError(f"Model bundle {str(path)!r} does not exist. Train one with 'featbank fit' first.")
    if not path.is_dir():
        raise BundleError(
            f"{str(path)!r} is a file, not a model bundle folder. Pass the folder written by 'featbank fit' "
            "(models/<name>)."
        )
    bundle = Bundle(path, read_manifest(path))
    sec = bundle.info.weights
    if not bundle.file(sec.file).is_file():
        raise BundleError(f"Bundle {str(path)!r} is incomplete: {sec.file} ({bundle.info.weights_section} weights) "
                          "is missing. Re-create the bundle.")
    return bundle


def is_bundle_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a manifest.json (a bundle, valid or not)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).exists()


def backbone_of_bundle(folder: str | os.PathLike) -> Backbone | None:
    """A fine-tuned bundle folder as a backbone; ``None`` for a folder that is no bundle.

    Registered with :func:`featbank.backbones.register_backbone_source` when this module is
    imported: this is where a bundle becomes a backbone (``extract --backbone models/<name>``,
    ``finetune --backbone models/<name>``), so :mod:`featbank.backbones` never imports bundles
    or fine-tuning code.

    Raises:
        BundleError: a bundle folder that is not a fine-tuned bundle, or a bad bundle.
    """
    name = folder
    if is_bundle_folder(name):
        bundle = load_bundle(name)
        if bundle.kind != "finetuned":
            raise BundleError(
                f"{str(name)!r} is a {bundle.kind!r} bundle (a head fitted on cached embeddings), not a fine-tuned "
                f"network; as --backbone pass the backbone it was fitted on ({bundle.info.backbone.backbone}), or a "
                "bundle made by 'featbank finetune'."
            )
        return bundle.load_backbone()
    return None


def _register() -> None:
    from ..backbones import register_backbone_source

    register_backbone_source(backbone_of_bundle)


_register()
