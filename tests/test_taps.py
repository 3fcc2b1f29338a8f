"""Taps: named intermediate layers, their pooling, and the module that returns them (real models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featbank.backbones import (
    FINAL,
    MAX_TAP_DIM,
    TapModel,
    available_layers,
    layer_dims,
    load_backbone,
    param_groups,
    parse_layers,
    pool_tap,
)
from featbank.errors import ConfigError

LITE0_TAPS = ["stem", *(f"stage{i}" for i in range(1, 8)), "head_conv", "final"]
# Channels of EfficientNet-Lite0's group outputs; pooled gap+2x2 = 5C unless 5C > 4096.
LITE0_CHANNELS = {"stem": 32, "stage1": 16, "stage2": 24, "stage3": 40, "stage4": 80, "stage5": 112,
                  "stage6": 192, "stage7": 320, "head_conv": 1280}


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("test_tiny")


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_tiny_taps_are_its_groups_plus_final(tiny) -> None:
    assert available_layers(tiny) == [g for g, _ in param_groups(tiny)] + [FINAL]
    assert available_layers("test_tiny") == ["stem", "stage1", "stage2", "final"]
    assert layer_dims(tiny, "all") == {"stem": 40, "stage1": 80, "stage2": 160, "final": 32}
    assert layer_dims(tiny, "all", pooling="gap") == {"stem": 8, "stage1": 16, "stage2": 32, "final": 32}


@pytest.mark.slow
def test_lite0_taps_and_pooled_shapes(lite0) -> None:
    assert available_layers(lite0) == LITE0_TAPS
    dims = layer_dims(lite0, "all")
    want = {t: (5 * c if 5 * c <= MAX_TAP_DIM else c) for t, c in LITE0_CHANNELS.items()}
    assert dims == {**want, "final": 1280}
    assert dims["head_conv"] == 1280  # 5 x 1280 is over the cap: global average alone
    model = TapModel(lite0, "stage3,stage5,final").eval()
    assert model.layers == ("stage3", "stage5", "final")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    with torch.inference_mode():
        outs = model(x)
        ref = lite0.embedder().eval()(x)
    model.remove_hooks()
    assert [tuple(o.shape) for o in outs] == [(2, 200), (2, 560), (2, 1280)]
    assert torch.equal(outs[-1], ref)  # final is the embedding, bit for bit
    assert all(torch.isfinite(o).all() for o in outs)


def test_tap_model_pools_the_stage_output(tiny) -> None:
    """The stage2 tap is the global average + 2x2 average of stage2's output, computed by hand."""
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    model = TapModel(tiny, ["final", "stage2"]).eval()
    with torch.inference_mode():
        stem_in = tiny.embedder().prepare(x)
        feat = tiny.features.stage2(tiny.features.stage1(tiny.features.stem(stem_in)))
        want = torch.cat([feat.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(feat, 2).flatten(1)], 1)
        stage2, final = model(x)
    model.remove_hooks()
    assert model.layers == ("stage2", "final")  # network order, whatever order was asked
    torch.testing.assert_close(stage2, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, feat.mean((2, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (2, 4, 2, 3)])
def test_2x2_pooling_matches_adaptive_avg_pool_on_odd_sizes(shape) -> None:
    x = torch.randn(*shape)
    out = pool_tap(x)
    torch.testing.assert_close(out[:, : shape[1]], x.mean((2, 3)))
    torch.testing.assert_close(out[:, shape[1]:], torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (2, 4, 2, 3)])
