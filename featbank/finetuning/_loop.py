"""The training loop: ``finetune()``, with or without cached frozen groups."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._device import autocast_dtype, default_num_workers, resolve_device
from .._files import check_bundle_dir, slugify
from ..backbones import HEAD_GROUP, group_modules, load_backbone, param_groups
from ..bundles import BackboneIdentity, build_manifest
from ..errors import (
    ConfigError,
    Interrupted,
    RandomWeightsWarning,
    ValidationLeakWarning,
)
from ..report import compute_metrics, plot_confusion_matrix, plot_learning_curve
from ._cache_frozen import VIEW_NAMES, CacheFrozenInputs, fill_cache_frozen, plan_cache_frozen
from ._data import (
    Augmentation,
    ImageSet,
    image_loader,
    probe_holdout,
    probe_overlap_note,
    shuffled_batches,
    split_index,
)
from ._model import (
    FinetuneModel,
    build_optimizer,
    forward_logits,
    frozen_bn_modules,
    head_from_probe,
    is_batchnorm,
    resolve_rates,
    trainable_groups,
)
from ._settings import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    FinetuneSettings,
    json_digest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    settings_diff,
    settings_from_kwargs,
)

__all__ = ["FinetuneReport", "finetune", "train_one_epoch", "evaluate"]

# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneReport:
    """What :func:`finetune` did.

    Attributes:
        path: the bundle folder written.
        epochs_run: epochs trained (fewer than asked when early stopping fired).
        best_epoch: the epoch whose weights were kept (best validation metric); 0 for an LP-FT
            in which no epoch beat the starting probe on validation (its weights are kept).
        val: metrics of the kept weights on the validation split; ``test``: on the test split
            (empty when DATA has none).
        history: one dict per epoch (train/val loss and metrics, seconds, images/s, lr).
        groups: ``[{name, n_params, trainable, lr}]``.
        resumed_from: the epoch a resumed run started after (0 for a fresh run).
        seconds_per_epoch: mean wall time of an epoch (training + validation).
        skipped: unreadable images ``(path, reason)`` (ignored in loss and metrics).
        cache_seconds: time spent computing the frozen groups' outputs (``cache_frozen``), else 0.
        notes: caveats about the numbers (e.g. an LP-FT probe that has seen the validation images).
    """

    path: Path
    epochs_run: int
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    resumed_from: int = 0
    seconds_per_epoch: float = 0.0
    skipped: list[str] = field(default_factory=list)
    device: str = "cpu"
    cache_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.test or self.val
        which = "test" if self.test else "val"
        cached = f", frozen groups cached in {self.cache_seconds:.1f} s" if self.cache_seconds else ""
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return (
            f"Fine-tuned {self.epochs_run} epoch(s){resumed} on {self.device} ({self.seconds_per_epoch:.1f} s/epoch{cached}), "
            f"best epoch {self.best_epoch}"
            f"{' (the starting probe: no epoch beat it on validation)' if self.best_epoch == 0 else ''}"
            f": {which} accuracy {m['accuracy']:.4f}, balanced accuracy "
            f"{m['balanced_accuracy']:.4f}."
        ) + "".join(f"\nNote: {n}" for n in self.notes)


def _default_out(data: Path, settings: FinetuneSettings) -> Path:
    bb = Path(settings.backbone).name if Path(settings.backbone).is_dir() else settings.backbone
    name = f"{data.name}-{bb}-{settings.strategy}" + ("-lpft" if settings.init_head else "")
    return Path("models") / slugify(name, "model")


def _interrupted_message(history: list[dict[str, Any]], start_epoch: int, ckpt_path: Path) -> str:
    done = history[-1]["epoch"] if history else start_epoch
    if done == 0 or not ckpt_path.exists():
        return (f"Interrupted during epoch {done + 1}, before any epoch finished: nothing is checkpointed, so there "
                "is nothing to resume yet. Run the same command again (without --resume) to start over.")
    return (f"Interrupted during epoch {done + 1}: {done} epoch(s) are checkpointed in {str(ckpt_path)!r}. Run the "
            "same command with --resume to continue.")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e))


def evaluate(model: FinetuneModel, loader: Any, device: torch.device, amp: torch.dtype | None,
             classes: list[str], skipped: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (:func:`featbank.report.compute_metrics` plus ``loss``) and logits of ``model`` over ``loader``."""
    model.eval()
    losses, ys, logits_all = [], [], []
    with torch.inference_mode():
        for x, y, bad in loader:
            skipped.extend(bad)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = forward_logits(model, x, amp).float()
            losses.append(nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item())
            ys.append(y.cpu().numpy())
            logits_all.append(logits.cpu().numpy())
    y = np.concatenate(ys)
    logits = np.concatenate(logits_all)
    ok = y >= 0  # unreadable images carry label -100
    proba = torch.softmax(torch.from_numpy(logits[ok]).double(), dim=1).numpy()
    return compute_metrics(y[ok], proba, classes, loss=sum(losses) / max(1, int(ok.sum()))), logits


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    settings: FinetuneSettings | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    **options: Any,
) -> FinetuneReport:
    """Fine-tune a backbone plus a new linear head on an image folder and write a bundle.

    Args:
        data: an ImageFolder (``DATA/<class>/<image>``) or ``DATA/{train,val,test}/<class>/...``.
            Without a val folder, LP-FT (``init_head``) validates on the images its probe held out
            (when the probe was fitted on a cache of this folder); otherwise a stratified
            ``val_split`` of train is held out (seeded). A note in the report says when the probe
            was fitted on validation images (``fit`` refits on train+val unless ``--no-refit``).
        out: the bundle folder (default ``models/<data>-<backbone>-<strategy>[-lpft]``).
            Checkpoints go to ``<out>.ckpt/checkpoint.pt`` and are removed once the bundle is written.
        settings: a :class:`FinetuneSettings` (default: built from the keywords, which otherwise
            change its fields); it is stored in the bundle's manifest.
        device: ``auto``, ``cpu`` or ``cuda`` (autocast bf16/fp16 on CUDA; channels_last on CPU).
        num_workers: image-decoding processes (default: CPU count - 1, at most 8; 0 on CPU
            when there are two cores or fewer).
        resume: continue the checkpoint of an interrupted run with the same settings.
        overwrite: replace an existing bundle and discard an existing checkpoint.
        progress: a tqdm bar per epoch (loss, metric, images/s) on stderr.
        on_epoch_end: called as ``on_epoch_end(epoch, history_row)`` after each checkpoint.
        **options: the fields of :class:`FinetuneSettings` (``backbone``, ``strategy``,
            ``trainable_from``, ``lr``, ``lr_groups``, ``layer_decay``, ``optimizer``,
            ``init_head``, ``epochs``, ``batch_size``, ``seed``, ...).

    Returns:
        A :class:`FinetuneReport`.

    Raises:
        ConfigError: a bad setting, unknown group, malformed ``lr_groups``, a checkpoint of other
            settings, out of memory (with a smaller batch size to try), an existing bundle, an
            output folder that cannot be written.
        DatasetError: a missing folder, or a class absent from train or val.
        BundleError: an ``init_head`` that does not fit the data or backbone.
        Interrupted: Ctrl-C; the last finished epoch's checkpoint is kept for ``resume``.

    Example:
        >>> featbank.finetune("data/elpv", backbone="resnet50", strategy="partial",
        ...                   trainable_from="layer3", lr_groups="seed-resnet", epochs=10)
    """
    if settings is None or options:
        settings = settings_from_kwargs({**(asdict(settings) if settings is not None else {}), **options})
    cfg = settings
    run = _set_up(data, out, cfg, device, num_workers, resume, overwrite)
    state = _resume_or_start(run, resume, overwrite)
    if run.cache_frozen is not None:
        inputs = CacheFrozenInputs(run.model, run.eval_set, run.split, run.cfg.batch_size, run.workers, run.bb.preprocess,
                             run.pin, run.dev, run.amp)
        fill_cache_frozen(run.cache_frozen, inputs, run.skipped, progress)
    if run.cfg.init_head is not None and state.start_epoch == 0:
        # LP-FT's step 0 is the probe itself: a candidate like any epoch, so a fine-tuning that never
        # beats it on validation keeps the probe's predictions instead of a worse network.
        v0 = _val_metrics(run)
        state.start = {"val_loss": v0["loss"], "val_accuracy": v0["accuracy"],
                       "val_balanced_accuracy": v0["balanced_accuracy"]}
        state.best = {"epoch": 0, "metric": state.start[f"val_{run.cfg.metric}"], "loss": state.start["val_loss"],
                      "model": _snapshot(run.model)}
    _train(run, state, progress, on_epoch_end)

    # Final metrics with the best weights.
    run.model.load_state_dict(state.best["model"])
    val = _evaluate_rows(run, run.split.val)
    test = _evaluate_rows(run, run.split.test) if len(run.split.test) else {}
    _write_bundle(run, state, val, test)
    try:
        run.ckpt_path.unlink()
        run.ckpt_path.parent.rmdir()
    except OSError:
        pass
    return FinetuneReport(
        path=run.out_path, epochs_run=len(state.history), best_epoch=state.best["epoch"], val=val, test=test,
        history=state.history, groups=run.group_rows, resumed_from=state.start_epoch,
        seconds_per_epoch=_seconds_per_epoch(state.history), skipped=sorted(set(run.skipped)), device=run.dev.type,
        cache_seconds=run.cache_frozen.seconds if run.cache_frozen is not None else 0.0, notes=run.notes,
    )


