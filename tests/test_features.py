"""FeatureSpec: one descriptor from extraction to the cache, the bundle manifest and ONNX; its two
formats are the ones caches and bundles already hold, and every field is checked in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featbank.features import (
    DIHEDRAL_ORDER,
    FIXED_VIEWS,
    VIEW_POOL,
    FeatureSpec,
    FeatureSpecError,
    make_views,
    view_transforms,
)

REPO = Path(__file__).resolve().parent.parent

#: The ``features`` section as fit wrote it before FeatureSpec (report keys included).
OLD_MANIFEST_FEATURES = {
    "layers": ["stage2", "final"], "layer_dims": {"stage2": 40, "final": 32}, "pooling": "gap+2x2",
    "views_used": 2, "augment": "dihedral", "view_seed": 0, "n_views": 2, "tta": True,
    "tta_choice": {"mode": "auto", "used": True, "n_views": 2, "val_plain": 0.5, "val_tta": 0.75},
    "selection": {"rounds": []},
}


def test_manifest_section_reads_as_before_and_writes_the_same_fields() -> None:
    spec = FeatureSpec.from_dict(OLD_MANIFEST_FEATURES)
    assert spec == FeatureSpec(("stage2", "final"), {"stage2": 40, "final": 32}, "gap+2x2", 2, "dihedral", 0,
                               views_used=2, tta=True)
    assert spec.dim == 72 and spec.taps == ("stage2",) and not spec.is_default
    written = spec.to_dict()
    assert written == {k: v for k, v in OLD_MANIFEST_FEATURES.items() if k not in ("tta_choice", "selection")}
    assert "view_pool" not in written  # absent unless set, as fit wrote it
    pooled = FeatureSpec.from_dict({**written, "tta": False, "view_pool": VIEW_POOL})
    assert pooled.dim == 144 and FeatureSpec.from_dict(pooled.to_dict()) == pooled
    assert json.loads(json.dumps(pooled.to_dict())) == pooled.to_dict()


def test_a_manifest_section_with_only_layers_takes_the_old_defaults() -> None:
    spec = FeatureSpec.from_dict({"layers": ["stage1"], "layer_dims": {"stage1": 8}})
    assert (spec.pooling, spec.n_views, spec.augment, spec.tta, spec.view_pool) == ("gap+2x2", 0, "", False, "")


@pytest.mark.parametrize("edit, field", [
    ({"layers": []}, "layers"),
    ({"layers": "final"}, "layers"),
    ({"layers": ["stage2", "stage2"]}, "layers"),
    ({"layers": ["../x", "final"]}, "layers"),
    ({"layer_dims": {"stage2": 40}}, "layer_dims"),
    ({"layer_dims": {"stage2": 0, "final": 32}}, "layer_dims"),
    ({"layer_dims": {"stage2": True, "final": 32}}, "layer_dims"),
    ({"n_views": -1}, "n_views"),
    ({"view_seed": "0"}, "view_seed"),
    ({"views_used": 1.5}, "views_used"),
    ({"tta": "yes"}, "tta"),
    ({"pooling": 3}, "pooling"),
    ({"n_views": 8}, "n_views"),  # more dihedral views than there are
    ({"augment": "hflip", "n_views": 2}, "n_views"),
    ({"view_pool": "mean+max; import os", "tta": False}, "view_pool"),
    ({"view_pool": VIEW_POOL, "augment": "crops", "tta": False}, "augment"),
    ({"view_pool": VIEW_POOL, "n_views": 0, "tta": False}, "n_views"),
    ({"view_pool": VIEW_POOL}, "tta"),
])
def test_from_dict_names_the_field_that_is_wrong(edit, field) -> None:
    with pytest.raises(FeatureSpecError) as e:
        FeatureSpec.from_dict({**OLD_MANIFEST_FEATURES, **edit})
    assert e.value.field == field and repr(e.value.value)[:20] in str(e.value)


def test_cache_attributes_round_trip_and_a_plain_cache_needs_none(tmp_path) -> None:
    spec = FeatureSpec(("stem", "final"), {"stem": 40, "final": 32}, "gap", 3, "crops", 7)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.attrs.update(spec.to_attrs())
        attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                 for k, v in f.attrs.items()}
    assert attrs["layers"] == '["stem", "final"]' and attrs["views"] == 3  # the format caches already hold
    assert FeatureSpec.from_attrs(attrs, 32) == spec
    assert FeatureSpec.from_attrs({}, 16) == FeatureSpec(("final",), {"final": 16})
    assert spec.key_part() == {"layers": ["stem", "final"], "pooling": "gap", "views": 3, "augment": "crops",
                               "view_seed": 7}
    assert spec.datasets() == {"layers/stem": (40,), "views/embeddings": (3, 32), "views/layers/stem": (3, 40)}
    with pytest.raises(FeatureSpecError, match="disagree"):
        FeatureSpec.from_attrs({**attrs, "augment": ""}, 32)
    with pytest.raises(FeatureSpecError, match="ending with \"final\""):
        FeatureSpec.from_attrs({**attrs, "layers": '["stem"]', "layer_dims": '{"stem": 40}'}, 32)
    with pytest.raises(FeatureSpecError, match="the 16 values 'embeddings' has"):
        FeatureSpec.from_attrs(attrs, 16)


def test_a_spec_keys_a_dict_whatever_its_widths() -> None:
    a = FeatureSpec(("stem", "final"), {"stem": 40, "final": 32})
    b = FeatureSpec(("stem", "final"), {"stem": 40, "final": 32})
    assert {a: 1}[b] == 1 and a == b and a != FeatureSpec(("stem", "final"), {"stem": 41, "final": 32})


def test_torch_views_are_the_numpy_views_of_extraction() -> None:
    import torch

    img = np.random.default_rng(1).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    spec = FeatureSpec(n_views=FIXED_VIEWS["dihedral"], augment="dihedral")
    want = make_views(img, "a.png", spec)
    got = [v(torch.from_numpy(img)[None]).numpy()[0] for v in view_transforms(spec, (12, 12))]
    assert len(got) == len(DIHEDRAL_ORDER) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert view_transforms(FeatureSpec(n_views=3, augment="crops"), (12, 12)) == []  # crops need the cache's path
    assert len(view_transforms(FeatureSpec(n_views=3, augment="dihedral"), (12, 16))) == 3  # flips and a half turn
    with pytest.raises(FeatureSpecError, match="at most 3 views of the non-square 12x16"):
        view_transforms(FeatureSpec(n_views=4, augment="dihedral"), (12, 16))


def test_crop_views_resample_with_the_backbones_filter_names() -> None:
    from featbank.images import RESAMPLE

    assert {name: Image.Resampling[name.upper()] for name in RESAMPLE} == RESAMPLE
    img = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    spec = FeatureSpec(n_views=2, augment="crops", view_seed=3)
    assert not np.array_equal(make_views(img, "a", spec, "nearest"), make_views(img, "a", spec, "bicubic"))


def test_the_ground_floor_stands_on_nothing_above_it() -> None:
    """features and dicom import no room above them (dicom no longer imports images)."""
    code = ("import json, sys, featbank.features, featbank.dicom\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('featbank.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert {"featbank.features", "featbank.dicom"} <= loaded
    assert loaded <= {"featbank._limits", "featbank.dicom", "featbank.errors", "featbank.features", "featbank.windowing"}
