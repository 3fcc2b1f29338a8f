"""``FitConfig``: every option of ``fit`` in one typed object, validated once and stored in the bundle.

Like :class:`featbank.finetuning.FinetuneSettings` (and torchvision's ``args`` saved in every
checkpoint): ``featbank fit``'s click options map onto it in one place (``cli/fit.py``), the
Python API builds it from keywords (``fit(cache, head, **options)``), it is checked when it is
made (:meth:`FitConfig.__post_init__`, before any cache is opened), and the bundle's manifest keeps
it as ``fit_config`` (:meth:`FitConfig.to_dict`; :meth:`FitConfig.from_dict` reads it back, so a
fit can be repeated from its bundle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..heads import HeadSpec

__all__ = ["FitConfig", "TTA_MODES", "DEFAULT_HEAD", "refuse_with_auto", "family_preprocess"]

#: ``--tta`` values: average over the cache's views when it helps on validation, always, never.
TTA_MODES = ("auto", "on", "off")
#: ``--head`` when none is given: the linear probe.
DEFAULT_HEAD = "linear"
_FLAGS = ("standardize", "l2_normalize", "save", "refit", "overwrite", "train_views", "pool_views", "auto")


def _check_head_name(head: str, families: Mapping[str, Any], kinds: Mapping[str, Any]) -> None:
    """Refuse a ``--head`` that is no head: not a family, not a registered head kind (linear, mlp, ...),
    not a scikit-learn classifier (any case). scikit-learn's registry (seconds to import the first time)
    is read only for a name that is none of featbank's own."""
    from ..heads import sklearn_classifiers, unknown_head

    if head in families or head in kinds:
        return
    registry = sklearn_classifiers()
    if head.lower() not in {n.lower() for n in registry}:
        raise unknown_head(head, registry, list(families))


def family_preprocess(head: str, standardize: bool, l2_normalize: bool, family: Any) -> str:
    """The preprocessing of ``--head <family> --cv K`` (``family``: that family) from the flags:
    ``standardize`` (the default) or ``l2`` (``--l2-normalize``, with or without ``--no-standardize``:
    centred, then each row L2-normalised), where the family offers it. Checked by :class:`FitConfig`
    before a cache is opened, and read by the search for the candidates' preprocessing.

    Raises:
        ConfigError: ``--no-standardize`` alone (no family fits raw features), or ``--l2-normalize`` for a
            family without ``l2`` (the linear head and the MLP standardise only).
    """
    offered = tuple(getattr(family, "preprocesses", ("standardize",)))
    pre = "l2" if l2_normalize else "standardize" if standardize else None
    if pre is None:
        raise ConfigError(f"--head {head} --cv: a head family standardises its features (the default) or, with "
                          "--l2-normalize, centres them and L2-normalises each row; --no-standardize alone (raw "
                          "features) is neither. Drop --no-standardize, or name a scikit-learn class (e.g. --head SVC "
                          "--no-standardize --cv 5).")
    if pre not in offered:
        raise ConfigError(f"--head {head} --cv: the {head} family preprocesses as {list(offered)} only; "
                          f"--l2-normalize ({pre}) is not one of them. Drop --l2-normalize, or fit --head {head} "
                          "--l2-normalize without --cv (C chosen on a validation split).")
    return pre


def refuse_with_auto(flags: Sequence[str]) -> None:
    """``--auto`` chooses the head, the layers, the view pooling and the preprocessing itself: an option
    that would choose one of them is refused (exit 2), never silently overridden.

    Raises:
        ConfigError: ``flags`` (the options given with ``--auto``) is not empty.
    """
    if flags:
        raise ConfigError(
            f"--auto chooses the head, layers, view pooling and preprocessing itself, so {', '.join(flags)} would be "
            "ignored. Drop it, or fit one head by K-fold CV with your choices: featbank fit CACHE --head svm-rbf "
            "--cv 5 --layers stage6,final --pool-views."
        )


