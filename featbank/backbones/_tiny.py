"""Tiny test backbones (random but fixed weights; they exist so tests walk the whole pipeline fast).

Importing this module registers ``test_tiny`` and ``test_sleep`` (a fixed wait per batch that uses
no CPU and a nearly free embedding on 8x8 inputs: a simulated accelerator, so that scaling can be
measured on a small CPU).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..images import PreprocessConfig
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    Backbone,
    BackboneInfo,
    load_state_into,
    read_state_dict,
    register_backbone,
    sha256_file,
    sha256_tensors,
)

__all__ = ["TinyConvNet", "SLEEP_SECONDS", "SLEEP_TRACE_ENV", "read_sleep_trace"]

class TinyConvNet(nn.Module):
    """A four-layer CNN: stem, two stages, pooled. For tests and examples only."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv2d(width, width * 2, 3, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.ReLU()
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width * 2, width * 4, 3, 1, 1, bias=False), nn.BatchNorm2d(width * 4), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 4
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class _FeaturesOnly(nn.Module):
    def __init__(self, net: TinyConvNet):
        super().__init__()
        self.stem, self.stage1, self.stage2, self.pool = net.stem, net.stage1, net.stage2, net.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1)


_TEST_PRE = PreprocessConfig((32, 32), 36, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
# test_sleep's inputs are 8x8: decoding, resizing and normalising them costs next to nothing, so a
# benchmark with it measures the scheduling of the simulated accelerators, not the CPU.
_SLEEP_PRE = PreprocessConfig((8, 8), 8, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _build_test_tiny(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
    net = _seeded_net()
    tag = "seed1234"
    if weights_file is not None:
        load_state_into(net, read_state_dict(weights_file), str(weights_file), "test_tiny")
        tag = f"file:{weights_file.name}"
    elif weights not in (None, "seed1234", RANDOM):
        raise ConfigError(f"Unknown weights {weights!r} for 'test_tiny'; it has only 'seed1234'.")
    # BN running stats of a fresh net are (0, 1): give them values so eval mode is not trivial.
    state = net.state_dict()
    sha = sha256_file(weights_file) if weights_file is not None else sha256_tensors(state)
    return Backbone(
        name="test_tiny",
        weights=tag,
        weights_sha256=sha,
        preprocess=_TEST_PRE,
        embed_dim=net.num_features,
        features=_FeaturesOnly(net).eval(),
        classifier=net.fc.eval(),
        family="test",
        embedding_note="global-average-pooled stage2 features (32); fixed random weights, for tests",
    )


_build_test_tiny.info = lambda: BackboneInfo(  # type: ignore[attr-defined]
    "test_tiny", "featbank (fixed random weights, for tests)", "seed1234", 32, (32, 32), True, "built in",
    "tiny test model",
)
register_backbone("test_tiny", "test")(_build_test_tiny)


class _SleepingFeatures(nn.Module):
    """A fixed wait per batch, then a nearly free embedding: an accelerator that costs no CPU.

    The embedding is a fixed random projection of each image's channel means and standard
    deviations, so rows differ by image and a cache can be checked, while the CPU stays free for
    decoding (the conv net of ``test_tiny`` would cost more CPU than the wait on a small machine).
    """

    def __init__(self, seconds: float, embed_dim: int = 32):
        super().__init__()
        self.seconds = seconds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            self.stem = nn.Linear(6, embed_dim)  # named like every backbone's first layer group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.time()
        time.sleep(self.seconds)  # releases the GIL and uses no CPU, like a kernel running on a GPU
        out = self.stem(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1))
        _trace(start, time.time(), len(x))
        return out


#: Environment variable: a folder where ``test_sleep`` logs each batch (``start end rows``, wall
#: clock seconds, one file per process), so a benchmark can tell when the simulated accelerators
#: were busy (first batch start to last batch end) and that every row went through one.
SLEEP_TRACE_ENV = "FEATBANK_SLEEP_TRACE"


def _trace(start: float, end: float, rows: int) -> None:
    folder = os.environ.get(SLEEP_TRACE_ENV)
    if folder:
        with open(Path(folder) / f"sleep-{os.getpid()}.txt", "a") as f:
            f.write(f"{start:.6f} {end:.6f} {rows}\n")


def read_sleep_trace(folder: str | os.PathLike) -> list[tuple[float, float, int]]:
    """Every batch ``test_sleep`` logged in ``folder``: ``(start, end, rows)``, sorted by start."""
    out = []
    for p in Path(folder).glob("sleep-*.txt"):
        for line in p.read_text().splitlines():
            a, b, n = line.split()
            out.append((float(a), float(b), int(n)))
    return sorted(out)


#: Seconds per batch of ``test_sleep`` when its weights name none (``--weights 0.02`` sets 20 ms).
SLEEP_SECONDS = 0.05


def _sleep_seconds(weights: str | None) -> float:
    if weights in (None, RANDOM, "seed1234"):
        return SLEEP_SECONDS
    try:
        seconds = float(weights)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 60:
        raise ConfigError(
            f"The weights of 'test_sleep' are its seconds per batch, a number from 0 to 60. Got {weights!r} instead "
            f"(default {SLEEP_SECONDS})."
        )
    return seconds


def _seeded_net() -> TinyConvNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return TinyConvNet()


def _build_test_sleep(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
    if weights_file is not None:
        raise ConfigError("'test_sleep' takes no --weights-file; its weights are fixed random ones.")
    seconds = _sleep_seconds(weights)
    features = _SleepingFeatures(seconds).eval()
    return Backbone(
        name="test_sleep",
        weights=f"{seconds:g}",
        weights_sha256=sha256_tensors(features.state_dict()),
        preprocess=_SLEEP_PRE,
        embed_dim=32,
        features=features,
        classifier=None,
        family="test",
        embedding_note=f"a fixed random projection of channel statistics after a {seconds:g} s wait per batch: a "
        "simulated accelerator for scaling tests (engine torch only)",
        extra={"torch_only": True},
    )


_build_test_sleep.info = lambda: BackboneInfo(  # type: ignore[attr-defined]
    "test_sleep", "featbank (fixed random weights, a fixed wait per batch)", f"{SLEEP_SECONDS:g}", 32, (8, 8), True,
    "built in", "simulated accelerator for scaling tests",
)
register_backbone("test_sleep", "test")(_build_test_sleep)
