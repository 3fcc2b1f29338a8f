"""Head families for ``fit --auto``: cross-validated scores with shared work, estimators that deploy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

try:  # tests/ may or may not be a package
    from .conftest import cache_dir_env, make_image_folder
except ImportError:
    from conftest import cache_dir_env, make_image_folder

from featbank.errors import ConfigError
from featbank.heads import HEAD_FAMILIES, HeadFamily, estimator_proba, get_head_family


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """400 digits (8x8 images as 64 features), 4 classes, 3 stratified folds."""
    X, y = load_digits(n_class=4, return_X_y=True)
    X, y = X[:400].astype(np.float32), y[:400]
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    return X, y, folds


def _fold_score(est, X: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray) -> float:
    """Fit on the fold's rows and score top-1 as featbank does (argmax of estimator_proba)."""
    est.fit(X[fit], y[fit])
    return float(np.mean(estimator_proba(est, X[held]).argmax(1) == y[held]))


def test_registry_names_every_family_and_refuses_an_unknown_one() -> None:
    for name, fam in HEAD_FAMILIES.items():
        assert fam.name == name and isinstance(fam, HeadFamily)
        assert get_head_family(name) is fam
    with pytest.raises(ConfigError, match="Unknown head family 'svm'.*'linear'"):
        get_head_family("svm")


def test_linear_cv_scores_shape_determinism_and_refit_agreement(digits, one_thread) -> None:
    X, y, folds = digits
    fam = get_head_family("linear")
    grid = fam.default_grid(len(X), X.shape[1], 4)
    assert [p["C"] for p in grid] == sorted(p["C"] for p in grid) and len(grid) == 9
    grid = grid[2:7]  # C = 1e-4 .. 1
    s = fam.cv_scores(X, y, folds, grid)
    assert s.shape == (len(grid), len(folds)) and s.dtype == np.float64
    np.testing.assert_array_equal(s, fam.cv_scores(X, y, folds, grid))
    # The strongest regularisation is worse than C = 1 on these digits: the path really refits per C.
    assert s[-1].mean() > s[0].mean() + 0.02
    # Each score is what the estimator build() gives scores when fitted on the fold (within the
    # path's early stop: a loose tolerance may move a row or two).
    for i, p in enumerate(grid):
        for j, (fit, held) in enumerate(folds):
            assert abs(_fold_score(fam.build(p), X, y, fit, held) - s[i, j]) <= 2 / len(held) + 1e-12


def test_linear_family_refuses_what_it_cannot_do(digits) -> None:
    X, y, folds = digits
    fam = get_head_family("linear")
    with pytest.raises(ConfigError, match="no preprocessing 'l2'"):
        fam.cv_scores(X, y, folds, [{"C": 1.0}], preprocess="l2")
    with pytest.raises(ConfigError, match=r"parameters \['C'\]; got \['gamma'\]"):
        fam.build({"gamma": 1.0})
    with pytest.raises(ConfigError, match="empty grid"):
        fam.cv_scores(X, y, folds, [])
    with pytest.raises(ConfigError, match="Fold 0 has 0 fit rows"):
        fam.cv_scores(X, y, [(np.array([], int), folds[0][1])], [{"C": 1.0}])
    assert fam.relative_cost(1000, 100, 9) > fam.relative_cost(100, 100, 9) > 0


