"""Benchmark: the seed tutorial's recipe vs featbank (extract once + fit --head linear).

Seed recipe, as the tutorial writes it: torchvision ImageFolder + Resize/CenterCrop/ToTensor/
Normalize + DataLoader (batch 32, shuffled), frozen backbone in eager NCHW float32 + a new fc
layer, Adam lr 1e-3, 10 epochs, the backbone re-run on every image every epoch. featbank: embed every
image once, then the linear probe (C sweep on a validation split, refit, test). Same backbone (efficientnet_lite0), same data
(ELPV, stratified 70/30 split, seed 0), same test images.

    python scripts/bench_seed.py --limit 200      # quick subset
    python scripts/bench_seed.py                  # all 2,624 ELPV images (slow on CPU: the seed recipe)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import featbank


def prepare(out: Path, limit: int | None, classes: int) -> Path:
    cmd = [sys.executable, str(Path(__file__).with_name("prepare_data.py")), "elpv", str(out), "--split", "70-30",
           "--classes", str(classes)]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def seed_recipe(data: Path, epochs: int, device: str, seed: int) -> tuple[float, float]:
    """The tutorial as written: torchvision ImageFolder + transforms + DataLoader (batch 32,
    shuffled, default workers), the frozen backbone in eager NCHW float32, a new fc, Adam."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from featbank.backbones import load_backbone

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    bb = load_backbone("efficientnet_lite0")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    p = bb.preprocess
    tf = p.torchvision_transform()  # Resize, CenterCrop, ToTensor, Normalize
    train_set = datasets.ImageFolder(str(data / "train"), transform=tf)
    test_set = datasets.ImageFolder(str(data / "test"), transform=tf)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=g)
    test_loader = DataLoader(test_set, batch_size=32)
    backbone = bb.features.eval().to(dev)  # the network up to global pooling: (N, 3, H, W) float in
    for q in backbone.parameters():
        q.requires_grad_(False)
    fc = nn.Linear(bb.embed_dim, len(train_set.classes)).to(dev)
    opt = torch.optim.Adam(fc.parameters(), lr=1e-3)
    for _ in range(epochs):
        fc.train()
        for x, y in train_loader:
            with torch.no_grad():
                f = backbone(x.to(dev)).flatten(1)  # the frozen backbone runs again, every epoch
            loss = nn.functional.cross_entropy(fc(f), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = 0
    fc.eval()
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((fc(backbone(x.to(dev)).flatten(1)).argmax(1).cpu() == y).sum())
    return time.perf_counter() - t0, correct / len(test_set)


def featbank_recipe(data: Path, work: Path, device: str, seed: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    cache = work / "cache.h5"
    featbank.extract(data, cache, backbone="efficientnet_lite0", device=device, progress=False)
    t1 = time.perf_counter()
    from featbank.fitting import fit as fit_head

    r = fit_head(cache, "linear", device=device, seed=seed, save=False)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, r.headline["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="stratified subset of N ELPV images")
    ap.add_argument("--classes", type=int, choices=(2, 4), default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work / "elpv", args.limit, args.classes)
        t_fb, t_fit, acc_fb = featbank_recipe(data, work, args.device, args.seed)
        t_seed, acc_seed = seed_recipe(data, args.epochs, args.device, args.seed)
    print(f"ELPV {args.classes}-class{f' subset {args.limit}' if args.limit else ''}, efficientnet_lite0")
    print(f"seed recipe ({args.epochs} epochs, backbone every epoch): {t_seed:.1f} s, test top-1 {acc_seed:.4f}")
    print(f"featbank extract + fit --head linear: {t_fb:.1f} s (fit {t_fit:.1f} s), test top-1 {acc_fb:.4f}")
    print(f"speed-up {t_seed / t_fb:.1f}x; accuracy difference {100 * (acc_fb - acc_seed):+.2f} pt "
          "(targets: >= 20x, accuracy at least equal)")


if __name__ == "__main__":
    main()
