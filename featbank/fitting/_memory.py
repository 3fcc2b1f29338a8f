"""What ``fit --auto`` and ``fit --cv K`` hold in memory, and the bound they keep to.

The search holds every candidate's feature matrix of the train+val images in memory (one read of
each layer, :func:`~featbank.fitting.feature_matrices`), and the SVMs (the families with
``holds_gram``) fit on a Gram matrix per fold, then on one of every train+val image for the refit. Both
grow with the images: a Gram matrix with the square of their number (80,000 images: 51 GB). So
before anything is loaded, :func:`plan_memory` compares them with a bound: ``--max-memory``, else
:data:`MEMORY_SHARE` of this machine's memory.

- A family that holds a Gram matrix over the bound is left out of ``--auto``, its reason said in the
  search's ``excluded`` (as a family that cannot export would be); as the one head of ``--cv``,
  it is refused.
- Candidate matrices over the bound are refused, with what they would take and what fits
  (``ConfigError``, exit 2): never a search that the operating system kills part-way.

The figures are estimates of the peak (float32 matrices, float64 Gram matrices), not measurements;
the Gram store shared by the families (:class:`~featbank.heads.FoldKernels`, at most 1 GiB) comes
on top.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..cache import FeatureCache
    from ._search import Candidate, FeatureKey

__all__ = ["MEMORY_SHARE", "search_memory_bound", "matrices_bytes", "gram_bytes", "plan_memory"]

#: Without ``--max-memory``, the share of this machine's physical memory the search may plan for.
MEMORY_SHARE = 0.5
#: Working copies of the widest matrix a family makes on a fold (preprocessed fit and held-out rows,
#: in float64 for the linear head): counted on top of the matrices themselves.
_WORKING_COPIES = 4


def search_memory_bound(max_memory: int | None) -> int:
    """``max_memory`` bytes when given, else :data:`MEMORY_SHARE` of the physical memory."""
    if max_memory is not None:
        return int(max_memory)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound to plan by
        return 2**62
    return int(physical * MEMORY_SHARE)


def matrices_bytes(layer_dims: Mapping[str, int], keys: Sequence[FeatureKey], n_images: int) -> int:
    """Peak bytes of :func:`~featbank.fitting.feature_matrices` for ``keys`` on ``n_images`` images, and the
    working copies of the widest: the plain rows of every layer any key reads, their pooled rows when a key
    is pooled, then each key's own columns (float32)."""
    keys = list(dict.fromkeys(keys))
    read = {t for layers, _ in keys for t in layers}
    union = sum(d for t, d in layer_dims.items() if t in read)
    pooled = 2 * union if any(v == "pooled" for _, v in keys) else 0
    widths = [sum(layer_dims[t] for t in layers) * (2 if v == "pooled" else 1) for layers, v in keys]
    return 4 * n_images * (union + pooled + sum(widths) + _WORKING_COPIES * max(widths, default=0))


def gram_bytes(n_images: int) -> int:
    """Peak bytes of a family that holds a Gram matrix (the SVMs) on ``n_images`` train+val images: the
    refit's Gram matrix and its kernel (float64), the largest of its fold and refit matrices."""
    return 2 * 8 * n_images * n_images


def plan_memory(cache: FeatureCache, candidates: list[Candidate], families: Mapping[str, Any], *, auto: bool,
                n_images: int, bound: int, given: Any) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that fit ``bound`` bytes, and ``{family: reason}`` for the families left out.

    ``given`` is the ``--max-memory`` text (``None``: the default bound), for the messages.

    Raises:
        ConfigError: the one head of ``--cv`` needs a Gram matrix over the bound, or the candidate
            matrices are over it.
    """
    from ._auto import _union_table

    where = f"--max-memory {given}" if given is not None else \
        f"{MEMORY_SHARE:.0%} of this machine's memory (raise it with --max-memory)"
    excluded: dict[str, str] = {}
    gram = gram_bytes(n_images)
    if gram > bound:
        for name in sorted({c.head for c in candidates}):
            if getattr(families[name], "holds_gram", False):
                excluded[name] = (f"its Gram matrix of the {n_images:,} train+val images takes {_size(gram)}, "
                                  f"over the {_size(bound)} of {where}")
        if not auto and excluded:
            (name, why), = excluded.items()
            raise ConfigError(f"--head {name} --cv: {why}. Use --head linear or mlp (their memory grows with the "
                              "images, not with their square), or fit on fewer images.")
        candidates = [c for c in candidates if c.head not in excluded]
        if not candidates:
            raise ConfigError(f"--auto: every head family it was given holds a Gram matrix, and "
                              f"{next(iter(excluded.values()))}.")
    keys = [c.key for c in candidates]
    need = matrices_bytes(_union_table(cache, keys).layer_dims, keys, n_images)
    if need > bound:
        final = [k for k in keys if k == (("final",), "plain")]
        least = matrices_bytes(_union_table(cache, final).layer_dims, final, n_images) if final else None
        hint = (f"; the final layer alone (--head linear --cv 5) needs {_size(least)}" if least is not None
                else "")
        raise ConfigError(
            f"{'--auto' if auto else '--cv'} holds its {len(set(keys))} candidate feature matrices of the "
            f"{n_images:,} train+val images in memory: about {_size(need)}, over the {_size(bound)} of {where}"
            f"{hint}. Raise --max-memory, or fit one head without the search: --head linear --max-memory "
            f"{_size(bound).replace(' ', '')} streams its rows from the cache."
        )
    return candidates, excluded


def _size(n: int) -> str:
    """Bytes in the largest unit of 1000 that keeps a digit before the point: ``1.9 GB``, ``640 MB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