# --------------------------------------------------------------------------------------------
# Set-up and resume
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the epochs of one fine-tuning run share (built once by :func:`_set_up`)."""

    cfg: FinetuneSettings
    dev: torch.device
    index: Any
    split: Any
    notes: list[str]
    out_path: Path
    ckpt_path: Path
    bb: Any
    classes: list[str]
    model: FinetuneModel
    net: _Net
    train_set: ImageSet
    eval_set: ImageSet
    cache_frozen: Any
    schedule: dict[str, int]
    hashed: dict[str, Any]
    settings_hash: str
    workers: int
    pin: bool
    skipped: list[str] = field(default_factory=list)

    @property
    def amp(self) -> torch.dtype | None:
        return self.net.amp

    @property
    def group_rows(self) -> list[dict[str, Any]]:
        return self.net.group_rows


@dataclass
class _Net:
    """The model's trainable side: groups, rates, optimizer, schedule, gradient scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp: torch.dtype | None
    frozen_bn: list[nn.Module]
    group_rows: list[dict[str, Any]]
    rates: dict[str, float]
    trainable: list[str]
    init_info: dict[str, Any] | None


@dataclass
class _State:
    """What a checkpoint carries from epoch to epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "metric": -1.0, "loss": float("inf"), "model": None})
    start: dict[str, Any] | None = None  # validation metrics of the LP-FT starting point (the probe)
    bad_epochs: int = 0
    start_epoch: int = 0
    stopped: bool = False


def _check_out(out_path: Path, ckpt_path: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them.")
    if not resume and not overwrite:
        if ckpt_path.exists():
            raise ConfigError(
                f"A checkpoint of an earlier run exists at {str(ckpt_path)!r}. Pass --resume to continue "
                "it, or --overwrite to start over (it is discarded)."
            )
        if out_path.exists():
            raise ConfigError(f"{str(out_path)!r} already exists. Pass --overwrite to replace it, or choose another --out.")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: there is no checkpoint at {str(ckpt_path)!r} to continue. Run without --resume.")
    check_bundle_dir(out_path)  # a folder that cannot take the bundle fails now, not after training


def _set_up(data: Any, out: Any, cfg: FinetuneSettings, device: str, num_workers: int | None, resume: bool,
            overwrite: bool) -> _Run:
    """Data, split, output checks, backbone, model, optimizer and schedule of a run (no training)."""
    from ..bundles import load_bundle
    from ..sources import scan_folder

    dev = resolve_device(device)
    index = scan_folder(data, require_labels=True)
    probe_bundle = load_bundle(cfg.init_head) if cfg.init_head is not None else None
    probe = probe_holdout(probe_bundle)
    split = split_index(index, cfg.val_split, cfg.seed, probe)
    notes = [n for n in [probe_overlap_note(index, split, probe)] if n]
    for n in notes:  # said now, not only after hours of training
        warnings.warn(n, ValidationLeakWarning, stacklevel=3)
    out_path = Path(out).expanduser() if out is not None else _default_out(index.root, cfg)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt") / "checkpoint.pt"
    _check_out(out_path, ckpt_path, resume, overwrite)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)
        bb = load_backbone(cfg.backbone, cfg.weights, cfg.weights_file)
    classes = list(index.classes)
    model, net = _build_model(cfg, bb, classes, probe_bundle, dev, len(split.train))
    augment = Augmentation(cfg.seed, cfg.crop_scale, cfg.hflip, cfg.vflip, cfg.rot90)
    train_set = ImageSet(index.root, index.paths, index.labels, bb.preprocess, augment)
    eval_set = ImageSet(index.root, index.paths, index.labels, bb.preprocess)
    frozen = plan_cache_frozen(model, bb, cfg, len(split.train), len(split.val)) if cfg.cache_frozen else None
    data_digest = json_digest([index.paths, index.labels.tolist(), index.splits.tolist(), index.fingerprints.tolist(),
                           split.train.tolist(), split.val.tolist()])
    hashed = {**asdict(cfg), "backbone_identity": bb.identity(), "data": data_digest,
              "init_head_id": net.init_info["bundle_id"] if net.init_info else None, "classes": classes}
    hashed["crop_scale"] = list(cfg.crop_scale)
    return _Run(
        cfg=cfg, dev=dev, index=index, split=split, notes=notes, out_path=out_path, ckpt_path=ckpt_path, bb=bb,
        classes=classes, model=model, net=net, train_set=train_set, eval_set=eval_set, cache_frozen=frozen,
        schedule=_schedule_steps(cfg, len(split.train)), hashed=hashed, settings_hash=json_digest(hashed),
        workers=num_workers if num_workers is not None else default_num_workers(dev, training=True),
        pin=dev.type == "cuda",
    )


def _build_model(cfg: FinetuneSettings, bb: Any, classes: list[str], probe_bundle: Any, dev: torch.device,
                 n_train: int) -> tuple[FinetuneModel, _Net]:
    """The backbone plus a new (or the probe's) head, its parameter groups, optimizer and schedule."""
    groups = [(g, [f"features.{p}" for p in ps]) for g, ps in param_groups(bb)]
    if any(g == HEAD_GROUP for g, _ in groups):
        raise ConfigError(f"Backbone {bb.name!r} has a parameter group named 'head', which featbank reserves.")
    torch.manual_seed(cfg.seed)
    init_info = None
    if cfg.init_head is not None:
        head, init_info = head_from_probe(cfg.init_head, bb, classes, probe_bundle)
    else:
        head = nn.Linear(bb.embed_dim, len(classes))
    model = FinetuneModel(bb.features, head, bb.preprocess.mean, bb.preprocess.std)
    groups.append((HEAD_GROUP, [f"head.{p}" for p, _ in head.named_parameters()]))
    names = [g for g, _ in groups]
    rates = resolve_rates(names, cfg.resolved_lr, cfg.lr_groups, cfg.layer_decay)
    trainable = trainable_groups(cfg.strategy, names, cfg.trainable_from)
    optimizer = build_optimizer(model, groups, rates, trainable, cfg.optimizer, cfg.resolved_weight_decay, cfg.train_bn)
    trainable_params = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_bn = frozen_bn_modules(model, trainable_params)
    pcount = dict((n, p.numel()) for n, p in model.named_parameters())
    group_rows = [
        {"name": g, "modules": group_modules(model, ps), "n_params": int(sum(pcount[p] for p in ps)),
         "trainable": g in trainable, "n_trainable": int(sum(pcount[p] for p in ps if p in trainable_params)),
         "lr": rates[g]}
        for g, ps in groups
    ]
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.to(dev)
    amp = autocast_dtype(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == torch.float16))
    steps = _schedule_steps(cfg, n_train)
    warmup, total_steps = steps["warmup_steps"], steps["total_steps"]

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return model, _Net(optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp=amp, frozen_bn=frozen_bn,
                       group_rows=group_rows, rates=rates, trainable=trainable, init_info=init_info)


