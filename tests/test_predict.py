"""predict.py (and evaluate.py's checkpoint handling): outputs keep the input's geometry; bad inputs fail alone."""
import json
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import torch

import config

ORIENTATION_AFFINES = {  # voxel -> world for RAS, LPS and LAS storage (2.5 x 2.5 x 4 mm)
    "RAS": np.diag([2.5, 2.5, 4.0, 1.0]),
    "LPS": np.diag([-2.5, -2.5, 4.0, 1.0]),
    "LAS": np.diag([-2.5, 2.5, 4.0, 1.0]),
}


class _StandInNet(torch.nn.Module):
    """Used only while multi_decoder_model.py does not exist yet: same constructor and config contract."""

    def __init__(self, organs=("prostate", "bladder", "rectum"), in_channels=1, base_channels=8, depth=5,
                 attention=True, checkpointing=False):
        super().__init__()
        self.config = dict(organs=tuple(organs), in_channels=in_channels, base_channels=base_channels, depth=depth,
                           attention=attention, checkpointing=checkpointing)
        self.net = torch.nn.Conv3d(in_channels, len(organs), 3, padding=1)

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """A randomly initialised tiny model saved in the contract's checkpoint format."""
    try:
        import multi_decoder_model
    except ImportError:
        multi_decoder_model = types.SimpleNamespace(MultiDecoderUNet=_StandInNet)
        monkeypatch.setitem(sys.modules, "multi_decoder_model", multi_decoder_model)
    torch.manual_seed(0)
    model = multi_decoder_model.MultiDecoderUNet(organs=config.ORGANS, in_channels=1, base_channels=2, depth=2,
                                                 attention=False, checkpointing=False)
    settings = dict(config.settings(), TARGET_SPACING=[4.0, 4.0, 4.0], PATCH_SIZE=[16, 16, 16])
    path = tmp_path / "ckpt" / "best_model.pth"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 1, "settings": settings,
                "run": {}}, path)
    return path


def write_ct(path, code, shape=(23, 21, 13)):
    rng = np.random.default_rng(0)
    hu = np.full(shape, -1000, np.int16)
    x, y, z = np.indices(shape)
    body = ((x - shape[0] / 2) / (shape[0] / 2.5)) ** 2 + ((y - shape[1] / 2) / (shape[1] / 2.5)) ** 2 <= 1
    hu[body] = 40 + rng.integers(-20, 20, body.sum())
    hu[(abs(x - 11) < 3) & (abs(y - 10) < 3) & (abs(z - 6) < 3)] = 300
    img = nib.Nifti1Image(hu, ORIENTATION_AFFINES[code])
    img.set_qform(ORIENTATION_AFFINES[code], code=1)
    img.set_sform(ORIENTATION_AFFINES[code], code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def test_outputs_keep_input_geometry(tmp_path, tiny_checkpoint):
    import predict

    config.AMP = False
    inputs = [write_ct(tmp_path / "in" / f"scan_{code}.nii.gz", code) for code in ORIENTATION_AFFINES]
    atlas_case = write_ct(tmp_path / "atlas" / "BDMAP_00000007" / "ct.nii.gz", "LPS", shape=(19, 22, 11))
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    done, failed = predict.predict_files(inputs + [bad, tmp_path / "atlas"], out, tiny_checkpoint)

    assert [p for p, _ in failed] == [bad] and "broken.nii.gz" in failed[0][1] and "\n" not in failed[0][1]
    assert len(done) == 4
    for src in inputs + [atlas_case]:
        case = predict.case_name(src)
        original = nib.load(str(src))
        for name in [f"segmentations/{o}.nii.gz" for o in config.ORGANS] + ["combined_labels.nii.gz"]:
            img = nib.load(str(out / case / name))
            assert img.shape == original.shape, name
            np.testing.assert_allclose(img.affine, original.affine)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
            assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(original.affine)
            data = np.asanyarray(img.dataobj)
            assert data.dtype == np.uint8
            allowed = {0, 1} if "segmentations" in name else {0} | {config.LABEL_VALUES[o] for o in config.ORGANS}
            assert set(np.unique(data)) <= allowed
        volumes = json.loads((out / case / "volumes.json").read_text())
        assert set(volumes["organs"]) == set(config.ORGANS)
    assert (out / "BDMAP_00000007" / "combined_labels.nii.gz").is_file()
    assert predict.case_name(inputs[0]) == "scan_RAS"


def test_labels_come_back_in_the_input_orientation(tmp_path, tiny_checkpoint, monkeypatch):
    """A predictor that marks one world-space corner must land on the same voxels whatever the storage order."""
    import evaluate
    import predict

    def fake_predict_case(model, ct_img, device):  # label 2 where the world x coordinate (RAS) is largest
        world_x = nib.affines.apply_affine(ct_img.affine, np.indices(ct_img.shape).reshape(3, -1).T)[:, 0]
        return (world_x.reshape(ct_img.shape) > world_x.max() - 1).astype(np.uint8) * 2

    monkeypatch.setattr(evaluate, "predict_case", fake_predict_case)
    monkeypatch.setattr(config, "STATUS_CLEAR_NOT_IMAGED", False)  # no pelvis in this CT: keep the fake bladder
    for code in ("RAS", "LAS"):
        src = write_ct(tmp_path / f"{code}.nii.gz", code)
        predict.predict_files([src], tmp_path / "out", tiny_checkpoint)
        mask = np.asanyarray(nib.load(str(tmp_path / "out" / code / "segmentations" / "bladder.nii.gz")).dataobj)
        expected_x = -1 if code == "RAS" else 0  # RAS: right-most voxel is the last; LAS: the first
        assert mask[expected_x].all() and mask.sum() == mask[expected_x].size


def test_unwritable_output_and_bad_checkpoint(tmp_path, tiny_checkpoint):
    import predict

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        predict.predict_files([tmp_path], blocker / "out", tiny_checkpoint)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pth"):
        predict.predict_files([tmp_path], tmp_path / "out", truncated)
    with pytest.raises(FileNotFoundError, match="not found"):
        predict.predict_files([tmp_path], tmp_path / "out", tmp_path / "missing.pth")


def test_checkpoint_settings_win(tiny_checkpoint, capsys):
    import evaluate

    config.PATCH_SIZE = (64, 64, 64)
    ckpt = torch.load(tiny_checkpoint, weights_only=False)
    changed = evaluate.use_checkpoint_settings(ckpt)
    assert config.PATCH_SIZE == (16, 16, 16) and config.TARGET_SPACING == (4.0, 4.0, 4.0)
    assert "PATCH_SIZE" in changed and "PATCH_SIZE" in capsys.readouterr().out
