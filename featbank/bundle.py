"""Model bundles: a folder holding a trained head (or fine-tuned network) and its manifest.

Layout (format v1, shared by ``fit``, ``finetune``, ``export``, ``evaluate`` and ``predict``)::

    models/<name>/
      manifest.json       what the model is: classes, backbone identity, cache key, head, metrics
      head.safetensors    torch heads (linear, mlp): tensors + their parameters in the metadata
      head.skops          scikit-learn heads (loaded with an explicit list of trusted types);
                          head.joblib only where skops is not installed (sha256 checked first)
      model.safetensors   fine-tuned bundles: the full network state (features.* and head.*)
      metrics.json, confusion_matrix.png, per_class_recall.png, misclassified.png

Every weights file has its sha256 in the manifest and is checked before it is read. A bundle is
written to a temporary folder next to its destination and moved into place with ``os.replace``,
so a crash never leaves a half-written bundle under the final name.

Probabilities: :meth:`Bundle.predict_proba` is the canonical mapping embeddings -> (N, C)
probabilities (ONNX export must match it). For a scikit-learn head without ``predict_proba``
it is the softmax of ``decision_function`` (binary: ``sigmoid(d)`` for the second class, i.e.
the softmax of ``[0, d]``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import __version__
from .errors import BundleError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "save_bundle",
    "load_bundle",
    "sha256_bytes",
    "sha256_file",
    "serialize_sklearn",
    "TRUSTED_MODULE_PREFIXES",
]

BUNDLE_FORMAT = "featbank-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
# Types a skops head file may contain: scikit-learn, numpy/scipy containers and featbank heads.
TRUSTED_MODULE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "featbank.heads.", "collections.")
# Plain data types only: never builtins such as eval/exec/getattr that a crafted file could name.
TRUSTED_BUILTINS = frozenset(
    f"builtins.{t}"
    for t in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "complex",
              "bool", "slice", "NoneType", "type", "object")
)
_WEIGHT_SECTIONS = ("head", "finetune")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _weight_files(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(section, file name), ...]`` of the weights files a manifest names."""
    out = []
    for section in _WEIGHT_SECTIONS:
        sec = manifest.get(section)
        if isinstance(sec, dict) and sec.get("file"):
            out.append((section, str(sec["file"])))
    return out


def _core_digest(manifest: Mapping[str, Any], hashes: Mapping[str, str]) -> str:
    core = {k: v for k, v in manifest.items() if k not in ("bundle_id", "created", "metrics")}
    h = hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode())
    for name in sorted(hashes):
        h.update(name.encode() + b"\0" + hashes[name].encode())
    return h.hexdigest()[:16]


def _is_bundle_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_bundle(
    path: str | os.PathLike,
    manifest: dict[str, Any],
    files: Mapping[str, bytes | str | os.PathLike],
    *,
    overwrite: bool = True,
) -> Path:
    """Write a bundle folder atomically and return its path.

    Args:
        path: the bundle folder (``models/<name>``); its parent is created.
        manifest: the manifest; ``format``, ``bundle_version``, ``featbank_version`` and
            ``created`` are filled when missing; each weights section (``head``/``finetune``)
            gets the ``sha256`` of its ``file``; ``files`` (name -> sha256 of every file) and
            ``bundle_id`` are set. The dict is updated in place.
        files: file name -> content (bytes), or a path to a file to copy (large weights).
        overwrite: replace an existing bundle at ``path`` (a folder that is not a bundle is
            never replaced).

    Raises:
        BundleError: a weights file named in the manifest is not in ``files``, a file name is
            not a plain name, or ``path`` exists and may not be replaced.
    """
    path = Path(path)
    for name in files:
        if name != Path(name).name or name in ("", ".", "..", MANIFEST):
            raise BundleError(f"Bundle file name {name!r} must be a plain file name other than {MANIFEST}.")
    for section, name in _weight_files(manifest):
        if name not in files:
            raise BundleError(f"The manifest's {section}.file is {name!r} but no such file was given to save_bundle.")
    if path.exists():
        if not path.is_dir() or (any(path.iterdir()) and not _is_bundle_dir(path)):
            raise BundleError(
                f"{str(path)!r} exists and is not a featbank bundle; refusing to replace it. "
                "Choose another --name or --out."
            )
        if not overwrite:
            raise BundleError(f"Bundle {str(path)!r} already exists. Choose another --name, or remove it first.")

    manifest.setdefault("format", BUNDLE_FORMAT)
    manifest.setdefault("bundle_version", BUNDLE_VERSION)
    manifest.setdefault("featbank_version", __version__)
    manifest.setdefault("created", _now())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hashes: dict[str, str] = {}
        for name, content in files.items():
            dst = tmp / name
            if isinstance(content, (bytes, bytearray, memoryview)):
                dst.write_bytes(bytes(content))
            else:
                shutil.copyfile(content, dst)
            hashes[name] = sha256_file(dst)
        for section, name in _weight_files(manifest):
            manifest[section]["sha256"] = hashes[name]
        manifest["files"] = dict(sorted(hashes.items()))
        weights = {n: hashes[n] for _, n in _weight_files(manifest)}
        manifest["bundle_id"] = _core_digest(manifest, weights)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def serialize_sklearn(estimator: Any) -> tuple[str, bytes, list[str]]:
    """``(file name, bytes, trusted types)`` of a fitted scikit-learn estimator.

    skops when installed (no pickle: loading needs an explicit list of trusted types), else
    joblib — whose file the bundle only loads after its sha256 matched the manifest.
    """
    try:
        import skops.io as sio
    except ImportError:
        import joblib

        buf = io.BytesIO()
        joblib.dump(estimator, buf)
        return "head.joblib", buf.getvalue(), []
    data = sio.dumps(estimator)
    return "head.skops", data, sorted(sio.get_untrusted_types(data=data))