def _schedule_steps(cfg: FinetuneSettings, n_train: int) -> dict[str, int]:
    """Steps of the cosine schedule with linear warm-up (the last batch of one joins the one before)."""
    steps_per_epoch = len(shuffled_batches(n_train, cfg.batch_size, cfg.seed, 0))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(min(cfg.warmup_epochs * steps_per_epoch, 0.2 * total_steps)))
    return {"warmup_steps": warmup, "total_steps": total_steps}


def _resume_or_start(run: _Run, resume: bool, overwrite: bool) -> _State:
    """A fresh state, or the checkpoint's (refused when it was made with other settings)."""
    state = _State()
    if resume:
        ckpt = load_checkpoint(run.ckpt_path)
        if ckpt.get("settings_hash") != run.settings_hash:
            diff = settings_diff(ckpt.get("settings", {}), json.loads(json.dumps(run.hashed, default=str)))
            raise ConfigError(
                f"--resume: the checkpoint {str(run.ckpt_path)!r} was made with other settings ("
                + "; ".join(diff[:6]) + "). Rerun with the original settings, or pass --overwrite to "
                "start over (the checkpoint is discarded)."
            )
        run.model.load_state_dict(ckpt["model"])
        run.net.optimizer.load_state_dict(ckpt["optimizer"])
        run.net.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            run.net.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state = _State(history=list(ckpt["history"]), best=dict(ckpt["best"]), start=ckpt.get("start"),
                       bad_epochs=int(ckpt["bad_epochs"]), start_epoch=int(ckpt["epoch"]),
                       stopped=bool(ckpt["stopped"]))
    elif overwrite and run.ckpt_path.exists():
        run.ckpt_path.unlink()
    return state


