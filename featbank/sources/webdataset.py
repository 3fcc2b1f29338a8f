"""WebDataset tar shards as a :class:`~featbank.sources.RowSource`: a folder of ``.tar`` files or
a brace pattern (``shards-{000000..000099}.tar``), and :class:`TarImages`, which reads a row's image
back out of its tar.

The tars are read with the standard library's :mod:`tarfile`, not the ``webdataset`` package:
listing needs random access by key (a shard resumes mid-tar) and a reason per bad member (corrupt
image, unreadable label, data cut by truncation), which ``tarfile`` gives directly and without a
dependency; ``webdataset`` streams samples in order and its handlers skip or raise per sample. A
row's key is ``<tar>/<__key__>``; its fingerprint is the tar's size and ``mtime_ns``, so any change
to a tar (its members included) re-embeds that tar's shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._files import NotRegularFileError, open_regular_file
from ..errors import ConfigError, DatasetError
from ..images import IMAGE_EXTENSIONS, ImageReadError, PreprocessConfig, check_image_bytes, preprocess_image
from .rows import Duplicates, Row, RowSource, printable, to_source, unstorable

__all__ = ["LABEL_SOURCES", "MAX_PATTERN_NAMES", "read_webdataset", "expand_braces", "count_braces", "TarImages"]

#: Where a sample's label comes from: its ``.cls``, ``.txt`` or ``.json`` member, or nowhere (unlabelled).
LABEL_SOURCES = ("cls", "txt", "json", "none")
#: A brace pattern may name at most this many tar files; the count is made before anything is expanded.
MAX_PATTERN_NAMES = 1_000_000

_GROUP = re.compile(r"\{([^{}]*)\}")
_MAX_GROUPS = 64
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def _range_of(body: str, pattern: str) -> tuple[int, int] | None:
    r = _RANGE.fullmatch(body)
    if r is None:
        return None
    lo, hi = int(r.group(1)), int(r.group(2))
    if hi < lo:
        raise ConfigError(f"The range {{{body}}} in {pattern!r} is empty (it counts down); write {{{r.group(2)}..{r.group(1)}}}.")
    return lo, hi


def _n_items(body: str, pattern: str) -> int:
    r = _range_of(body, pattern)
    return r[1] - r[0] + 1 if r is not None else body.count(",") + 1


def _items(body: str, pattern: str) -> Iterator[str]:
    r = _range_of(body, pattern)
    if r is None:
        yield from body.split(",")
        return
    width = len(_RANGE.fullmatch(body).group(1))  # type: ignore[union-attr]
    for i in range(r[0], r[1] + 1):
        yield str(i).zfill(width)


def _expand(pattern: str) -> Iterator[str]:
    m = _GROUP.search(pattern)
    if m is None:
        yield pattern
        return
    head, tail = pattern[: m.start()], pattern[m.end():]
    for item in _items(m.group(1), pattern):
        yield from _expand(head + item + tail)


def count_braces(pattern: str, limit: int = MAX_PATTERN_NAMES) -> int:
    """How many names ``pattern`` expands to, counted without expanding it (``limit + 1``: more than ``limit``).

    Groups side by side multiply (``{0..9}{0..9}``: 100); a nested pattern is counted by walking
    its names lazily, stopping past ``limit``.
    """
    groups = _GROUP.findall(pattern)
    if len(groups) == pattern.count("{"):  # no nesting: a product of the groups' sizes
        n = 1
        for body in groups:
            n *= _n_items(body, pattern)
            if n > limit:
                return limit + 1
        return n
    n = 0
    for _ in _expand(pattern):
        n += 1
        if n > limit:
            break
    return n


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000000..000002}.tar`` -> three names (zero padding kept); ``{a,b}`` lists too.

    Raises:
        ConfigError: the pattern names more than :data:`MAX_PATTERN_NAMES` files (counted before
            anything is expanded), or a range counts down.
    """
    if pattern.count("{") > _MAX_GROUPS:
        raise ConfigError(f"The pattern {pattern[:80]!r}... has {pattern.count('{')} brace groups; at most {_MAX_GROUPS} "
                          "are read. Pass the folder that holds the shards instead.")
    n = count_braces(pattern)
    if n > MAX_PATTERN_NAMES:
        raise ConfigError(
            f"The pattern {pattern!r} names more than {MAX_PATTERN_NAMES:,} tar files; featbank reads at most "
            f"{MAX_PATTERN_NAMES:,} shards from one pattern. Check the braces (e.g. shards/{{000000..000099}}.tar), "
            "or pass the folder that holds the shards."
        )
    return list(_expand(pattern))


