"""featbank doctor: every stage measured on real images with a real engine; its prediction is the smallest limit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featbank.cli.main import cli
from featbank.errors import ConfigError, DatasetError
from featbank.extraction import diagnose

from conftest import make_image_folder


@pytest.fixture(autouse=True)
def _short_model_windows(monkeypatch):
    """Three windows of 0.2 s, not 2 s: the windows' median is what is tested, not its precision."""
    from featbank.extraction import _doctor

    monkeypatch.setattr(_doctor, "MODEL_SECONDS", 0.2)


def test_diagnose_measures_every_stage_and_names_the_smallest_limit(tmp_path):
    data = make_image_folder(tmp_path / "data")
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (first / "broken.png").write_bytes(b"not an image")
    d = diagnose(data, backbone="test_tiny", engine="torch", device="cpu", sample=30, out=tmp_path / "c.h5")
    assert set(d.stages) == {"read", "decode", "resize", "model", "write"}
    assert all(v > 0 for v in d.stages.values())
    assert d.n_sampled == 25 and d.n_unreadable == 1
    assert d.bottleneck == min(d.rates, key=d.rates.get)
    assert d.measured is not None and d.measured > 0 and d.startup >= 0  # a real extract of the sample
    assert d.n_images == 25 and d.predicted == pytest.approx(25 / (d.startup + 25 / d.measured))  # every image listed
    assert "cpu" in d.rates  # on the CPU the decoders and the model share the cores
    assert d.settings["engine"] == "torch" and d.settings["num_workers"] >= 0
    assert d.settings["jpeg_share"] == 0.5  # half the readable sample is JPEG (the files' bytes, not their names)
    text = d.summary()
    assert "bottleneck" in text and "model" in text
    assert not list(tmp_path.glob(".featbank-doctor-*"))  # the write probe leaves nothing behind


def test_auto_times_a_torch_only_backbone_on_torch_as_extract_runs_it(tmp_path):
    """--engine auto means what extract makes of it: a backbone whose forward is not an ONNX graph runs on
    torch (the stages and the real extract of the sample alike), and onnxruntime is refused for it."""
    data = make_image_folder(tmp_path / "data")
    d = diagnose(data, backbone="test_sleep", weights="0.01", device="cpu", sample=8)
    assert d.settings["engine"] == "torch" and d.measured is not None and "--engine torch" in d.summary()
    with pytest.raises(ConfigError, match="runs only with --engine torch"):
        diagnose(data, backbone="test_sleep", weights="0.01", engine="onnxruntime", device="cpu", sample=8)


