"""predict.py (and inference.py's checkpoint handling): outputs keep the input's geometry; bad inputs fail alone."""
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
    import inference
    import predict

    def fake_predict_case(model, ct_img, device, prepared=None):  # label 2 where the world x coordinate (RAS) is largest
        world_x = nib.affines.apply_affine(ct_img.affine, np.indices(ct_img.shape).reshape(3, -1).T)[:, 0]
        return (world_x.reshape(ct_img.shape) > world_x.max() - 1).astype(np.uint8) * 2

    monkeypatch.setattr(inference, "predict_case", fake_predict_case)
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
    import inference

    config.PATCH_SIZE = (64, 64, 64)
    ckpt = torch.load(tiny_checkpoint, weights_only=False)
    changed = inference.use_checkpoint_settings(ckpt)
    assert config.PATCH_SIZE == (16, 16, 16) and config.TARGET_SPACING == (4.0, 4.0, 4.0)
    assert "PATCH_SIZE" in changed and "PATCH_SIZE" in capsys.readouterr().out


def test_predict_needs_neither_evaluate_nor_train():
    """Checkpoint -> model and CT -> labels live in inference.py: prediction does not depend on evaluation."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("predict.py", "inference.py", "evaluate.py"):
        imported = set()
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        banned = {"evaluate", "train"} if name != "evaluate.py" else {"train"}
        assert not imported & banned, (name, imported & banned)


def _fake_predict_case(model, ct_img, device, prepared=None):
    """Bladder (label 2) in a block off the centre, so every DICOM output has a present organ to carry."""
    labels = np.zeros(ct_img.shape, np.uint8)
    labels[3:9, 4:12, 2:7] = 2
    labels[5:7, 6:8, 3:5] = 0  # a hole
    return labels


def test_dicom_outputs_for_nifti_and_dicom_inputs(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """A NIfTI input gets its CT written as a DICOM series for the RTSTRUCT/SEG to reference; a DICOM series
    input is referenced itself; the round-trip Dice is in volumes.json; a bad DICOM folder fails alone."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    import dicom_io
    import inference
    import predict

    monkeypatch.setattr(inference, "predict_case", _fake_predict_case)
    monkeypatch.setattr(config, "STATUS_CLEAR_NOT_IMAGED", False)  # no pelvis in these CTs: keep the fake bladder
    nifti_in = write_ct(tmp_path / "in" / "scan_LAS.nii.gz", "LAS")
    series_info = dicom_io.write_ct_series(nib.load(str(write_ct(tmp_path / "src.nii.gz", "LPS"))),
                                           tmp_path / "dicom" / "patient07")
    bad = tmp_path / "dicom_bad" / "patient08"
    bad.mkdir(parents=True)
    (bad / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    out = tmp_path / "out"
    done, failed = predict.predict_files([nifti_in, tmp_path / "dicom", bad], out, tiny_checkpoint,
                                         formats=("nifti", "rtstruct", "seg"))
    assert [p for p, _ in failed] == [bad] and "\n" not in failed[0][1] and "patient08" in failed[0][1]
    assert sorted(p.name for p, _ in done) == ["patient07", "scan_LAS.nii.gz"]

    for case, own_series in (("scan_LAS", False), ("patient07", True)):
        record = json.loads((out / case / "volumes.json").read_text())
        dicom = record["dicom"]
        assert dicom["rtstruct"]["roundtrip_dice"] == {"prostate": None, "bladder": 1.0, "rectum": None}
        assert dicom["rtstruct"]["warnings"] == [] and dicom["seg"]["segments"] == ["bladder"]
        assert ("ct_series" in dicom) != own_series and (out / case / "ct_dicom").is_dir() != own_series
        rs = pydicom.dcmread(out / case / "rtstruct.dcm")
        series_uid = series_info.series_uid if own_series else dicom_io.read_ct_series(out / case / "ct_dicom")[1].series_uid
        ref = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == series_uid == dicom["series_instance_uid"]
        assert [r.ROIName for r in rs.StructureSetROISequence] == [config.ROI_NAMES["bladder"]]
        seg = pydicom.dcmread(out / case / "seg.dcm")
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        assert (out / case / "segmentations" / "bladder.nii.gz").is_file()
    series_img = nib.load(str(out / "patient07" / "combined_labels.nii.gz"))
    np.testing.assert_allclose(series_img.affine, dicom_io.read_ct_series(tmp_path / "dicom" / "patient07")[0].affine)
    console = capsys.readouterr().out
    assert "rtstruct.dcm written, read back: Dice bladder 1.0000" in console
    assert "CT written as a DICOM series in ct_dicom/" in console


def test_round_trip_warning_reaches_file_and_console(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    pytest.importorskip("pydicom")
    import dicom_export
    import inference
    import predict

    monkeypatch.setattr(inference, "predict_case", _fake_predict_case)
    monkeypatch.setattr(config, "STATUS_CLEAR_NOT_IMAGED", False)  # no pelvis in this CT: keep the fake bladder
    real = dicom_export.rtstruct_roundtrip

    def lossy(path, masks, ref_img, frame_of_reference_uid=None):  # as if the file lost voxels on the way
        return real(path, dict(masks, bladder=np.roll(masks["bladder"], 3, axis=0)), ref_img, frame_of_reference_uid)

    monkeypatch.setattr(dicom_export, "rtstruct_roundtrip", lossy)
    src = write_ct(tmp_path / "scan_RAS.nii.gz", "RAS")
    done, failed = predict.predict_files([src], tmp_path / "out", tiny_checkpoint, formats="rtstruct")
    assert len(done) == 1 and not failed
    record = json.loads((tmp_path / "out" / "scan_RAS" / "volumes.json").read_text())
    assert record["dicom"]["rtstruct"]["roundtrip_dice"]["bladder"] < config.ROUNDTRIP_MIN_DICE
    assert "bladder read back with Dice" in record["dicom"]["rtstruct"]["warnings"][0]
    assert "predict: warning: rtstruct.dcm: bladder read back with Dice" in capsys.readouterr().out
    assert not (tmp_path / "out" / "scan_RAS" / "segmentations").exists()  # nifti was not asked for


def test_format_option(tmp_path, tiny_checkpoint):
    import predict

    assert predict.parse_formats("nifti, RTSTRUCT,seg,seg") == ("nifti", "rtstruct", "seg")
    with pytest.raises(ValueError, match="--format png"):
        predict.parse_formats("png")
    with pytest.raises(SystemExit) as exc:
        predict.main([str(tmp_path), "-o", str(tmp_path / "out"), "--format", "nifti,dicom"])
    assert exc.value.code == 2
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(SystemExit) as exc:
        predict.main([str(bad), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint)])
    assert exc.value.code == 1