def test_max_pooling_appends_the_same_cells_maxima(shape) -> None:
    """gap+2x2+max: the default's 5C columns unchanged, then the global max and the 2x2 maxima."""
    x = torch.randn(*shape)
    c = shape[1]
    out = pool_tap(x, "gap+2x2+max")
    assert out.shape == (shape[0], 10 * c)
    torch.testing.assert_close(out[:, : 5 * c], pool_tap(x, "gap+2x2"))
    torch.testing.assert_close(out[:, 5 * c: 6 * c], x.amax((2, 3)))
    torch.testing.assert_close(out[:, 6 * c:], torch.nn.functional.adaptive_max_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize(("channels", "parts"), [
    (MAX_TAP_DIM // 10, "avg avg2x2 max max2x2"),  # 409: 10C = 4090 fits
    (MAX_TAP_DIM // 10 + 1, "avg avg2x2 max"),  # 410: 6C fits
    (MAX_TAP_DIM // 6 + 1, "avg avg2x2"),  # 683: 5C, exactly gap+2x2
    (MAX_TAP_DIM // 5 + 1, "avg max"),  # 820: too wide for gap+2x2, 2C fits
    (MAX_TAP_DIM // 2, "avg max"),  # 2048: 2C = 4096 fits
    (MAX_TAP_DIM // 2 + 1, "avg"),  # 2049: the average alone
])
def test_a_wide_layer_drops_max_pooling_parts_from_the_end(channels, parts) -> None:
    """gap+2x2+max keeps a layer's gap+2x2 columns first at every width and never exceeds the cap."""
    x = torch.randn(2, channels, 3, 3)
    ops = {"avg": x.mean((2, 3)), "avg2x2": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1),
           "max": x.amax((2, 3)), "max2x2": torch.nn.functional.adaptive_max_pool2d(x, 2).flatten(1)}
    out = pool_tap(x, "gap+2x2+max")
    torch.testing.assert_close(out, torch.cat([ops[p] for p in parts.split()], 1))
    assert out.shape[1] <= MAX_TAP_DIM
    avg = pool_tap(x, "gap+2x2")
    torch.testing.assert_close(out[:, : avg.shape[1]], avg)


@pytest.mark.parametrize("pooling", ["gap+2x2", "gap+2x2+max", "gap"])
@pytest.mark.parametrize("channels", [1, 3, 409, 410, 682, 683, 819, 820, 2048, 2049, 5000])
def test_layer_widths_are_the_pooled_widths(pooling, channels) -> None:
    """The width layer_dims records (_pooled_dim) is what pool_tap returns, for every pooling and width."""
    from featbank.backbones._taps import _pooled_dim

    x = torch.randn(1, channels, 3, 3)
    assert _pooled_dim(tuple(x.shape), pooling) == pool_tap(x, pooling).shape[1]


def test_pool_tap_refuses_an_unknown_pooling() -> None:
    with pytest.raises(ConfigError, match="'pooling' parameter must be one of"):
        pool_tap(torch.randn(1, 2, 3, 3), "max")


def test_tiny_layer_dims_with_max_pooling(tiny) -> None:
    assert layer_dims(tiny, "all", pooling="gap+2x2+max") == {"stem": 80, "stage1": 160, "stage2": 320, "final": 32}


def test_pooling_is_capped() -> None:
    wide = torch.randn(1, MAX_TAP_DIM // 5 + 1, 4, 4)
    assert pool_tap(wide).shape == (1, wide.shape[1])
    assert pool_tap(torch.randn(2, 6, 8)).shape == (2, 8)  # tokens: averaged


@pytest.mark.parametrize(("spec", "want"), [
    (None, ("final",)),
    ("final", ("final",)),
    ("all", ("stem", "stage1", "stage2", "final")),
    ("final,stem", ("stem", "final")),
    ("stage1-final", ("stage1", "stage2", "final")),
    (" stage2 , stage2 ", ("stage2",)),
    (["stage1", "final"], ("stage1", "final")),
])
def test_parse_layers(tiny, spec, want) -> None:
    assert parse_layers(spec, tiny) == want


@pytest.mark.parametrize(("spec", "words"), [
    ("stage3", ["Unknown layer 'stage3'", "stem, stage1, stage2, final"]),
    ("stge1", ["Did you mean 'stage1'"]),
    ("final-stem", ["runs backwards", "stem-final"]),
    ("stem,,final", ["must name layers"]),
    ("", ["must name layers"]),
])
def test_parse_layers_refuses_with_what_to_type(tiny, spec, words) -> None:
    with pytest.raises(ConfigError) as e:
        parse_layers(spec, tiny)
    for w in words:
        assert w in str(e.value)


def test_unknown_pooling_is_refused(tiny) -> None:
    with pytest.raises(ConfigError, match="'pooling' parameter must be one of"):
        TapModel(tiny, "all", pooling="max")


@pytest.mark.slow
def test_tap_model_exports_to_onnx_with_the_same_numbers(tiny, tmp_path) -> None:
    import contextlib
    import io
    import warnings

    import onnxruntime as ort

    model = TapModel(tiny, "all", pooling="gap+2x2+max").eval()
    path = tmp_path / "taps.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),), str(path), input_names=["images"],
                          output_names=list(model.layers), dynamic_shapes=({0: torch.export.Dim("batch", max=1 << 16)},),
                          dynamo=True, external_data=False)
    x = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    model.remove_hooks()
    assert [g.shape for g in got] == [(3, 80), (3, 160), (3, 320), (3, 32)]  # max pooling's maxima export too
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-5)