@pytest.fixture(scope="module")
def hard_digits() -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """300 digits of 10 classes with noise added: no setting scores 100%, so a wrong fit shows."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    X = (X[:300] + rng.normal(0, 4.0, (300, 64))).astype(np.float32)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y[:300]))
    return X, y[:300], folds


@pytest.mark.parametrize("name", ["svm-rbf", "svm-linear"])
@pytest.mark.parametrize("preprocess", ["standardize", "l2", "sqrt"])
@pytest.mark.parametrize("shared", [False, True])
def test_svm_cv_scores_equal_fitting_build_on_each_fold(hard_digits, name, preprocess, shared) -> None:
    """With or without a shared FoldKernels (filled first by the other families, so this one reads it)."""
    from featbank.heads import FoldKernels

    X, y, folds = hard_digits
    fam = get_head_family(name)
    grid = fam.default_grid(len(X), X.shape[1], 10)
    grid = grid[::2]
    kw = {}
    if shared:
        kw["kernels"] = FoldKernels()
        get_head_family("knn").cv_scores(X, y, folds, [{"k": 1}], preprocess=preprocess, **kw)
        assert kw["kernels"].computed == len(folds)
    s = fam.cv_scores(X, y, folds, grid, preprocess=preprocess, **kw)
    assert s.shape == (len(grid), len(folds))
    if shared:
        assert kw["kernels"].computed == len(folds) and kw["kernels"].reused == len(folds)
    np.testing.assert_array_equal(s, fam.cv_scores(X, y, folds, grid, preprocess=preprocess))
    assert s.max() - s.min() > 0.05 and s.max() < 1.0  # the settings differ and the task is not trivial
    for i, p in enumerate(grid):
        for j, (fit, held) in enumerate(folds):
            assert _fold_score(fam.build(p, preprocess=preprocess), X, y, fit, held) == s[i, j], (p, j)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_kernel_svc_predicts_as_sklearn_svc_fitted_on_the_same_rows(hard_digits, kernel) -> None:
    """Same solver, same kernel up to rounding: equal predictions; decision values within the solver's
    stopping tolerance (libsvm's SMO stops at tol, so ulp-level kernel differences move the
    solution by ~5e-6 relative at SVC's default tol=1e-3, by < 1e-6 at tol=1e-4)."""
    from sklearn.svm import SVC

    from featbank.heads import KernelSVC

    X, y, _ = hard_digits
    X = (X - X.mean(0)) / X.std(0)
    for C, gs in ((0.3, 1.0), (10.0, 2.0)):
        for rows in (slice(0, 200), np.flatnonzero(y < 2)[:60]):  # multiclass and binary
            for tol, rtol in ((1e-3, 2e-5), (1e-4, 1e-6)):
                k = KernelSVC(C=C, kernel=kernel, gamma_scale=gs, tol=tol).fit(X[rows], y[rows])
                ref = SVC(C=C, kernel=kernel, gamma=k._gamma, tol=tol).fit(X[rows], y[rows])
                if kernel == "rbf":
                    assert k._gamma == pytest.approx(gs / (X.shape[1] * X[rows].astype(np.float64).var()))
                np.testing.assert_array_equal(k.support_, ref.support_)
                np.testing.assert_array_equal(k.predict(X[200:]), ref.predict(X[200:]))
                d, dref = k.decision_function(X[200:]), ref.decision_function(X[200:])
                assert np.abs(d - dref).max() <= rtol * np.abs(dref).max(), (C, tol)


def test_kernel_svc_refuses_bad_parameters() -> None:
    from featbank.heads import KernelSVC

    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    with pytest.raises(ConfigError, match="'kernel' parameter of KernelSVC must be one of"):
        KernelSVC(kernel="poly").fit(X, y)
    with pytest.raises(ConfigError, match="'gamma_scale' parameter of KernelSVC must be a float > 0. Got -1"):
        KernelSVC(gamma_scale=-1).fit(X, y)
    with pytest.raises(ConfigError, match="'C' parameter"):
        get_head_family("svm-rbf").build({"C": 0.0, "gamma_scale": 1.0})


@pytest.mark.parametrize("preprocess", ["standardize", "l2", "sqrt"])
@pytest.mark.parametrize("shared", [False, True])
def test_knn_cv_scores_equal_kneighborsclassifier_on_each_fold(hard_digits, preprocess, shared) -> None:
    """Scikit-learn's neighbour search, or the distances of the shared Gram matrix: the same votes."""
    from sklearn.neighbors import KNeighborsClassifier

    from featbank.heads import FoldKernels

    X, y, folds = hard_digits
    fam = get_head_family("knn")
    grid = fam.default_grid(len(X), X.shape[1], 10)
    assert [p["k"] for p in grid] == [1, 3, 5, 10, 20, 50]
    assert [p["k"] for p in fam.default_grid(12, 64, 2)] == [1, 3, 5]
    kernels = FoldKernels() if shared else None
    s = fam.cv_scores(X, y, folds, grid, preprocess=preprocess, kernels=kernels)
    if shared:
        assert kernels.computed == len(folds) and kernels.refused == 0
    assert s.shape == (len(grid), len(folds)) and s.max() - s.min() > 0.02
    for i, p in enumerate(grid):
        for j, (fit, held) in enumerate(folds):
            est = fam.build(p, preprocess=preprocess)
            assert isinstance(est[-1], KNeighborsClassifier) and est[-1].n_neighbors == p["k"]
            assert _fold_score(est, X, y, fit, held) == s[i, j], (p, j)
            assert np.mean(est.predict(X[held]) == y[held]) == s[i, j]  # predict agrees with the argmax
    with pytest.raises(ConfigError, match="k = 500 neighbours but a fold fits on 200"):
        fam.cv_scores(X, y, folds, [{"k": 500}])
    with pytest.raises(ConfigError, match="'k' must be an int >= 1"):
        fam.build({"k": 0})


@pytest.mark.parametrize(("name", "params"), [("knn", {"k": 5}), ("svm-rbf", {"C": 3.0, "gamma_scale": 1.0}),
                                              ("svm-linear", {"C": 0.1})])
@pytest.mark.parametrize("preprocess", ["standardize", "l2", "sqrt"])
def test_torch_modules_of_knn_and_svm_equal_estimator_proba(hard_digits, name, params, preprocess) -> None:
    """What export puts in the graph: multiclass and binary, to float32 rounding."""
    import torch

    from featbank.heads import head_to_torch

    X, y, _ = hard_digits
    for rows in (slice(0, 200), np.flatnonzero(y < 2)[:60]):
        est = get_head_family(name).build(params, preprocess=preprocess).fit(X[rows], y[rows])
        with torch.no_grad():
            p = head_to_torch(est)(torch.from_numpy(X[200:])).double().numpy()
        ref = estimator_proba(est, X[200:])
        np.testing.assert_allclose(p, ref, atol=1e-6)
        assert (p.argmax(1) == ref.argmax(1)).all()


def test_fold_kernels_share_one_gram_per_fold_within_a_memory_bound(hard_digits) -> None:
    """One Gram matrix per (matrix, preprocessing, fold) for svm-rbf, svm-linear and knn; least recently
    used entries dropped beyond the bound; a fold larger than the bound is not stored (the families
    compute it themselves, with the same scores)."""
    from featbank.heads import FoldKernels

    X, y, folds = hard_digits
    one = FoldKernels.fold_bytes(len(folds[0][0]), len(folds[0][1]))
    for bound, computed, reused, refused, kept in ((1 << 30, 3, 6, 0, 3), (one + 10, 9, 0, 0, 1), (one - 1, 0, 0, 9, 0)):
        k = FoldKernels(bound)
        out = {n: get_head_family(n).cv_scores(X, y, folds, get_head_family(n).default_grid(200, 64, 10)[:3],
                                               kernels=k) for n in ("svm-rbf", "svm-linear", "knn")}
        assert (k.computed, k.reused, k.refused, len(k._store)) == (computed, reused, refused, kept), bound
        assert k.nbytes <= bound
        for n, sc in out.items():  # the same scores as without sharing
            fam = get_head_family(n)
            np.testing.assert_array_equal(sc, fam.cv_scores(X, y, folds, fam.default_grid(200, 64, 10)[:3]))
    k = FoldKernels()
    a = k.get(X, *folds[0], "standardize")
    assert k.get(X, *folds[0], "l2") is not a and k.get(X.copy(), *folds[0], "standardize") is not a
    assert k.get(X, *folds[0], "standardize") is a and k.has(X, *folds[0], "standardize")
    assert not k.has(X, *folds[1], "standardize")
    assert a.G_ff.shape == (len(folds[0][0]),) * 2 and a.G_hf.shape == (len(folds[0][1]), len(folds[0][0]))


@pytest.mark.parametrize("preprocess, rtol", [("standardize", 1e-12), ("sqrt", 1e-12), ("l2", 1e-5)])
def test_fold_kernels_sum_a_matrix_from_its_column_blocks(hard_digits, preprocess, rtol) -> None:
    """A matrix registered as column blocks gets the Gram matrix one product gives (l2: to float32
    rounding, see featbank.heads._gram); a second matrix holding some of the blocks reuses them."""
    from featbank.heads import FoldKernels
    from featbank.heads._gram import fold_gram, fold_rows

    X, y, folds = hard_digits
    X = X.copy()
    X[:, 7] = 2.5  # a constant column: standardised to 0, as StandardScaler does
    fit, held = folds[0]
    k = FoldKernels()
    k.register(X, [("a", np.arange(0, 20)), ("b", np.arange(20, 50)), ("c", np.arange(50, 64))])
    sub = np.ascontiguousarray(X[:, 20:64])
    k.register(sub, [("b", np.arange(0, 30)), ("c", np.arange(30, 44))])
    assert k.stored_share(X, fit, held, preprocess) == 0.0
    for M in (X, sub):
        got, want = k.get(M, fit, held, preprocess), fold_gram(*fold_rows(M, fit, held, preprocess))
        for f in ("G_ff", "G_hf", "sq_f", "sq_h"):
            np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=rtol, atol=rtol, err_msg=f)
        assert got.var_f == pytest.approx(want.var_f, rel=rtol) and got.n_features == want.n_features
    # sub's blocks were stored by X's fold (block a, which no other matrix holds, was summed and dropped)
    assert (k.blocks_computed, k.blocks_reused, k.computed, k.reused) == (3, 2, 1, 1)
    assert sorted(key[1] for key in k._store if key[0] == "block") == ["b", "c"]
    assert k.stored_share(sub, fit, held, preprocess) == 1.0
    other = sub[:, :30]  # block b alone, not yet registered: nothing to share
    assert k.stored_share(other, *folds[1], preprocess) == 0.0
    k.register(other, [("b", np.arange(30))])
    assert k.stored_share(other, fit, held, preprocess) == 1.0 and k.stored_share(sub, *folds[1], preprocess) == 0.0
    k.get(X, *folds[1], preprocess)
    k2 = FoldKernels()
    k2.register(X, [("a", np.arange(0, 20)), ("bc", np.arange(20, 64))])
    k2.get(X, *folds[1], preprocess)
    k2.register(sub, [("b", np.arange(0, 30)), ("c", np.arange(30, 44))])
    assert k2.stored_share(sub, *folds[1], preprocess) == 0.0  # other names: other numbers
    assert k.stored_share(X[:, :20].copy(), *folds[1], preprocess) == 0.0  # unregistered


