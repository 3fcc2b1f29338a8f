"""Reading a cache: :class:`FeatureCache`, lazy on the embeddings, and :func:`open_cache`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import CacheError, ConfigError, NotACacheError
from ._direct import RowReader
from ._discovery import find_latest_cache
from ._features import CacheFeatures, check_block, dataset_name, parse_requested, read_features
from ._index import INDEX_SCHEMA_VERSION
from ._parts import PartInfo, parts_dir
from ._schema import FORMAT, SCHEMA_VERSION, SPLIT_NAMES, decode_attr
from ._validate import (
    check_codes,
    check_file_kind,
    check_rows,
    check_schema_version,
    check_structure,
    is_hdf5,
    parse_json_attr,
    recreate_hint,
)

#: What :func:`open_cache` does with finite but extreme embedding rows.
EXTREME_POLICIES = ("raise", "warn", "ignore")

__all__ = ["FeatureCache", "open_cache", "check_v2_index"]


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def check_v2_index(path: Path, f: h5py.File) -> list[PartInfo]:
    """A schema-v2 index: every part of its table present and unchanged, and every virtual dataset
    mapped onto those parts only (HDF5 fills a missing source with zeros, and a hostile index could
    map rows onto any file). Returns the table of parts."""
    from ._index import read_parts_table, verify_cache

    root = f.attrs.get("root")
    root = root.decode("utf-8", "replace") if isinstance(root, bytes) else root
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    if prefix:  # HDF5 looks there before the index's own folder: it could map rows onto other files
        raise CacheError(
            f"Cannot read '{path}' safely: HDF5_VDS_PREFIX is set ({prefix!r}), and HDF5 would look for the cache's "
            f"parts there before '{parts_dir(path)}'. Unset it (env -u HDF5_VDS_PREFIX ...) to read featbank caches."
        )
    try:
        table = read_parts_table(f)
        # The folder verify_cache checks (named after the index), so a renamed index cannot read the
        # zeros of a folder that is no longer there.
        allowed = {f"{parts_dir(path).name}/{p.name}" for p in table}
        n_rows = sum(int(p.n_rows) for p in table)
    except (KeyError, IndexError, ValueError, TypeError, OSError) as e:
        raise CacheError(f"Cache '{path}' is damaged: its table of parts (group 'parts') cannot be read ({e}). "
                         f"{recreate_hint(path, root)}") from None
    try:
        verify_cache(path, full=False, parts=table)  # names every missing or changed part, and what to run
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise CacheError(f"Cache '{path}' is damaged: its table of parts is inconsistent ({e}). "
                         f"{recreate_hint(path, root)}") from None
    names = ["embeddings", "labels", "splits", "paths", "fingerprints",
             "skipped/paths", "skipped/reasons", "skipped/fingerprints"]
    for group in ("layers", "views", "views/layers"):  # every layer/view dataset, listed in the attributes or not
        g = f.get(group)
        if isinstance(g, h5py.Group):
            names += [f"{group}/{k}" for k, v in g.items() if isinstance(v, h5py.Dataset)]
    for name in names:
        ds = f.get(name)
        if isinstance(ds, h5py.Dataset) and ds.is_virtual:
            bad = sorted({vs.file_name for vs in ds.virtual_sources()} - allowed)
            if bad:
                raise CacheError(
                    f"Cache '{path}' is damaged: dataset '{name}' maps rows onto {bad[:3]}, which its table of "
                    f"parts does not list in '{parts_dir(path).name}' (an index renamed without renaming its parts "
                    f"folder to match reads like this). {recreate_hint(path, root)}"
                )
    emb = f.get("embeddings")
    if isinstance(emb, h5py.Dataset) and emb.shape[:1] != (n_rows,):
        raise CacheError(f"Cache '{path}' is damaged: 'embeddings' has {emb.shape[0] if emb.shape else 0} rows, its "
                         f"table of parts lists {n_rows}. {recreate_hint(path, root)}")
    return table


class FeatureCache:
    """A featbank cache opened for reading. Embeddings stay on disk until asked for.

    Use :func:`open_cache`. Attributes hold the small per-row arrays in memory; ``embeddings`` is
    the h5py dataset (lazy, sliceable); :meth:`load_embeddings` reads rows into memory.

    Attributes:
        path: the file.
        metadata: every file attribute (schema version, backbone, weights sha256, transform, ...).
        classes: class names; ``labels`` index into them.
        paths: relative image paths, one per row.
        labels: int64 labels, -1 for unlabelled rows.
        splits: int8 split codes into ``SPLIT_NAMES``, -1 for rows with no split.
        skipped: ``[(path, reason), ...]`` for files that could not be read.
    """

    def __init__(self, path: str | os.PathLike, *, extreme: str = "raise", allow_incomplete: bool = False):
        if extreme not in EXTREME_POLICIES:
            raise ConfigError(f"The 'extreme' parameter must be one of {EXTREME_POLICIES}. Got {extreme!r} instead.")
        self.path = Path(path)
        self.extreme = extreme
        #: Rows already reported as extreme (``extreme='warn'`` warns once per row).
        self.extreme_rows: set[int] = set()
        self._file = _open_h5(self.path)
        self._readers: dict[str, RowReader] = {}
        try:
            self._read_small(allow_incomplete)
        except BaseException:
            self._file.close()
            raise

    def _read_small(self, allow_incomplete: bool) -> None:
        f, path = self._file, self.path
        if f.attrs.get("format") != FORMAT:
            raise NotACacheError(
                f"'{path}' is an HDF5 file but not a featbank cache (no format={FORMAT!r} attribute). "
                "Point at a file written by 'featbank extract'."
            )
        version = f.attrs.get("schema_version")
        self._parts: list[PartInfo] = []
        self._parts_dir: Path | None = None
        if isinstance(version, (int, np.integer)) and not isinstance(version, (bool, np.bool_)) and int(version) == 2:
            real = Path(os.path.realpath(path))  # through a symlink: the parts lie beside its target
            self._parts, self._parts_dir = check_v2_index(real, f), parts_dir(real)
        else:
            check_schema_version(path, version, (SCHEMA_VERSION, INDEX_SCHEMA_VERSION), __version__)
        self.metadata: dict[str, Any] = {}
        for k, v in f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            if isinstance(v, np.generic):
                v = v.item()
            self.metadata[k] = v
        root = self.metadata.get("root")
        parsed = {k: parse_json_attr(path, k, self.metadata[k], root)
                  for k in ("transform", "engines", "split_names", "classes_json") if k in self.metadata}
        # transform and engines are handed out decoded; split_names and classes_json stay strings.
        self.metadata.update({k: v for k, v in parsed.items() if k in ("transform", "engines")})
        names = parsed.get("split_names", list(SPLIT_NAMES))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CacheError(f"Cache '{path}' is damaged: attribute 'split_names' is {names!r}, expected a list "
                             f"of names. {recreate_hint(path, root)}")
        self._split_names = tuple(names)
        if not allow_incomplete and self.metadata.get("complete", True) is False:
            data = root if isinstance(root, str) and root else "DATA"
            raise CacheError(
                f"Cache '{path}' is incomplete (attribute complete=False: an interrupted 'featbank extract' "
                f"left it with {f['embeddings'].shape[0] if 'embeddings' in f else 0} rows). Finish it with "
                f"'featbank extract {data} --out {path}' (same options as before), then rerun."
            )
        check_structure(path, f, root)
        # Public: plain h5py (the virtual dataset for v2). featbank's own reads go through _reader().
        self.embeddings: h5py.Dataset = f["embeddings"]
        try:
            self.labels = f["labels"][...].astype(np.int64)
            self.splits = f["splits"][...].astype(np.int8)
            self.paths = decode_attr(f["paths"][...])
            self.fingerprints = f["fingerprints"][...].astype(np.int64)
        except OSError as e:  # a part whose table entry matches it but whose data is cut short
            raise self._damaged_part_error(e, root) from None
        self.classes = decode_attr(f["classes"][...])
        check_codes(path, self.labels, f["splits"][...].astype(np.int64), len(self.classes), self._split_names, root)
        self._features: CacheFeatures = read_features(path, f, int(self.embeddings.shape[1]),
                                                      int(self.embeddings.shape[0]), root)
        sk = f.get("skipped")
        self.skipped: list[tuple[str, str]] = (
            list(zip(decode_attr(sk["paths"][...]), decode_attr(sk["reasons"][...]))) if sk is not None else []
        )
        self.skipped_fingerprints = (
            sk["fingerprints"][...].astype(np.int64).reshape(-1, 2) if sk is not None else np.zeros((0, 2), np.int64)
        )
        if "listing_skipped" in self.metadata:  # schema v2: rows refused while listing a manifest or tars
            listed = parse_json_attr(path, "listing_skipped", self.metadata["listing_skipped"], root)
            try:
                rows = [(str(k), str(r)) for k, r, _ in listed]
                extra = np.array([fp for *_, fp in listed], np.int64).reshape(-1, 2)
            except (TypeError, ValueError):
                raise CacheError(f"Cache '{path}' is damaged: attribute 'listing_skipped' is not a list of "
                                 f"[path, reason, fingerprint]. {recreate_hint(path, root)}") from None
            self.skipped += rows
            self.skipped_fingerprints = np.concatenate([self.skipped_fingerprints, extra])

    def _damaged_part_error(self, e: OSError, root: Any) -> CacheError:
        """The error for per-row data HDF5 cannot read: it names the first part that fails to read."""
        for part in self._parts:
            try:
                with h5py.File(self._parts_dir / part.name, "r") as pf:
                    for name in ("labels", "splits", "paths", "fingerprints"):
                        pf[name][...]
            except (OSError, KeyError):
                return CacheError(
                    f"Cache '{self.path}' cannot be read: part file {part.name!r} is damaged ({str(e)[:160]}). "
                    f"Remove the part file {str(self._parts_dir / part.name)!r} and rerun 'featbank extract' with the "
                    f"same options (it recomputes that part only); 'featbank cache verify {self.path}' checks every part."
                )
        return CacheError(f"Cache '{self.path}' cannot be read ({str(e)[:200]}). {recreate_hint(self.path, root)}")

    # -- convenience -------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def cache_key(self) -> str:
        return str(self.metadata.get("cache_key", ""))

    @property
    def root(self) -> Path:
        return Path(str(self.metadata.get("root", "")))

    @property
    def split_names(self) -> tuple[str, ...]:
        return self._split_names

    def has_split(self, name: str) -> bool:
        return bool(np.any(self.split_mask(name)))

    def split_mask(self, name: str) -> np.ndarray:
        """Boolean row mask of split ``name`` (``train``, ``val`` or ``test``)."""
        names = self.split_names
        if name not in names:
            raise ValueError(f"Unknown split {name!r}; expected one of {names}.")
        return self.splits == names.index(name)

    def load_embeddings(self, rows: np.ndarray | Sequence[int] | None = None, dtype=np.float32) -> np.ndarray:
        """Read embeddings into memory: all rows, or the given row indices / boolean mask."""
        if rows is None:
            return self._read_sorted(np.arange(self.n_samples), dtype)
        uniq, inverse = _sorted_unique(rows, self.n_samples)
        out = self._read_sorted(uniq, dtype) if uniq.size else np.zeros((0, self.embed_dim), dtype)
        return out if inverse is None else out[inverse]

    def _reader(self, name: str) -> RowReader:
        """featbank's reader of a per-row dataset: straight from the parts where it can (see ``_direct``)."""
        if name not in self._readers:
            self._readers[name] = RowReader(self._file[name], self._parts_dir, self._parts)
        return self._readers[name]

    def _read_sorted(self, rows: np.ndarray, dtype: Any) -> np.ndarray:
        """Embedding rows ``rows`` (sorted), values checked (NaN/inf, extreme: ``check_rows``)."""
        out = np.empty((len(rows), self.embed_dim), dtype)
        suspect = self._reader("embeddings").read_rows(rows, out)
        if suspect:  # the blocks the one-pass test could not clear, checked exactly, in one message
            at = np.concatenate([np.arange(s.start, s.stop) for s in suspect])
            check_rows(self, rows[at], out[at], self.extreme)
        return out

    def iter_chunks(self, rows: np.ndarray, chunk_rows: int, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, embeddings)`` in chunks of at most ``chunk_rows`` sorted rows."""
        rows = np.sort(np.asarray(rows).reshape(-1))
        _check_range(rows, self.n_samples)
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self._read_sorted(idx, dtype)

    # -- layers and views (``featbank extract --layers / --views``) ------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        """The layers the cache holds, in network order, ending with ``final`` (``embeddings``)."""
        return self._features.layers

    @property
    def layer_dims(self) -> dict[str, int]:
        """``{layer: number of pooled values}``."""
        return dict(self._features.layer_dims)

    @property
    def pooling(self) -> str:
        return self._features.pooling

    @property
    def n_views(self) -> int:
        """K, the augmented views stored per image besides the plain one (0: none)."""
        return self._features.n_views

    @property
    def augment(self) -> str:
        """How the views were made: ``hflip``, ``dihedral``, ``crops``, or ``""``."""
        return self._features.augment

    @property
    def view_seed(self) -> int:
        return self._features.view_seed

    def _read_layer(self, tap: str, view: int | None, rows: np.ndarray, dtype: Any) -> np.ndarray:
        if tap == "final" and view is None:
            return self._read_sorted(rows, dtype)
        name = dataset_name(tap, view is not None)
        out = np.empty((len(rows), self._features.layer_dims[tap]), dtype)
        suspect = self._reader(name).read_rows(rows, out, column=view)
        if suspect:
            at = np.concatenate([np.arange(s.start, s.stop) for s in suspect])
            check_block(self, name, rows[at], out[at])
        return out

    def load_features(self, rows: np.ndarray | Sequence[int] | None = None, layers: str | Sequence[str] = ("final",),
                      view: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Read the features of ``layers`` into memory, concatenated in the order given.

        Args:
            rows: row indices or a boolean mask; ``None`` for every row.
            layers: names from :attr:`layers` (``"final"`` is ``embeddings``), a comma-separated
                string, or ``"all"``.
            view: ``None`` for the plain view; ``k`` (0-based) for the k-th augmented view.
            dtype: of the result.

        Returns:
            ``(n, sum of layer_dims[layer])`` array.

        Raises:
            ConfigError: a layer or view the cache does not hold (the message lists what it holds).
            CacheError: NaN/inf (or extreme, see ``open_cache``) values in the rows read.

        Example:
            >>> X = cache.load_features(cache.split_mask("train"), layers=("stage5", "final"))
        """
        wanted = parse_requested(self._features, layers, view)
        uniq, inverse = _sorted_unique(np.arange(self.n_samples) if rows is None else rows, self.n_samples)
        if uniq.size == 0:
            return np.zeros((0, sum(self._features.layer_dims[t] for t in wanted)), dtype)
        cols = [self._read_layer(t, view, uniq, dtype) for t in wanted]
        out = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)
        return out if inverse is None else out[inverse]

    def iter_feature_chunks(self, rows: np.ndarray, chunk_rows: int, layers: str | Sequence[str] = ("final",),
                            view: int | None = None, dtype: Any = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_indices, features)`` in chunks of at most ``chunk_rows`` sorted rows (see :meth:`load_features`)."""
        parse_requested(self._features, layers, view)
        rows = np.sort(np.asarray(rows).reshape(-1))
        _check_range(rows, self.n_samples)
        for start in range(0, len(rows), chunk_rows):
            idx = rows[start : start + chunk_rows]
            yield idx, self.load_features(idx, layers, view, dtype)

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        try:
            self._file.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.path)!r}, n_samples={self.n_samples}, embed_dim={self.embed_dim}, "
            f"n_classes={self.n_classes}, backbone={self.metadata.get('backbone')!r})"
        )


def _sorted_unique(rows: np.ndarray | Sequence[int], n_samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row indices or a boolean mask as sorted unique indices, and how to put them back in the order
    asked (None: already sorted and unique, the common case, which then costs no copy)."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    rows = rows.reshape(-1)
    if rows.size and rows.dtype.kind not in "iu":
        raise IndexError(f"row indices must be integers or a boolean mask; got an array of {rows.dtype}")
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        uniq, inverse = rows.astype(np.int64, copy=False), None
    else:
        uniq, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.reshape(-1)
    _check_range(uniq, n_samples)
    return uniq, inverse


def _check_range(sorted_rows: np.ndarray, n_samples: int) -> None:
    if sorted_rows.size and (sorted_rows[0] < 0 or sorted_rows[-1] >= n_samples):
        raise IndexError(f"row indices must lie in [0, {n_samples}); got {sorted_rows[0]}..{sorted_rows[-1]}")


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise CacheError(f"Cache '{path}' does not exist. Run 'featbank extract DATA --out {path}' first.")
    if path.is_dir():
        raise CacheError(f"'{path}' is a folder; pass a cache file written by 'featbank extract' (an .h5 file).")
    check_file_kind(path)
    try:
        # HDF5 finds a v2 index's parts relative to the file's folder as opened: a symlink's target's.
        return h5py.File(os.path.realpath(path), "r")
    except OSError as e:
        if not is_hdf5(path):
            raise NotACacheError(f"'{path}' is not a featbank cache (an empty file).") from None
        raise CacheError(f"'{path}' is not a readable HDF5 file ({e}). {recreate_hint(path)}") from None


def open_cache(path: str | os.PathLike | None = None, *, extreme: str = "raise",
               allow_incomplete: bool = False) -> FeatureCache:
    """Open a featbank cache for reading; with no path, the one :func:`choose_cache` picks.

    Opening validates everything but the embedding values: the format and schema version, that
    every dataset is there with the right shape and one row per embedding, labels within the
    classes, split codes within ``split_names``, JSON attributes. Embedding values are checked as
    rows are read (NaN/inf always refused; see ``extreme``), so opening a large cache stays cheap.

    Args:
        path: the cache file; ``None`` for :func:`choose_cache`'s pick in the default folder.
        extreme: rows with a value beyond ``EXTREME_VALUE`` (finite but huge, e.g. 1e38):
            ``"raise"`` (default) refuses them with a :class:`CacheError` naming them, ``"warn"``
            returns them with an :class:`ExtremeEmbeddingsWarning`, ``"ignore"`` returns them.
        allow_incomplete: open a cache that an interrupted extract left with ``complete=False``.

    Raises:
        CacheError: missing, unreadable, damaged (the message names the field and the value),
            incomplete, or of another schema version. :class:`NotACacheError` (a subclass) when the
            file is not a featbank cache at all.

    Example:
        >>> with open_cache("runs/elpv.h5") as cache:
        ...     X = cache.load_embeddings(cache.split_mask("train"))
    """
    return FeatureCache(path if path is not None else find_latest_cache(), extreme=extreme,
                        allow_incomplete=allow_incomplete)