@dataclass(frozen=True)
class FitConfig:
    """What one ``fit`` does (see :func:`featbank.fitting.fit` for each option's meaning).

    Attributes:
        head: ``linear``, ``mlp``, a head family of ``--auto`` (with ``cv``) or a scikit-learn class name.
        params: head parameters (``{"C": 0.1}`` fixes C and skips the sweep).
        standardize, l2_normalize: feature preprocessing, stored with the head.
        val_split: fraction of train held out for selection when the cache has no val split.
        class_weight: ``None`` or ``"balanced"``.
        shots, seeds: K images per class sampled per seed (K-shot runs).
        max_memory: bytes (or ``"2GB"``) the rows may take in memory before linear/mlp stream; with
            ``auto`` / ``cv``, the bound the search plans its memory by (:mod:`featbank.fitting._memory`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the torch heads.
        out, name, save, overwrite: where the bundle goes, whether it is written, whether it may replace one.
        seed: seed of the validation split and the heads.
        grid: the coarse C grid of the sweep (default: the head kind's).
        refit: refit the selected head on train+val.
        layers, tta, train_views, pool_views: what the head reads and how it predicts.
        auto, cv, budget, cv_repeats, families: the CV search (``--auto``, ``--cv K``).
    """

    head: str = DEFAULT_HEAD
    params: Mapping[str, Any] = field(default_factory=dict)
    standardize: bool = True
    l2_normalize: bool = False
    val_split: float = 0.2
    class_weight: str | None = None
    shots: int | None = None
    seeds: Sequence[int] = (0,)
    max_memory: int | str | None = None
    device: str = "auto"
    out: str | Path | None = None
    name: str | None = None
    seed: int = 0
    save: bool = True
    grid: Sequence[float] | None = None
    refit: bool = True
    overwrite: bool = False
    layers: str | Sequence[str] | None = "final"
    tta: str = "auto"
    train_views: bool = True
    pool_views: bool = False
    auto: bool = False
    cv: int | None = None
    budget: str | float | None = None
    cv_repeats: int | None = None
    families: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # family objects (tests, plugins)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        self._check_types()
        set_(self, "params", dict(self.params or {}))
        if isinstance(self.tta, bool):
            set_(self, "tta", "on" if self.tta else "off")
        set_(self, "seeds", self._check_seeds())
        self._check()

    # -- derived ---------------------------------------------------------------------------------

    @property
    def searched(self) -> bool:
        """Whether the head is chosen by K-fold CV (``--auto``, ``--cv``, ``--budget``) rather than one val split."""
        return self.auto or self.cv is not None or self.budget is not None

    @property
    def memory_bytes(self) -> int | None:
        from ._rows import parse_memory

        return parse_memory(self.max_memory)

    @property
    def run_seeds(self) -> list[int]:
        """The seeds of the runs: every K-shot seed, else the one ``seed``."""
        return list(self.seeds) if self.shots is not None else [self.seed]

    def spec(self) -> HeadSpec:
        """The :class:`~featbank.heads.HeadSpec` of the head to build."""
        from ..heads import HeadSpec

        return HeadSpec(self.head, dict(self.params), bool(self.standardize), bool(self.l2_normalize),
                        self.class_weight, self.device, self.grid)

    # -- stored with the bundle ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the manifest's ``fit_config``); parameter values that JSON cannot hold as their repr."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "families"}
        d["families"] = None if self.families is None else sorted(self.families)
        d["out"] = None if self.out is None else str(self.out)
        return json.loads(json.dumps(d, default=repr))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitConfig:
        """The config a bundle's ``fit_config`` describes (head family objects are not stored: the defaults).

        Raises:
            ConfigError: a key that is no option of ``fit``, or a value it refuses.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"fit_config must be a JSON object of fit's options; got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        bad = sorted(map(str, set(d) - known))
        if bad:
            raise ConfigError(f"fit_config has no option {', '.join(map(repr, bad))}; its options are: "
                              f"{', '.join(sorted(known))}.")
        return cls(**{k: v for k, v in d.items() if k != "families"})

    # -- validation ------------------------------------------------------------------------------

    def _check_types(self) -> None:
        """Types first: a config may come from a bundle's manifest (:meth:`from_dict`), which anyone can edit."""
        def fail(name: str, what: str) -> ConfigError:
            return ConfigError(f"The {name!r} option of fit must be {what}. Got {getattr(self, name)!r} instead.")

        if not isinstance(self.head, str) or not self.head:
            raise fail("head", "a head name such as 'linear', 'mlp' or 'SVC'")
        if self.params is not None and not isinstance(self.params, Mapping):
            raise fail("params", "a mapping of parameter names to values")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise fail(name, "True or False")
        for name in ("seed", "cv", "cv_repeats"):
            v = getattr(self, name)
            if (v is not None or name == "seed") and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise fail(name, "an integer")
        v = self.val_split
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 < float(v) < 1.0:
            raise ConfigError(f"--val-split must be between 0 and 1 (exclusive); got {v!r}.")
        if not isinstance(self.seeds, (list, tuple)) and not isinstance(self.seeds, np.ndarray):
            raise fail("seeds", "a list of integers")
        if self.out is not None and not isinstance(self.out, (str, Path)):
            raise fail("out", "a folder path")
        if self.name is not None and not isinstance(self.name, str):
            raise fail("name", "a bundle name")

    def _check_seeds(self) -> tuple[int, ...]:
        try:
            seeds = tuple(int(s) for s in self.seeds) or (int(self.seed),)
        except (TypeError, ValueError):
            raise ConfigError(f"seeds must be integers like (0, 1, 2); got {self.seeds!r}.") from None
        if self.shots is None and len(seeds) > 1:
            raise ConfigError("--seeds repeats K-shot sampling; give --shots K with it (e.g. --shots 10 --seeds 0,1,2).")
        return seeds

    def _check(self) -> None:
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced'; got {self.class_weight!r}.")
        if self.shots is not None and (not isinstance(self.shots, (int, np.integer)) or self.shots < 1):
            raise ConfigError(f"--shots must be a positive integer; got {self.shots!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda; got {self.device!r}.")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"The 'tta' parameter must be one of {', '.join(TTA_MODES)}. Got {self.tta!r} instead.")
        self._check_family_head()
        if self.searched:
            self._check_search()
        self.memory_bytes  # noqa: B018 - a bad --max-memory exits before the cache is opened
        if self.save:
            from ._bundle import bundle_dir

            bundle_dir(self.out, self.name, "model")  # --out with --name: refused before the cache is opened

    def _check_search(self) -> None:
        from ._search import parse_budget

        if self.shots is not None:
            raise ConfigError("--shots samples a few images per class; it does not combine with --auto or --cv. Drop one.")
        if self.tta == "on":
            raise ConfigError("--auto and --cv score plain or pooled rows and use no TTA; drop --tta on.")
        self._refuse_split_options()
        if self.cv_repeats is not None and int(self.cv_repeats) < 1:
            raise ConfigError(f"cv_repeats must be at least 1; got {self.cv_repeats!r}.")
        if self.budget is not None:
            parse_budget(self.budget)  # a bad budget exits before the cache is opened
        if self.auto:
            refuse_with_auto([flag for flag, given in (
                ("--head", self.head != DEFAULT_HEAD), ("--param", bool(self.params)),
                ("--layers", self.layers not in (None, "final")), ("--pool-views", self.pool_views),
                ("--l2-normalize", self.l2_normalize), ("--no-standardize", not self.standardize)) if given])

    def _refuse_split_options(self) -> None:
        """Options of the one-validation-split protocol that K-fold CV would silently ignore (exit 2)."""
        mode = "--auto" if self.auto else f"--cv {self.cv}" if self.cv is not None else "--budget"
        if not self.refit:
            raise ConfigError(f"--no-refit keeps a head fitted on train alone, its validation images unseen; {mode} "
                              "chooses by K-fold CV on train+val and refits the winner on all of it (there is no "
                              "held-out validation split to keep). Drop --no-refit, or fit without "
                              f"{mode.split()[0]} for an LP-FT start.")
        if self.val_split != 0.2:
            raise ConfigError(f"--val-split {self.val_split} holds out one validation split; {mode} uses K-fold CV "
                              "on train+val instead. Drop --val-split (--cv K sets the folds).")
        if not self.train_views:
            raise ConfigError(f"--no-train-views: {mode} trains on one row per image already (the plain view, or "
                              "the views pooled), never on the views as rows. Drop --no-train-views.")

    def _check_family_head(self) -> None:
        """A head family (svm-rbf, knn...) is scored by K-fold CV, so it needs --cv; families fit unweighted."""
        from .. import heads

        families = self.families if self.families is not None else heads.HEAD_FAMILIES
        _check_head_name(self.head, families, heads.HEAD_KINDS)
        family_only = self.head in families and self.head not in heads.HEAD_KINDS  # svm-rbf, knn...: no kind
        if family_only and not self.searched:
            raise ConfigError(f"--head {self.head} is a head family of --auto; its grid is chosen by K-fold CV: add "
                              f"--cv 5 (featbank fit CACHE --head {self.head} --cv 5).")
        if self.searched and not self.auto and self.head in families and not self.params:  # the family's --cv
            family_preprocess(self.head, self.standardize, self.l2_normalize, families[self.head])
        if family_only and self.params:
            raise ConfigError(f"--param fixes a parameter of linear, mlp or a scikit-learn head; the {self.head} family "
                              f"sweeps its own grid by K-fold CV. Drop --param (featbank fit CACHE --head {self.head} "
                              "--cv 5), or fix it on the scikit-learn classifier (e.g. --head KNeighborsClassifier "
                              "--param n_neighbors=3 --cv 5, --head SVC --param C=1 --cv 5).")
        if self.searched and self.class_weight is not None and self.head in families:
            raise ConfigError("--class-weight does not combine with --auto or a head family's --cv: the families fit "
                              "and score unweighted (top-1). Drop --class-weight, or use a scikit-learn head "
                              "(--head SVC --cv 5).")
