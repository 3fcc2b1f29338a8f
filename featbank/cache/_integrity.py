"""Every check a cache passes before any of its rows is read, in one place.

``open_cache`` (so ``fit``, ``evaluate`` and extract's rerun) and ``featbank cache info``,
``verify`` and ``export`` all call :func:`validate_cache`; ``verify`` then hashes every part and
reads every row through. What a cache may reference, and what is checked before anything is
allocated from a count the file declares:

- the file itself is a regular file (a FIFO or device is refused, never opened);
- schema v2: the table of parts names plain part files inside ``<index>.parts/`` (no path, no
  ``..``, no link out of the folder), each a regular file of the recorded size (and sha256 where
  its mtime changed); every per-row dataset of the index is a virtual dataset that maps exactly
  those parts, whole and in table order, onto the dataset of the same name; each part holds each
  dataset with the row count the table records, stored inside the part (contiguous, chunked or
  compact: no HDF5 external storage, no virtual layout, no unwritten storage that reads as fill
  values); every other dataset of the index is stored inside the index;
- schema v1 (``_legacy``): every dataset is stored inside the file, the same way;
- no more class names than rows (embedded and skipped): every class is some row's label;
- then the small per-row arrays are read and checked (labels within the classes, split codes
  within the split names), and the layer/view attributes against the datasets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5f, h5s

from .. import __version__
from .._files import NotRegularFileError, check_regular_file
from ..errors import CacheError, NotACacheError
from ..features import FeatureSpec
from ._features import read_features
from ._index import LISTING, read_parts_table, verify_cache
from ._legacy import V1_SCHEMA_VERSION, check_v1_storage, schema_version
from ._parts import ROW_DATASETS, SKIPPED_DATASETS, PartInfo, parts_dir
from ._schema import FORMAT, SCHEMA_VERSION, SPLIT_NAMES
from ._validate import (
    check_codes,
    check_file_kind,
    check_schema_version,
    check_structure,
    is_hdf5,
    parse_json_attr,
    recreate_hint,
    storage_problem,
)

__all__ = ["CacheCheck", "open_cache_file", "validate_cache", "check_v2_index", "maps_exactly", "damaged_part_error"]

_FEATURE_GROUPS = ("layers", "views", "views/layers")


@dataclass
class CacheCheck:
    """What :func:`validate_cache` read and checked.

    Attributes:
        metadata: the file's attributes (``transform`` and ``engines`` decoded from JSON).
        split_names: the names split codes index.
        parts: schema v2: the table of parts, checked against the files; v1: empty.
        parts_dir: schema v2: the parts folder; v1: None.
        labels: ``int64`` per row, within the classes (or -1).
        splits: ``int8`` per row, within ``split_names`` (or -1).
        features: the layers and views the cache holds.
        listed: ``(path, reason, fingerprint)`` of rows refused while listing, from the attribute
            ``listing_skipped`` of a cache written before ``skipped/`` held them too (empty otherwise:
            the index's ``listing/`` rows are already part of ``skipped/``).
    """

    metadata: dict[str, Any]
    split_names: tuple[str, ...]
    parts: list[PartInfo]
    parts_dir: Path | None
    labels: np.ndarray
    splits: np.ndarray
    features: FeatureSpec
    listed: list[tuple[str, str, tuple[int, int]]]


def _fail(path: Path, what: str, root: Any = None) -> CacheError:
    return CacheError(f"Cache '{path}' is damaged: {what}. {recreate_hint(path, root)}")


def open_cache_file(path: Path) -> h5py.File:
    """Open a cache file read-only after checking it is a regular HDF5 file (a FIFO is never opened).

    Raises:
        CacheError: missing, a folder, a FIFO or device, unreadable. :class:`NotACacheError` when
            it is not HDF5.
    """
    path = Path(path)
    try:
        check_regular_file(path)
    except FileNotFoundError:
        raise CacheError(f"Cache '{path}' does not exist. Run 'featbank extract DATA --out {path}' first.") from None
    except NotRegularFileError as e:
        if e.kind == "a folder":
            raise CacheError(f"'{path}' is a folder; pass a cache file written by 'featbank extract' (an .h5 file).") from None
        raise CacheError(f"'{path}' is {e.kind}, not a regular file; featbank reads a cache only from a regular "
                         "file (an .h5 file written by 'featbank extract'). Pass the cache file itself.") from None
    except OSError as e:
        raise CacheError(f"Cache '{path}' cannot be read: {e.strerror or e}.") from None
    check_file_kind(path)
    try:
        # HDF5 finds a v2 index's parts relative to the file's folder as opened: a symlink's target's.
        return h5py.File(os.path.realpath(path), "r")
    except OSError as e:
        if not is_hdf5(path):
            raise NotACacheError(f"'{path}' is not a featbank cache (an empty file).") from None
        raise CacheError(f"'{path}' is not a readable HDF5 file ({e}). {recreate_hint(path)}") from None


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Every dataset of the file by path (no leading slash); links to other files are not followed."""
    out: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = obj

    f.visititems(visit)
    return out


def _per_row_names(f: h5py.File) -> tuple[list[str], list[str]]:
    """(datasets with one row per embedded row, datasets with one row per skipped row) of an index."""
    rows = list(ROW_DATASETS)
    for group in _FEATURE_GROUPS:  # every layer/view dataset, listed in the attributes or not
        g = f.get(group)
        if isinstance(g, h5py.Group):
            rows += [f"{group}/{k}" for k, v in g.items() if isinstance(v, h5py.Dataset)]
    return rows, [f"skipped/{n}" for n in SKIPPED_DATASETS]


def _selects(space: h5s.SpaceID, first: tuple[int, ...] | None, shape: tuple[int, ...]) -> bool:
    """Whether ``space`` selects the block ``shape`` at ``first`` (``None``: all of a source dataset)."""
    if first is None and space.get_select_type() == h5s.SEL_ALL:  # the source's extent is not stored then
        return True
    first = first or (0,) * len(shape)
    last = tuple(a + n - 1 for a, n in zip(first, shape))
    return space.get_select_npoints() == int(np.prod(shape)) and space.get_select_bounds() == (first, last)


def maps_exactly(ds: h5py.Dataset, folder_name: str, parts: list[PartInfo], counts: list[int],
                 own: tuple[str, int] | None = None) -> bool:
    """Whether the virtual ``ds`` maps the parts with rows (``counts[i]`` rows of ``parts[i]``), whole and in
    order, onto the dataset of the same name in ``folder_name/<part name>`` (what ``write_index`` writes);
    then, with ``own`` (dataset, rows), that dataset of the index itself, whole."""
    if not ds.is_virtual:
        return False
    name, tail = ds.name.lstrip("/"), tuple(ds.shape[1:])
    used = [(f"{folder_name}/{p.name}", name, n) for p, n in zip(parts, counts) if n]
    if own and own[1]:
        used.append((".", own[0], own[1]))
    sources = ds.virtual_sources()
    if len(sources) != len(used) or sum(n for *_, n in used) != ds.shape[0]:
        return False
    pos = 0
    for (file_name, dset_name, n), vs in zip(used, sources):
        whole = (n, *tail)
        if (vs.file_name != file_name or vs.dset_name.lstrip("/") != dset_name
                or not _selects(vs.vspace, (pos, *(0,) * len(tail)), whole) or not _selects(vs.src_space, None, whole)):
            return False
        pos += n
    return True


def _check_index_storage(path: Path, f: h5py.File, per_row: set[str], root: Any) -> None:
    """Virtual datasets only where rows are mapped onto parts; every other dataset stored inside the index."""
    for name, ds in _datasets(f).items():
        why = "" if (ds.is_virtual and name in per_row) else storage_problem(ds.id)
        if why:
            raise _fail(path, f"dataset '{name}' {why}; a cache holds its values in its own file (an index: its "
                        "per-row datasets mapped onto its own parts)", root)


def _check_counts(path: Path, f: h5py.File, table: list[PartInfo], n_listed: int, root: Any) -> None:
    """The row counts of the index's datasets agree with its table of parts and its ``listing/`` rows
    (shapes only, nothing read)."""
    for name, want in (("embeddings", sum(p.n_rows for p in table)),
                       ("skipped/paths", sum(p.n_skipped for p in table) + n_listed)):
        ds = f.get(name)
        if isinstance(ds, h5py.Dataset) and ds.shape[:1] != (want,):
            got = ds.shape[0] if ds.shape else 0
            raise _fail(path, f"'{name}' has {got} rows, its table of parts lists {want} (fields 'parts/n_rows', "
                        f"'parts/n_skipped'{', and the rows of group ' + repr(LISTING) if n_listed else ''})", root)


def _check_listing(path: Path, f: h5py.File, root: Any) -> int:
    """The index's ``listing/`` group (rows refused while listing): three datasets of one length, of
    the kinds ``skipped/`` has; returns that length (0 without the group)."""
    g = f.get(LISTING)
    if g is None:
        return 0
    want = {"paths": (1, "OS"), "reasons": (1, "OS"), "fingerprints": (2, "iu")}
    shapes = {k: g[k].shape if isinstance(g, h5py.Group) and isinstance(g.get(k), h5py.Dataset) else None for k in want}
    if not isinstance(g, h5py.Group) or any(
            s is None or len(s) != want[k][0] or g[k].dtype.kind not in want[k][1] for k, s in shapes.items()):
        raise _fail(path, f"group '{LISTING}' holds {shapes}, expected paths and reasons (n,) strings and "
                    "fingerprints (n, 2) integers", root)
    n = {s[0] for s in shapes.values() if s is not None}
    if len(n) != 1 or shapes["fingerprints"][1] != 2:
        raise _fail(path, f"group '{LISTING}' has datasets of shapes {shapes}, expected (n,), (n,) and (n, 2)", root)
    return n.pop()


def _check_mapping(path: Path, f: h5py.File, table: list[PartInfo], names: list[str], n_listed: int | None,
                   root: Any) -> None:
    """Each of ``names`` maps the parts exactly; ``n_listed`` not None: skipped rows, then the index's listing/."""
    counts = [p.n_rows if n_listed is None else p.n_skipped for p in table]
    for name in names:
        ds = f.get(name)
        own = (f"{LISTING}/{name.rpartition('/')[2]}", n_listed) if n_listed else None
        if not isinstance(ds, h5py.Dataset) or (not sum(counts) and not own and not ds.is_virtual):
            continue  # absent (check_structure decides) or empty: nothing to map
        if maps_exactly(ds, parts_dir(path).name, table, counts, own):
            continue
        folder = parts_dir(path).name
        if not ds.is_virtual:
            raise _fail(path, f"dataset '{name}' is not a virtual dataset over the parts its table lists in "
                        f"'{folder}' (no part holds its rows, and no hash covers them)", root)
        bad = sorted({vs.file_name for vs in ds.virtual_sources()})
        raise _fail(path, f"dataset '{name}' maps rows onto {bad[:3]}, not exactly the parts its table lists in "
                    f"'{folder}', whole and in order (an index renamed without renaming its parts folder to match "
                    "reads like this)", root)


def _part_problem(file: Path, wanted: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """What keeps one part from holding ``wanted`` (dataset -> shape, dtype) inside itself ("" when nothing)."""
    try:
        fid = h5f.open(os.fsencode(file), h5f.ACC_RDONLY)
    except OSError as e:
        return f"is not a readable HDF5 file ({str(e)[:120]})"
    try:
        for name, (shape, dtype) in wanted.items():
            try:
                dsid = h5d.open(fid, name.encode())
            except KeyError:
                return f"has no dataset '{name}'"
            try:
                if tuple(dsid.shape) != shape:
                    return (f"holds '{name}' of shape {tuple(dsid.shape)}, the index maps {shape} onto it (fields "
                            "'parts/n_rows', 'parts/n_skipped')")
                if dsid.dtype != dtype:
                    return f"holds '{name}' as {dsid.dtype}, the index reads {dtype}"
                why = storage_problem(dsid)
                if why:
                    return f"dataset '{name}' {why}"
            finally:
                dsid.close()
    finally:
        fid.close()
    return ""


def _check_part_contents(path: Path, f: h5py.File, table: list[PartInfo], rows: list[str], skipped: list[str],
                         root: Any) -> None:
    """Each part holds every mapped dataset with the rows its table entry records, stored inside itself."""
    tails = {n: (tuple(f[n].shape[1:]), f[n].dtype) for n in (*rows, *skipped) if isinstance(f.get(n), h5py.Dataset)}
    folder = parts_dir(path)
    for p in table:
        wanted = {n: ((p.n_skipped if n in skipped else p.n_rows, *tail), dt) for n, (tail, dt) in tails.items()}
        why = _part_problem(folder / p.name, wanted)
        if why:
            raise CacheError(
                f"Cache '{path}' cannot be read: part {folder.name}/{p.name} {why}. A part stores its rows inside "
                f"itself, as many as the index's table records. Remove that part file and rerun 'featbank extract' "
                f"with the same options (it recomputes that part only), or {recreate_hint(path, root)[0].lower()}"
                f"{recreate_hint(path, root)[1:]}"
            )


def check_v2_index(path: Path, f: h5py.File) -> list[PartInfo]:
    """A schema-v2 index is only its own parts (see the module docstring); returns its table of parts.

    ``path`` is the index as HDF5 opened it (a symlink's target), so its parts folder is beside it.
    """
    root = f.attrs.get("root")
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    if prefix:  # HDF5 looks there before the index's own folder: it could map rows onto other files
        raise CacheError(
            f"Cannot read '{path}' safely: HDF5_VDS_PREFIX is set ({prefix!r}), and HDF5 would look for the cache's "
            f"parts there before '{parts_dir(path)}'. Unset it (env -u HDF5_VDS_PREFIX ...) to read featbank caches."
        )
    rows, skipped = _per_row_names(f)
    _check_index_storage(path, f, {*rows, *skipped}, root)
    table = read_parts_table(f)
    n_listed = _check_listing(path, f, root)
    _check_counts(path, f, table, n_listed, root)
    verify_cache(path, full=False, parts=table)  # names every missing or changed part, and what to run
    _check_mapping(path, f, table, rows, None, root)
    _check_mapping(path, f, table, skipped, n_listed, root)
    _check_part_contents(path, f, table, rows, skipped, root)
    return table


def _metadata(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _read_attrs(path: Path, f: h5py.File, allow_incomplete: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The attributes (JSON ones parsed) and split names; refuses an incomplete cache unless allowed."""
    metadata = _metadata(f)
    root = metadata.get("root")
    parsed = {k: parse_json_attr(path, k, metadata[k], root)
              for k in ("transform", "engines", "split_names", "classes_json") if k in metadata}
    # transform and engines are handed out decoded; split_names and classes_json stay strings.
    metadata.update({k: v for k, v in parsed.items() if k in ("transform", "engines")})
    names = parsed.get("split_names", list(SPLIT_NAMES))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(path, f"attribute 'split_names' is {names!r}, expected a list of names", root)
    if not allow_incomplete and metadata.get("complete", True) is False:
        data = root if isinstance(root, str) and root else "DATA"
        raise CacheError(
            f"Cache '{path}' is incomplete (attribute complete=False: an interrupted 'featbank extract' "
            f"left it with {f['embeddings'].shape[0] if 'embeddings' in f else 0} rows). Finish it with "
            f"'featbank extract {data} --out {path}' (same options as before), then rerun."
        )
    return metadata, tuple(names)


def _check_class_count(path: Path, f: h5py.File, root: Any) -> None:
    """No more class names than rows: every class of a cache is the label of one of its rows (embedded or
    skipped), and a class count sizes arrays (a confusion matrix is classes x classes)."""
    n_classes, n_rows = int(f["classes"].shape[0]), int(f["embeddings"].shape[0])
    sk = f.get("skipped/paths")
    n_skipped = int(sk.shape[0]) if isinstance(sk, h5py.Dataset) and sk.shape else 0
    if n_classes > max(n_rows + n_skipped, 0):
        raise _fail(path, f"dataset 'classes' has {n_classes} names for {n_rows} rows and {n_skipped} skipped rows; "
                    "every class is the label of at least one row", root)


def _listing_skipped(path: Path, metadata: dict[str, Any], root: Any) -> list[tuple[str, str, tuple[int, int]]]:
    if "listing_skipped" not in metadata:
        return []
    listed = parse_json_attr(path, "listing_skipped", metadata["listing_skipped"], root)
    try:
        return [(str(k), str(r), (int(fp[0]), int(fp[1]))) for k, r, fp in listed]
    except (TypeError, ValueError, IndexError):
        raise _fail(path, "attribute 'listing_skipped' is not a list of [path, reason, fingerprint]", root) from None


def damaged_part_error(path: Path, folder: Path | None, parts: list[PartInfo], e: OSError, root: Any) -> CacheError:
    """The error for per-row data HDF5 cannot read: it names the first part that fails to read."""
    for part in parts if folder is not None else []:
        try:
            with h5py.File(folder / part.name, "r") as pf:
                for name in ("labels", "splits", "paths", "fingerprints"):
                    pf[name][...]
        except (OSError, KeyError):
            return CacheError(
                f"Cache '{path}' cannot be read: part file {part.name!r} is damaged ({str(e)[:160]}). "
                f"Remove the part file {str(folder / part.name)!r} and rerun 'featbank extract' with the "
                f"same options (it recomputes that part only); 'featbank cache verify {path}' checks every part."
            )
    return CacheError(f"Cache '{path}' cannot be read ({str(e)[:200]}). {recreate_hint(path, root)}")


def validate_cache(path: Path, f: h5py.File, *, allow_incomplete: bool = False) -> CacheCheck:
    """Every check :func:`~featbank.cache.open_cache` runs, before any per-row array is read or sized.

    Args:
        path: the cache as the user named it (messages name it).
        f: the file opened by :func:`open_cache_file`.
        allow_incomplete: accept ``complete=False`` (an interrupted extract, for its rerun).

    Raises:
        CacheError: the message names the field, the value and what to run.
            :class:`NotACacheError` for an HDF5 file without featbank's format attribute.
    """
    if f.attrs.get("format") != FORMAT:
        raise NotACacheError(f"'{path}' is an HDF5 file but not a featbank cache (no format={FORMAT!r} attribute). "
                             "Point at a file written by 'featbank extract'.")
    v2 = schema_version(f.attrs) == SCHEMA_VERSION
    if not v2:
        check_schema_version(path, f.attrs.get("schema_version"), (V1_SCHEMA_VERSION, SCHEMA_VERSION), __version__)
    metadata, split_names = _read_attrs(path, f, allow_incomplete)
    root = metadata.get("root")
    check_structure(path, f, root)
    emb = f["embeddings"]
    features = read_features(path, f, int(emb.shape[1]), int(emb.shape[0]), root)  # attributes and shapes only
    real = Path(os.path.realpath(path))  # through a symlink: the parts lie beside its target
    parts, folder = (check_v2_index(real, f), parts_dir(real)) if v2 else ([], None)
    if not v2:
        check_v1_storage(path, f)
    _check_class_count(path, f, root)
    try:
        labels = f["labels"][...].astype(np.int64)
        splits = f["splits"][...].astype(np.int64)
    except OSError as e:  # a part whose table entry matches it but whose data is cut short
        raise damaged_part_error(path, folder, parts, e, root) from None
    check_codes(path, labels, splits, int(f["classes"].shape[0]), split_names, root)
    listed = _listing_skipped(path, metadata, root) if LISTING not in f else []  # listing/ is already in skipped/
    return CacheCheck(metadata, split_names, parts, folder, labels, splits.astype(np.int8), features, listed)