def test_fold_kernels_l2_leaves_a_row_at_the_mean_as_the_normalizer_does(hard_digits) -> None:
    """A held-out row equal to the fit rows' mean centres to (almost) zero: scikit-learn's Normalizer
    leaves a float32 row whose norm is under 10 float32 eps as it is, and so do the summed blocks."""
    from featbank.heads import FoldKernels
    from featbank.heads._gram import fold_gram, fold_rows

    X, y, folds = hard_digits
    fit, held = folds[0]
    from sklearn.preprocessing import StandardScaler

    X = X / np.float32(100)  # small entries: the float32 rounding of the centring stays under 10 eps
    row = StandardScaler(with_std=False).fit(X[fit]).mean_.astype(np.float32)
    row[:8] = np.nextafter(row[:8], np.float32(np.inf))  # a few float32 ulps off the mean: not exactly 0
    X[held[0]] = row
    k = FoldKernels()
    k.register(X, [("a", np.arange(0, 40)), ("b", np.arange(40, 64))])
    got, want = k.get(X, fit, held, "l2"), fold_gram(*fold_rows(X, fit, held, "l2"))
    assert 0 < want.sq_h[0] < 1e-6  # the pipeline left it near zero: not scaled to unit length
    np.testing.assert_allclose(got.sq_h, want.sq_h, atol=1e-5)
    np.testing.assert_allclose(got.G_hf, want.G_hf, atol=1e-5)


