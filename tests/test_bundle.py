"""Model bundles: save -> load -> identical predictions; corrupt or foreign bundles are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featbank.bundles import load_bundle, save_bundle
from featbank.errors import BundleError
from featbank.fitting import fit

from _fitdata import blobs, write_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    X, y = blobs(20, 8, 3, sep=0.8)
    return X, write_synthetic_cache(d / "c.h5", X, y), d


@pytest.mark.parametrize("head,params", [("linear", {}), ("mlp", {"hidden_sizes": (8,), "max_epochs": 10}),
                                         ("LogisticRegression", {"C": 0.5}), ("SVC", {}), ("RidgeClassifier", {})])
def test_round_trip_gives_identical_predictions(data, head, params):
    X, cache, d = data
    r = fit(cache, head, params=params, out=d / "models" / head)
    b = load_bundle(r.path)
    assert b.kind == "head" and b.classes == ["c0", "c1", "c2"] and b.embed_dim == 8
    p = b.predict_proba(X)
    assert p.shape == (len(X), 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    expected = r.estimator.predict(X)
    assert np.array_equal(np.asarray(b.load_head().predict(X)), expected)
    if hasattr(r.estimator, "predict_proba") and head != "SVC":
        np.testing.assert_array_equal(p, r.estimator.predict_proba(X))
    m = json.loads((r.path / "manifest.json").read_text())
    assert m["format"] == "featbank-bundle" and m["bundle_version"] == 1 and len(m["bundle_id"]) == 16
    assert m["head"]["sha256"] == m["files"][m["head"]["file"]]


def test_tampered_missing_and_foreign_bundles_are_refused(data, tmp_path):
    X, cache, d = data
    r = fit(cache, "LogisticRegression", out=tmp_path)
    f = r.path / r.path.joinpath("manifest.json").read_text().split('"file": "')[1].split('"')[0]
    f.write_bytes(f.read_bytes() + b"x")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(r.path).load_head()
    f.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(r.path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "plain")
    with pytest.raises(BundleError, match="not a featbank bundle"):
        save_bundle(tmp_path / "plain", {"kind": "head", "classes": ["a", "b"], "backbone": {"backbone": "test_tiny"},
                                         "head": {"type": "linear", "file": "head.safetensors"}},
                    {"head.safetensors": b"x"}, overwrite=True)
    assert (tmp_path / "plain" / "keep.txt").read_text() == "mine"


def test_future_bundle_version_is_refused(data, tmp_path):
    X, cache, d = data
    r = fit(cache, "linear", params={"C": 1.0}, out=tmp_path)
    m = json.loads((r.path / "manifest.json").read_text())
    m["bundle_version"] = 7
    (r.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle_version 7"):
        load_bundle(r.path)


def test_save_bundle_replaces_an_old_bundle_atomically(tmp_path):
    man = {"kind": "head", "classes": ["a", "b"], "backbone": {"backbone": "test_tiny", "embed_dim": 2},
           "head": {"type": "sklearn", "file": "head.skops"}}
    p = save_bundle(tmp_path / "b", dict(man), {"head.skops": b"one"})
    with pytest.raises(BundleError, match="already exists. Pass --overwrite"):
        save_bundle(tmp_path / "b", dict(man, head=dict(man["head"])), {"head.skops": b"two"})
    assert (p / "head.skops").read_bytes() == b"one"
    save_bundle(tmp_path / "b", dict(man, head=dict(man["head"])), {"head.skops": b"two"}, overwrite=True)
    assert (p / "head.skops").read_bytes() == b"two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b"]  # no temp folders or lock left behind


def test_trusted_skops_types_are_exact_names():
    from featbank.bundles import trusted_skops_types

    trusted = trusted_skops_types()
    assert "sklearn.pipeline.Pipeline" in trusted and "sklearn.svm._classes.SVC" in trusted
    assert all(not t.endswith(".") and t.count(".") >= 1 for t in trusted)
    assert not any(t.startswith(("numpy.testing", "os.", "posix.", "subprocess.", "operator.")) for t in trusted)
    # builtins: data types only (skops builds them), never a builtin callable
    assert {t for t in trusted if t.startswith("builtins.")} <= {
        f"builtins.{n}" for n in ("dict", "list", "tuple", "set", "str", "int", "float", "bool", "NoneType")}
    assert "sklearn.metrics._dist_metrics.PyFuncDistance64" not in trusted


@pytest.mark.slow
def test_every_head_fit_accepts_saves_and_loads_with_the_trusted_types(tmp_path):
    """The allowlist is what featbank writes: every classifier `fit --head` accepts round-trips."""
    import warnings

    import skops.io as sio

    from featbank.bundles import serialize_sklearn
    from featbank.heads import make_sklearn_head, sklearn_classifiers

    X, y = blobs(12, 6, 3, sep=2.0)
    X = X - X.min()  # non-negative, for the naive Bayes heads that need counts
    variants = [(n, {}) for n in sklearn_classifiers()] + [
        ("KNeighborsClassifier", {"algorithm": "ball_tree", "metric": "manhattan"}), ("MLPClassifier", {"solver": "sgd"}),
        ("CalibratedClassifierCV", {"method": "isotonic"}), ("SVC", {"probability": True})]
    saved = 0
    for name, params in variants:
        try:
            est = make_sklearn_head(name, params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(X, y)
        except Exception:  # noqa: BLE001 - meta-estimators that need an inner estimator, etc.
            continue
        fname, data, _ = serialize_sklearn(est)  # raises if a type would not be trusted on load
        sio.loads(data, trusted=sorted(sio.get_untrusted_types(data=data)))
        saved += 1
    assert saved >= 30