class Bundle:
    """A model bundle opened for use. Use :func:`load_bundle`.

    Attributes:
        path: the bundle folder.
        manifest: the parsed manifest.json.
        kind: ``"head"`` (a head fitted on cached embeddings) or ``"finetuned"``.
        classes: class names; column ``i`` of :meth:`predict_proba` is ``classes[i]``.
        backbone: identity dict of the backbone (backbone, weights, weights_sha256, transform,
            embed_dim).
        cache_key: key of the cache the head was fitted on (``None`` for fine-tuned bundles).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.classes: list[str] = list(manifest["classes"])
        self.backbone: dict[str, Any] = dict(manifest.get("backbone") or {})
        self.cache_key: str | None = manifest.get("cache_key")
        self._head: Any = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def embed_dim(self) -> int | None:
        d = self.backbone.get("embed_dim")
        return int(d) if d is not None else None

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

    def _read_checked(self, section: str) -> tuple[Path, bytes]:
        sec = self.manifest.get(section) or {}
        name = sec.get("file")
        if not name:
            raise BundleError(f"Bundle {str(self.path)!r} names no {section} file in its manifest; it is incomplete.")
        f = self.path / name
        if not f.is_file():
            raise BundleError(f"Bundle {str(self.path)!r} is incomplete: {name} is missing. Re-create the bundle.")
        data = f.read_bytes()
        want = sec.get("sha256")
        if not want or sha256_bytes(data) != want:
            raise BundleError(
                f"{str(f)!r} does not match the sha256 recorded in the manifest (got "
                f"{sha256_bytes(data)[:12]}..., recorded {str(want)[:12]}...): the file was changed or "
                "corrupted. Refusing to load it; re-create the bundle."
            )
        return f, data

    def load_head(self) -> Any:
        """The fitted estimator mapping embeddings -> probabilities (preprocessing included).

        For ``kind="head"``: a :class:`featbank.heads.LinearHead` / ``MLPHead``, or a scikit-learn
        estimator (usually a ``Pipeline`` with the stored preprocessing). For fine-tuned bundles
        whose head is one linear layer, a ``LinearHead`` built from ``head.*`` of the network.

        Raises:
            BundleError: missing file, sha256 mismatch, untrusted types, unreadable content.
        """
        if self._head is not None:
            return self._head
        if self.kind == "finetuned":
            self._head = self._load_finetuned_head()
            return self._head
        info = self.head_info
        f, data = self._read_checked("head")
        htype = info.get("type")
        try:
            if htype in ("linear", "mlp"):
                from safetensors.numpy import load as st_load

                from .heads import head_from_state

                self._head = head_from_state(htype, st_load(data), info)
            elif f.suffix == ".skops":
                self._head = self._load_skops(data, f)
            elif f.suffix == ".joblib":
                import joblib

                # Safe only because the sha256 above matched the manifest written at fit time.
                self._head = joblib.load(io.BytesIO(data))
            else:
                raise BundleError(f"Unknown head file type {f.name!r} (head.type={htype!r}) in {str(self.path)!r}.")
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt bundle
            raise BundleError(f"Cannot read head file {str(f)!r}: {type(e).__name__}: {e}. Re-create the bundle.") from None
        return self._head

    def _load_skops(self, data: bytes, f: Path) -> Any:
        try:
            import skops.io as sio
        except ImportError:
            raise BundleError(
                f"{str(f)!r} is a skops file but skops is not installed. Run 'pip install skops'."
            ) from None
        untrusted = sorted(sio.get_untrusted_types(data=data))
        bad = [t for t in untrusted if not (t.startswith(TRUSTED_MODULE_PREFIXES) or t in TRUSTED_BUILTINS)]
        if bad:
            raise BundleError(
                f"{str(f)!r} contains types featbank does not trust: {bad}. Refusing to load it. "
                f"Only types from {', '.join(TRUSTED_MODULE_PREFIXES)} and plain builtin data types are loaded."
            )
        return sio.loads(data, trusted=untrusted)

    def _load_finetuned_head(self) -> Any:
        from safetensors.numpy import load as st_load

        from .heads import LinearHead

        _, data = self._read_checked("finetune")
        tensors = {k[len("head."):]: v for k, v in st_load(data).items() if k.startswith("head.")}
        weights = [k for k, v in tensors.items() if v.ndim == 2]
        biases = [k for k, v in tensors.items() if v.ndim == 1]
        if len(weights) != 1 or len(biases) > 1:
            raise BundleError(
                f"Fine-tuned bundle {str(self.path)!r} has a head that is not one linear layer "
                f"(head tensors: {sorted(tensors)}); load it with featbank.finetuning.load_finetuned_model instead."
            )
        w = tensors[weights[0]].astype(np.float32)
        b = tensors[biases[0]].astype(np.float32) if biases else np.zeros(w.shape[0], np.float32)
        return LinearHead.from_coef(w, b, classes=np.arange(w.shape[0]))

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) probabilities for (N, D) embeddings, columns in the order of :attr:`classes`."""
        X = np.asarray(embeddings, dtype=np.float32)
        if X.ndim != 2:
            raise BundleError(f"Embeddings must be a 2-D array (n_samples, embed_dim); got shape {X.shape}.")
        if self.embed_dim is not None and X.shape[1] != self.embed_dim:
            raise BundleError(
                f"Embeddings have dimension {X.shape[1]} but bundle {str(self.path)!r} expects "
                f"{self.embed_dim} (backbone {self.backbone.get('backbone')!r})."
            )
        est = self.load_head()
        if hasattr(est, "predict_proba") and _has_proba(est):
            p = np.asarray(est.predict_proba(X), dtype=np.float64)
        else:
            d = np.asarray(est.decision_function(X), dtype=np.float64)
            if d.ndim == 1:
                d = np.stack([np.zeros_like(d), d], axis=1)
            d = d - d.max(axis=1, keepdims=True)
            p = np.exp(d)
            p /= p.sum(axis=1, keepdims=True)
        cols = np.asarray(getattr(est, "classes_", np.arange(p.shape[1]))).astype(np.int64)
        if p.shape[1] == self.n_classes and np.array_equal(cols, np.arange(self.n_classes)):
            return p
        out = np.zeros((X.shape[0], self.n_classes), dtype=np.float64)
        out[:, cols] = p
        return out

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Class indices (into :attr:`classes`) of the most probable class."""
        return self.predict_proba(embeddings).argmax(axis=1)

    def __repr__(self) -> str:
        return (
            f"Bundle({str(self.path)!r}, kind={self.kind!r}, head={self.head_info.get('estimator')!r}, "
            f"n_classes={self.n_classes}, backbone={self.backbone.get('backbone')!r})"
        )


def _has_proba(est: Any) -> bool:
    try:
        getattr(est, "predict_proba")
    except AttributeError:  # e.g. SVC(probability=False) hides it behind available_if
        return False
    return True


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a model bundle folder (or its manifest.json).

    Raises:
        BundleError: the folder or manifest is missing, unreadable, not a featbank bundle, of
            another bundle version, or incomplete (a weights file is missing). Hashes are checked
            when the weights are read (:meth:`Bundle.load_head`).

    Example:
        >>> bundle = load_bundle("models/elpv-linear")
        >>> probs = bundle.predict_proba(embeddings)
    """
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.exists():
        raise BundleError(f"Model bundle {str(path)!r} does not exist. Train one with 'featbank fit' first.")
    if not path.is_dir():
        raise BundleError(
            f"{str(path)!r} is a file, not a model bundle folder. Pass the folder written by 'featbank fit' "
            "(models/<name>), or an .onnx file where ONNX models are accepted."
        )
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{str(path)!r} has no {MANIFEST}; it is not a featbank model bundle.")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{str(mf)!r} is not valid JSON ({e}); the bundle is corrupt. Re-create it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{str(mf)!r} is not a featbank bundle manifest (format != {BUNDLE_FORMAT!r}).")
    version = manifest.get("bundle_version")
    if version != BUNDLE_VERSION:
        raise BundleError(
            f"Bundle {str(path)!r} has bundle_version {version!r}; this featbank ({__version__}) reads "
            f"version {BUNDLE_VERSION}. Re-create it with this featbank version."
        )
    missing = [k for k in ("kind", "classes", "backbone") if k not in manifest]
    if missing or manifest.get("kind") not in ("head", "finetuned"):
        raise BundleError(
            f"Bundle manifest {str(mf)!r} is incomplete or has an unknown kind "
            f"(missing {missing}, kind={manifest.get('kind')!r}); re-create the bundle."
        )
    for section, name in _weight_files(manifest):
        if not (path / name).is_file():
            raise BundleError(f"Bundle {str(path)!r} is incomplete: {name} ({section} weights) is missing.")
    if not _weight_files(manifest):
        raise BundleError(f"Bundle {str(path)!r} names no weights file in its manifest; it is incomplete.")
    return Bundle(path, manifest)
