"""Tiny test backbones (random but fixed weights; they exist so tests walk the whole pipeline fast).

Importing this module registers ``test_tiny``.
"""

from __future__ import annotations

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

__all__ = ["TinyConvNet"]

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


def _build_test_tiny(weights: str | None, weights_file: Path | None, allow_random: bool) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        net = TinyConvNet()
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
