"""Write image folders from labelled data that ships inside installed packages (no download).

Each subcommand builds ``OUT/<class>/<image>`` (or ``OUT/{train,test}/<class>/<image>`` with
``--split 70-30``, or a flat ``OUT/<image>`` for ``photos``), ready for ``featbank``. The folder
is written to a hidden temporary sibling and renamed into place at the end, so an interrupted run
leaves nothing half-written. A marker file records the arguments: running the same command again
prints "already prepared" and exits at once (a folder written by an older version of this script
is rebuilt). ``--split 70-30`` is scikit-learn's ``train_test_split(train_size=0.7, stratify=...,
random_state=seed)`` over the source order; ELPV's 2- and 4-class folders are both stratified on
the 4 defect probabilities, so one seed gives both the same test images.

Examples:
    python scripts/prepare_data.py elpv data/elpv                       # 2,624 images, 4 classes
    python scripts/prepare_data.py elpv data/elpv2 --classes 2 --split 70-30
    python scripts/prepare_data.py elpv data/elpv-mixed --limit 400 --jpeg-fraction 0.5
    python scripts/prepare_data.py fashion-mnist data/fmnist --n-train 5000 --n-test 1000
    python scripts/prepare_data.py digits data/digits
    python scripts/prepare_data.py lfw data/lfw
    python scripts/prepare_data.py photos data/photos
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import importlib.util
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "MARKER",
    "FASHION_MNIST_CLASSES",
    "PrepareError",
    "Item",
    "PrepareResult",
    "elpv_data_dir",
    "read_elpv_labels",
    "build_elpv",
    "build_fashion_mnist",
    "build_digits",
    "build_lfw",
    "build_photos",
    "main",
]

MARKER = ".featbank-prepared.json"
#: Bump when the output of a builder changes for the same arguments.
PREPARE_VERSION = 2  # 2: ELPV 2-class splits stratified on the 4 defect probabilities
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Index-prefixed so that sorted class names keep the dataset's own label order.
FASHION_MNIST_CLASSES = (
    "0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)  # fmt: skip
SPLITS = ("none", "70-30")


class PrepareError(Exception):
    """A user-facing problem: the message says what is wrong and what to do."""


@dataclass
class Item:
    """One output image: its file stem, class (None for flat) and split, and where pixels come from."""

    stem: str
    label: str | None
    pixels: np.ndarray | None = None
    source: Path | None = None
    split: str | None = None
    strata: str | None = None  # what --split/--limit stratify on (default: the label)


@dataclass
class PrepareResult:
    """What a builder did: the folder, images per ``[split/]class``, and whether it was already there."""

    out: Path
    counts: dict[str, int]
    already_prepared: bool


# --------------------------------------------------------------------------- writing


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale_partials(out: Path) -> None:
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(partial.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _stratified_subset(
    labels: Sequence[str], size: int | float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        keep, rest = train_test_split(
            idx, train_size=size, stratify=np.asarray(labels), random_state=seed
        )
    except ValueError as e:
        raise PrepareError(
            f"Cannot take a stratified {what} of {len(labels)} images: {e}"
        ) from None
    return np.sort(keep), np.sort(rest)


def _strata(items: list[Item]) -> list[str]:
    return [it.strata if it.strata is not None else str(it.label) for it in items]


def _select(items: list[Item], split: str, seed: int, limit: int | None) -> list[Item]:
    if limit is not None:
        n_classes = len({it.label for it in items})
        if limit < n_classes:
            raise PrepareError(
                f"--limit must be at least the number of classes ({n_classes}); got {limit}."
            )
        if limit < len(items):
            keep, _ = _stratified_subset(_strata(items), limit, seed, f"subset of {limit}")
            items = [items[i] for i in keep]
    if split == "70-30":
        train, test = _stratified_subset(_strata(items), 0.7, seed, "70/30 split")
        for i in train:
            items[i].split = "train"
        for i in test:
            items[i].split = "test"
    elif split != "none":
        raise PrepareError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}.")
    return items


def _write_item(item: Item, folder: Path, as_jpeg: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if as_jpeg else ".png"
    target = folder / f"{item.stem}{suffix}"
    if item.source is not None and not as_jpeg and item.source.suffix.lower() == ".png":
        shutil.copyfile(item.source, target)
        return
    if item.source is not None:
        with Image.open(item.source) as img:
            img.load()
            picture = img
    else:
        picture = Image.fromarray(np.ascontiguousarray(item.pixels))
    if as_jpeg:
        if picture.mode not in ("L", "RGB"):
            picture = picture.convert("RGB")
        picture.save(target, format="JPEG", quality=95)
    else:
        picture.save(target, format="PNG")


def _prepare(
    out: str | os.PathLike[str],
    args: dict[str, Any],
    make_items: Callable[[], list[Item]],
    jpeg_fraction: float = 0.0,
    seed: int = 0,
    force: bool = False,
) -> PrepareResult:
    out = Path(out).expanduser().absolute()
    if not 0.0 <= jpeg_fraction <= 1.0:
        raise PrepareError(f"--jpeg-fraction must be between 0 and 1; got {jpeg_fraction}.")
    wanted = {"version": PREPARE_VERSION, "args": args}
    if out.exists():
        marker = _read_marker(out)
        if marker is not None and {k: marker.get(k) for k in wanted} == wanted:
            return PrepareResult(out, marker.get("counts", {}), already_prepared=True)
        if not out.is_dir():
            raise PrepareError(f"'{out}' exists and is not a folder. Choose another output folder.")
        if marker is None and any(out.iterdir()):
            raise PrepareError(
                f"'{out}' exists, is not empty and was not made by this script; refusing to overwrite it. "
                "Choose another output folder or remove it."
            )
        outdated = marker is not None and marker.get("args") == args  # same request, older script
        if marker is not None and not force and not outdated:
            raise PrepareError(
                f"'{out}' was prepared with other arguments ({json.dumps(marker.get('args'))}). "
                "Pass --force to rebuild it, or choose another output folder."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        items = make_items()
        n_jpeg = int(round(jpeg_fraction * len(items)))
        as_jpeg = np.zeros(len(items), dtype=bool)
        as_jpeg[np.random.default_rng(seed).permutation(len(items))[:n_jpeg]] = True
        counts: dict[str, int] = {}
        for item, jpeg in zip(items, as_jpeg):
            rel = "/".join(p for p in (item.split, item.label) if p)
            _write_item(item, partial / rel if rel else partial, bool(jpeg))
            counts[rel] = counts.get(rel, 0) + 1
        counts = dict(sorted(counts.items()))
        marker_data = {**wanted, "counts": counts, "n_images": len(items)}
        (partial / MARKER).write_text(json.dumps(marker_data, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.partial-{os.getpid()}-old"
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PrepareResult(out, counts, already_prepared=False)


# --------------------------------------------------------------------------- datasets


def elpv_data_dir() -> Path:
    """The ``data`` folder of the installed ``elpv-dataset`` package (labels.csv, images/).

    ``$FEATBANK_ELPV_DIR`` overrides it with a folder of the same layout (for machines where the
    package cannot be installed, e.g. a GPU box without network).
    """
    override = os.environ.get("FEATBANK_ELPV_DIR")
    if override:
        return Path(override)
    if importlib.util.find_spec("elpv_dataset") is None:
        raise PrepareError(
            "The ELPV data is not installed. Install it with: pip install elpv-dataset"
        )
    data = Path(str(importlib.resources.files("elpv_dataset") / "data"))
    if not (data / "labels.csv").is_file():
        raise PrepareError(
            f"'{data / 'labels.csv'}' is missing; reinstall with: pip install --force-reinstall elpv-dataset"
        )
    return data


def read_elpv_labels(data_dir: Path) -> list[tuple[str, float, str]]:
    """Rows ``(relative image path, defect probability, cell type)`` of ELPV's labels.csv."""
    rows = []
    for line_no, line in enumerate(
        (data_dir / "labels.csv").read_text(encoding="utf-8").splitlines(), 1
    ):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise PrepareError(
                f"{data_dir / 'labels.csv'}:{line_no}: expected 'path probability type', got {line!r}"
            )
        rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def _elpv_class(probability: float, n_classes: int) -> str:
    if n_classes == 2:
        return "defective" if probability >= 0.5 else "functional"
    return f"p{int(round(probability * 100)):03d}"