def _split_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _label(tf: tarfile.TarFile, member: tarfile.TarInfo, kind: str) -> str:
    fh = tf.extractfile(member)
    if fh is None:
        raise ValueError("not a regular member")
    raw = fh.read(1 << 16).decode("utf-8").strip()
    if kind == "cls":
        return str(int(raw))
    if kind == "json":
        value = json.loads(raw)
        value = value.get("label", value.get("cls")) if isinstance(value, dict) else value
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ValueError("no 'label' (string or integer) in the JSON")
        raw = str(value)
    if not raw:
        raise ValueError("empty label")
    why = unstorable(raw, "label")
    if why:
        raise ValueError(why)
    return raw


def _digest(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """sha256 of a member's bytes (read in blocks; only for members whose key repeats). A member past the
    byte limit is not read: its size stands for it (it is refused as too large anyway)."""
    from ..images import MAX_IMAGE_BYTES

    if member.size > MAX_IMAGE_BYTES:
        return f"size {member.size}"
    h = hashlib.sha256()
    fh = tf.extractfile(member)
    if fh is not None:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class _TarListing:
    """What the tars of one WebDataset gave so far: rows, refusals, members, repeats."""

    found: dict[str, tuple[str, int, tuple[int, int]]] = field(default_factory=dict)
    skipped: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)
    dups: Duplicates = field(default_factory=Duplicates)
    clashes: list[str] = field(default_factory=list)
    #: per row: its image member, for the check of keys repeated across tars
    image_of: dict[str, tarfile.TarInfo] = field(default_factory=dict)


_Samples = dict[str, dict[str, list[tarfile.TarInfo]]]


