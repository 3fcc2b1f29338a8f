"""The training loop: ``finetune()``, with or without cached frozen groups."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._files import check_bundle_dir, slugify
from ..backbones import HEAD_GROUP, load_backbone, param_groups
from ..errors import (
    ConfigError,
    Interrupted,
    RandomWeightsWarning,
    ValidationLeakWarning,
)
from ..report import compute_metrics, plot_confusion_matrix, plot_learning_curve
from .checkpoint import (
    _digest,
    _load_checkpoint,
    _rng_state,
    _save_checkpoint,
    _set_rng_state,
    _settings_diff,
)
from .data import (
    _batches,
    _ImageSet,
    _loader,
    _probe_holdout,
    _probe_overlap_note,
    _split,
)
from .model import (
    FinetuneModel,
    _frozen_bn_modules,
    _head_from_probe,
    _is_bn,
    _logits,
    _trainable_groups,
    build_optimizer,
    resolve_rates,
)
from .settings import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    FinetuneSettings,
    _settings_from,
)
from .trunk import VIEW_NAMES, fill_trunk, plan_trunk

__all__ = ["FinetuneReport", "finetune"]

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
        return (
            f"Fine-tuned {self.epochs_run} epoch(s) on {self.device} ({self.seconds_per_epoch:.1f} s/epoch{cached}), "
            f"best epoch {self.best_epoch}{' (the starting probe: no epoch beat it on validation)' if self.best_epoch == 0 else ''}"
            f": {which} accuracy {m['accuracy']:.4f}, balanced accuracy "
            f"{m['balanced_accuracy']:.4f}."
        ) + "".join(f"\nNote: {n}" for n in self.notes)


def _default_out(data: Path, settings: FinetuneSettings) -> Path:
    bb = Path(settings.backbone).name if Path(settings.backbone).is_dir() else settings.backbone
    name = f"{data.name}-{bb}-{settings.strategy}" + ("-lpft" if settings.init_head else "")
    return Path("models") / slugify(name, "model")


def _autocast(device: torch.device) -> tuple[Any, torch.dtype | None]:
    if device.type != "cuda":
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dtype, dtype


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


def _evaluate(model: FinetuneModel, loader: Any, device: torch.device, amp: torch.dtype | None,
              classes: list[str], skipped: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    model.eval()
    losses, ys, logits_all = [], [], []
    with torch.inference_mode():
        for x, y, bad in loader:
            skipped.extend(bad)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = _logits(model, x, amp).float()
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
    device: str = "auto",
    num_workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    **settings: Any,
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
        device: ``auto``, ``cpu`` or ``cuda`` (autocast bf16/fp16 on CUDA; channels_last on CPU).
        num_workers: image-decoding processes (default: CPU count - 1, at most 8; 0 on CPU
            when there are two cores or fewer).
        resume: continue the checkpoint of an interrupted run with the same settings.
        overwrite: replace an existing bundle and discard an existing checkpoint.
        progress: a tqdm bar per epoch (loss, metric, images/s) on stderr.
        on_epoch_end: called as ``on_epoch_end(epoch, history_row)`` after each checkpoint.
        **settings: the fields of :class:`FinetuneSettings` (``backbone``, ``strategy``,
            ``trainable_from``, ``lr``, ``lr_groups``, ``layer_decay``, ``optimizer``,
            ``init_head``, ``epochs``, ``batch_size``, ``seed``, ...).

    Returns:
        A :class:`FinetuneReport`.

    Raises:
        ConfigError: a bad setting, unknown group, malformed ``lr_groups``, a checkpoint of other
            settings, out of memory (with a smaller batch size to try), an existing bundle.
        DatasetError: a missing folder, or a class absent from train or val.
        BundleError: an ``init_head`` that does not fit the data or backbone.
        Interrupted: Ctrl-C; the last finished epoch's checkpoint is kept for ``resume``.

    Example:
        >>> featbank.finetune("data/elpv", backbone="resnet50", strategy="partial",
        ...                   trainable_from="layer3", lr_groups="seed-resnet", epochs=10)
    """
    from ..bundle import load_bundle
    from ..data import scan_folder
    from ..extraction import resolve_device

    cfg = _settings_from(settings)
    dev = torch.device(resolve_device(device))
    index = scan_folder(data, require_labels=True)
    probe_bundle = load_bundle(cfg.init_head) if cfg.init_head is not None else None
    probe = _probe_holdout(probe_bundle)
    split = _split(index, cfg.val_split, cfg.seed, probe)
    notes = [n for n in [_probe_overlap_note(index, split, probe)] if n]
    for n in notes:  # said now, not only after hours of training
        warnings.warn(n, ValidationLeakWarning, stacklevel=2)
    out_path = Path(out).expanduser() if out is not None else _default_out(index.root, cfg)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt") / "checkpoint.pt"
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

    with warnings.catch_warnings():
        warnings.simplefilter("always", RandomWeightsWarning)
        bb = load_backbone(cfg.backbone, cfg.weights, cfg.weights_file)
    classes = list(index.classes)
    n_classes = len(classes)
    groups = [(g, [f"features.{p}" for p in ps]) for g, ps in param_groups(bb)]
    if any(g == HEAD_GROUP for g, _ in groups):
        raise ConfigError(f"Backbone {bb.name!r} has a parameter group named 'head', which featbank reserves.")

    torch.manual_seed(cfg.seed)
    init_info = None
    if cfg.init_head is not None:
        head, init_info = _head_from_probe(cfg.init_head, bb, classes, probe_bundle)
    else:
        head = nn.Linear(bb.embed_dim, n_classes)
    features = bb.features
    model = FinetuneModel(features, head, bb.preprocess.mean, bb.preprocess.std)
    groups.append((HEAD_GROUP, [f"head.{p}" for p, _ in head.named_parameters()]))
    names = [g for g, _ in groups]
    rates = resolve_rates(names, cfg.resolved_lr, cfg.lr_groups, cfg.layer_decay)
    trainable = _trainable_groups(cfg.strategy, names, cfg.trainable_from)
    optimizer = build_optimizer(model, groups, rates, trainable, cfg.optimizer, cfg.resolved_weight_decay, cfg.train_bn)
    trainable_params = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_bn = _frozen_bn_modules(model, trainable_params)
    pcount = dict((n, p.numel()) for n, p in model.named_parameters())
    group_rows = [
        {"name": g, "modules": None, "n_params": int(sum(pcount[p] for p in ps)), "trainable": g in trainable,
         "n_trainable": int(sum(pcount[p] for p in ps if p in trainable_params)), "lr": rates[g]}
        for g, ps in groups
    ]
    from ..backbones import _group_modules

    for row, (g, ps) in zip(group_rows, groups):
        row["modules"] = _group_modules(model, ps)

    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.to(dev)
    amp, _ = _autocast(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == torch.float16))

    train_set = _ImageSet(index.root, index.paths, index.labels, bb.preprocess, True, cfg.seed, cfg.crop_scale, cfg.hflip,
                           cfg.vflip, cfg.rot90)
    eval_set = _ImageSet(index.root, index.paths, index.labels, bb.preprocess, False)
    trunk = plan_trunk(model, bb, cfg, len(split.train), len(split.val)) if cfg.cache_frozen else None
    epoch_batches = [_batches(len(split.train), cfg.batch_size, cfg.seed, 0)]
    steps_per_epoch = len(epoch_batches[0])
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(min(cfg.warmup_epochs * steps_per_epoch, 0.2 * total_steps)))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    data_digest = _digest([index.paths, index.labels.tolist(), index.splits.tolist(), index.fingerprints.tolist(),
                           split.train.tolist(), split.val.tolist()])
    hashed = {**asdict(cfg), "backbone_identity": bb.identity(), "data": data_digest,
              "init_head_id": init_info["bundle_id"] if init_info else None, "classes": classes}
    hashed["crop_scale"] = list(cfg.crop_scale)
    settings_hash = _digest(hashed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "metric": -1.0, "loss": float("inf"), "model": None}
    start: dict[str, Any] | None = None  # validation metrics of the LP-FT starting point (the probe)
    bad_epochs, start_epoch, stopped = 0, 0, False
    if resume:
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt.get("settings_hash") != settings_hash:
            diff = _settings_diff(ckpt.get("settings", {}), json.loads(json.dumps(hashed, default=str)))
            raise ConfigError(
                f"--resume: the checkpoint {str(ckpt_path)!r} was made with other settings ("
                + "; ".join(diff[:6]) + "). Rerun with the original settings, or pass --overwrite to "
                "start over (the checkpoint is discarded)."
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        bad_epochs, start_epoch, stopped = int(ckpt["bad_epochs"]), int(ckpt["epoch"]), bool(ckpt["stopped"])
        start = ckpt.get("start")
    elif overwrite and ckpt_path.exists():
        ckpt_path.unlink()

    workers = num_workers if num_workers is not None else _default_workers(dev.type)
    pin = dev.type == "cuda"
    val_batches = [list(map(int, split.val[i:i + cfg.batch_size])) for i in range(0, len(split.val), cfg.batch_size)]
    skipped: list[str] = []
    train_rows = split.train
    from tqdm.auto import tqdm

    if trunk is not None:
        fill_trunk(trunk, model, eval_set, split, cfg.batch_size, workers, bb.preprocess, pin, dev, amp, skipped, progress)

    def train_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        order = _batches(len(train_rows), cfg.batch_size, cfg.seed, epoch)
        if trunk is None:
            batches = [[(e, int(train_rows[i])) for e, i in b] for b in order]
            yield from _loader(train_set, batches, workers, bb.preprocess, pin)
            return
        # One view per image and epoch, drawn from a generator of (seed, epoch): resumable.
        rng = np.random.default_rng((cfg.seed, 20_000 + epoch))
        for b in order:
            rows = np.array([i for _, i in b], np.int64)
            x, y = trunk.train.batch(rows, rng.integers(0, len(trunk.views), len(rows)), dev)
            yield x, y, []

    def val_metrics() -> dict[str, Any]:
        if trunk is None:
            loader = _loader(eval_set, val_batches, workers, bb.preprocess, pin)
            return _evaluate(model, loader, dev, amp, classes, skipped)[0]
        starts = range(0, len(split.val), cfg.batch_size)
        rows = [np.arange(i, min(i + cfg.batch_size, len(split.val))) for i in starts]
        loader = ((*trunk.val.batch(r, np.zeros(len(r), np.int64), dev), []) for r in rows)
        return _evaluate(trunk.model, loader, dev, amp, classes, skipped)[0]

    def run_epoch(epoch: int) -> dict[str, Any]:
        model.train()
        if trunk is not None:
            trunk.model.train()
        for m in frozen_bn:
            m.eval()
        if cfg.resolved_bn_stats == "frozen":
            for m in model.modules():
                if _is_bn(m):
                    m.eval()
        if cfg.strategy == "frozen" and not cfg.train_bn:
            model.features.eval()
        t0 = time.perf_counter()
        seen, loss_sum, correct, n_ok = 0, 0.0, 0, 0
        bar = tqdm(total=len(train_rows), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0,
                   leave=True, dynamic_ncols=True, file=sys.stderr)
        params = [p for p in model.parameters() if p.requires_grad]
        net = model if trunk is None else trunk.model
        for x, y, bad in train_batches(epoch):
            skipped.extend(bad)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = _logits(net, x, amp)
            loss = nn.functional.cross_entropy(logits.float(), y, ignore_index=-100)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"Training diverged at epoch {epoch} (loss is {loss.item()}). Lower --lr (now "
                    f"{cfg.resolved_lr:g}) or --lr-groups rates; earlier checkpoints are intact."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            k = int((y >= 0).sum())
            loss_sum += loss.item() * k
            correct += int((logits.argmax(1) == y).sum())
            n_ok += k
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", acc=f"{correct / max(1, n_ok):.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        train_seconds = time.perf_counter() - t0
        val = val_metrics()
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(1, n_ok):.4f}", **{f"val_{cfg.metric}": f"{val[cfg.metric]:.4f}"},
                        img_s=f"{seen / train_seconds:.1f}")
        bar.close()
        return {
            "epoch": epoch, "train_loss": loss_sum / max(1, n_ok), "train_accuracy": correct / max(1, n_ok),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
            "lr_head": optimizer.param_groups[-1]["lr"], "seconds": seconds, "images_per_second": seen / train_seconds,
        }

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    if cfg.init_head is not None and start_epoch == 0:
        # LP-FT's step 0 is the probe itself: a candidate like any epoch, so a fine-tuning that never
        # beats it on validation keeps the probe's predictions instead of a worse network.
        v0 = val_metrics()
        start = {"val_loss": v0["loss"], "val_accuracy": v0["accuracy"], "val_balanced_accuracy": v0["balanced_accuracy"]}
        best = {"epoch": 0, "metric": start[f"val_{cfg.metric}"], "loss": start["val_loss"], "model": snapshot()}
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if stopped:
                break
            row = run_epoch(epoch)
            history.append(row)
            metric, vloss = row[f"val_{cfg.metric}"], row["val_loss"]
            if metric > best["metric"] + 1e-12 or (abs(metric - best["metric"]) <= 1e-12 and vloss < best["loss"]):
                best = {"epoch": epoch, "metric": metric, "loss": vloss, "model": snapshot()}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stopped = cfg.patience > 0 and bad_epochs >= cfg.patience
            _save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "featbank_version": __version__,
                "settings": json.loads(json.dumps(hashed, default=str)), "settings_hash": settings_hash,
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": _rng_state(), "history": history, "best": best, "bad_epochs": bad_epochs, "stopped": stopped,
                "start": start,
            })
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(history, start_epoch, ckpt_path)) from None
    except Exception as e:
        if _is_oom(e):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            raise ConfigError(
                f"Out of memory on {dev.type} with --batch-size {cfg.batch_size}. Try --batch-size "
                f"{max(1, cfg.batch_size // 2)} (and --resume to keep finished epochs; the batch size "
                "is part of the settings, so a smaller one starts over with --overwrite)."
            ) from None
        raise

    # Final metrics with the best weights.
    model.load_state_dict(best["model"])
    val, _ = _evaluate(model, _loader(eval_set, val_batches, workers, bb.preprocess, pin), dev, amp, classes, skipped)
    test: dict[str, Any] = {}
    if len(split.test):
        test_batches = [list(map(int, split.test[i:i + cfg.batch_size])) for i in range(0, len(split.test), cfg.batch_size)]
        test, _ = _evaluate(model, _loader(eval_set, test_batches, workers, bb.preprocess, pin), dev, amp, classes, skipped)

    model.to("cpu")
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_bytes = st_save(state, metadata={"format": "featbank-finetuned", "classes": json.dumps(classes)})
    identity = {
        "backbone": f"finetuned:{bb.name}",
        "weights": "finetuned",
        "weights_sha256": hashlib.sha256(weights_bytes).hexdigest(),
        "transform": bb.preprocess.to_dict(),
        "embed_dim": bb.embed_dim,
    }
    spe = float(np.mean([h["seconds"] for h in history])) if history else 0.0
    if trunk is None:
        train_aug: dict[str, Any] = {"random_resized_crop": {"scale": list(cfg.crop_scale), "ratio": [0.75, 4 / 3]},
                                     "hflip": cfg.hflip, "vflip": cfg.vflip, "rot90": cfg.rot90}
        trunk_info = None
    else:
        train_aug = {"views": [VIEW_NAMES[v] for v in trunk.views], "of": "backbone eval transform",
                     "one_view_per_image_and_epoch": True}
        trunk_info = {"prefix": trunk.split.prefix_names, "suffix": trunk.split.suffix_names,
                      "output_shape": list(trunk.split.out_shape), "dtype": "float16",
                      "n_views": len(trunk.views), "seconds": trunk.seconds}
    metrics = {"val": val, "test": test, "best_epoch": best["epoch"], "metric": cfg.metric, "start": start}
    manifest: dict[str, Any] = {
        "kind": "finetuned",
        "classes": classes,
        "backbone": identity,
        "cache_key": None,
        "finetune": {
            "file": "model.safetensors",
            "base_backbone": bb.identity(),
            "base_family": bb.family,
            "strategy": cfg.strategy,
            "trainable_from": trainable[0] if cfg.strategy == "partial" else None,
            "train_bn": cfg.train_bn,
            "bn_stats": cfg.resolved_bn_stats,
            "groups": group_rows,
            "rates": rates,
            "lr": cfg.resolved_lr, "lr_groups": cfg.lr_groups, "layer_decay": cfg.layer_decay,
            "optimizer": cfg.optimizer, "momentum": 0.9 if cfg.optimizer == "sgd" else None,
            "weight_decay": cfg.resolved_weight_decay,
            "init_head": init_info,
            "epochs": cfg.epochs, "epochs_run": len(history), "best_epoch": best["epoch"],
            "batch_size": cfg.batch_size, "seed": cfg.seed, "metric": cfg.metric, "patience": cfg.patience,
            "schedule": {"type": "cosine", "warmup_steps": warmup, "total_steps": total_steps, "clip_grad": cfg.clip_grad},
            "augmentation": {"train": train_aug, "eval": "backbone eval transform (resize shorter side + centre crop)"},
            "cache_frozen": trunk_info,
            "head": {"type": "linear", "in_features": bb.embed_dim, "out_features": n_classes},
            "device": dev.type, "precision": str(amp).replace("torch.", "") if amp else "float32",
            "seconds_per_epoch": spe,
            "settings_hash": settings_hash,
            "start": start,
            "history": history,
        },
        "metrics": metrics,
        "data": {"root": str(index.root), "layout": index.layout, "n_train": int(len(split.train)),
                 "n_val": int(len(split.val)), "n_test": int(len(split.test)), "val_source": split.val_source,
                 "notes": notes},
        "validation": {"root": str(index.root), "paths": [index.paths[i] for i in split.val]},
    }
    cm_src, cm_name = (test, "test") if test else (val, "val")
    files = {
        "model.safetensors": weights_bytes,
        "metrics.json": (json.dumps({**metrics, "history": history}, indent=2) + "\n").encode(),
        "learning_curve.png": plot_learning_curve(history, cfg.metric, best["epoch"], start),
        "confusion_matrix.png": plot_confusion_matrix(cm_src["confusion_matrix"], classes,
                                                      f"{cm_name} ({cm_src['n_samples']} images)"),
    }
    from ..bundle import save_bundle

    save_bundle(out_path, manifest, files, overwrite=True)
    try:
        ckpt_path.unlink()
        ckpt_path.parent.rmdir()
    except OSError:
        pass
    return FinetuneReport(
        path=out_path, epochs_run=len(history), best_epoch=best["epoch"], val=val, test=test, history=history,
        groups=group_rows, resumed_from=start_epoch, seconds_per_epoch=spe, skipped=sorted(set(skipped)),
        device=dev.type, cache_seconds=trunk.seconds if trunk is not None else 0.0, notes=notes,
    )


def _default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    if device == "cpu":
        return 0 if n <= 2 else min(8, n - 1)
    return min(12, n)