def build_elpv(
    out: str | os.PathLike[str],
    n_classes: int = 4,
    split: str = "none",
    seed: int = 0,
    limit: int | None = None,
    jpeg_fraction: float = 0.0,
    force: bool = False,
) -> PrepareResult:
    """ELPV solar cells as an ImageFolder: 4 classes ``p000 p033 p067 p100`` by defect probability,
    or 2 classes ``functional`` / ``defective`` (probability >= 0.5)."""
    if n_classes not in (2, 4):
        raise PrepareError(f"--classes must be 4 or 2; got {n_classes}.")
    args = {"dataset": "elpv", "classes": n_classes, "split": split, "seed": seed,
            "limit": limit, "jpeg_fraction": jpeg_fraction}  # fmt: skip

    def make_items() -> list[Item]:
        data = elpv_data_dir()
        items = [
            # Stratified on the 4 defect probabilities for both label sets: the 2-class and
            # 4-class folders of one seed hold the same test images, so their scores compare.
            Item(Path(rel).stem, _elpv_class(p, n_classes), source=data / rel, strata=_elpv_class(p, 4))
            for rel, p, _cell_type in read_elpv_labels(data)
        ]
        return _select(items, split, seed, limit)

    return _prepare(out, args, make_items, jpeg_fraction, seed, force)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise PrepareError(f"'{path}' is not an idx file of unsigned bytes.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise PrepareError(
            f"'{path}' is truncated: expected {int(np.prod(shape))} values, found {arr.size}."
        )
    return arr.reshape(shape)


