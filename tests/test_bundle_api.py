"""One Bundle API: load_backbone() / load_head() used by predict, evaluate, export, finetune, extract."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import featbank
from featbank.cli.main import cli
from featbank.fitting import fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def file_weights_bundle(image_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A head bundle fitted on test_tiny embeddings whose weights came from --weights-file."""
    import torch

    from featbank.backbones import load_backbone

    bb = load_backbone("test_tiny")
    state = {**bb.features.state_dict(), **{f"fc.{k}": v for k, v in bb.classifier.state_dict().items()}}
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    wfile = tmp_path / "tiny-weights.pt"
    torch.save(state, wfile)
    cache = featbank.extract(image_folder, tmp_path / "c.h5", backbone="test_tiny", weights_file=wfile,
                             engine="torch", num_workers=0, progress=False).path
    return fit(cache, "linear", out=tmp_path / "models" / "filew").path, wfile


def test_predict_with_a_weights_file_bundle(file_weights_bundle, image_folder):
    """Was: "Unknown weights 'file:...'" (exit 2 for the wrong reason); export handled the same bundle."""
    bundle, wfile = file_weights_bundle
    image = str(sorted(image_folder.rglob("*.png"))[0])
    res = CliRunner().invoke(cli, ["predict", str(bundle), image])
    assert res.exit_code == 2 and "--weights-file" in res.output and "Unknown weights" not in res.output, res.output
    res = CliRunner().invoke(cli, ["predict", str(bundle), image, "--weights-file", str(wfile), "--json"])
    assert res.exit_code == 0, res.output
    preds = featbank.predict(bundle, [image], weights_file=wfile)
    assert preds[0].label in featbank.load_bundle(bundle).classes


def test_bundle_load_backbone_checks_the_weights(file_weights_bundle, tmp_path):
    import torch

    from featbank.errors import BundleError

    bundle, wfile = file_weights_bundle
    b = featbank.load_bundle(bundle)
    assert b.load_backbone(weights_file=wfile).weights_sha256 == b.backbone["weights_sha256"]
    other = tmp_path / "other.pt"
    state = torch.load(wfile, weights_only=True)
    torch.save({k: v * 2 for k, v in state.items()}, other)
    with pytest.raises(BundleError, match="not the ones"):
        b.load_backbone(weights_file=other)


def test_manifest_schema_is_one_definition_for_both_ends(tmp_path):
    """save_bundle checks builders' manifests with the reader's schema; build_manifest gives typed parts."""
    from featbank.bundles import load_bundle, save_bundle
    from featbank.bundles.manifest import BackboneIdentity, build_manifest
    from featbank.errors import BundleError

    ident = BackboneIdentity("test_tiny", "seed1234", "0" * 64, {"input_size": [32, 32]}, 32)
    m = build_manifest("head", ["a", "b"], ident, cache_key="k", head={"type": "sklearn", "file": "head.skops"},
                       metrics={})
    b = load_bundle(save_bundle(tmp_path / "b", m, {"head.skops": b"x"}))
    assert b.info.backbone == ident and b.info.head.file == "head.skops" and b.info.head.sha256
    with pytest.raises(BundleError, match="field 'backbone.embed_dim'"):
        build_manifest("head", ["a"], BackboneIdentity("test_tiny", embed_dim="32"), head={"type": "linear",
                                                                                           "file": "h"})
    with pytest.raises(BundleError, match="field 'head.file'.*bare file name"):
        save_bundle(tmp_path / "c", {**m, "head": {"type": "sklearn", "file": "../h.skops"}}, {"h.skops": b"x"})
    assert not (tmp_path / "c").exists()