def test_fold_kernels_keep_a_matrixs_stored_blocks_while_computing_its_others(hard_digits) -> None:
    """A block already stored is taken before the others are computed, so storing them cannot evict it:
    what the plan counted as paid (stored_share) is not paid again."""
    from featbank.heads import FoldKernels

    X, y, folds = hard_digits
    fit, held = folds[0]
    part = FoldKernels.fold_bytes(len(fit), len(held)) + 8 * len(fit)
    k = FoldKernels(4 * part)
    k.register(X, [("a", np.arange(0, 20)), ("b", np.arange(20, 40)), ("c", np.arange(40, 64))])
    k.register(X[:, 40:64].copy(), [("c", np.arange(24))])
    k.register(X[:, :40].copy(), [("a", np.arange(20)), ("b", np.arange(20, 40))])
    k.get(next(M for i, (M, b) in k._blocks.items() if len(b) == 1), fit, held, "standardize")  # stores c
    for j in range(2):  # two other matrices' folds: c is now the least recently used
        k.get(X[:, : 10 + j].copy(), fit, held, "standardize")
    assert k.stored_share(X, fit, held, "standardize") == pytest.approx(24 / 64)
    before = (k.blocks_computed, k.blocks_reused)
    k.get(X, fit, held, "standardize")
    assert (k.blocks_computed - before[0], k.blocks_reused - before[1]) == (2, 1)