def _members(tf: tarfile.TarFile, name: str, fp: tuple[int, int], size: int, out: _TarListing) -> _Samples:
    """The tar's regular members grouped by sample key and extension (repeats kept, in order)."""
    samples: _Samples = {}
    try:
        for m in tf:
            if m.isfile():
                key, ext = _split_member(m.name)
                samples.setdefault(key, {}).setdefault(ext, []).append(m)
    except (tarfile.TarError, EOFError, OSError) as e:
        out.skipped.append((f"{name}/", f"truncated or corrupt tar, members after the damage are lost: {e}", fp))
    else:
        # tarfile stops quietly at a cut header; a whole archive ends with two zero blocks.
        end = max((m.offset_data + -(-m.size // 512) * 512 for s_ in samples.values() for ms in s_.values() for m in ms),
                  default=0)
        if size < end + 1024:
            out.skipped.append((f"{name}/", "truncated tar (no end-of-archive marker): members after the cut are lost", fp))
    return samples


def _one(tf: tarfile.TarFile, row: str, ext: str, ms: list[tarfile.TarInfo], out: _TarListing, labels: bool) -> tarfile.TarInfo:
    """The member of ``row`` with extension ``ext``; repeats must be the same bytes (or the same label)."""
    if len(ms) > 1:
        same = (len({_label(tf, m, ext) for m in ms}) == 1 if labels
                else len({m.size for m in ms}) == 1 and len({_digest(tf, m) for m in ms}) == 1)
        if same:
            out.dups.collapsed.append((f"{printable(row)} (.{ext} x{len(ms)})", printable(row)))
        else:
            out.clashes.append(f"{printable(row)!r} has {len(ms)} different .{ext} members")
    return ms[0]


def _list_tar(path: Path, name: str, label_from: str, out: _TarListing) -> int:
    """Add one tar's samples to ``out``; returns how many rows it gave."""
    from ..images import MAX_IMAGE_BYTES

    try:
        fh = open_regular_file(path)
    except OSError as e:
        out.skipped.append((f"{name}/", f"not a readable tar: {getattr(e, 'what', None) or e.strerror or e}", (0, 0)))
        return 0
    with fh:
        st = os.fstat(fh.fileno())
        fp = (int(st.st_size), int(st.st_mtime_ns))
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, OSError) as e:
            out.skipped.append((f"{name}/", f"not a readable tar: {e}", fp))
            return 0
        with tf:
            samples = _members(tf, name, fp, st.st_size, out)
            n = 0
            for key, exts in samples.items():
                row = f"{name}/{key}"
                why = unstorable(key, "member name")
                image_ext = next((e for e in sorted(exts) if f".{e}" in IMAGE_EXTENSIONS), None)
                if why or image_ext is None:
                    out.skipped.append((printable(row), why or "no image member", fp))
                    continue
                try:
                    image = _one(tf, row, image_ext, exts[image_ext], out, False)
                    if image.offset_data + image.size > st.st_size:
                        raise ImageReadError("truncated tar: the image member's data is cut off")
                    check_image_bytes(image.size, MAX_IMAGE_BYTES)  # from the header, before a byte is read
                    label = ""
                    if label_from != "none" and label_from in exts:
                        label = _label(tf, _one(tf, row, label_from, exts[label_from], out, True), label_from)
                except ImageReadError as e:
                    out.skipped.append((row, e.reason, fp))
                    continue
                except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError) as e:
                    out.skipped.append((row, f"unreadable label in .{label_from}: {e}", fp))
                    continue
                out.found[row] = (label, -1, fp)
                out.members[row] = f"{name}\0{image.name}"  # key and member name may both hold '/'
                out.image_of[row] = image
                n += 1
            return n


def _collapse_across_tars(root: Path, out: _TarListing, counts: dict[str, int]) -> None:
    """A key in several tars with the same image bytes is one sample: later copies collapse into the first
    (same label) or are a conflict (other label). The same key with other bytes is another sample."""
    by_key: dict[str, list[str]] = {}
    for row in out.found:
        tar = out.members[row].partition("\0")[0]
        by_key.setdefault(row[len(tar) + 1:], []).append(row)
    for key, rows in by_key.items():
        sizes = [out.image_of[r].size for r in rows]
        if len(rows) < 2 or len(set(sizes)) == len(sizes):
            continue
        for row in sorted(rows):
            tar = out.members[row].partition("\0")[0]
            try:
                with open_regular_file(root / tar) as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
                    identity = (key, out.image_of[row].size, _digest(tf, out.image_of[row]))
            except (OSError, tarfile.TarError):  # changed since it was listed: its own sample (the reader says why)
                continue
            label = out.found[row][0]
            if not out.dups.add(identity, Row(row, label, -1, out.found[row][2], 0)):
                del out.found[row], out.members[row]
                counts[tar] -= 1


