"""Segment new CT files with a trained checkpoint; outputs in each input's exact geometry.

Usage:
    python predict.py CT.nii.gz [more files or folders] -o OUT [--checkpoint PATH] [--NAME=value ...]
    python predict.py /data/AbdomenAtlas -o OUT        # a folder of BDMAP_*/ct.nii.gz cases
    python predict.py patient01/CT -o OUT --format nifti,rtstruct,seg   # a DICOM CT series in, RTSTRUCT + SEG out

Writes OUT/<case>/segmentations/{prostate,bladder,rectum}.nii.gz (uint8 0/1), OUT/<case>/combined_labels.nii.gz
(uint8, AbdomenAtlas values config.LABEL_VALUES) and OUT/<case>/volumes.json (mL, status and quality flags per
organ, see status.py); --preview adds OUT/<case>/preview.png (axial, coronal, sagittal through the organs).
<case> is the folder name for .../<folder>/ct.nii.gz (AbdomenAtlas layout), otherwise the file name without
.nii(.gz) (a DICOM folder: its name, or its parent's for .../<patient>/CT or .../<patient>/DICOM). Outputs keep the input's shape, affine, qform and sform. The net and TARGET_SPACING / PATCH_SIZE /
HU_CLIP come from the checkpoint. A bad file gives a one-line error and the others are still processed; the
exit code is 1 when any failed.

DICOM (requirements-dicom.txt): a folder of CT slice files is one input (dicom_io.read_ct_series; a folder of
such folders gives one input each), named after the folder. --format rtstruct writes OUT/<case>/rtstruct.dcm
(dicom_export.write_rtstruct), reads it back and puts the Dice per organ against the mask written into
volumes.json ("dicom" -> "roundtrip_dice"; below config.ROUNDTRIP_MIN_DICE a warning there and on the console);
--format seg writes OUT/<case>/seg.dcm (DICOM-SEG). Both reference the input series; for a NIfTI input the CT
is first written as a DICOM series, OUT/<case>/ct_dicom/, for them to reference.
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
FORMATS = ("nifti", "rtstruct", "seg")  # --format choices; nifti is the default
CT_SERIES_DIR = "ct_dicom"  # OUT/<case>/ct_dicom/: a NIfTI input written as a DICOM series for the RTSTRUCT/SEG


def case_name(path):
    """Case folder name: the parent folder for */ct.nii.gz and for a DICOM folder named CT or DICOM
    (patient01/CT -> patient01), else the file or folder name without .nii(.gz)."""
    path = Path(path)
    name = path.name
    if path.is_dir() and name.lower() in ("ct", "dicom") and path.parent.name:
        return path.parent.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.parent.name if name == "ct" and path.parent.name else name


def dicom_folders(folder):
    """DICOM series inputs in `folder`: the folder itself when it holds files directly, else each sub-folder
    holding DICOM files (a folder of patient folders); [] when there is no DICOM at all."""
    import dicom_io  # numpy only at import; pydicom is loaded when a series is read

    if not dicom_io.is_dicom_series(folder):
        return []
    if any(f.is_file() and not f.name.startswith(".") for f in folder.iterdir()):
        return [folder]
    return sorted(c for c in folder.iterdir() if c.is_dir() and dicom_io.is_dicom_series(c))


def collect_inputs(inputs):
    """Expand folders: <folder>/ct.nii.gz, else <folder>/*/ct.nii.gz (BDMAP_* cases), else <folder>/*.nii(.gz),
    else DICOM series (dicom_folders). A path that does not exist is kept, so that it is reported as failed
    rather than silently dropped."""
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
                    found = dicom_folders(p)
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


def parse_formats(text):
    """'nifti,rtstruct' -> ("nifti", "rtstruct"); ValueError naming an unknown format."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in str(text).split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--format {text}: expected a comma-separated list of {', '.join(FORMATS)}")
    return formats


def write_nifti(labels, original, case_dir, organs):
    """Per-organ masks and combined_labels in the input's geometry (files replaced atomically)."""
    seg_dir = Path(case_dir) / "segmentations"
    seg_dir.mkdir(parents=True, exist_ok=True)
    combined = np.zeros(labels.shape, np.uint8)
    for k, organ in enumerate(organs, start=1):
        mask = labels == k
        save_nifti_atomic(like_input(mask, original), seg_dir / f"{organ}.nii.gz")
        combined[mask] = config.LABEL_VALUES[organ]
    save_nifti_atomic(like_input(combined, original), Path(case_dir) / "combined_labels.nii.gz")


def write_dicom(labels, original, case_dir, organs, formats, series=None):
    """RTSTRUCT (read back: Dice per organ) and/or DICOM-SEG referencing `series` (a dicom_io.SeriesInfo of the
    input; None = a NIfTI input, written as a DICOM series first). Returns the "dicom" record of volumes.json."""
    import dicom_export
    import dicom_io

    case_dir = Path(case_dir)
    record = {}
    if series is None:
        series = dicom_io.write_ct_series(original, case_dir / CT_SERIES_DIR, series_description="CT (from NIfTI)")
        record["ct_series"] = f"{CT_SERIES_DIR}/ (written from the NIfTI input, referenced by the files below)"
    record["series_instance_uid"] = series.series_uid
    masks = {organ: (labels == k).astype(np.uint8) for k, organ in enumerate(organs, start=1)}
    if "rtstruct" in formats:
        path = case_dir / "rtstruct.dcm"
        written = dicom_export.write_rtstruct(masks, original, series, path)
        check = dicom_export.rtstruct_roundtrip(path, masks, original, series.frame_of_reference_uid)
        record["rtstruct"] = {"file": path.name, "contours": written["contours"],
                              "roundtrip_dice": check["dice"], "warnings": check["warnings"]}
    if "seg" in formats:
        if any(m.any() for m in masks.values()):
            record["seg"] = {"file": "seg.dcm", "segments": dicom_export.write_seg(masks, original, series,
                                                                                   case_dir / "seg.dcm")["segments"]}
        else:  # a DICOM-SEG needs at least one segment
            record["seg"] = {"file": None, "segments": [], "note": "no organ found, no DICOM-SEG written"}
    return record


def write_outputs(labels, original, case_dir, organs, formats=("nifti",), series=None, assessment=None):
    """The outputs asked for in `formats` and volumes.json (mL per organ; the DICOM record) for one case;
    `assessment` (status.assess) adds each organ's status and flags, and the pelvis landmark."""
    Path(case_dir).mkdir(parents=True, exist_ok=True)
    spacing = [float(z) for z in original.header.get_zooms()[:3]]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {}
    for k, organ in enumerate(organs, start=1):
        n = int((labels == k).sum())
        volumes[organ] = {"present": n > 0, "ml": n * voxel_ml, "voxels": n}
        if assessment is not None:
            volumes[organ] = dict(assessment["organs"][organ], **volumes[organ])
    record = {"spacing_mm": spacing, "shape": list(labels.shape), "organs": volumes}
    if assessment is not None:
        record.update(pelvis=assessment["pelvis"], scan_z_mm=assessment["scan_z_mm"])
    if "nifti" in formats:
        write_nifti(labels, original, case_dir, organs)
    if "rtstruct" in formats or "seg" in formats:
        record["dicom"] = write_dicom(labels, original, case_dir, organs, formats, series)
    write_text_atomic(Path(case_dir) / "volumes.json", json.dumps(record, indent=2))
    return record


def check_dicom_packages(formats):
    """ValueError with one line when a DICOM output is asked for and its packages are missing."""
    import importlib

    needed = (["pydicom", "contourpy"] if "rtstruct" in formats else []) + (["highdicom"] if "seg" in formats else [])
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ValueError(f"--format {','.join(formats)} needs {name}: pip install -r requirements-dicom.txt") \
                from None


def read_input(path):
    """(CT image, SeriesInfo or None) for a NIfTI file or a DICOM series folder; one-line ValueError otherwise."""
    import preprocessing

    if path.is_dir():
        import dicom_io

        if not dicom_io.is_dicom_series(path):
            raise preprocessing.CaseError(path, "no CT (.nii/.nii.gz or DICOM series) found in this folder")
        return dicom_io.read_ct_series(path)
    return preprocessing.load_ct(path), None  # checks the file; one-line CaseError otherwise


def predict_files(paths, out_dir, checkpoint=None, show_progress=None, formats=("nifti",), preview=False):
    """Segment every CT in `paths` (files or folders) into out_dir/<case>/; returns (done, failed) where done is
    [(input path, case folder)] and failed is [(input path, one-line reason)]. `formats`: any of FORMATS.

    Bad checkpoints and an unwritable out_dir raise (nothing could be done); a bad input file only fails itself.
    """
    import inference
    import preprocessing
    import status
    from tqdm import tqdm

    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    check_dicom_packages(formats)
    out_dir = check_writable(out_dir)
    device = inference.pick_device()
    inference.keep_freed_memory()
    model, ckpt, _ = inference.load_model(checkpoint, device)
    inference.use_checkpoint_settings(ckpt)
    organs = tuple(ckpt["model_config"].get("organs", config.ORGANS))
    thresholds = status.thresholds_of(ckpt)
    files = collect_inputs(paths)
    done, failed, seen = [], [], {}
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    for path in tqdm(files, desc="predict", unit="file", disable=not show_progress):
        name = case_name(path)
        try:
            if name in seen:
                raise preprocessing.CaseError(path, f"case name {name!r} already used by {seen[name]}")
            ct, series = read_input(path)
            prepared = inference.prepare_case(ct)  # resampled CT and femoral heads, for both steps
            labels = inference.predict_case(model, ct, device, prepared)
            labels, assessment = status.assess(ct, labels, model, device, thresholds, organs, prepared)
            original = ct if series is not None else nib.load(str(path))  # header with the file's own qform/sform
            case_dir = out_dir / name
            record = write_outputs(labels, original, case_dir, organs, formats, series, assessment)
            if preview:
                status.preview_png(ct, labels, organs, case_dir / "preview.png",
                                   status.console_line(name, record["organs"], record.get("pelvis")))
        except (ValueError, OSError) as exc:  # CaseError, DicomError and ExportError are ValueErrors
            failed.append((path, str(exc)))
            tqdm.write(f"predict: failed {exc}" if str(path) in str(exc) else f"predict: failed {path}: {exc}")
            continue
        seen[name] = path
        done.append((path, case_dir))
        tqdm.write(f"predict: {status.console_line(name, record['organs'], record.get('pelvis'))}")
        for line in dicom_lines(name, record.get("dicom")):
            tqdm.write(line)
    return done, failed


def dicom_lines(name, record):
    """Console lines for the DICOM outputs of one case: what was written, the round-trip Dice, warnings."""
    if not record:
        return []
    lines = []
    if "ct_series" in record:
        lines.append(f"predict: {name}: CT written as a DICOM series in {CT_SERIES_DIR}/ (the NIfTI input has none)")
    rt = record.get("rtstruct")
    if rt:
        dice = ", ".join(f"{o} {d:.4f}" for o, d in rt["roundtrip_dice"].items() if d is not None) or "no organ"
        lines.append(f"predict: {name}: {rt['file']} written, read back: Dice {dice}")
        lines += [f"predict: warning: {w}" for w in rt["warnings"]]
    seg = record.get("seg")
    if seg:
        lines.append(f"predict: {name}: " + (f"seg.dcm written ({len(seg['segments'])} segments)" if seg["file"]
                                              else seg["note"]))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="CT .nii/.nii.gz files, DICOM series or folders")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: CHECKPOINT_DIR/best_model.pth")
    parser.add_argument("--preview", action="store_true", help="write <case>/preview.png (3 views, organ outlines)")
    parser.add_argument("--format", default="nifti", help=f"comma-separated, any of {', '.join(FORMATS)} "
                                                          "(default nifti)")
    args, rest = parser.parse_known_args(argv)
    try:
        formats = parse_formats(args.format)
    except ValueError as exc:
        parser.error(str(exc))  # usage error: exit code 2, like a mistyped --NAME=value
    try:
        config.configure(rest)
        done, failed = predict_files(args.inputs, args.out, args.checkpoint, formats=formats, preview=args.preview)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"predict: {exc}")
    print(f"predict: {len(done)} done, {len(failed)} failed -> {args.out}")
    if failed:
        for path, reason in failed:
            print(f"  failed: {reason}" if str(path) in reason else f"  failed: {path}: {reason}")
        sys.exit(1)


if __name__ == "__main__":
    main()