def test_fold_kernels_use_blocks_only_where_a_folds_blocks_fit_in_the_bound(hard_digits) -> None:
    from featbank.heads import FoldKernels

    X, y, folds = hard_digits
    fit, held = folds[0]
    part = FoldKernels.fold_bytes(len(fit), len(held)) + 8 * len(fit)
    blocks = [("a", np.arange(0, 32)), ("b", np.arange(32, 64))]
    for bound, used in ((3 * part, True), (3 * part - 1, False)):
        k = FoldKernels(bound)
        k.register(X, blocks)
        k.get(X, fit, held, "standardize")
        assert (k.blocks_computed == 2) is used and k.computed == 1 and k.nbytes <= bound
    k = FoldKernels(3 * part)  # a wider matrix registered: its blocks would not fit, so no matrix is split
    k.register(X, blocks)
    k.register(X[:, :48].copy(), [("a", np.arange(0, 32)), ("b1", np.arange(32, 40)), ("b2", np.arange(40, 48))])
    k.get(X, fit, held, "standardize")
    assert k.blocks_computed == 0 and k.computed == 1
    k = FoldKernels()
    for bad in ([("a", np.arange(0, 32))], [("a", np.arange(0, 33)), ("b", np.arange(32, 64))],
                [("a", np.arange(0, 32)), ("a", np.arange(32, 64))]):
        with pytest.raises(ValueError, match="exactly once, under distinct names"):
            k.register(X, bad)


def test_l2_preprocessing_centres_on_the_fit_rows_then_normalises_rows(hard_digits) -> None:
    """'l2' is cosine similarity of centred rows: kNN's neighbours are those of the centred cosine."""
    X, y, folds = hard_digits
    fit, held = folds[0]
    est = get_head_family("knn").build({"k": 1}, preprocess="l2").fit(X[fit], y[fit])
    C = X[fit].astype(np.float64).mean(0)
    A = (X[fit] - C) / np.linalg.norm(X[fit] - C, axis=1, keepdims=True)
    B = (X[held] - C) / np.linalg.norm(X[held] - C, axis=1, keepdims=True)
    np.testing.assert_array_equal(est.predict(X[held]), y[fit][(B @ A.T).argmax(1)])


@pytest.mark.slow
def test_mlp_cv_scores_equal_fitting_build_on_each_fold(hard_digits, one_thread) -> None:
    X, y, folds = hard_digits
    fam = get_head_family("mlp")
    grid = fam.default_grid(len(X), X.shape[1], 10)[:2]
    s = fam.cv_scores(X, y, folds[:2], grid)
    assert s.shape == (2, 2) and 0.5 < s.min() and s.max() < 1.0
    for i, p in enumerate(grid):
        for j, (fit, held) in enumerate(folds[:2]):
            assert _fold_score(fam.build(p), X, y, fit, held) == s[i, j], (p, j)
    with pytest.raises(ConfigError, match="no preprocessing 'l2'"):
        fam.cv_scores(X, y, folds, grid, preprocess="l2")
    with pytest.raises(ConfigError, match="'dropout' parameter of MLPHead"):
        fam.build({"hidden_sizes": 8, "dropout": 2.0, "weight_decay": 0.0})


# --------------------------------------------------------------------------------------------
# Every family's estimator in a real bundle: saved, loaded, exported to ONNX with the parity check
# --------------------------------------------------------------------------------------------


