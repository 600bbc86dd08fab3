"""Segment new CT files with a trained checkpoint; outputs in each input's exact geometry.

Usage:
    python predict.py CT.nii.gz [more files or folders] -o OUT [--checkpoint PATH] [--NAME=value ...]
    python predict.py /data/AbdomenAtlas -o OUT        # a folder of BDMAP_*/ct.nii.gz cases

Writes OUT/<case>/segmentations/{prostate,bladder,rectum}.nii.gz (uint8 0/1), OUT/<case>/combined_labels.nii.gz
(uint8, AbdomenAtlas values config.LABEL_VALUES) and OUT/<case>/volumes.json (mL, status and quality flags per
organ, see status.py); --preview adds OUT/<case>/preview.png (axial, coronal, sagittal through the organs).
<case> is the folder name for .../<folder>/ct.nii.gz (AbdomenAtlas layout), otherwise the file name without
.nii(.gz). Outputs keep the input's shape, affine, qform and sform. The net and TARGET_SPACING / PATCH_SIZE /
HU_CLIP come from the checkpoint. A bad file gives a one-line error and the others are still processed; the
exit code is 1 when any failed.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

import config
from fileio import save_nifti_atomic, write_text_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_name(path):
    """Case folder name: the parent folder for */ct.nii.gz, else the file name without .nii(.gz)."""
    path = Path(path)
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.parent.name if name == "ct" and path.parent.name else name


def collect_inputs(inputs):
    """Expand folders: <folder>/ct.nii.gz, else <folder>/*/ct.nii.gz (BDMAP_* cases), else <folder>/*.nii(.gz).
    A path that does not exist is kept, so that it is reported as failed rather than silently dropped."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            if (p / "ct.nii.gz").is_file():
                found = [p / "ct.nii.gz"]
            else:
                found = sorted(c / "ct.nii.gz" for c in p.iterdir() if (c / "ct.nii.gz").is_file())
                if not found:
                    found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES))
            if not found:
                files.append(p)  # reported as "no CT found"
            files.extend(found)
        else:
            files.append(p)
    return files


def check_writable(out_dir):
    """Create out_dir and prove a file can be written there; ValueError with one line otherwise."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ValueError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None
    return out_dir


def like_input(data, original):
    """A NIfTI image of `data` (uint8) with the original's shape, affine, qform and sform (and their codes)."""
    header = original.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)  # an input with scl_slope / scl_inter must not rescale the mask
    header["cal_min"], header["cal_max"] = 0, 0
    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), original.affine, header)
    qform, qcode = original.get_qform(coded=True)
    sform, scode = original.get_sform(coded=True)
    img.set_qform(qform if qform is not None else original.affine, code=int(qcode or 0))
    img.set_sform(sform if sform is not None else original.affine, code=int(scode or 0))
    return img


def write_outputs(labels, original, case_dir, organs, assessment=None):
    """Per-organ masks, combined_labels and volumes.json for one case (files replaced atomically); `assessment`
    (status.assess) adds each organ's status and flags, and the pelvis landmark."""
    seg_dir = Path(case_dir) / "segmentations"
    seg_dir.mkdir(parents=True, exist_ok=True)
    spacing = [float(z) for z in original.header.get_zooms()[:3]]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    combined = np.zeros(labels.shape, np.uint8)
    volumes = {}
    for k, organ in enumerate(organs, start=1):
        mask = labels == k
        save_nifti_atomic(like_input(mask, original), seg_dir / f"{organ}.nii.gz")
        combined[mask] = config.LABEL_VALUES[organ]
        n = int(mask.sum())
        volumes[organ] = {"present": n > 0, "ml": n * voxel_ml, "voxels": n}
        if assessment is not None:
            volumes[organ] = dict(assessment["organs"][organ], **volumes[organ])
    save_nifti_atomic(like_input(combined, original), Path(case_dir) / "combined_labels.nii.gz")
    record = {"spacing_mm": spacing, "shape": list(labels.shape), "organs": volumes}
    if assessment is not None:
        record.update(pelvis=assessment["pelvis"], scan_z_mm=assessment["scan_z_mm"])
    write_text_atomic(Path(case_dir) / "volumes.json", json.dumps(record, indent=2))
    return volumes


def predict_files(paths, out_dir, checkpoint=None, show_progress=None, preview=False):
    """Segment every CT in `paths` (files or folders) into out_dir/<case>/; returns (done, failed) where done is
    [(input path, case folder)] and failed is [(input path, one-line reason)].

    Bad checkpoints and an unwritable out_dir raise (nothing could be done); a bad input file only fails itself.
    """
    import evaluate
    import preprocessing
    import status
    from tqdm import tqdm

    out_dir = check_writable(out_dir)
    device = evaluate.pick_device()
    model, ckpt, _ = evaluate.load_model(checkpoint, device)
    evaluate.use_checkpoint_settings(ckpt)
    organs = tuple(ckpt["model_config"].get("organs", config.ORGANS))
    thresholds = status.thresholds_of(ckpt)
    files = collect_inputs(paths)
    done, failed, seen = [], [], {}
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    for path in tqdm(files, desc="predict", unit="file", disable=not show_progress):
        name = case_name(path)
        try:
            if path.is_dir():
                raise preprocessing.CaseError(path, "no CT (.nii/.nii.gz) found in this folder")
            if name in seen:
                raise preprocessing.CaseError(path, f"case name {name!r} already used by {seen[name]}")
            ct = preprocessing.load_ct(path)  # checks the file; one-line CaseError otherwise
            labels = evaluate.predict_case(model, ct, device)
            original = nib.load(str(path))  # header with the file's own qform/sform
            labels, assessment = status.assess(ct, labels, model, device, thresholds, organs)
            case_dir = out_dir / name
            volumes = write_outputs(labels, original, case_dir, organs, assessment)
            if preview:
                status.preview_png(ct, labels, organs, case_dir / "preview.png", status.console_line(name, volumes))
        except (ValueError, OSError) as exc:  # CaseError is a ValueError
            failed.append((path, str(exc)))
            tqdm.write(f"predict: failed {exc}" if str(path) in str(exc) else f"predict: failed {path}: {exc}")
            continue
        seen[name] = path
        done.append((path, case_dir))
        tqdm.write(f"predict: {status.console_line(name, volumes)}")
    return done, failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="CT .nii/.nii.gz files or folders")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: CHECKPOINT_DIR/best_model.pth")
    parser.add_argument("--preview", action="store_true", help="write <case>/preview.png (3 views, organ outlines)")
    args, rest = parser.parse_known_args(argv)
    try:
        config.configure(rest)
        done, failed = predict_files(args.inputs, args.out, args.checkpoint, preview=args.preview)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"predict: {exc}")
    print(f"predict: {len(done)} done, {len(failed)} failed -> {args.out}")
    if failed:
        for path, reason in failed:
            print(f"  failed: {reason}" if str(path) in reason else f"  failed: {path}: {reason}")
        sys.exit(1)


if __name__ == "__main__":
    main()