def read_webdataset(spec: str | os.PathLike, *, label_from: str = "cls") -> RowSource:
    """List the samples of WebDataset shards: a folder of ``.tar`` files or a brace pattern.

    The image is the member with an image extension; the label comes from ``.cls`` (an integer),
    ``.txt`` (a class name) or ``.json`` (its ``label``), as ``label_from`` says, or ``none``.
    An image member larger than :data:`~featbank.images.MAX_IMAGE_BYTES` (from its header), a
    member name or label HDF5 cannot store (a NUL byte) or a truncated member is a skipped row with
    its reason. One sample is one row: a member repeated in a tar, or a key repeated across tars
    with the same image bytes, collapses into the first with a
    :class:`~featbank.errors.DuplicateRowsWarning`; repeats that differ (bytes or label) are an error.

    Raises:
        ConfigError: an unknown ``label_from``; a pattern naming more than :data:`MAX_PATTERN_NAMES` tars.
        DatasetError: no tar found, a single class, or repeated samples that disagree (listed).
    """
    if label_from not in LABEL_SOURCES:
        raise ConfigError(f"The 'label_from' parameter must be one of {LABEL_SOURCES}. Got {label_from!r} instead.")
    spec_path = Path(spec).expanduser()
    if spec_path.is_dir():
        root, names = spec_path.resolve(), sorted(p.name for p in spec_path.glob("*.tar"))
    else:
        expanded = expand_braces(str(spec))
        root = Path(expanded[0]).parent.resolve()
        names = sorted(os.path.relpath(Path(p).resolve(), root) for p in expanded)
    if not names:
        raise DatasetError(f"No .tar shards found in '{spec}'. Pass a folder of .tar files or a pattern such as "
                           "shards/{000000..000099}.tar.")
    out = _TarListing()
    counts: dict[str, int] = {}
    for name in names:
        if not (root / name).exists():
            out.skipped.append((f"{name}/", "tar not found", (0, 0)))
            continue
        why = unstorable(name, "tar's file name")
        if why:
            out.skipped.append((f"{printable(name)}/", why, (0, 0)))
            continue
        counts[name] = _list_tar(root / name, name, label_from, out)
    if out.clashes:
        shown = "; ".join(out.clashes[:10]) + (f" (and {len(out.clashes) - 10} more)" if len(out.clashes) > 10 else "")
        raise DatasetError(f"The WebDataset '{spec}' repeats a sample key with other contents: {shown}. One sample is "
                           "one row: give each sample its own key.")
    _collapse_across_tars(root, out, counts)
    out.dups.check(f"The WebDataset '{spec}'", "the same sample",
                   "One sample is one row: give each sample its own key, and one label.")
    source = to_source(root, out.found, out.skipped, "webdataset", f"'{spec}'", out.members, list(counts.items()))
    source.duplicates = out.dups.collapsed
    return source


class TarImages:
    """Map-style dataset over tar members (one open tar per worker process); bad members give a reason.

    ``members[row]`` is ``"<tar>\\0<member name>"`` as :func:`read_webdataset` lists it. A member is
    bounded as an image file is: its size (from the tar header) before a byte is read, its pixels
    from the image header, and it is decoded from the tar as a stream, never read whole.
    """

    def __init__(self, root: Path, keys: Sequence[str], members: Sequence[str], rows: np.ndarray, cfg: PreprocessConfig):
        self.root, self.keys, self.members, self.rows, self.cfg = root, keys, members, rows, cfg
        self._open: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _tar(self, tar: str) -> tarfile.TarFile:
        tf = self._open.get(tar)
        if tf is None:
            tf = self._open[tar] = tarfile.open(fileobj=open_regular_file(self.root / tar), mode="r:")
        return tf

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        from ..images import DEFAULT_MAX_PIXELS, decode_image

        row = int(self.rows[i])
        tar, _, member = self.members[row].partition("\0")
        try:
            tf = self._tar(tar)
            info = tf.getmember(member)
            check_image_bytes(info.size)
            fh = tf.extractfile(info)
            if fh is None:
                return row, None, "not a regular tar member"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = decode_image(fh, DEFAULT_MAX_PIXELS, window=self.cfg.window, name=member)
                return row, preprocess_image(img, self.cfg), ""
        except ImageReadError as e:
            return row, None, e.reason
        except NotRegularFileError:
            return row, None, "the tar is not a regular file"
        except (KeyError, tarfile.TarError, EOFError) as e:
            return row, None, f"corrupt tar member: {e}"
        except Exception as e:  # noqa: BLE001 - a bad member must not kill a long run
            return row, None, f"truncated or corrupt: {type(e).__name__}: {e}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}
