"""featbank compare: a bake-off of real backbones over real images, real caches and real probes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import featbank
from featbank.cache import default_cache_dir
from featbank.cli.main import cli
from featbank.comparison import CompareConfig, CompareRow, default_plot_path, format_table, parse_backbones, plot_comparison
from featbank.comparison._table import empty_row
from featbank.comparison._throughput import Clock, Throughput, choose_throughput, read_record
from featbank.errors import ConfigError, DatasetError
from featbank.extraction import ExtractReport, default_cache_path

from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--engine", "torch", "--num-workers", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """3 colour-coded classes, train/ and test/ split folders, 6 images per class and split."""
    return make_image_folder(tmp_path / "data", n_per_class=6, splits=("train", "test"))


def _cache_files() -> list[Path]:
    d = default_cache_dir()
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


def _row(name: str, **values) -> CompareRow:
    row = empty_row(name, "final")
    row.update(values)  # type: ignore[typeddict-item]
    return row


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()


# ------------------------------------------------------------------------------------------------
# Refusals: before any work, exit 2, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbones,expected", [
    ("", "names no backbone"),
    (" , ", "names no backbone"),
    ("test_tiny,,efficientnet_lite0", "empty name"),
    ("test_tiny,test_tiny", "'test_tiny' more than once"),
    ("efficientnet_lite0, efficientnet_lite0", "'efficientnet_lite0' more than once"),
    ("test_tiny,torchvision:resnet19", "Unknown backbone 'torchvision:resnet19'. Did you mean 'resnet18'"),
    pytest.param("test_tiny,resnet19", "Unknown backbone 'resnet19'. Did you mean 'resnet18'",
                 marks=pytest.mark.slow),  # timm's list of names is consulted: importing timm takes seconds
    ("test_tiny,nosuchsource:resnet18", "Unknown backbone 'nosuchsource:resnet18'"),
])
def test_bad_backbones_exit_2_before_any_work(split_folder, tmp_path, backbones, expected):
    plot = tmp_path / "p.png"
    res = CliRunner().invoke(cli, ["compare", str(split_folder), "--backbones", backbones, "--plot", str(plot), *FAST])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "Traceback" not in res.output
    assert _cache_files() == [] and not plot.exists()


def test_bad_data_layers_plot_exit_2_before_any_work(split_folder, tmp_path):
    runner = CliRunner()
    cases = [
        (["compare", str(tmp_path / "nowhere"), "-b", "test_tiny"], "does not exist"),
        (["compare", str(split_folder), "-b", "test_tiny", "--layers", "stage1,,final"], "empty name"),
        (["compare", str(split_folder), "-b", "test_tiny", "--plot", str(tmp_path)], "is a folder"),
        (["compare", str(split_folder), "-b", "test_tiny", "--plot", str(tmp_path / "p.jpg")], "must end in .png"),
        (["compare", str(split_folder)], "Missing option '--backbones'"),
    ]
    (tmp_path / "blocker").write_text("a file, not a folder")
    cases.append((["compare", str(split_folder), "-b", "test_tiny", "--plot", str(tmp_path / "blocker" / "p.png")],
                  "Choose another --plot"))
    for args, expected in cases:
        res = runner.invoke(cli, [*args, *FAST])
        assert res.exit_code == 2, (args, res.output)
        assert expected in res.output and "Traceback" not in res.output, (args, res.output)
    for kwargs in ({"engine": "tensorrt"}, {"device": "tpu"}, {"batch_size": 0}, {"num_workers": -1}):
        with pytest.raises(ConfigError, match="tensorrt|tpu|batch_size|num_workers"):
            featbank.compare(split_folder, "test_tiny", **kwargs)
    assert _cache_files() == []


def test_unlabelled_or_single_class_data_is_refused(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(DatasetError):
        featbank.compare(flat, "test_tiny")
    one = make_image_folder(tmp_path / "one", classes=("only",), n_per_class=2)
    with pytest.raises(DatasetError):
        featbank.compare(one, ["test_tiny"])
    assert _cache_files() == []


def test_compare_config_is_checked_once_when_built(tmp_path):
    config = CompareConfig(tmp_path / "data", " a, b", layers=" stage5,final ")
    assert (config.data, config.backbones, config.layers, config.plot) == (str(tmp_path / "data"), ("a", "b"),
                                                                          "stage5,final", None)
    for kwargs, message in (({"engine": "tensorrt"}, "'engine' parameter"), ({"device": "tpu"}, "'device' parameter"),
                            ({"batch_size": 0}, "batch_size"), ({"layers": "a,,b"}, "empty name")):
        with pytest.raises(ConfigError, match=message):
            CompareConfig(tmp_path / "data", "a", **kwargs)
    with pytest.raises(ConfigError, match="more than once"):
        CompareConfig(tmp_path / "data", ["a", "a"])
    # The config alone, or the shorthand (data, backbones, fields as keywords): not both, and not without backbones.
    with pytest.raises(ConfigError, match="takes the CompareConfig alone.*backbones, layers"):
        featbank.compare(config, "c", layers="final")
    with pytest.raises(ConfigError, match="needs the backbones"):
        featbank.compare(tmp_path / "data")
    with pytest.raises(DatasetError):  # checked by compare, before any work: DATA does not exist
        featbank.compare(config)
    assert _cache_files() == []


def test_cli_parameters_map_onto_the_config():
    """One mapping: every click parameter of compare but --no-plot, --json and --quiet is a CompareConfig field."""
    from dataclasses import fields

    names = {p.name for p in cli.commands["compare"].params} - {"no_plot", "as_json", "quiet"}
    assert names == {f.name for f in fields(CompareConfig)} - {"progress"}


def test_parse_backbones():
    assert parse_backbones("a, b,c") == ["a", "b", "c"]
    assert parse_backbones(["test_tiny", "efficientnet_lite0"]) == ["test_tiny", "efficientnet_lite0"]
    for bad in ([], [""], "a,a", 3, ["a", 1]):
        with pytest.raises(ConfigError):
            parse_backbones(bad)  # type: ignore[arg-type]


def test_real_subprocess_refusal(tmp_path):
    exe = Path(sys.executable).parent / "featbank"
    proc = subprocess.run([str(exe), "compare", str(tmp_path / "nowhere"), "--backbones", "test_tiny"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# The table, the plot and the throughput record, on rows made by hand
# ------------------------------------------------------------------------------------------------


def test_table_marks_missing_test_recorded_throughput_and_errors():
    rows = [
        _row("test_tiny", dims=32, img_per_s=55.0, img_per_s_source="measured", val_top1=0.9, val_balanced_acc=0.85,
             fit_s=0.4),
        _row("efficientnet_lite0", dims=1280, img_per_s=12.3, img_per_s_source="recorded", img_per_s_method="steady",
             val_top1=0.95, val_balanced_acc=0.9, fit_s=1.2),
        _row("efficientnet_lite1", dims=1280, img_per_s=2.5, img_per_s_source="measured", img_per_s_method="whole run",
             val_top1=0.95, val_balanced_acc=0.9, fit_s=1.2),
        _row("resnet18", error="extract failed: the weights of 'resnet18' are not on this machine"),
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["backbone", "layers", "dims"]
    tiny = next(line for line in lines if line.startswith("test_tiny"))
    assert "55.0" in tiny and "0.9000" in tiny and "—" in tiny
    assert "12.3 (recorded)" in text and "measured by an earlier compare run" in text
    assert "2.5 (whole run)" in text and "model load included" in text
    assert "DATA has no test split" in text
    assert "resnet18: extract failed" in text


def test_plot_is_a_png_and_names_rows_it_cannot_draw(tmp_path):
    rows = [
        _row("a", dims=32, img_per_s=500.0, val_top1=0.7, val_balanced_acc=0.6, test_top1=0.72, test_balanced_acc=0.61),
        _row("b", dims=1280, img_per_s=10.0, val_top1=0.9, val_balanced_acc=0.8, test_top1=0.88, test_balanced_acc=0.8),
        _row("c", dims=1280, val_top1=0.9, val_balanced_acc=0.8),  # no throughput known
        _row("d", error="extract failed"),
    ]
    out = plot_comparison(rows, tmp_path / "sub" / "plot.png", title="data")
    assert out == tmp_path / "sub" / "plot.png"
    _assert_png(out)
    assert not list(out.parent.glob(".*tmp*"))


def test_default_plot_path_is_beside_the_caches(split_folder):
    p = default_plot_path(split_folder)
    assert p.parent == default_cache_dir() / "caches" and p.suffix == ".png" and p.name.startswith("data-")
    assert default_plot_path(split_folder) == p and default_plot_path(split_folder.parent) != p


def _record(**changes) -> str:
    record = {"cache_key": "k", "images_per_second": 5.0, "n_images": 3, "method": "steady"}
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize("record", [
    "not json", "[]", _record(cache_key="other"), _record(images_per_second=float("nan")),
    _record(images_per_second=-1), _record(images_per_second=True), _record(images_per_second="5"),
    _record(n_images="3"), _record(n_images=0), _record(method="guessed"), _record(method=None),
])
def test_a_bad_or_foreign_throughput_record_counts_as_none(tmp_path, record):
    path = tmp_path / "c.h5.throughput.json"
    path.write_text(record)
    assert read_record(path, "k") is None
    assert read_record(tmp_path / "missing.json", "k") is None


def test_a_good_throughput_record_is_read(tmp_path):
    path = tmp_path / "c.h5.throughput.json"
    path.write_text(_record(images_per_second=5.5, n_images=30))
    assert read_record(path, "k") == Throughput(5.5, 30, "steady")
    assert read_record(path, "") is None


def test_the_better_measurement_is_kept(tmp_path):
    report = ExtractReport(path=tmp_path / "c.h5", n_embedded=100, seconds=20.0, cache_key="k")
    steady = Throughput(50.0, 92, "steady")
    assert choose_throughput(report, steady) == (steady, "measured")
    assert read_record(tmp_path / "c.h5.throughput.json", "k") == steady
    # A rerun that embeds 3 new images measures mostly the model load: the record stands.
    small = ExtractReport(path=tmp_path / "c.h5", n_embedded=3, seconds=6.0, cache_key="k")
    assert choose_throughput(small, Clock().measure(small, 32)) == (steady, "recorded")
    assert choose_throughput(small, None) == (steady, "recorded")
    more = Throughput(60.0, 500, "steady")
    assert choose_throughput(report, more) == (more, "measured")
    assert read_record(tmp_path / "c.h5.throughput.json", "k") == more
    other_key = ExtractReport(path=tmp_path / "c.h5", cache_key="k2")
    assert choose_throughput(other_key, None) == (None, "unknown")


def test_clock_leaves_the_first_batch_out():
    report = ExtractReport(path=Path("c.h5"), n_embedded=40, seconds=100.0)
    clock = Clock()
    clock.marks = [(10.0, 8), (11.0, 16), (12.0, 24), (13.0, 32), (13.5, 40)]
    assert clock.measure(report, 8) == Throughput(32 / 3.5, 32, "steady")
    assert clock.measure(report, 33) == Throughput(0.4, 40, "whole run")  # too few after the first batch
    assert Clock().measure(ExtractReport(path=Path("c.h5")), 8) is None


# ------------------------------------------------------------------------------------------------
# End to end: test_tiny and the real Lite0 weights
# ------------------------------------------------------------------------------------------------


def _check_row(row: CompareRow, name: str, dims: int) -> None:
    assert row["backbone"] == name and row["layers"] == "final" and row["error"] is None
    assert row["dims"] == dims and row["n_images"] == 36
    assert (row["n_train"], row["n_test"]) == (18 - row["n_val"], 18) and row["n_val"] > 0
    for key in ("val_top1", "val_balanced_acc", "test_top1", "test_balanced_acc"):
        assert 0.0 <= row[key] <= 1.0, (key, row)  # type: ignore[literal-required]
    assert row["img_per_s"] is not None and row["img_per_s"] > 0 and math.isfinite(row["img_per_s"])
    assert row["fit_s"] is not None and row["fit_s"] > 0 and "C" in row["chosen"]
    assert Path(row["cache"]).is_file() and row["notes"] == []


@pytest.mark.slow
def test_compare_two_backbones_then_reuse_their_caches(split_folder, tmp_path):
    plot = tmp_path / "plot.png"
    rows = featbank.compare(split_folder, "test_tiny,efficientnet_lite0", plot=plot, engine="torch", num_workers=0,
                            batch_size=8)
    assert [r["backbone"] for r in rows] == ["test_tiny", "efficientnet_lite0"]
    _check_row(rows[0], "test_tiny", 32)
    _check_row(rows[1], "efficientnet_lite0", 1280)
    for r in rows:
        assert r["n_embedded"] == 36 and r["img_per_s_source"] == "measured"
        assert r["img_per_s_method"] == "steady" and r["img_per_s_images"] == 36 - 8  # the first batch left out
        assert Path(r["cache"]) == default_cache_path(split_folder, r["backbone"])
    assert rows[1]["test_top1"] >= 0.8  # colour-coded classes: Lite0 separates them
    _assert_png(plot)
    stamps = {r["cache"]: Path(r["cache"]).stat().st_mtime_ns for r in rows}

    # Second run, through the command line: nothing embedded, the first run's throughput recorded.
    res = CliRunner().invoke(cli, ["compare", str(split_folder), "-b", "test_tiny,efficientnet_lite0", "--json",
                                   "--plot", str(tmp_path / "again.png"), *FAST])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    for first, second in zip(rows, again):
        assert second["n_embedded"] == 0 and second["img_per_s_source"] == "recorded"
        assert second["img_per_s"] == first["img_per_s"] and second["img_per_s_images"] == 28
        assert second["img_per_s_method"] == "steady"
        for key in ("val_top1", "test_top1", "test_balanced_acc", "chosen", "dims", "cache"):
            assert second[key] == first[key], key
        assert Path(second["cache"]).stat().st_mtime_ns == stamps[second["cache"]]
    _assert_png(tmp_path / "again.png")


@pytest.mark.slow
def test_cli_table_without_test_split_and_a_backbone_without_weights(tmp_path, monkeypatch):
    # An empty torch hub: torchvision's resnet18 weights are not on this machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    data = make_image_folder(tmp_path / "nosplit", n_per_class=6)
    res = CliRunner().invoke(cli, ["compare", str(data), "-b", "test_tiny,resnet18", *FAST])
    assert res.exit_code == 2, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("backbone") and "test top-1" in lines[0]
    tiny = next(line for line in lines if line.startswith("test_tiny"))
    assert tiny.split()[1:3] == ["final", "32"] and "—" in tiny  # test columns empty: no test split
    assert "(whole run)" in tiny  # 18 images in one batch of 32: no steady rate
    assert "DATA has no test split" in res.stdout
    assert "resnet18: extract failed" in res.stdout and "weights" in res.stdout
    assert "1 of 2 backbones failed (resnet18)" in res.output
    plot = default_plot_path(data)
    assert f"Plot: {plot}" in res.output
    _assert_png(plot)
    rows = featbank.compare(data, ["test_tiny"], engine="torch", num_workers=0)
    assert rows[0]["test_top1"] is None and rows[0]["val_top1"] is not None and "no test split" in rows[0]["notes"][0]


@pytest.mark.slow
def test_a_cache_made_with_other_settings_is_an_error_row_until_overwrite(split_folder):
    (split_folder / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    default = default_cache_path(split_folder, "test_tiny")
    featbank.extract(split_folder, default, backbone="test_tiny", dtype="float16", engine="torch", num_workers=0,
                     progress=False)
    before = default.read_bytes()
    rows = featbank.compare(split_folder, "test_tiny", engine="torch", num_workers=0)
    assert rows[0]["error"] is not None and "extract failed" in rows[0]["error"] and "float16" in rows[0]["error"]
    assert rows[0]["val_top1"] is None and default.read_bytes() == before  # the foreign cache is untouched
    assert "test_tiny: extract failed" in format_table(rows)
    res = CliRunner().invoke(cli, ["compare", str(split_folder), "-b", "test_tiny", "--overwrite", "--no-plot", "--json",
                                   *FAST])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["error"] is None and rows[0]["n_embedded"] == 36 and rows[0]["n_images"] == 36
    assert not default_plot_path(split_folder).exists() and "Plot:" not in res.output
    assert rows[0]["notes"] == ["1 image(s) could not be read and were skipped (listed in the cache under skipped/)"]
    assert "test_tiny: 1 image(s) could not be read" in format_table(rows)


def test_extract_on_progress_counts_without_a_progress_bar(image_folder, tmp_path):
    """compare times batches through on_progress with the bar off: done must count even then."""
    marks: list[tuple[int, int]] = []
    featbank.extract(image_folder, tmp_path / "c.h5", backbone="test_tiny", engine="torch", num_workers=0, batch_size=8,
                     progress=False, on_progress=lambda done, total: marks.append((done, total)))
    assert marks == [(8, 24), (16, 24), (24, 24)]


@pytest.mark.slow
def test_layers_are_extracted_into_their_own_cache_and_probed(split_folder):
    from featbank.backbones import layer_dims

    res = CliRunner().invoke(cli, ["compare", str(split_folder), "-b", "test_tiny", "--layers", "stage9", *FAST])
    assert res.exit_code == 2 and "Unknown layer 'stage9'" in res.output and _cache_files() == []
    rows = featbank.compare(split_folder, "test_tiny", layers="stage1,final", engine="torch", num_workers=0)
    row = rows[0]
    assert row["error"] is None and row["layers"] == "stage1,final"
    assert row["dims"] == sum(layer_dims("test_tiny", ("stage1", "final")).values()) > 32
    assert row["cache"].endswith("-test_tiny-layers-stage1-final.h5") and row["test_top1"] is not None
    assert not default_cache_path(split_folder, "test_tiny").exists()  # the plain cache is another file
    with featbank.open_cache(row["cache"]) as cache:
        assert set(cache.layers) == {"stage1", "final"}
