"""Reliability (issue #8): a catalogue of bad inputs, and kill -9 in the middle of preprocessing and training.

Every bad input must give a clear one-line error naming the file and the problem (or a skip recorded with its
reason in processed/manifest.json), never a deep traceback, and must leave what was already written intact.
Determinism and GPU out-of-memory handling are tested in test_train.py and test_inference.py.

Cases are tiny hand-made NIfTI volumes (40 x 38 x 30 voxels, three blob organs); the whole file takes well
under a minute on 2 CPU cores, most of it in the subprocesses that check what a user sees on the command line.
"""
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import config
import preprocessing as pp

ROOT = Path(__file__).resolve().parents[1]
GOOD_ID, BAD_ID = "BDMAP_00000001", "BDMAP_00000002"
SHAPE = (40, 38, 30)  # voxels [x, y, z]
SPACING = (2.0, 2.0, 2.5)  # mm
TARGET = (4.0, 4.0, 4.0)  # mm: coarse, so preprocessing and inference take milliseconds
# Subprocesses share 2 cores with whatever else runs: one thread each.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(autouse=True)
def tiny_config():
    config.TARGET_SPACING = TARGET  # conftest reloads config.py after each test


# --- tiny cases ------------------------------------------------------------------------------------------------

def affine(spacing=SPACING, origin=(-40.0, -38.0, -37.5)):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    return aff


def good_volume(shape=SHAPE):
    """(int16 HU CT, {organ: uint8 mask}): an elliptic soft-tissue body in air with three disjoint blobs."""
    x, y, z = np.indices(shape)
    c = (np.array(shape) - 1) / 2
    ct = np.where(((x - c[0]) / 17) ** 2 + ((y - c[1]) / 15) ** 2 < 1, 40, -1000).astype(np.int16)
    blobs = {"bladder": (0, -4, 5, 6, 10), "prostate": (0, 3, -6, 4, 45), "rectum": (0, 9, 0, 3, -60)}
    masks = {}
    for organ, (dx, dy, dz, r, hu) in blobs.items():
        inside = (x - c[0] - dx) ** 2 + (y - c[1] - dy) ** 2 + ((z - c[2] - dz) * 1.25) ** 2 < r * r
        ct[inside] = hu
        masks[organ] = inside.astype(np.uint8)
    return ct, masks


def save(array, path, aff=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine() if aff is None else aff), str(path))
    return path