# --------------------------------------------------------------------------------------------
# Epochs
# --------------------------------------------------------------------------------------------


def _train(run: _Run, state: _State, progress: bool,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> None:
    """Epochs from the state's to ``cfg.epochs``: train, validate, keep the best, checkpoint."""
    cfg = run.cfg
    try:
        for epoch in range(state.start_epoch + 1, cfg.epochs + 1):
            if state.stopped:
                break
            row = train_one_epoch(run, epoch, progress, resumed=state.start_epoch > 0 and epoch == state.start_epoch + 1)
            state.history.append(row)
            metric, vloss = row[f"val_{cfg.metric}"], row["val_loss"]
            best = state.best
            if metric > best["metric"] + 1e-12 or (abs(metric - best["metric"]) <= 1e-12 and vloss < best["loss"]):
                state.best = {"epoch": epoch, "metric": metric, "loss": vloss, "model": _snapshot(run.model)}
                state.bad_epochs = 0
            else:
                state.bad_epochs += 1
            state.stopped = cfg.patience > 0 and state.bad_epochs >= cfg.patience
            _checkpoint(run, state, epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(state.history, state.start_epoch, run.ckpt_path)) from None
    except Exception as e:
        if _is_oom(e):
            if run.dev.type == "cuda":
                torch.cuda.empty_cache()
            raise ConfigError(
                f"Out of memory on {run.dev.type} with --batch-size {cfg.batch_size}. Try --batch-size "
                f"{max(1, cfg.batch_size // 2)} (and --resume to keep finished epochs; the batch size "
                "is part of the settings, so a smaller one starts over with --overwrite)."
            ) from None
        raise


def _checkpoint(run: _Run, state: _State, epoch: int) -> None:
    net = run.net
    save_checkpoint(run.ckpt_path, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "featbank_version": __version__,
        "settings": json.loads(json.dumps(run.hashed, default=str)), "settings_hash": run.settings_hash,
        "epoch": epoch, "model": run.model.state_dict(), "optimizer": net.optimizer.state_dict(),
        "scheduler": net.scheduler.state_dict(), "scaler": net.scaler.state_dict() if net.scaler.is_enabled() else {},
        "rng": rng_state(), "history": state.history, "best": state.best, "bad_epochs": state.bad_epochs,
        "stopped": state.stopped, "start": state.start,
    })


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _train_batches(run: _Run, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    cfg, rows, frozen = run.cfg, run.split.train, run.cache_frozen
    order = shuffled_batches(len(rows), cfg.batch_size, cfg.seed, epoch)
    if frozen is None:
        batches = [[(e, int(rows[i])) for e, i in b] for b in order]
        yield from image_loader(run.train_set, batches, run.workers, run.bb.preprocess, run.pin)
        return
    # One view per image and epoch, drawn from a generator of (seed, epoch): resumable.
    rng = np.random.default_rng((cfg.seed, 20_000 + epoch))
    for b in order:
        idx = np.array([i for _, i in b], np.int64)
        x, y = frozen.train.batch(idx, rng.integers(0, len(frozen.views), len(idx)), run.dev)
        yield x, y, []


def _set_train_mode(run: _Run) -> None:
    """Train mode, except BatchNorm layers whose statistics stay as they are."""
    run.model.train()
    if run.cache_frozen is not None:
        run.cache_frozen.model.train()
    for m in run.net.frozen_bn:
        m.eval()
    if run.cfg.resolved_bn_stats == "frozen":
        for m in run.model.modules():
            if is_batchnorm(m):
                m.eval()
    if run.cfg.strategy == "frozen" and not run.cfg.train_bn:
        run.model.features.eval()


def train_one_epoch(run: _Run, epoch: int, progress: bool, resumed: bool = False) -> dict[str, Any]:
    """One pass over the training rows, then validation; returns the epoch's history row.

    ``resumed``: the first epoch after a checkpoint (``--resume``), which the bar says."""
    from tqdm.auto import tqdm

    cfg, net, dev = run.cfg, run.net, run.dev
    _set_train_mode(run)
    t0 = time.perf_counter()
    seen, loss_sum, correct, n_ok = 0, 0.0, 0, 0
    desc = f"epoch {epoch}/{cfg.epochs}" + (" (resumed)" if resumed else "")
    bar = tqdm(total=len(run.split.train), unit="img", desc=desc, disable=not progress,
               mininterval=0.1 if sys.stderr.isatty() else 10.0, leave=True, dynamic_ncols=True, file=sys.stderr)
    params = [p for p in run.model.parameters() if p.requires_grad]
    module = run.model if run.cache_frozen is None else run.cache_frozen.model
    with bar:  # closed before an interrupt's message is printed, not under it
        for x, y, bad in _train_batches(run, epoch):
            run.skipped.extend(bad)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss, logits = _train_step(run, module, params, x, y, epoch)
            k = int((y >= 0).sum())
            loss_sum += loss * k
            correct += int((logits.argmax(1) == y).sum())
            n_ok += k
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", acc=f"{correct / max(1, n_ok):.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        train_seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", img_s=f"{seen / train_seconds:.1f}", val="running")
        bar.refresh()  # validation runs next: say so rather than sit at 100%
        val = _val_metrics(run)
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", **{f"val_{cfg.metric}": f"{val[cfg.metric]:.4f}"},
                        img_s=f"{seen / train_seconds:.1f}")
    return {
        "epoch": epoch, "train_loss": loss_sum / max(1, n_ok), "train_accuracy": correct / max(1, n_ok),
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
        "lr_head": net.optimizer.param_groups[-1]["lr"], "seconds": seconds, "images_per_second": seen / train_seconds,
    }


def _train_step(run: _Run, module: nn.Module, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                epoch: int) -> tuple[float, torch.Tensor]:
    """One optimizer step on a batch (loss, backward through the scaler, clipping, the schedule's step);
    the batch's loss and logits. A loss that is not finite stops the run with what to change."""
    cfg, net = run.cfg, run.net
    logits = forward_logits(module, x, net.amp)
    loss = nn.functional.cross_entropy(logits.float(), y, ignore_index=-100)
    if not torch.isfinite(loss):
        raise ConfigError(
            f"Training diverged at epoch {epoch} (loss is {loss.item()}). Lower --lr (now "
            f"{cfg.resolved_lr:g}) or --lr-groups rates; earlier checkpoints are intact."
        )
    net.optimizer.zero_grad(set_to_none=True)
    net.scaler.scale(loss).backward()
    if cfg.clip_grad > 0:
        net.scaler.unscale_(net.optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    net.scaler.step(net.optimizer)
    net.scaler.update()
    net.scheduler.step()
    return loss.item(), logits


def _batches_of(rows: np.ndarray, batch_size: int) -> list[list[int]]:
    return [list(map(int, rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]


def _val_metrics(run: _Run) -> dict[str, Any]:
    """Validation metrics of the model as it trains (through the cached frozen groups when there are)."""
    if run.cache_frozen is None:
        return _evaluate_rows(run, run.split.val)
    n_val, bs = len(run.split.val), run.cfg.batch_size
    rows = [np.arange(i, min(i + bs, n_val)) for i in range(0, n_val, bs)]
    loader = ((*run.cache_frozen.val.batch(r, np.zeros(len(r), np.int64), run.dev), []) for r in rows)
    return evaluate(run.cache_frozen.model, loader, run.dev, run.amp, run.classes, run.skipped)[0]


def _evaluate_rows(run: _Run, rows: np.ndarray) -> dict[str, Any]:
    """Metrics of the whole model on image rows, decoded with the eval transform."""
    loader = image_loader(run.eval_set, _batches_of(rows, run.cfg.batch_size), run.workers, run.bb.preprocess, run.pin)
    return evaluate(run.model, loader, run.dev, run.amp, run.classes, run.skipped)[0]


# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------


def _seconds_per_epoch(history: list[dict[str, Any]]) -> float:
    return float(np.mean([h["seconds"] for h in history])) if history else 0.0


def _write_bundle(run: _Run, state: _State, val: dict[str, Any], test: dict[str, Any]) -> None:
    """model.safetensors, metrics.json, the learning curve and the confusion matrix, atomically."""
    from safetensors.torch import save as st_save

    from ..bundles import save_bundle

    run.model.to("cpu")
    state_dict = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    weights_bytes = st_save(state_dict, metadata={"format": "featbank-finetuned", "classes": json.dumps(run.classes)})
    metrics = {"val": val, "test": test, "best_epoch": state.best["epoch"], "metric": run.cfg.metric,
               "start": state.start}
    cm_src, cm_name = (test, "test") if test else (val, "val")
    files = {
        "model.safetensors": weights_bytes,
        "metrics.json": (json.dumps({**metrics, "history": state.history}, indent=2) + "\n").encode(),
        "learning_curve.png": plot_learning_curve(state.history, run.cfg.metric, state.best["epoch"], state.start),
        "confusion_matrix.png": plot_confusion_matrix(cm_src["confusion_matrix"], run.classes,
                                                      f"{cm_name} ({cm_src['n_samples']} images)"),
    }
    save_bundle(run.out_path, _manifest(run, state, metrics, hashlib.sha256(weights_bytes).hexdigest()), files,
                overwrite=True)


def _augmentation(run: _Run) -> tuple[dict[str, Any], dict[str, Any] | None]:
    cfg, frozen = run.cfg, run.cache_frozen
    if frozen is None:
        return {"random_resized_crop": {"scale": list(cfg.crop_scale), "ratio": [0.75, 4 / 3]},
                "hflip": cfg.hflip, "vflip": cfg.vflip, "rot90": cfg.rot90}, None
    train_aug = {"views": [VIEW_NAMES[v] for v in frozen.views], "of": "backbone eval transform",
                 "one_view_per_image_and_epoch": True}
    cache_frozen_info = {"prefix": frozen.split.prefix_names, "suffix": frozen.split.suffix_names,
                  "output_shape": list(frozen.split.out_shape), "dtype": "float16",
                  "n_views": len(frozen.views), "seconds": frozen.seconds}
    return train_aug, cache_frozen_info


def _manifest(run: _Run, state: _State, metrics: dict[str, Any], weights_sha256: str) -> dict[str, Any]:
    cfg, bb, net, index, split = run.cfg, run.bb, run.net, run.index, run.split
    train_aug, cache_frozen_info = _augmentation(run)
    identity = BackboneIdentity(backbone=f"finetuned:{bb.name}", weights="finetuned", weights_sha256=weights_sha256,
                                transform=bb.preprocess.to_dict(), embed_dim=bb.embed_dim)
    finetune_info = {
        "file": "model.safetensors", "base_backbone": BackboneIdentity(**bb.identity()), "base_family": bb.family,
        "strategy": cfg.strategy, "trainable_from": net.trainable[0] if cfg.strategy == "partial" else None,
        "train_bn": cfg.train_bn, "bn_stats": cfg.resolved_bn_stats, "groups": net.group_rows, "rates": net.rates,
        "lr": cfg.resolved_lr, "lr_groups": cfg.lr_groups, "layer_decay": cfg.layer_decay,
        "optimizer": cfg.optimizer, "momentum": 0.9 if cfg.optimizer == "sgd" else None,
        "weight_decay": cfg.resolved_weight_decay, "init_head": net.init_info,
        "epochs": cfg.epochs, "epochs_run": len(state.history), "best_epoch": state.best["epoch"],
        "batch_size": cfg.batch_size, "seed": cfg.seed, "metric": cfg.metric, "patience": cfg.patience,
        "schedule": {"type": "cosine", **run.schedule, "clip_grad": cfg.clip_grad},
        "augmentation": {"train": train_aug, "eval": "backbone eval transform (resize shorter side + centre crop)"},
        "cache_frozen": cache_frozen_info,
        "head": {"type": "linear", "in_features": bb.embed_dim, "out_features": len(run.classes)},
        "device": run.dev.type, "precision": str(net.amp).replace("torch.", "") if net.amp else "float32",
        "seconds_per_epoch": _seconds_per_epoch(state.history), "settings_hash": run.settings_hash,
        "start": state.start, "history": state.history,
    }
    return build_manifest(
        "finetuned", run.classes, identity, finetune=finetune_info, metrics=metrics,
        data={"root": str(index.root), "layout": index.layout, "n_train": int(len(split.train)),
              "n_val": int(len(split.val)), "n_test": int(len(split.test)), "val_source": split.val_source,
              "notes": run.notes},
        validation={"root": str(index.root), "paths": [index.paths[i] for i in split.val]},
    )