def _bundle_with_head(src: Path, dst: Path, est: Any) -> Path:
    """A copy of the bundle ``src`` whose head is ``est`` (fitted), written by featbank's bundle writer."""
    from safetensors.numpy import save as st_save

    from featbank.bundles import save_bundle, serialize_sklearn
    from featbank.heads import LinearHead, MLPHead, head_state

    man = json.loads((src / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in src.iterdir()
             if p.is_file() and p.name not in ("manifest.json", man["head"]["file"])}
    if isinstance(est, (LinearHead, MLPHead)):
        tensors, info = head_state(est)
        htype = "linear" if isinstance(est, LinearHead) else "mlp"
        man["head"] = {"type": htype, "estimator": type(est).__name__, **info, "file": "head.safetensors"}
        files["head.safetensors"] = st_save(tensors)
    else:
        fname, data, trusted = serialize_sklearn(est)
        man["head"] = {"type": "sklearn", "estimator": type(est[-1]).__name__, "file": fname,
                       "pipeline": [n for n, _ in est.steps], "trusted_types": trusted}
        files[fname] = data
    for key in ("files", "bundle_id"):
        man.pop(key, None)
    return save_bundle(dst, man, files)


def _export_and_compare(bundle: Path, images: list[Path], tmp_path: Path) -> Any:
    """Export with the parity check; onnxruntime's probabilities equal featbank predict's."""
    import featbank
    from featbank.runtime import OnnxClassifier

    report = featbank.export_model(bundle, tmp_path / f"{bundle.name}.onnx", check_images=images)
    assert report.parity["passed"], report.parity
    preds = featbank.predict(bundle, images, top_k=3)
    classes = featbank.load_bundle(bundle).classes
    py = np.array([[dict(p.top_k)[k] for k in classes] for p in preds])
    onnx = OnnxClassifier(report.path).predict_proba(images)
    np.testing.assert_allclose(onnx, py, atol=1e-4)
    assert (onnx.argmax(1) == py.argmax(1)).all()
    return report


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A test_tiny cache of 3 classes x 8 images (train/test) and a linear bundle fitted on it."""
    import featbank

    root = tmp_path_factory.mktemp("plain")
    data = make_image_folder(root / "data", n_per_class=8, splits=("train", "test"))
    with cache_dir_env(root / "fc"):
        featbank.extract(data, root / "c.h5", backbone="test_tiny", engine="torch", num_workers=0, progress=False)
        featbank.fit(root / "c.h5", "linear", out=root / "linear")
    return {"data": data, "cache": root / "c.h5", "bundle": root / "linear"}


_EXPORT_CASES = [("linear", "standardize", {"C": 0.1}), ("svm-rbf", "standardize", {"C": 3.0, "gamma_scale": 1.0}),
                 ("svm-rbf", "l2", {"C": 10.0, "gamma_scale": 2.0}), ("svm-linear", "l2", {"C": 0.1}),
                 ("svm-rbf", "sqrt", {"C": 3.0, "gamma_scale": 1.0}), ("knn", "standardize", {"k": 3}),
                 ("knn", "l2", {"k": 5}), ("knn", "sqrt", {"k": 3}),
                 ("mlp", "standardize", {"hidden_sizes": 16, "dropout": 0.2, "weight_decay": 1e-4})]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "preprocess", "params"), _EXPORT_CASES)
def test_every_family_exports_with_parity(plain, tmp_path, monkeypatch, one_thread, name, preprocess, params) -> None:
    import featbank

    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(plain["data"].parent / "fc"))
    fam = get_head_family(name)
    assert fam.exportable and preprocess in fam.preprocesses
    with featbank.open_cache(plain["cache"]) as c:
        rows = np.flatnonzero(c.split_mask("train"))
        est = fam.build(params, preprocess=preprocess).fit(c.load_embeddings(rows), c.labels[rows])
        test_rows = np.flatnonzero(c.split_mask("test"))
        images = [c.abspath(c.paths[r]) for r in test_rows]
        X_test = c.load_embeddings(test_rows)
    bundle = _bundle_with_head(plain["bundle"], tmp_path / "models" / name, est)
    loaded = featbank.load_bundle(bundle).load_head()
    assert type(loaded) is type(est)
    np.testing.assert_array_equal(estimator_proba(loaded, X_test), estimator_proba(est, X_test))
    report = _export_and_compare(bundle, images, tmp_path)
    assert report.route.startswith("torch")  # every family is a torch graph (kNN and the SVMs in float64)


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True])
def test_svm_on_layers_and_pooled_views_exports_with_parity(layered, tmp_path, monkeypatch, one_thread, pooled) -> None:
    """The SVM on a layered cache (two layers) and on [mean | max] pooled views: one graph, parity."""
    import featbank
    from featbank.fitting._layers import FeatureTable

    data, cache = layered
    monkeypatch.setenv("FEATBANK_CACHE_DIR", str(tmp_path / "fc"))
    src = featbank.fit(cache, "linear", layers="stage2,final", pool_views=pooled, train_views=False,
                       out=tmp_path / "src").path
    fam = get_head_family("svm-rbf")
    with featbank.open_cache(cache) as c:
        table = FeatureTable(c, ("stage2", "final"), train_views=False, pooled=pooled)
        rows = np.flatnonzero(c.split_mask("train"))
        est = fam.build({"C": 3.0, "gamma_scale": 1.0}).fit(table.load_embeddings(rows), c.labels[rows])
        images = [c.abspath(c.paths[r]) for r in np.flatnonzero(c.split_mask("test"))]
    bundle = _bundle_with_head(src, tmp_path / "models" / "svm", est)
    report = _export_and_compare(bundle, images, tmp_path)
    assert report.route.startswith("torch")


def test_the_cuda_gram_path_equals_blas_on_cpu() -> None:
    """gram()'s torch branch (what runs on CUDA) run on the CPU device: the same float64 products as BLAS."""
    import torch

    from featbank.heads._kernel_svc import gram, torch_gram

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(37, 300)).astype(np.float32), rng.normal(size=(11, 300))
    got = torch_gram(np.asarray(A, np.float64), B, torch.device("cpu"))
    assert got.dtype == np.float64 and got.shape == (37, 11)
    np.testing.assert_allclose(got, gram(A, B), rtol=1e-12, atol=1e-10)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["svm-rbf", "svm-linear", "linear"])