def write_case(root, name):
    case = Path(root) / name
    ct, masks = good_volume()
    save(ct, case / "ct.nii.gz")
    for organ, mask in masks.items():
        save(mask, case / "segmentations" / f"{organ}.nii.gz")
    return case


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def patch_pixdim(path, axis, value):
    """Write `value` into the raw header's pixdim[axis] (nibabel would 'fix' it if we went through it)."""
    raw = bytearray(gzip.decompress(Path(path).read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * axis, value)  # pixdim: float32[8] at byte 76 of the 348-byte header
    Path(path).write_bytes(gzip.compress(bytes(raw)))


def ct_of(case):
    return case / "ct.nii.gz"


def mask_of(case, organ="bladder"):
    return case / "segmentations" / f"{organ}.nii.gz"


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# --- catalogue 1: bad cases met by preprocessing (skipped with the reason, or warned and fixed) ----------------
# kind: (break the case in place and return the file the message must name, fragment of the reason)

def _ct_missing(case):
    ct_of(case).unlink()
    return ct_of(case), "file not found"


def _ct_truncated_gzip(case):
    truncate(ct_of(case))
    return ct_of(case), "truncated"


def _ct_not_nifti(case):
    ct_of(case).write_bytes(b"<html>404 Not Found</html>\n" * 20)  # a failed download, saved as .nii.gz
    return ct_of(case), "not a readable NIfTI"


def _ct_gzipped_text(case):
    ct_of(case).write_bytes(gzip.compress(json.dumps({"not": "an image"}).encode() * 50))
    return ct_of(case), "not a readable NIfTI"


def _ct_2d(case):
    save(good_volume()[0][:, :, 15], ct_of(case))
    return ct_of(case), "expected a 3D volume"


def _ct_4d(case):
    ct = good_volume()[0]
    save(np.stack([ct, ct], -1), ct_of(case))
    return ct_of(case), "expected a 3D volume"


def _ct_nan(case):
    ct = good_volume()[0].astype(np.float32)
    ct[3, 4, 5] = np.nan
    save(ct, ct_of(case))
    return ct_of(case), "NaN/Inf voxels"


def _ct_inf(case):
    ct = good_volume()[0].astype(np.float32)
    ct[:2] = np.inf
    save(ct, ct_of(case))
    return ct_of(case), "NaN/Inf voxels"


def _spacing(axis, value):
    def breaker(case):
        patch_pixdim(ct_of(case), axis, value)
        return ct_of(case), "implausible voxel spacing"
    return breaker


def _spacing_huge(case):
    save(good_volume()[0], ct_of(case), affine((2.0, 2.0, 50.0)))
    return ct_of(case), "implausible voxel spacing"


def _ct_all_zero(case):
    save(np.zeros(SHAPE, np.int16), ct_of(case))
    return ct_of(case), "constant image"


def _ct_unrescaled(case):
    save((good_volume()[0] + 1024).astype(np.uint16), ct_of(case))  # stored values, slope/intercept dropped
    return ct_of(case), "looks unrescaled"


def _mask_shape(case):
    save(good_volume()[1]["bladder"][:, :, :-1], mask_of(case))
    return mask_of(case), "mask shape (40, 38, 29) != CT shape (40, 38, 30)"


def _mask_affine(case):
    save(good_volume()[1]["bladder"], mask_of(case), affine(origin=(-40.0, -38.0, -32.5)))
    return mask_of(case), "mask affine differs from the CT: origin"


def _mask_multilabel(case):
    mask = good_volume()[1]["bladder"].copy()
    mask[mask > 0] = 1 + np.arange(int(mask.sum())) % 2  # labels 1 and 2 in one organ file
    save(mask, mask_of(case))
    return mask_of(case), "not binary"


def _mask_negative(case):
    save(good_volume()[1]["bladder"].astype(np.int16) * -1, mask_of(case))
    return mask_of(case), "negative values"


def _mask_truncated(case):
    truncate(mask_of(case, "rectum"))
    return mask_of(case, "rectum"), "truncated"


SKIPPED = {
    "ct_missing": _ct_missing,
    "ct_truncated_gzip": _ct_truncated_gzip,
    "ct_not_nifti": _ct_not_nifti,
    "ct_gzipped_text": _ct_gzipped_text,
    "ct_2d": _ct_2d,
    "ct_4d": _ct_4d,
    "ct_nan_voxels": _ct_nan,
    "ct_inf_voxels": _ct_inf,
    "spacing_zero": _spacing(1, 0.0),
    "spacing_negative": _spacing(2, -2.0),
    "spacing_nan": _spacing(3, float("nan")),
    "spacing_huge": _spacing_huge,
    "ct_all_zero": _ct_all_zero,
    "ct_hu_unrescaled": _ct_unrescaled,
    "mask_shape_mismatch": _mask_shape,
    "mask_affine_mismatch": _mask_affine,
    "mask_multilabel": _mask_multilabel,
    "mask_negative": _mask_negative,
    "mask_truncated": _mask_truncated,
}


def _mask_0_255(case):
    save(good_volume()[1]["bladder"] * 255, mask_of(case))
    return mask_of(case), "values {0,255} binarised"


def _mask_probabilities(case):
    mask = good_volume()[1]["bladder"].astype(np.float32)
    save(np.clip(mask * 0.9 + 0.05, 0, 1), mask_of(case))  # 0.05 outside, 0.95 inside
    return mask_of(case), "float probabilities, thresholded at 0.5"


WARNED = {"mask_values_0_255": _mask_0_255, "mask_float_probabilities": _mask_probabilities}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A data root with one good case and its processed/ output, written once; tests work on copies."""
    root = tmp_path_factory.mktemp("base")
    config.TARGET_SPACING = TARGET
    write_case(root / "data", GOOD_ID)
    manifest = pp.preprocess(root / "data", root / "processed", workers=1)
    assert [c["case_id"] for c in manifest["cases"]] == [GOOD_ID] and not manifest["skipped"]
    return root


def copy_base(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")  # copy2 keeps mtimes, so the good case stays "done"
    return tmp_path / "run" / "data", tmp_path / "run" / "processed"


def earlier_outputs(out):
    return {k: v for k, v in snapshot(out).items() if k.startswith(f"cases/{GOOD_ID}/") or k == "splits.json"}


@pytest.mark.parametrize("kind", list(SKIPPED))
def test_bad_case_skipped_with_reason(base, tmp_path, kind):
    data, out = copy_base(base, tmp_path)
    before = earlier_outputs(out)
    bad_file, fragment = SKIPPED[kind](write_case(data, BAD_ID))

    manifest = pp.preprocess(data, out, workers=1)

    assert [c["case_id"] for c in manifest["cases"]] == [GOOD_ID]
    assert [s["case_id"] for s in manifest["skipped"]] == [BAD_ID]
    reason = manifest["skipped"][0]["reason"]
    assert reason.startswith(f"{bad_file}: ") and fragment in reason and "\n" not in reason, reason
    assert "please report" not in reason, reason  # an input we foresaw, not the catch-all
    assert json.loads((out / "manifest.json").read_text())["skipped"] == manifest["skipped"]  # recorded on disk
    assert manifest["run"] == dict(processed=0, reused=1, skipped=1)
    assert earlier_outputs(out) == before  # the good case and splits.json untouched, byte for byte
    assert not (out / "cases" / BAD_ID / "meta.json").exists()  # nothing that looks like a finished case
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("kind", list(WARNED))
def test_odd_mask_values_warned_and_binarised(base, tmp_path, kind):
    data, out = copy_base(base, tmp_path)
    before = earlier_outputs(out)
    bad_file, fragment = WARNED[kind](write_case(data, BAD_ID))

    manifest = pp.preprocess(data, out, workers=1)

    assert not manifest["skipped"] and [c["case_id"] for c in manifest["cases"]] == [GOOD_ID, BAD_ID]
    meta = json.loads((out / "cases" / BAD_ID / "meta.json").read_text())
    assert [w for w in meta["warnings"] if fragment in w and bad_file.name in w], meta["warnings"]
    assert manifest["cases"][1]["n_warnings"] >= 1
    assert np.array_equal(np.load(out / "cases" / BAD_ID / "label.npy"),
                          np.load(out / "cases" / GOOD_ID / "label.npy"))  # binarised to the very same organ
    assert {k: v for k, v in earlier_outputs(out).items() if k != "splits.json"} == \
        {k: v for k, v in before.items() if k != "splits.json"}


# --- catalogue 2: what a user sees on the command line ---------------------------------------------------------

def run_cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def tiny_checkpoint(path, **config_changes):
    """A randomly initialised MultiDecoderUNet(base 4, depth 3) in train.py's checkpoint format."""
    import multi_decoder_model
    import train

    torch.manual_seed(0)
    model = multi_decoder_model.MultiDecoderUNet(base_channels=4, depth=3)
    settings = dict(config.settings(), TARGET_SPACING=list(TARGET), PATCH_SIZE=[16, 16, 16], AMP=False)
    ckpt = {"model": model.state_dict(), "model_config": {**model.config, **config_changes}, "epoch": 1,
            "settings": settings, "run": {}}
    train.save_atomic(ckpt, path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two good CT files and a checkpoint that can segment them."""
    root = tmp_path_factory.mktemp("scans")
    ct = good_volume()[0]
    good = [save(ct, root / "in" / "a_good.nii.gz"), save(ct[::-1], root / "in" / "c_good.nii.gz")]
    return dict(root=root, good=good, ckpt=tiny_checkpoint(root / "ckpt" / "best_model.pth"))


def _root_missing(tmp, scans):
    return ["preprocessing.py", "--data-root", tmp / "nowhere", "--out", tmp / "out"], 1, tmp / "nowhere", \
        "data root not found"


def _root_empty(tmp, scans):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "README.txt").write_text("cases go here")
    return ["preprocessing.py", "--data-root", tmp / "empty", "--out", tmp / "out"], 1, tmp / "empty", \
        "no BDMAP_* case folders"


def _preprocess_out_unwritable(tmp, scans):
    write_case(tmp / "data", GOOD_ID)
    (tmp / "a_file").write_text("not a folder")  # tests run as root: chmod would not stop a write
    return ["preprocessing.py", "--data-root", tmp / "data", "--out", tmp / "a_file" / "processed"], 1, \
        tmp / "a_file" / "processed", "not writable"


def _setting_ill_typed(tmp, scans):
    return ["run_pipeline.py", "--all", "--EPOCHS=oops"], 2, "--EPOCHS=oops", "expected int"


def _setting_unknown(tmp, scans):
    return ["run_pipeline.py", "--all", "--EPOCH=5"], 2, "--EPOCH", "no such setting"


def _ckpt_other_architecture(tmp, scans):
    ckpt = tiny_checkpoint(tmp / "other.pth", base_channels=8)  # config says 8 channels, weights have 4
    return ["predict.py", scans["good"][0], "-o", tmp / "out", "--checkpoint", ckpt], 1, ckpt, \
        "weights do not fit this architecture"


def _ckpt_foreign(tmp, scans):
    ckpt = tmp / "foreign.pth"
    torch.save({"state_dict": torch.nn.Conv3d(1, 2, 3).state_dict(), "epoch": 3}, ckpt)  # another tool's file
    return ["predict.py", scans["good"][0], "-o", tmp / "out", "--checkpoint", ckpt], 1, ckpt, \
        "not a checkpoint of this pipeline"


def _ckpt_truncated(tmp, scans):
    ckpt = tmp / "truncated.pth"
    shutil.copy(scans["ckpt"], ckpt)
    truncate(ckpt)
    return ["predict.py", scans["good"][0], "-o", tmp / "out", "--checkpoint", ckpt], 1, ckpt, \
        "not a readable checkpoint"


def _predict_out_unwritable(tmp, scans):
    (tmp / "a_file").write_text("not a folder")
    out = tmp / "a_file" / "predictions"
    return ["predict.py", scans["good"][0], "-o", out, "--checkpoint", scans["ckpt"]], 1, out, "not writable"


def _pipeline_root_missing(tmp, scans):
    return ["run_pipeline.py", "--preprocess", "--data-root", tmp / "nowhere", f"--OUTPUT_ROOT={tmp}"], 1, \
        tmp / "nowhere", "data root does not exist"


def _train_without_processed(tmp, scans):
    return ["train.py", f"--OUTPUT_ROOT={tmp}", "--EPOCHS=1"], 1, tmp / "processed" / "splits.json", \
        "run preprocessing first"


CLI = {
    "data_root_missing": _root_missing,
    "data_root_empty": _root_empty,
    "pipeline_data_root_missing": _pipeline_root_missing,
    "preprocess_output_unwritable": _preprocess_out_unwritable,
    "setting_ill_typed": _setting_ill_typed,
    "setting_unknown": _setting_unknown,
    "checkpoint_other_architecture": _ckpt_other_architecture,
    "checkpoint_foreign_file": _ckpt_foreign,
    "checkpoint_truncated": _ckpt_truncated,
    "predict_output_unwritable": _predict_out_unwritable,
    "train_without_processed": _train_without_processed,
}


@pytest.mark.parametrize("kind", list(CLI))
def test_cli_fails_in_one_line(tmp_path, scans, kind):
    args, code, named, fragment = CLI[kind](tmp_path, scans)
    sentinel = tmp_path / "earlier_output.json"
    sentinel.write_text('{"kept": true}')

    proc = run_cli(*args)

    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert str(named) in lines[0] and fragment in lines[0], lines[0]
    assert sentinel.read_text() == '{"kept": true}'
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


def test_predict_one_bad_file_among_good(tmp_path, scans):
    inp = tmp_path / "in"
    shutil.copytree(scans["root"] / "in", inp)
    bad = inp / "b_bad.nii.gz"  # sorted between the good ones: the one after it must still be done
    bad.write_bytes(gzip.compress(b"\x00" * 100))
    out = tmp_path / "out"
    earlier = out / "b_bad" / "volumes.json"  # from an earlier run on a good version of this scan
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"organs": {}}')

    proc = run_cli("predict.py", inp, "-o", out, "--checkpoint", scans["ckpt"])

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    failed = [l for l in proc.stdout.splitlines() if l.strip().startswith("failed:")]
    assert len(failed) == 1 and str(bad) in failed[0] and "not a readable NIfTI" in failed[0], proc.stdout
    assert "2 done, 1 failed" in proc.stdout
    for name in ("a_good", "c_good"):
        vol = json.loads((out / name / "volumes.json").read_text())
        assert set(vol["organs"]) == set(config.ORGANS)
        assert nib.load(str(out / name / "combined_labels.nii.gz")).shape == SHAPE
    assert earlier.read_text() == '{"organs": {}}' and sorted(p.name for p in earlier.parent.iterdir()) == \
        ["volumes.json"]
    assert not list(out.rglob("*.tmp*"))


# --- kill -9 in the middle of a stage, then rerun -----------------------------------------------------------

def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not Path(path).exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the process ended before it could be killed"


def load_case_arrays(out):
    return {str(p.relative_to(out)): np.load(p) for p in sorted((out / "cases").rglob("*.npy"))}


def test_preprocessing_killed_then_rerun_matches_clean_run(tmp_path):
    data = tmp_path / "data"
    ids = [f"BDMAP_{i:08d}" for i in range(1, 7)]
    for cid in ids:
        write_case(data, cid)
    clean = pp.preprocess(data, tmp_path / "clean", workers=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "preprocessing.py", "--data-root", str(data), "--out", str(out), "--workers", "1",
           f"--TARGET_SPACING={','.join(map(str, TARGET))}"]

    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / "cases" / ids[0] / "ct.npy", proc)  # the first case's first file: mid-case, mid-run
    kill9(proc)
    assert not (out / "manifest.json").exists()
    # What a kill can also leave, made certain here: a half-written temp file and an unfinished case folder.
    half = next(out / "cases" / c for c in ids[1:] if not (out / "cases" / c / "meta.json").exists())
    half.mkdir(parents=True, exist_ok=True)
    (half / ".label.npy.999.tmp").write_bytes(b"\x93NUMPY half")
    (half / "ct.npy").write_bytes(b"\x93NUMPY half")  # no meta.json beside it: unfinished

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"] == clean["cases"] and manifest["skipped"] == [] == clean["skipped"]
    assert manifest["run"]["processed"] + manifest["run"]["reused"] == len(ids)
    a, b = load_case_arrays(out), load_case_arrays(tmp_path / "clean")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((out / "splits.json").read_text()) == json.loads((tmp_path / "clean" / "splits.json").read_text())
    assert not list(out.rglob("*.tmp"))


def test_training_killed_then_resumed_to_the_end(tmp_path):
    import train

    data = tmp_path / "data"
    for i in range(1, 5):
        write_case(data, f"BDMAP_{i:08d}")
    manifest = pp.preprocess(data, tmp_path / "processed", workers=1)
    assert len(manifest["cases"]) == 4
    epochs = 12
    cmd = [sys.executable, "train.py", f"--EPOCHS={epochs}", "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4",
           "--DEPTH=3", "--ITERS_PER_EPOCH=2", "--BATCH_SIZE=1", "--VAL_EVERY=100", "--SW_BATCH=4", "--AMP=false",
           "--AUGMENT=false"]
    env = dict(ENV, PELVIS_OUTPUT_ROOT=str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints"

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(ckpt_dir / "checkpoint_last.pth", proc)
    kill9(proc)
    killed_at = train.load_checkpoint(ckpt_dir / "checkpoint_last.pth")["epoch"]  # whole, whatever the moment
    assert 1 <= killed_at < epochs

    with open(tmp_path / "logs" / "train_log.jsonl", "a") as fh:  # as if killed while writing a log line
        fh.write('{"epoch": 99, "train_lo')
    (ckpt_dir / ".checkpoint_last.pth.tmp").write_bytes(b"PK half a checkpoint")  # as if killed in torch.save
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    resumed_from = int(resumed.stdout.split("after epoch ")[1].split()[0])
    assert resumed_from >= killed_at  # the last whole checkpoint (a later one may have landed after our read)
    assert f"epoch {resumed_from + 1}/{epochs}" in resumed.stdout and f"epoch {epochs}/{epochs}" in resumed.stdout
    for path in sorted(ckpt_dir.glob("*.pth")):
        ckpt = train.load_checkpoint(path)
        train.model_from_checkpoint(ckpt, path)
    assert train.load_checkpoint(ckpt_dir / "checkpoint_last.pth")["epoch"] == epochs
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best_model.pth", "checkpoint_last.pth"]
    log = [json.loads(l) for l in (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, epochs + 1))  # nothing lost, nothing twice


# --- DICOM input (issue #17): each bad series or structure set is one line naming the folder or file ---------

def _dicom_helpers():
    """tests/test_dicom_io.py's hand-made DICOM writers (imported late: that module skips without pydicom)."""
    pytest.importorskip("pydicom")
    import test_dicom_io
    return test_dicom_io


def _bad_series(kind, root):
    """(folder or file the error must name, what to call) for one kind of bad DICOM input."""
    import dicom_io
    t = _dicom_helpers()
    folder = root / kind
    vol = t.test_volume((12, 10, 6))
    if kind == "missing_slice":
        paths = t.write_slices(folder, vol)
        paths[3].unlink()
    elif kind == "gantry_tilt":  # positions step along z while the slices are tilted 15 degrees
        c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
        t.write_slices(folder, vol, iop=(1, 0, 0, 0, c, s))
        for p in folder.iterdir():
            import pydicom
            ds = pydicom.dcmread(str(p))
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], -30.0, float(ds.InstanceNumber) * 2.5]
            ds.save_as(str(p))
    elif kind == "non_orthogonal":
        t.write_slices(folder, vol, iop=(1, 0, 0, 0.3, 1, 0))
    elif kind == "mixed_sizes":
        uids = dict(study="1.2.3", series="1.2.3.4", frame="1.2.3.5")
        t.write_slices(folder, vol, uids=uids)
        t.write_slices(folder, t.test_volume((12, 9, 1)), origin=(-20.0, -30.0, 80.0), seed=3, uids=uids)
    elif kind == "mixed_orientations":
        uids = dict(study="1.2.3", series="1.2.3.4", frame="1.2.3.5")
        t.write_slices(folder, vol, uids=uids)
        t.write_slices(folder, t.test_volume((12, 10, 1)), iop=t.CORONAL, uids=uids, seed=4)
    elif kind == "duplicate_position":
        paths = t.write_slices(folder, vol)
        shutil.copy(paths[2], folder / "copy_of_slice")
        import pydicom
        ds = pydicom.dcmread(str(folder / "copy_of_slice"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(str(folder / "copy_of_slice"))
    elif kind == "single_slice":
        t.write_slices(folder, t.test_volume((12, 10, 1)))
    elif kind == "non_ct_modality":
        t.write_slices(folder, vol, modality="MR")
    elif kind == "two_ct_series":
        t.write_slices(folder, vol, seed=1)
        t.write_slices(folder, vol, seed=2)
    elif kind == "unreadable_file":
        t.write_slices(folder, vol)
        (folder / "IM_broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10")
        return folder / "IM_broken.dcm", lambda: dicom_io.read_ct_series(folder)
    elif kind == "truncated_pixels":
        paths = t.write_slices(folder, vol)
        paths[2].write_bytes(paths[2].read_bytes()[:-100])
        return paths[2], lambda: dicom_io.read_ct_series(folder)
    elif kind == "empty_folder":
        folder.mkdir(parents=True)
        (folder / "readme.txt").write_text("nothing here")
    return folder, lambda: dicom_io.read_ct_series(folder)


DICOM_SERIES_KINDS = {
    "missing_slice": "uneven slice spacing", "gantry_tilt": "gantry tilt", "non_orthogonal": "non-orthogonal",
    "mixed_sizes": "mixed slice sizes", "mixed_orientations": "mixed slice orientations",
    "duplicate_position": "same position", "single_slice": "only one CT slice", "non_ct_modality": "no CT series",
    "two_ct_series": "2 CT series", "unreadable_file": "unreadable DICOM file", "truncated_pixels": "pixel data",
    "empty_folder": "no DICOM files"}


@pytest.mark.parametrize("kind", sorted(DICOM_SERIES_KINDS))
def test_bad_dicom_series_is_one_line_naming_it(tmp_path, kind):
    import dicom_io
    where, call = _bad_series(kind, tmp_path)
    with pytest.raises(dicom_io.DicomError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(where)), message
    assert DICOM_SERIES_KINDS[kind] in message, message


def _series_with_rtstruct(root, contours_z=(50.0,), frame_uid=None):
    t = _dicom_helpers()
    import dicom_io
    t.write_slices(root / "CT", t.test_volume((12, 10, 6)))
    img, info = dicom_io.read_ct_series(root / "CT")
    contours = [np.array([[-18.0, -28.0, z], [-14.0, -28.0, z], [-14.0, -24.0, z]]) for z in contours_z]
    path = t.make_rtstruct(root / "RS.dcm", info, {"Bladder": contours}, frame_uid=frame_uid)
    return img, info, path


@pytest.mark.parametrize("kind", ["plane_between_slices", "plane_outside_series", "frame_of_reference",
                                  "not_an_rtstruct", "unreadable_rtstruct"])
def test_bad_rtstruct_is_one_line_naming_the_file(tmp_path, kind):
    import dicom_io
    z = {"plane_between_slices": (51.25,), "plane_outside_series": (250.0,)}.get(kind, (50.0,))
    img, info, path = _series_with_rtstruct(tmp_path, z, frame_uid="9.9.9" if kind == "frame_of_reference" else None)
    if kind == "not_an_rtstruct":
        path = Path(info.files[0])
    if kind == "unreadable_rtstruct":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(dicom_io.DicomError) as err:
        rs = dicom_io.read_rtstruct(path)
        dicom_io.check_frame_of_reference(rs, info)
        dicom_io.rasterise(rs.roi("Bladder"), img, info.frame_of_reference_uid)
    message = str(err.value)
    expect = {"plane_between_slices": "matches no CT slice", "plane_outside_series": "matches no CT slice",
              "frame_of_reference": "Frame of Reference", "not_an_rtstruct": "not an RT Structure Set",
              "unreadable_rtstruct": "truncated"}[kind]
    assert "\n" not in message and message.startswith(str(path)) and expect in message, message


def test_convert_dicom_batch_goes_on_past_bad_patients_on_the_command_line(tmp_path):
    """Good patient, RTSTRUCT without CT, missing slice, foreign frame of reference, CT without RTSTRUCT, two
    RTSTRUCTs: one converted case, five one-line failures, no traceback, exit code 1."""
    t = _dicom_helpers()
    root = tmp_path / "dicom"
    t.planning_export(root / "good")
    (root / "rs_only").mkdir(parents=True)
    shutil.copy(root / "good" / "RS" / "RS.dcm", root / "rs_only" / "RS.dcm")
    t.planning_export(root / "gap2")
    import pydicom
    order = sorted((root / "gap2" / "CT").iterdir(),  # file names are shuffled: sort by position
                   key=lambda p: float(pydicom.dcmread(str(p), stop_before_pixels=True).ImagePositionPatient[2]))
    order[3].unlink()  # a slice in the middle: a gap
    t.planning_export(root / "foreign", frame_uid="1.2.3.999")
    t.planning_export(root / "no_rs")
    shutil.rmtree(root / "no_rs" / "RS")
    t.planning_export(root / "two_rs")
    shutil.copy(root / "two_rs" / "RS" / "RS.dcm", root / "two_rs" / "RS2.dcm")
    proc = subprocess.run([sys.executable, "convert_dicom.py", str(root), "-o", str(tmp_path / "data")], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    failed = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(failed) == 5 and all(l.startswith("failed: ") for l in failed), proc.stderr
    for name, words in (("foreign", "Frame of Reference"), ("gap2", "uneven slice spacing"),
                        ("no_rs", "no RTSTRUCT"), ("rs_only", "RTSTRUCT without CT"), ("two_rs", "2 RTSTRUCT")):
        assert any(f"/{name}" in l and words in l for l in failed), (name, failed)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["BDMAP_good"]
    assert "1 converted, 5 failed" in proc.stdout


def test_dicom_without_pydicom_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "import dicom_io\n"
            "try:\n    dicom_io.read_ct_series(sys.argv[1])\n"
            "except dicom_io.DicomError as e:\n    print(e)\n")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "IM1").write_bytes(b"\x00" * 128 + b"DICM")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ct")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("pip install -r requirements-dicom.txt"), proc.stdout + proc.stderr
    save(good_volume()[0], tmp_path / "ct.nii.gz")  # the NIfTI path works without pydicom and never loads dicom_io
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "import preprocessing, predict\n"
            "print('dicom_io' in sys.modules, preprocessing.load_ct(sys.argv[1]).shape)\n")
    check = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ct.nii.gz")], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == f"False {SHAPE}", check.stderr[-1000:]