def test_doctor_cli_json_and_bad_input(tmp_path):
    data = make_image_folder(tmp_path / "data")
    res = CliRunner().invoke(cli, ["doctor", str(data), "--backbone", "test_tiny", "--engine", "torch", "--sample", "8",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["predicted"] > 0 and out["bottleneck"] in out["rates"] and 0 < out["predicted"] <= out["measured"]
    res = CliRunner().invoke(cli, ["doctor", str(data), "--sample", "0"])
    assert res.exit_code == 2 and "--sample" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["doctor", str(tmp_path / "empty"), "--backbone", "test_tiny"])
    assert res.exit_code == 2 and "Error:" in res.output and "Traceback" not in res.output


def test_layers_and_views_are_timed_as_extract_would_run_them(tmp_path, monkeypatch):
    """With --layers and --views the model runs once per view and its taps are what is written: the model
    stage is the plain one times 1 + K (the same engine's per-view time), and the real extract of the
    sample stores them (it is given the options)."""
    from featbank.extraction import _doctor

    data = make_image_folder(tmp_path / "data")
    per_view = []
    real = _doctor._time_model
    monkeypatch.setattr(_doctor, "_time_model", lambda *a: per_view.append(real(*a)) or per_view[-1])
    seen = []
    run = _doctor._time_pipeline
    monkeypatch.setattr(_doctor, "_time_pipeline", lambda paths, options, b: seen.append(options) or run(paths, options, b))
    d = diagnose(data, backbone="test_tiny", engine="torch", device="cpu", sample=8, layers=["stage1", "final"], views=3,
                 augment="dihedral")
    (sec, dim), = per_view
    assert dim == 80 + 32 and d.stages["model"] == pytest.approx(4 * sec)  # stage1 pooled gap+2x2, final 32
    # the decoding workers make the 3 views of each image too: a stage of its own, in the CPU's budget
    assert list(d.stages) == ["read", "decode", "resize", "views", "model", "write"] and d.stages["views"] > 0
    cpu = sum(d.stages[k] for k in ("read", "decode", "resize", "views"))
    assert d.rates["cpu"] == pytest.approx(d.settings["cores"] / (cpu + d.settings["cores"] * d.stages["model"]))
    assert d.settings["passes"] == 4 and d.settings["features"] == "--layers stage1,final --views 3 --augment dihedral"
    assert seen[0]["layers"] == ("stage1", "final") and seen[0]["views"] == 3 and seen[0]["augment"] == "dihedral"
    assert d.measured is not None and "the model runs 4 times per image" in d.summary()
    with pytest.raises(ConfigError, match="views"):
        diagnose(data, backbone="test_tiny", engine="torch", views=9, augment="dihedral")
    res = CliRunner().invoke(cli, ["doctor", str(data), "--backbone", "test_tiny", "--engine", "torch", "--sample", "8",
                                   "--layers", "nope"])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output


def test_diagnose_refuses_what_it_cannot_measure(tmp_path):
    data = tmp_path / "bad"
    for c in "ab":
        (data / c).mkdir(parents=True)
        for i in range(3):
            (data / c / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="could be read"):
        diagnose(data, backbone="test_tiny", engine="torch")
    with pytest.raises(ConfigError, match="batch_size"):
        diagnose(data, backbone="test_tiny", batch_size=0)


def test_on_a_gpu_held_back_by_decoding_it_suggests_decode_gpu_for_the_jpeg_share():
    from featbank.extraction._doctor import _limits, _suggest

    stages = {"read": 0.0002, "decode": 0.004, "resize": 0.002, "model": 0.0001, "write": 0.00001}
    settings = {"device": "cuda", "engine": "torch", "batch_size": 64, "num_workers": 4, "cores": 4, "n_gpu": 1,
                "jpeg_share": 1.0}
    rates = _limits(stages, 4, 4, on_cpu=False)
    assert min(rates, key=rates.get) == "decoders"
    sug = {s["options"]: s for s in _suggest(stages, settings, "decoders")}
    assert sug["--decode gpu"]["predicted"] > rates["decoders"] * 10  # only reading stays on the CPU
    half = {s["options"]: s for s in _suggest(stages, {**settings, "jpeg_share": 0.5}, "decoders")}
    assert rates["decoders"] < half["--decode gpu"]["predicted"] < sug["--decode gpu"]["predicted"]
    png = {s["options"] for s in _suggest(stages, {**settings, "jpeg_share": 0.0}, "decoders")}
    assert "--decode gpu" not in png  # nothing nvJPEG could take
    on_cpu = {s["options"] for s in _suggest(stages, {**settings, "device": "cpu"}, "decoders")}
    assert "--decode gpu" not in on_cpu


def test_the_pipeline_run_copies_no_fifo_and_is_bounded(tmp_path, monkeypatch):
    """A FIFO in the data is never opened by the doctor's copies (it would block); a sample larger than
    the copy budget is not run through extract: the prediction then comes from the stages alone."""
    import os

    from featbank.extraction import _doctor

    data = make_image_folder(tmp_path / "data")
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    os.mkfifo(first / "pipe.png")
    d = diagnose(data, backbone="test_tiny", engine="torch", device="cpu", sample=30)
    assert d.measured is not None and d.n_sampled == 24  # the FIFO is neither sampled nor copied
    monkeypatch.setattr(_doctor, "PIPELINE_BYTES", 10)
    d = diagnose(data, backbone="test_tiny", engine="torch", device="cpu", sample=30)
    assert d.measured is None and d.predicted == d.rates[d.bottleneck] and "from the stages alone" in d.summary()
