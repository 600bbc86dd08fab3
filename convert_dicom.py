"""Planning-system exports (per-patient folders of a DICOM CT series + an RT Structure Set) -> AbdomenAtlas layout.

Usage:
    python convert_dicom.py DICOM_ROOT -o DATA_ROOT
    python run_pipeline.py --all --data-root DATA_ROOT          # then the pipeline runs unchanged

DICOM_ROOT/<patient>/ holds (at any depth) one CT series and one RTSTRUCT; a folder with several CT series is
fine when the RTSTRUCT names the one it was drawn on. Writes, per patient:
    DATA_ROOT/BDMAP_<patient>/ct.nii.gz                    int16 HU, RAS (dicom_io.read_ct_series)
    DATA_ROOT/BDMAP_<patient>/segmentations/<organ>.nii.gz uint8 0/1 on the CT grid, for every organ of
                                                           config.ORGANS + config.EXTRA_MASKS whose ROI has contours
    DATA_ROOT/BDMAP_<patient>/conversion.json              source files, which ROI became which organ, every
                                                           ROI that matched no organ, and each organ's status
ROI names are matched to organs with config.ROI_SYNONYMS (case-insensitive, spaces/'_'/'-' alike). An organ
whose ROI has no contours, or that has no ROI, is "absent": no mask file is written (preprocessing then treats
it as absent, exactly as it does for a missing file today) and conversion.json says which of the two it was.
A bad patient folder is one line and the others are still converted; the exit code is 1 when any failed.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

import config
import dicom_io
from dicom_io import DicomError
from fileio import save_nifti_atomic, write_text_atomic


def normalise_roi_name(name):
    """'Femoral Head_Lt ' -> 'femoral_head_lt': lower case, runs of spaces, '_' and '-' made one '_'."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def synonym_table():
    """{normalised ROI name: organ} from config.ROI_NAMES and config.ROI_SYNONYMS; ValueError on a clash."""
    table = {}
    for organ in tuple(config.ORGANS) + tuple(config.EXTRA_MASKS):
        names = [config.ROI_NAMES.get(organ, organ)] + list(config.ROI_SYNONYMS.get(organ, ())) + [organ]
        for name in names:
            key = normalise_roi_name(name)
            if table.setdefault(key, organ) != organ:
                raise ValueError(f"config.ROI_SYNONYMS: {name!r} is listed for both {table[key]} and {organ}")
    return table


def match_rois(structure_set):
    """({organ: Roi or None}, [names of ROIs that match no organ]).

    Two ROIs for one organ: the one with contours wins; two with contours are a DicomError (guessing which
    is the real bladder would silently train on the wrong one)."""
    table = synonym_table()
    organs = {o: [] for o in tuple(config.ORGANS) + tuple(config.EXTRA_MASKS)}
    unmatched = []
    for roi in structure_set.rois:
        organ = table.get(normalise_roi_name(roi.name))
        if organ:
            organs[organ].append(roi)
        else:
            unmatched.append(roi.name)
    chosen = {}
    for organ, rois in organs.items():
        full = [r for r in rois if not r.empty]
        if len(full) > 1:
            raise DicomError(structure_set.path, f"{len(full)} ROIs with contours for {organ}: "
                                                 f"{', '.join(repr(r.name) for r in full)}; rename or remove one")
        chosen[organ] = full[0] if full else (rois[0] if rois else None)
    return chosen, unmatched


def patient_folders(root):
    """Sorted sub-folders of DICOM_ROOT (one per patient); DICOM_ROOT itself when it has none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM root not found")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return subs or [root]


def case_id(folder):
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(folder).resolve().name).strip("_") or "case"
    return name if name.startswith("BDMAP_") else f"BDMAP_{name}"


def _choose_rtstruct(scan, folder):
    """(path, StructureSet) of the folder's one RTSTRUCT (or the one drawn on a CT series that is here)."""
    if not scan["rtstruct"]:
        raise DicomError(folder, "no RTSTRUCT in this folder (no contours to train on)")
    sets = [dicom_io.read_rtstruct(p) for p, _ in scan["rtstruct"]]
    if len(sets) > 1:
        here = [s for s in sets if set(s.referenced_series_uids) & set(scan["ct"])]
        if len(here) != 1:
            raise DicomError(folder, f"{len(sets)} RTSTRUCT files ({', '.join(Path(s.path).name for s in sets)}); "
                                     "keep one per patient folder")
        sets = here
    return sets[0]


def _choose_series(scan, structure_set, folder, notes):
    """SeriesInstanceUID of the CT the structure set was drawn on."""
    refs = [u for u in structure_set.referenced_series_uids if u in scan["ct"]]
    if refs:
        return refs[0]
    if not scan["ct"]:
        what = f"CT series {structure_set.referenced_series_uids[0]}" if structure_set.referenced_series_uids \
            else "a CT series"
        raise DicomError(structure_set.path, f"RTSTRUCT without CT: it references {what}, which is not in {folder}")
    if len(scan["ct"]) == 1:
        uid = next(iter(scan["ct"]))
        if structure_set.referenced_series_uids:
            notes.append(f"RTSTRUCT references series {structure_set.referenced_series_uids[0]}; took the folder's "
                         "only CT series (its Frame of Reference is checked)")
        return uid
    raise DicomError(folder, f"{len(scan['ct'])} CT series and the RTSTRUCT names none of them")


