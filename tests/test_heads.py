"""The torch heads as scikit-learn estimators, their torch modules, streaming, sklearn heads by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from featbank.cache import open_cache
from featbank.errors import ConfigError
from featbank.heads import Features, LinearHead, MLPHead, head_to_torch, make_sklearn_head, parse_param

from _fitdata import blobs, write_synthetic_cache

# Minibatch SGD: a sample weight of 2 is not the same as a repeated row in a shuffled minibatch
# stream, so this exact-equivalence check does not apply to the MLP (it holds for LinearHead).
_MLP_EXPECTED = {"check_sample_weight_equivalence_on_dense_data": "minibatch SGD: weights != repeated rows"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _expected(est):
    return _MLP_EXPECTED if isinstance(est, MLPHead) else {}


@parametrize_with_checks(
    [LinearHead(tol=1e-8, max_iter=100), MLPHead(hidden_sizes=(16,), lr=1e-2, max_epochs=20, batch_size=64, random_state=0)],
    expected_failed_checks=_expected,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_linear_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(40, 12, 4, sep=0.6, seed=1)
    X = X.astype(np.float64)
    for C in (0.01, 1.0):
        head = LinearHead(C=C, tol=1e-9).fit(X, y)
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(StandardScaler().fit_transform(X), y)
        Xs = StandardScaler().fit(X).transform(X)
        np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Xs), atol=1e-4)


@pytest.mark.parametrize("make", [lambda: LinearHead(C=0.5, l2_normalize=True),
                                  lambda: MLPHead(hidden_sizes=(8,), max_epochs=5, random_state=0)])
def test_to_torch_softmax_equals_predict_proba(make):
    X, y = blobs(20, 6, 3, sep=1.0)
    head = make().fit(X, y)
    with torch.no_grad():
        p = torch.softmax(head.to_torch()(torch.as_tensor(X)), 1).numpy()
        q = head_to_torch(head)(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(p, head.predict_proba(X), atol=1e-5)
    np.testing.assert_allclose(q, head.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("name", ["LogisticRegression", "LinearSVC", "RidgeClassifier"])
@pytest.mark.parametrize("k", [2, 3])
def test_head_to_torch_for_linear_sklearn_pipelines(name, k):
    from featbank.heads import estimator_proba

    X, y = blobs(20, 6, k, sep=1.0)
    est = make_sklearn_head(name, {}, l2_normalize=True).fit(X, y)
    with torch.no_grad():
        got = head_to_torch(est)(torch.as_tensor(X)).numpy()
    # estimator_proba is the bundles' canonical definition (Bundle.predict_proba uses it)
    np.testing.assert_allclose(got, estimator_proba(est, X, k), atol=1e-5)
    assert head_to_torch(make_sklearn_head("KNeighborsClassifier", {}).fit(X, y)) is None


@pytest.mark.slow
def test_linear_streaming_equals_in_memory(tmp_path):
    X, y = blobs(150, 24, 3, sep=0.5, seed=3)
    path = write_synthetic_cache(tmp_path / "c.h5", X, y)
    with open_cache(path) as cache:
        streamed = Features(cache=cache, rows=np.arange(len(y)), chunk_rows=64)
        a = LinearHead(C=0.3, tol=1e-8).fit(streamed, y)
        b = LinearHead(C=0.3, tol=1e-8).fit(X, y)
        assert streamed.n_chunks > 5
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=2e-4)
        np.testing.assert_allclose(a.mean_, b.mean_, rtol=1e-5, atol=1e-6)
        # Same minibatch size and count either way; only the shuffling differs (chunk-wise when streamed).
        m1 = MLPHead(hidden_sizes=(16,), max_epochs=20, batch_size=32, random_state=0).fit(streamed, y)
        m2 = MLPHead(hidden_sizes=(16,), max_epochs=20, batch_size=32, random_state=0).fit(X, y)
        assert abs(m1.score(X, y) - m2.score(X, y)) < 0.1 and m1.score(X, y) > 0.8


def test_sample_weight_equals_repeated_rows():
    X, y = blobs(15, 5, 3, sep=0.7)
    sw = np.random.default_rng(0).integers(1, 4, len(y))
    a = LinearHead(tol=1e-9).fit(X, y, sample_weight=sw)
    b = LinearHead(tol=1e-9).fit(np.repeat(X, sw, 0), np.repeat(y, sw))
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-5)


def test_class_weight_balanced_raises_minority_recall():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(0.8, 1, (20, 4))]).astype(np.float32)
    y = np.r_[np.zeros(300), np.ones(20)].astype(int)
    plain = LinearHead().fit(X, y)
    bal = LinearHead(class_weight="balanced").fit(X, y)
    assert (bal.predict(X[y == 1]) == 1).mean() > (plain.predict(X[y == 1]) == 1).mean()


def test_unknown_sklearn_head_and_param_suggest_names():
    with pytest.raises(ConfigError, match="Did you mean 'LogisticRegression'"):
        make_sklearn_head("LogisticRegresion", {})
    with pytest.raises(ConfigError, match="did you mean 'n_neighbors'"):
        make_sklearn_head("KNeighborsClassifier", {"n_neighbor": 3})


def test_parse_param_literals():
    assert parse_param("C=0.5") == ("C", 0.5)
    assert parse_param("hidden_sizes=(512,256)") == ("hidden_sizes", (512, 256))
    assert parse_param("kernel=rbf") == ("kernel", "rbf")
    assert parse_param("max_depth=None") == ("max_depth", None)
    assert parse_param("fit_intercept=false") == ("fit_intercept", False)
    with pytest.raises(ConfigError, match="key=value"):
        parse_param("C0.5")


def test_misspelt_featbank_head_suggests_it() -> None:
    from featbank.errors import ConfigError
    from featbank.heads import make_sklearn_head

    with pytest.raises(ConfigError, match="Did you mean 'linear'"):
        make_sklearn_head("linaer", {})
    with pytest.raises(ConfigError, match="Did you mean 'mlp'"):
        make_sklearn_head("mpl", {})


@pytest.mark.parametrize("make,msg", [
    (lambda: LinearHead(C=-1), "The 'C' parameter of LinearHead must be a float > 0. Got -1 instead."),
    (lambda: LinearHead(C=True), "The 'C' parameter of LinearHead"),
    (lambda: LinearHead(max_iter="abc"), "The 'max_iter' parameter of LinearHead must be an int >= 1. Got 'abc' instead."),
    (lambda: LinearHead(class_weight="auto"), "The 'class_weight' parameter of LinearHead"),
    (lambda: MLPHead(dropout=2), "The 'dropout' parameter of MLPHead must be a float in [0, 1). Got 2 instead."),
    (lambda: MLPHead(hidden_sizes=(8, -1)), "The 'hidden_sizes' parameter of MLPHead"),
    (lambda: MLPHead(batch_size=0), "The 'batch_size' parameter of MLPHead"),
    (lambda: MLPHead(validation_fraction=1.0), "The 'validation_fraction' parameter of MLPHead"),
])
def test_bad_parameters_raise_a_config_error_at_fit(make, msg):
    X, y = blobs(10, 4, 2, 3.0)
    with pytest.raises(ConfigError) as info:
        make().fit(X, y)
    assert msg in str(info.value)
    assert isinstance(info.value, ValueError)  # scikit-learn's contract for invalid parameters


def test_fit_library_refuses_bad_head_parameters_before_writing(tmp_path):
    from featbank.fitting import fit

    X, y = blobs(20, 4, 2, 3.0)
    cache = write_synthetic_cache(tmp_path / "c.h5", X, y)
    for head, params in [("linear", {"C": -1}), ("mlp", {"dropout": 2}), ("linear", {"max_iter": "abc"})]:
        with pytest.raises(ConfigError, match="parameter of"):
            fit(cache, head, params=params, out=tmp_path / "models" / "m")
    assert not (tmp_path / "models").exists()


def test_featbank_uses_only_public_scikit_learn_api():
    import ast
    from pathlib import Path

    import featbank

    private = []
    for path in Path(featbank.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sklearn":
                names = [node.module, *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "sklearn"]
            else:
                continue
            if any(part.startswith("_") for n in names for part in n.split(".")):
                private.append(f"{path.name}:{node.lineno}")
    assert not private, private


def test_class_weight_naming_unknown_classes_is_a_parameter_error():
    X, y = blobs(10, 4, 2, 3.0)
    with pytest.raises(ConfigError, match="The 'class_weight' parameter of LinearHead must name classes"):
        LinearHead(class_weight={7: 1.0}).fit(X, y)
    with pytest.raises(ConfigError, match="The 'class_weight' parameter of MLPHead must be"):
        MLPHead(class_weight={0: "x"}).fit(X, y)


@pytest.mark.parametrize("counts", [[3, 3, 2, 2, 2], [4, 4, 4, 4, 4], [8, 8, 8, 8, 8], [30, 1, 1], [60, 20, 20]])
def test_mlp_early_stopping_holds_out_its_fraction_stratified_where_it_can(counts):
    """10% of 12-40 rows is 2-4 rows, fewer than the 5 classes, and a class of one row cannot be split:
    the hold-out is then drawn at random (a stratified split raised); of 100 rows in 3 classes, stratified."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(counts)), counts)
    X = rng.normal(size=(len(y), 6)).astype(np.float32) + y[:, None]
    m = MLPHead(hidden_sizes=(8,), max_epochs=3, early_stopping=True, random_state=0).fit(X, y)
    assert m.predict(X).shape == (len(y),) and 1 <= m.n_epochs_ <= 3