def test_cuda_scores_equal_cpu_scores(hard_digits, name) -> None:
    X, y, folds = hard_digits
    fam = get_head_family(name)
    grid = fam.default_grid(len(X), X.shape[1], 10)[::3]
    cpu, gpu = fam.cv_scores(X, y, folds, grid), fam.cv_scores(X, y, folds, grid, device="cuda")
    assert np.abs(cpu - gpu).max() <= 2 / min(len(h) for _, h in folds)
    if name.startswith("svm"):  # the shared Gram matrices, multiplied on the GPU
        from featbank.heads import FoldKernels

        shared = fam.cv_scores(X, y, folds, grid, device="cuda", kernels=FoldKernels())
        assert np.abs(cpu - shared).max() <= 2 / min(len(h) for _, h in folds)


def test_relative_costs_grow_with_the_work() -> None:
    for fam in HEAD_FAMILIES.values():
        small, rows, width, grid = (fam.relative_cost(200, 64, 3), fam.relative_cost(2000, 64, 3),
                                    fam.relative_cost(200, 6400, 3), fam.relative_cost(200, 64, 9))
        assert 0 < small < rows and small < width and small <= grid, fam.name
    # On the ELPV pooled features the MLP is the expensive family by far.
    costs = {n: f.relative_cost(2100, 12560, 6) for n, f in HEAD_FAMILIES.items()}
    assert max(costs, key=costs.get) == "mlp" and costs["mlp"] > 10 * costs["svm-rbf"]