def convert_patient(folder, out_root):
    """Convert one patient folder into out_root/BDMAP_<name>/; returns the conversion record (dict).
    DicomError (one line) when the folder cannot be used; nothing is written for it then."""
    folder, out_root = Path(folder), Path(out_root)
    scan = dicom_io.scan_folder(folder)
    notes = list(scan["notes"])
    structure_set = _choose_rtstruct(scan, folder)
    uid = _choose_series(scan, structure_set, folder, notes)
    img, info = dicom_io.read_ct_series(folder, series_uid=uid, scan=scan)
    notes = sorted(set(notes + info.notes), key=(notes + info.notes).index) + structure_set.notes
    dicom_io.check_frame_of_reference(structure_set, info)
    chosen, unmatched = match_rois(structure_set)
    voxel_ml = float(np.prod(np.linalg.norm(img.affine[:3, :3], axis=0))) / 1000.0
    masks, organs = {}, {}
    for organ, roi in chosen.items():
        if roi is None:
            organs[organ] = dict(status="absent", roi=None, reason="no ROI with a matching name")
        elif roi.empty:
            organs[organ] = dict(status="absent", roi=roi.name, reason="ROI has no contours")
        else:
            mask = dicom_io.rasterise(roi, img, info.frame_of_reference_uid)
            masks[organ] = mask
            n = int(mask.sum())
            organs[organ] = dict(status="present", roi=roi.name, voxels=n, ml=round(n * voxel_ml, 3),
                                 contours=len(roi.contours))
            if not n:
                notes.append(f"{organ}: ROI {roi.name!r} encloses no voxel centre")
    cid = case_id(folder)
    record = dict(case_id=cid, source=str(folder), rtstruct=structure_set.path, ct_series_uid=info.series_uid,
                  frame_of_reference_uid=info.frame_of_reference_uid, ct_shape=list(img.shape),
                  ct_spacing=[round(float(s), 4) for s in np.linalg.norm(img.affine[:3, :3], axis=0)],
                  organs=organs, unmatched_rois=unmatched,
                  empty_unmatched_rois=[n for n in unmatched if structure_set.roi(n).empty], notes=notes)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{cid}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "segmentations").mkdir(parents=True)
        save_nifti_atomic(img, tmp / "ct.nii.gz")
        import nibabel as nib
        for organ, mask in masks.items():
            save_nifti_atomic(nib.Nifti1Image(mask, img.affine), tmp / "segmentations" / f"{organ}.nii.gz")
        write_text_atomic(tmp / "conversion.json", json.dumps(record, indent=1) + "\n")
        dicom_io.replace_dir(tmp, out_root / cid)  # an earlier conversion is replaced only by a complete one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def summary_line(record):
    parts = []
    for organ, o in record["organs"].items():
        if o["status"] == "present":
            parts.append(f"{organ} {o['ml']:.1f} mL ({o['roi']!r})")
        elif o["roi"]:
            parts.append(f"{organ} absent ({o['roi']!r} has no contours)")
        else:
            parts.append(f"{organ} absent (no ROI)")
    shape = "x".join(map(str, record["ct_shape"]))
    spacing = "x".join(f"{s:g}" for s in record["ct_spacing"])
    line = f"{record['case_id']} <- {record['source']}: CT {shape} at {spacing} mm; {', '.join(parts)}"
    if record["unmatched_rois"]:
        line += f"; ROIs matching no organ: {', '.join(record['unmatched_rois'])}"
    return line


def convert(dicom_root, out_root):
    """Convert every patient folder; returns (records, failures) where failures are one-line messages."""
    records, failures = [], []
    folders = patient_folders(dicom_root)
    ids = [case_id(f) for f in folders]
    for folder, cid in zip(folders, ids):
        if ids.count(cid) > 1:
            failures.append(f"{folder}: its case name {cid} is not unique among the patient folders")
            continue
        try:
            records.append(convert_patient(folder, out_root))
        except DicomError as exc:
            failures.append(str(exc))
        except OSError as exc:
            failures.append(f"{folder}: {exc.strerror or exc}")
    return records, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dicom_root", type=Path, help="folder of per-patient DICOM folders")
    parser.add_argument("-o", "--out", type=Path, required=True, help="DATA_ROOT to write BDMAP_* cases into")
    args = parser.parse_args(argv)
    try:
        dicom_io.require_pydicom("convert_dicom.py")
        records, failures = convert(args.dicom_root, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"convert_dicom: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(summary_line(record))
        for note in record["notes"]:
            print(f"  note: {note}")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"convert_dicom: {len(records)} converted, {len(failures)} failed -> {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