def _find_idx(source: Path, prefix: str) -> Path:
    for name in (f"{prefix}.gz", prefix):
        if (source / name).is_file():
            return source / name
    raise PrepareError(
        f"Fashion-MNIST file '{prefix}[.gz]' not found in '{source}'. Install the data with: "
        "apt-get install dataset-fashion-mnist (or 'apt-get download dataset-fashion-mnist' and "
        "'dpkg-deb -x' it, then pass --source <dir>/usr/share/datasets/fashion-mnist)."
    )


def build_fashion_mnist(
    out: str | os.PathLike[str],
    n_train: int = 5000,
    n_test: int = 1000,
    seed: int = 0,
    jpeg_fraction: float = 0.0,
    source: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> PrepareResult:
    """Fashion-MNIST from the Debian package files: stratified subsets of the official train and
    test splits into ``OUT/train/<class>/`` and ``OUT/test/<class>/``."""
    src = Path(source) if source is not None else FASHION_MNIST_DIR
    if not src.is_dir():
        raise PrepareError(
            f"Fashion-MNIST is not installed ('{src}' does not exist). Install it with: "
            "apt-get install dataset-fashion-mnist (needs root), or 'apt-get download "
            "dataset-fashion-mnist' + 'dpkg-deb -x' and pass --source <dir>/usr/share/datasets/fashion-mnist."
        )
    args = {"dataset": "fashion-mnist", "n_train": n_train, "n_test": n_test, "seed": seed,
            "jpeg_fraction": jpeg_fraction, "source": str(src.absolute())}  # fmt: skip

    def make_items() -> list[Item]:
        items: list[Item] = []
        for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
            images = _read_idx(_find_idx(src, f"{prefix}-images-idx3-ubyte"))
            labels = _read_idx(_find_idx(src, f"{prefix}-labels-idx1-ubyte"))
            if len(images) != len(labels) or images.ndim != 3:
                raise PrepareError(
                    f"Fashion-MNIST {split} images and labels in '{src}' do not match."
                )
            keep = np.arange(len(labels))
            if n < len(labels):
                keep, _ = _stratified_subset(labels.tolist(), n, seed, f"{split} subset of {n}")
            for i in keep:
                items.append(
                    Item(f"{i:05d}", FASHION_MNIST_CLASSES[labels[i]], images[i], split=split)
                )
        return items

    return _prepare(out, args, make_items, jpeg_fraction, seed, force)


def build_digits(out: str | os.PathLike[str], split: str = "none", seed: int = 0, limit: int | None = None,
                 jpeg_fraction: float = 0.0, force: bool = False) -> PrepareResult:
    """scikit-learn's 1,797 8x8 digits (0..16 scaled to 0..255), classes ``0`` ... ``9``."""
    return _build_selected(out, "digits", _digits_items, split, seed, limit, jpeg_fraction, force)


def build_lfw(out: str | os.PathLike[str], split: str = "none", seed: int = 0, limit: int | None = None,
              jpeg_fraction: float = 0.0, force: bool = False) -> PrepareResult:
    """scikit-image's ``lfw_subset``: 200 25x25 grey photos, the first 100 ``face``, the rest ``non_face``."""
    return _build_selected(out, "lfw", _lfw_items, split, seed, limit, jpeg_fraction, force)


def _build_selected(out: str | os.PathLike[str], dataset: str, load: Callable[[], list[Item]], split: str, seed: int,
                    limit: int | None, jpeg_fraction: float, force: bool) -> PrepareResult:
    """A data set whose every image ``load()`` gives, split and limited by :func:`_select`."""
    args = {"dataset": dataset, "split": split, "seed": seed, "limit": limit, "jpeg_fraction": jpeg_fraction}
    return _prepare(out, args, lambda: _select(load(), split, seed, limit), jpeg_fraction, seed, force)


def _digits_items() -> list[Item]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return [Item(f"{i:04d}", str(int(t)), pixels[i]) for i, t in enumerate(digits.target)]


def _lfw_items() -> list[Item]:
    from skimage import data
    from skimage.util import img_as_ubyte

    faces = img_as_ubyte(data.lfw_subset())
    return [Item(f"{i:03d}", "face" if i < 100 else "non_face", faces[i]) for i in range(len(faces))]


def build_photos(out: str | os.PathLike[str], force: bool = False) -> PrepareResult:
    """Four natural photos from scikit-image (coffee, chelsea, astronaut, rocket) as a flat folder."""
    args = {"dataset": "photos"}

    def make_items() -> list[Item]:
        from skimage import data

        return [
            Item(name, None, getattr(data, name)())
            for name in ("coffee", "chelsea", "astronaut", "rocket")
        ]

    return _prepare(out, args, make_items, 0.0, 0, force)


# --------------------------------------------------------------------------- command line


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("Examples:\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", type=Path, help="output folder")
    common.add_argument(
        "--force", action="store_true", help="rebuild a folder prepared with other arguments"
    )
    labelled = argparse.ArgumentParser(add_help=False)
    labelled.add_argument(
        "--split",
        choices=SPLITS,
        default="none",
        help="none: OUT/<class>/; 70-30: stratified OUT/{train,test}/<class>/",
    )
    labelled.add_argument(
        "--seed", type=int, default=0, help="random_state of the subset, split and JPEG choice"
    )
    labelled.add_argument(
        "--limit", type=_positive_int, default=None, help="keep a stratified subset of N images"
    )
    labelled.add_argument(
        "--jpeg-fraction", type=_fraction, default=0.0, help="save this fraction as JPEG quality 95"
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    p = sub.add_parser(
        "elpv", parents=[common, labelled], help="ELPV solar cells (pip install elpv-dataset)"
    )
    p.add_argument(
        "--classes",
        type=int,
        choices=(4, 2),
        default=4,
        help="4 by defect probability, or 2 (p >= 0.5 defective)",
    )
    p = sub.add_parser(
        "fashion-mnist",
        parents=[common],
        help="Fashion-MNIST (apt-get install dataset-fashion-mnist)",
    )
    p.add_argument("--n-train", type=_positive_int, default=5000)
    p.add_argument("--n-test", type=_positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jpeg-fraction", type=_fraction, default=0.0)
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help=f"folder of the idx files (default {FASHION_MNIST_DIR})",
    )
    sub.add_parser("digits", parents=[common, labelled], help="scikit-learn 8x8 digits, 10 classes")
    sub.add_parser(
        "lfw", parents=[common, labelled], help="scikit-image lfw_subset: face / non_face"
    )
    sub.add_parser("photos", parents=[common], help="four scikit-image photos, flat folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 a user error, 130 interrupted)."""
    ns = _parser().parse_args(argv)
    labelled = {"split": getattr(ns, "split", "none"), "seed": getattr(ns, "seed", 0),
                "limit": getattr(ns, "limit", None), "jpeg_fraction": getattr(ns, "jpeg_fraction", 0.0)}  # fmt: skip
    try:
        if ns.dataset == "elpv":
            result = build_elpv(ns.out, n_classes=ns.classes, force=ns.force, **labelled)
        elif ns.dataset == "fashion-mnist":
            result = build_fashion_mnist(
                ns.out, ns.n_train, ns.n_test, ns.seed, ns.jpeg_fraction, ns.source, ns.force
            )
        elif ns.dataset == "digits":
            result = build_digits(ns.out, force=ns.force, **labelled)
        elif ns.dataset == "lfw":
            result = build_lfw(ns.out, force=ns.force, **labelled)
        else:
            result = build_photos(ns.out, force=ns.force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    total = sum(result.counts.values())
    state = "already prepared" if result.already_prepared else "prepared"
    print(f"{result.out}: {state}, {total} images")
    for name, count in result.counts.items():
        print(f"  {name or '(no class)'}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
