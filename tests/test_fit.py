"""featbank.fit: the probe protocol, the C sweep, streaming, K-shot, evaluate, and every refusal."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import featbank
from featbank.errors import BundleError, CacheError, ConfigError
from featbank.fitting import fit
from featbank.inference import evaluate

from _fitdata import blobs, write_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def _splits(n: int, test_frac: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < test_frac, 2, 0).astype(np.int8)


def test_sweep_picks_weak_regularisation_on_separable_data_and_strong_on_noise(tmp_path):
    Xs, ys = blobs(60, 20, 3, sep=1.5, seed=0)  # well separated: the weakest C loses nothing
    sep = fit(write_synthetic_cache(tmp_path / "sep.h5", Xs, ys), save=False)
    # 60 dims, 30 rows per class, labels independent of X: any fit is overfitting -> strongest C.
    rng = np.random.default_rng(1)
    Xn = rng.normal(size=(90, 60)).astype(np.float32)
    yn = np.repeat(np.arange(3), 30)
    rng.shuffle(yn)
    noisy = fit(write_synthetic_cache(tmp_path / "noise.h5", Xn, yn), save=False)
    assert sep.chosen["C"] >= 1e-1, sep.sweep
    assert noisy.chosen["C"] <= 1e-3, noisy.sweep
    assert sep.headline["top1"] == 1.0
    # coarse grid (9) + refinement (4) around the best, all reported
    assert len(sep.sweep) == 9 + 2 and all("val_score" in r for r in sep.sweep)  # coarse grid + refinement
    assert sep.eval_split == "val" and sep.notes


@pytest.mark.slow
def test_no_refit_keeps_the_head_that_was_scored_on_validation(tmp_path):
    from sklearn.metrics import log_loss

    X, y = blobs(40, 16, 4, sep=0.5, seed=3)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y, splits=_splits(len(y)))
    kept = fit(cache, "linear", out=tmp_path / "models" / "kept", refit=False)
    refit = fit(cache, "linear", out=tmp_path / "models" / "refit")
    assert kept.chosen == refit.chosen  # same sweep, same choice
    c = featbank.open_cache(cache)
    row = {p: i for i, p in enumerate(c.paths)}
    for r, fitted_on in ((kept, "train"), (refit, "train+val")):
        b = featbank.load_bundle(r.path)
        assert b.manifest["training"]["fitted_on"] == fitted_on
        val_rows = np.sort([row[p] for p in b.manifest["validation"]["paths"]])
        loss = log_loss(c.labels[val_rows], b.predict_proba(c.load_embeddings(val_rows)), labels=range(4))
        if fitted_on == "train":  # the saved head is the one the sweep scored: val loss as reported
            assert loss == pytest.approx(r.metrics["val"]["log_loss"], rel=1e-4)
        else:  # refitted on the validation rows too: they now fit better than the sweep said
            assert loss < r.metrics["val"]["log_loss"] - 1e-3


@pytest.mark.slow
def test_uses_test_split_and_saves_a_complete_bundle(tmp_path):
    X, y = blobs(40, 16, 4, sep=0.8, seed=2)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y, splits=_splits(len(y)))
    r = fit(cache, "linear", out=tmp_path / "models", class_weight="balanced")
    assert r.eval_split == "test" and r.n_test == int((_splits(len(y)) == 2).sum())
    m = r.headline
    assert {"top1", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(m)
    assert "top5" not in m  # only 4 classes
    for f in ("manifest.json", "head.safetensors", "metrics.json", "confusion_matrix.png", "per_class_recall.png",
              "misclassified.png"):
        assert (r.path / f).is_file(), f
    b = featbank.load_bundle(r.path)
    assert b.manifest["head"]["chosen_C"] == r.chosen["C"]
    assert b.manifest["head"]["preprocessing"] == {"standardize": True, "l2_normalize": False}
    assert len(b.manifest["validation"]["paths"]) == r.n_val > 0
    assert b.cache_key == "synthetic-key"
    ev = evaluate(r.path, cache, split="test")
    assert ev.metrics["top1"] == pytest.approx(m["top1"])


def test_top5_with_many_classes_and_val_split_of_the_cache(tmp_path):
    X, y = blobs(12, 8, 6, sep=1.0)
    splits = np.zeros(len(y), np.int8)
    splits[::4] = 1  # val
    splits[1::4] = 2  # test
    r = fit(write_synthetic_cache(tmp_path / "c.h5", X, y, splits=splits), save=False)
    assert "top5" in r.headline and r.n_val == int((splits == 1).sum())


def test_streaming_fit_matches_in_memory(tmp_path):
    X, y = blobs(200, 32, 3, sep=0.4, seed=4)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y, splits=_splits(len(y)))
    mem = fit(cache, "linear", params={"C": 0.05}, save=False)
    stream = fit(cache, "linear", params={"C": 0.05}, save=False, max_memory="100KB")
    assert stream.streaming and not mem.streaming
    np.testing.assert_allclose(stream.estimator.predict_proba(X), mem.estimator.predict_proba(X), atol=1e-3)
    assert stream.headline["top1"] == pytest.approx(mem.headline["top1"], abs=0.01)
    with pytest.raises(ConfigError, match="only 'linear' and 'mlp' stream"):
        fit(cache, "SVC", save=False, max_memory="100KB")


@pytest.mark.slow
def test_shots_report_mean_and_std_over_seeds(tmp_path):
    X, y = blobs(30, 8, 3, sep=1.0)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y, splits=_splits(len(y)))
    r = fit(cache, shots=5, seeds=[0, 1, 2], save=False)
    s = r.metrics["shots"]
    assert s["shots"] == 5 and s["seeds"] == [0, 1, 2] and len(s["top1_per_seed"]) == 3
    assert s["top1_std"] >= 0 and 0 < s["top1_mean"] <= 1
    assert r.n_train + r.n_val == 15
    with pytest.raises(ConfigError, match="only"):
        fit(cache, shots=1000, save=False)
    with pytest.raises(ConfigError, match="--shots"):
        fit(cache, seeds=[0, 1], save=False)


# ---- refusals: clear error, nothing written ------------------------------------------------


def _refuses(tmp_path, exc, match, cache, **kw):
    out = tmp_path / "models-out"
    with pytest.raises(exc, match=match):
        fit(cache, out=out, **kw)
    assert not out.exists()


def test_refuses_missing_and_foreign_files(tmp_path):
    _refuses(tmp_path, CacheError, "does not exist", tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    _refuses(tmp_path, CacheError, "not a featbank cache .not an HDF5 file", tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    _refuses(tmp_path, CacheError, "not a featbank cache", tmp_path / "other.h5")


def test_refuses_unknown_schema_version(tmp_path):
    X, y = blobs(5, 4, 2, sep=1.0)
    path = write_synthetic_cache(tmp_path / "c.h5", X, y)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    _refuses(tmp_path, CacheError, "schema version 99", path)


def test_refuses_unlabelled_single_class_and_tiny_class(tmp_path):
    X, y = blobs(5, 4, 2, sep=1.0)
    _refuses(tmp_path, CacheError, "no labels", write_synthetic_cache(tmp_path / "a.h5", X, -np.ones(10, np.int64)))
    _refuses(tmp_path, ConfigError, "single class", write_synthetic_cache(tmp_path / "b.h5", X, np.zeros(10, np.int64)))
    y1 = np.array([0] * 9 + [1])
    _refuses(tmp_path, ConfigError, r"at least 2 training images.*'c1' \(1\)", write_synthetic_cache(tmp_path / "c.h5", X, y1))


def test_refuses_nan_and_inf_embeddings(tmp_path):
    X, y = blobs(5, 4, 2, sep=1.0)
    X[3, 1] = np.nan
    _refuses(tmp_path, CacheError, "NaN or infinite.*img_00003", write_synthetic_cache(tmp_path / "n.h5", X, y))
    X[3, 1] = np.inf
    _refuses(tmp_path, CacheError, "NaN or infinite", write_synthetic_cache(tmp_path / "i.h5", X, y))


def test_refuses_unknown_head_and_parameter(tmp_path):
    X, y = blobs(5, 4, 2, sep=1.0)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y)
    _refuses(tmp_path, ConfigError, "Did you mean 'RandomForestClassifier'", cache, head="RandomForest")
    _refuses(tmp_path, ConfigError, "no parameter 'hidden'", cache, head="mlp", params={"hidden": 3})
    _refuses(tmp_path, ConfigError, "val-split", cache, val_split=1.5)


@pytest.mark.slow
def test_evaluate_refuses_a_cache_of_other_settings(tmp_path):
    X, y = blobs(10, 4, 2, sep=1.0)
    r = fit(write_synthetic_cache(tmp_path / "a.h5", X, y), out=tmp_path / "m")
    other_key = write_synthetic_cache(tmp_path / "b.h5", X, y, key="another-key")
    with pytest.raises(BundleError, match="cache key"):
        evaluate(r.path, other_key)
    X8, _ = blobs(10, 8, 2, sep=1.0)
    with pytest.raises(BundleError, match="expects 4-d embeddings"):
        evaluate(r.path, write_synthetic_cache(tmp_path / "c.h5", X8, y))


@pytest.mark.slow
def test_mlp_and_sklearn_heads_on_a_real_cache(tiny_cache, tmp_path):
    r = fit(tiny_cache, "mlp", params={"hidden_sizes": (16,), "max_epochs": 30}, out=tmp_path / "m1")
    assert r.chosen["epochs"] >= 1 and r.headline["top1"] >= 0.6
    s = fit(tiny_cache, "KNeighborsClassifier", params={"n_neighbors": 3}, out=tmp_path / "m2")
    assert s.headline["top1"] >= 0.6 and (s.path / "head.skops").is_file()


def test_sklearn_head_with_c_is_swept_on_validation(tmp_path):
    """SVC's C is chosen on validation like the linear probe's: a strong C wins on noisy labels, a weak one on clean."""
    from featbank.heads import SKLEARN_C_GRID

    X, y = blobs(60, 20, 3, sep=1.2, seed=3)
    r = fit(write_synthetic_cache(tmp_path / "c.h5", X, y), "SVC", params={"kernel": "linear"}, save=False)
    tried = [row["C"] for row in r.sweep]
    assert set(SKLEARN_C_GRID) <= set(tried) and len(tried) == len(SKLEARN_C_GRID) + 2  # + the refinement
    best = max(row["val_score"] for row in r.sweep)
    chosen = [row for row in r.sweep if row["C"] == r.chosen["C"]][0]
    assert chosen["val_score"] == best and r.chosen["C"] == min(row["C"] for row in r.sweep if row["val_score"] == best)
    assert r.estimator[-1].C == r.chosen["C"]
    # --param C=... fixes it: no sweep.
    fixed = fit(write_synthetic_cache(tmp_path / "d.h5", X, y), "SVC", params={"C": 2.0}, save=False)
    assert fixed.sweep == [] and fixed.estimator[-1].C == 2.0


def test_fit_config_is_stored_in_the_bundle_and_repeats_the_fit(tmp_path):
    from featbank.fitting import FitConfig

    X, y = blobs(30, 8, 3, sep=0.7, seed=6)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y, splits=_splits(len(y)))
    r = fit(cache, "linear", out=tmp_path / "m", class_weight="balanced", seed=3)
    stored = featbank.load_bundle(r.path).manifest["fit_config"]
    assert stored["head"] == "linear" and stored["class_weight"] == "balanced" and stored["seed"] == 3
    assert stored["out"] == str(tmp_path / "m") and stored["seeds"] == [0] and stored["tta"] == "auto"
    config = FitConfig.from_dict(stored)
    assert config.to_dict() == stored
    again = fit(cache, config=FitConfig.from_dict({**stored, "save": False}))
    assert again.chosen == r.chosen and again.headline["top1"] == r.headline["top1"]


@pytest.mark.parametrize("options, message", [
    ({"class_weight": "heavy"}, "class_weight must be None or 'balanced'; got 'heavy'"),
    ({"tta": "sometimes"}, "The 'tta' parameter must be one of auto, on, off. Got 'sometimes' instead."),
    ({"shots": 0}, "--shots must be a positive integer; got 0"),
    ({"seeds": (0, 1)}, "--seeds repeats K-shot sampling"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda; got 'tpu'"),
    ({"max_memory": "lots"}, "--max-memory must look like 2GB"),
    ({"auto": True, "budget": "soon"}, "budget"),
    ({"cv": 5, "shots": 3}, "--shots samples a few images per class"),
    ({"out": "a", "name": "b"}, "--out is the bundle folder itself"),
    ({"head": "svm-rbf"}, "--head svm-rbf is a head family of --auto"),
])
def test_fit_config_refuses_bad_options_before_the_cache_is_opened(tmp_path, options, message):
    from featbank.fitting import FitConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        FitConfig(**options)
    with pytest.raises(ConfigError):  # not the CacheError of the missing file: the options are checked first
        fit(tmp_path / "missing.h5", **options)


def test_fit_refuses_an_option_it_does_not_have_and_a_stored_config_with_one(tmp_path):
    from featbank.fitting import FitConfig

    with pytest.raises(TypeError, match="unexpected keyword argument.*'regularisation'.*fields of FitConfig"):
        fit(tmp_path / "c.h5", regularisation=1.0)
    with pytest.raises(ConfigError, match="fit_config has no option 'python'"):
        FitConfig.from_dict({"head": "linear", "python": "import os"})


@pytest.mark.parametrize("stored, message", [
    ("fit everything", "fit_config must be a JSON object"),
    ({"head": ["linear"]}, "The 'head' option of fit must be a head name"),
    ({"params": "C=1"}, "The 'params' option of fit must be a mapping"),
    ({"refit": "yes"}, "The 'refit' option of fit must be True or False"),
    ({"seed": "3"}, "The 'seed' option of fit must be an integer"),
    ({"cv": 2.5}, "The 'cv' option of fit must be an integer"),
    ({"seeds": "0,1"}, "The 'seeds' option of fit must be a list of integers"),
    ({"seeds": [0, "x"], "shots": 2}, "seeds must be integers"),
    ({"val_split": "0.2"}, "--val-split must be between 0 and 1"),
    ({"out": {"path": "/"}}, "The 'out' option of fit must be a folder path"),
    ({"__class__": "os.system"}, "fit_config has no option '__class__'"),
])
def test_a_hostile_fit_config_is_refused_with_a_config_error(stored, message):
    """fit_config is read back from a manifest anyone can edit: every bad field is a ConfigError, never a crash."""
    from featbank.fitting import FitConfig

    with pytest.raises(ConfigError, match=message):
        FitConfig.from_dict(stored)
