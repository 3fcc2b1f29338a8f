"""Schema-v1 caches for tests: the one-file layout featbank wrote before schema v2 (parts + index).

``extract`` writes schema v2 only; v1 files still open and are migrated by the next ``extract``, so
tests need real v1 files. They are written by the v1 writer (``write_cache``, still the code that
wrote them) from a real v2 extraction: same rows, embeddings, key and attributes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import featbank
from featbank.cache import PartRows, open_cache, write_cache
from featbank.cache._parts import parts_dir

__all__ = ["to_v1", "make_v1_cache"]

#: Attributes of a v2 index that a v1 file does not have (the v1 writer sets its own format ones).
_V2_ONLY = ("format", "schema_version", "featbank_version", "split_names", "n_samples", "embed_dim", "dtype",
            "n_parts", "parts_dir", "plan", "listing_skipped", "shard_size")


def to_v1(index: Path, out: Path | None = None) -> Path:
    """Rewrite the v2 cache ``index`` as a v1 file at ``out`` (default: in place, its parts removed)."""
    index = Path(index)
    out = index if out is None else Path(out)
    with open_cache(index, extreme="ignore", allow_incomplete=True) as c:
        emb = c.load_embeddings(dtype=c.embeddings.dtype)
        attrs: dict[str, Any] = {k: v for k, v in c.metadata.items() if k not in _V2_ONLY}
        rows = (c.paths, c.fingerprints, c.labels, c.splits, list(c.classes))
        skipped = [(p, r, tuple(int(v) for v in fp)) for (p, r), fp in zip(c.skipped, c.skipped_fingerprints)]
        dtype = str(c.embeddings.dtype)
    src = out.with_name(out.name + ".src.h5")
    with h5py.File(src, "w") as f:
        f["embeddings"] = emb
    tmp = out.with_name(out.name + ".v1.h5")
    write_cache(tmp, sources=[("old", src, np.arange(len(rows[0])))], rows=PartRows(*rows[:4]), classes=rows[4],
                skipped=skipped, embed_dim=emb.shape[1], dtype=dtype, attrs=attrs)
    src.unlink()
    if out == index:
        shutil.rmtree(parts_dir(index), ignore_errors=True)
    tmp.replace(out)
    return out


def make_v1_cache(data: Path, out: Path, **kwargs: Any) -> Path:
    """``featbank.extract(data, ...)`` as a schema-v1 file at ``out`` (``kwargs`` go to extract)."""
    v2 = Path(out).with_name(Path(out).name + ".v2.h5")
    featbank.extract(data, v2, **kwargs)
    to_v1(v2, out)
    shutil.rmtree(parts_dir(v2), ignore_errors=True)
    v2.unlink()
    return Path(out)
