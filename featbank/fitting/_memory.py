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

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._machine import format_bytes, memory_limit
from ..errors import ConfigError

if TYPE_CHECKING:
    from ._scored import Candidate, FeatureKey

__all__ = ["MEMORY_SHARE", "search_memory_bound", "matrices_bytes", "gram_bytes", "plan_memory"]

#: Without ``--max-memory``, the share of this machine's physical memory the search may plan for.
MEMORY_SHARE = 0.5
#: Working copies of the widest matrix a family makes on a fold (preprocessed fit and held-out rows,
#: in float64 for the linear head): counted on top of the matrices themselves.
_WORKING_COPIES = 4


def search_memory_bound(max_memory: int | None) -> int:
    """``max_memory`` bytes when given, else :data:`MEMORY_SHARE` of this machine's memory (the physical
    memory, or a container's cgroup limit where lower: :func:`featbank._machine.memory_limit`); no bound
    where neither can be read."""
    if max_memory is not None:
        return int(max_memory)
    limit = memory_limit()
    return int(limit * MEMORY_SHARE) if limit is not None else 2**62


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
    refit's Gram matrix and the three n x n arrays of turning it into an RBF kernel (float64), the largest of
    its fold and refit matrices."""
    return 4 * 8 * n_images * n_images


def plan_memory(layer_dims: Mapping[str, int], candidates: list[Candidate], families: Mapping[str, Any], *,
                auto: bool, n_images: int, bound: int, given: Any) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that fit ``bound`` bytes, and ``{family: reason}`` for the families left out.

    ``layer_dims``: the width of each layer the candidates read. ``given`` is the ``--max-memory`` text
    (``None``: the default bound), for the messages. A family that holds a Gram matrix is left out where
    that matrix and the candidate matrices together exceed the bound.

    Raises:
        ConfigError: the one head of ``--cv`` holds a Gram matrix over the bound, every family does, or the
            candidate matrices alone are over it.
    """
    size = format_bytes
    where = f"--max-memory {given}" if given is not None else \
        f"{MEMORY_SHARE:.0%} of this machine's memory (raise it with --max-memory)"
    if not candidates:
        raise ConfigError("--auto has no head family to search (none of those it was given can be exported).")
    need = matrices_bytes(layer_dims, [c.key for c in candidates], n_images)
    gram = gram_bytes(n_images)
    excluded: dict[str, str] = {}
    if need + gram > bound:
        for name in sorted({c.head for c in candidates}):
            if getattr(families[name], "holds_gram", False):
                excluded[name] = (f"its Gram matrix of the {n_images:,} train+val images takes {size(gram)}, with "
                                  f"the feature matrices {size(need + gram)}, over the {size(bound)} of {where}")
        if excluded and (not auto or all(c.head in excluded for c in candidates)):
            name, why = next(iter(excluded.items()))
            head = f"--head {name} --cv" if not auto else "--auto"
            raise ConfigError(f"{head}: {why}. Raise --max-memory above {size(need + gram)}, use --head linear or "
                              "mlp (their memory grows with the images, not with their square), or fit on fewer images.")
        candidates = [c for c in candidates if c.head not in excluded]
        need = matrices_bytes(layer_dims, [c.key for c in candidates], n_images)
    if need > bound:
        final = [(("final",), "plain")]
        least = matrices_bytes(layer_dims, final, n_images) if auto and "final" in layer_dims else None
        hint = f"; the final layer alone (--head linear --cv 5) needs {size(least)}" if least and least <= bound else ""
        option = size(bound).replace(" bytes", "").replace(" ", "")  # as --max-memory reads it: 19.5KiB
        raise ConfigError(
            f"{'--auto' if auto else '--cv'} holds its {len({c.key for c in candidates})} candidate feature matrices "
            f"of the {n_images:,} train+val images in memory: about {size(need)}, over the {size(bound)} of {where}"
            f"{hint}. Raise --max-memory, or fit one head without the search: --head linear --max-memory {option} "
            "streams its rows from the cache."
        )
    return candidates, excluded