def test_signed_sqrt_is_power_normalisation_that_saves_and_loads_as_a_trusted_type(tmp_path) -> None:
    """``sqrt``: sign(x) * sqrt(|x|) entry by entry (negatives keep their sign), then standardised; the step
    has no learned state, refuses another width, and a skops file of its pipeline loads under featbank's
    trust list (which names it) and predicts the same."""
    from sklearn.base import clone

    from featbank.heads import SignedSqrt
    from featbank.heads.skops import load_skops, serialize_sklearn, trusted_skops_types

    X = np.array([[4.0, -9.0, 0.0], [0.25, 1.0, -0.01]])
    np.testing.assert_array_equal(SignedSqrt().fit_transform(X), [[2.0, -3.0, 0.0], [0.5, 1.0, -0.1]])
    with pytest.raises(ValueError, match="fitted on 3 features; got an array of shape"):
        SignedSqrt().fit(X).transform(X[:, :2])
    assert clone(SignedSqrt()).get_params() == {}
    est = get_head_family("svm-rbf").build({"C": 3.0, "gamma_scale": 1.0}, preprocess="sqrt")
    assert [type(s).__name__ for _, s in est.steps] == ["SignedSqrt", "StandardScaler", "KernelSVC"]
    assert "featbank.heads.SignedSqrt" in trusted_skops_types()
    rng = np.random.default_rng(0)
    Xr, y = rng.normal(size=(60, 5)), np.arange(60) % 3
    est.fit(Xr, y)
    _, data, types = serialize_sklearn(est)
    assert "featbank.heads.SignedSqrt" in types
    loaded = load_skops(data, "test")
    np.testing.assert_array_equal(loaded.predict(Xr), est.predict(Xr))
    with pytest.raises(ConfigError, match="preprocess"):
        get_head_family("linear").build({"C": 1.0}, preprocess="sqrt")


def test_a_hostile_signed_sqrt_step_is_refused(tmp_path) -> None:
    """The new trusted step is data only: a call node in its state is refused before anything runs (the
    canary is never written)."""
    from _hostile import skops_with_call

    from featbank.errors import BundleError
    from featbank.heads.skops import load_skops, serialize_sklearn

    rng = np.random.default_rng(0)
    est = get_head_family("svm-rbf").build({"C": 1.0, "gamma_scale": 1.0}, preprocess="sqrt")
    est.fit(rng.normal(size=(30, 4)), np.arange(30) % 2)
    _, data, _ = serialize_sklearn(est)
    canary = tmp_path / "ran"
    for module, name in (("builtins", "eval"), ("os", "system")):
        bad = skops_with_call(data, module, name, canary, step="SignedSqrt", attr="n_features_in_")
        with pytest.raises(BundleError, match=f"does not trust.*{module}.{name}") as err:
            load_skops(bad, "head.skops")
        assert "SignedSqrt" not in str(err.value)  # the step itself is trusted: only the call is refused
    assert not canary.exists()


@pytest.mark.slow
def test_a_bundle_whose_head_width_is_not_a_number_is_refused(plain, tmp_path) -> None:
    """A trusted step can still hold a wrong value (skops checks types): a SignedSqrt whose width is the
    string 'abc' would disable the width check and fail at predict; the bundle is refused on load."""
    import io
    import zipfile

    from _hostile import _json_node

    import featbank
    from featbank.bundles import save_bundle
    from featbank.errors import BundleError

    with featbank.open_cache(plain["cache"]) as c:
        rows = np.flatnonzero(c.split_mask("train"))
        est = get_head_family("svm-rbf").build({"C": 1.0, "gamma_scale": 1.0}, preprocess="sqrt")
        est.fit(c.load_embeddings(rows), c.labels[rows])
    good = _bundle_with_head(plain["bundle"], tmp_path / "good", est)
    assert featbank.load_bundle(good).load_head() is not None
    z = zipfile.ZipFile(io.BytesIO((good / "head.skops").read_bytes()))
    schema = json.loads(z.read("schema.json"))
    step = next(s["content"][1] for s in schema["content"]["content"]["steps"]["content"]
                if s["content"][1]["__class__"] == "SignedSqrt")
    step["content"]["content"]["n_features_in_"] = _json_node("abc")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zo:
        for n in z.namelist():
            zo.writestr(n, json.dumps(schema) if n == "schema.json" else z.read(n))
    man = json.loads((good / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file() and p.name != "manifest.json"}
    files["head.skops"] = out.getvalue()
    for key in ("files", "bundle_id"):
        man.pop(key, None)
    bad = save_bundle(tmp_path / "bad", man, files)
    with pytest.raises(BundleError, match="n_features_in_ is 'abc', not a number of features"):
        featbank.load_bundle(bad).load_head()
