"""DICOM in: CT series -> NIfTI (and back), RT Structure Sets -> masks on a CT grid.

Usage:
    img, info = dicom_io.read_ct_series("patient/CT")          # RAS+ int16 HU image, SeriesInfo
    rs = dicom_io.read_rtstruct("patient/RS.dcm")               # StructureSet: ROIs with contours in LPS mm
    mask = dicom_io.rasterise(rs.roi("Bladder"), img, info.frame_of_reference_uid)   # uint8 on img's grid
    info = dicom_io.write_ct_series(img, "out/CT")              # a NIfTI CT as a DICOM CT series
    python dicom_io.py FOLDER                                   # print what a folder holds
    python dicom_io.py RS.dcm                                   # ROI volumes (cc) on a 1 mm contour grid

Geometry. DICOM patient coordinates are LPS (+x patient left, +y posterior, +z head); NIfTI world is RAS, so
x and y change sign. A slice's voxel (column i, row j) sits at ImagePositionPatient + i * PixelSpacing[1] * row
direction + j * PixelSpacing[0] * column direction (ImageOrientationPatient = row direction, column direction);
slices are ordered by their position along the normal (row x column), never by InstanceNumber, and the slice
spacing is the median gap between those positions, never SliceThickness. The image is then reoriented to the
closest canonical RAS axes (flips and permutations only; an oblique series keeps its rotation in the affine),
so arrays are indexed [x, y, z] like every other stage.

Only pydicom is needed (imported inside the functions, so the NIfTI path never loads it); without it a DICOM
feature stops with one line saying `pip install -r requirements-dicom.txt`. Every refusal is a DicomError
whose message is one line, 'path: problem'.
"""
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config

INSTALL_HINT = "DICOM support needs pydicom: pip install -r requirements-dicom.txt"
# Copied from the CT into every file written for that patient (RTSTRUCT, SEG, a CT written back).
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                          "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                          "ReferringPhysicianName", "StudyDescription", "Manufacturer", "InstitutionName",
                          "PatientPosition")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
NOT_DICOM_SUFFIXES = (".txt", ".md", ".json", ".csv", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".nii",
                      ".gz", ".zip", ".log", ".ini", ".py", ".sh")  # skipped with a note, never parsed
ORTHO_TOL = 1e-3  # |row|, |col| = 1 and row . col = 0 within this (ImageOrientationPatient is often rounded)
SAME_TOL = 1e-4  # orientation / spacing of two slices count as equal within this
TILT_TOL_MM = 0.05  # slice positions may leave the line along the normal by this much (mm) before "tilt"


class DicomError(ValueError):
    """Input that cannot be used; the message is one line, 'path: problem'."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), str(problem)
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # survive pickling between worker processes
        return DicomError, (self.path, self.problem)


def _pydicom(path):
    try:
        import pydicom
    except ImportError:
        raise DicomError(path, INSTALL_HINT) from None
    return pydicom


def require_pydicom(what="DICOM input"):
    """DicomError with the install hint when pydicom is missing (for callers that want to fail early)."""
    _pydicom(what)


def _line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else 'no detail'}"


# --- Finding DICOM files ----------------------------------------------------------------------------------

def _has_dicm_magic(path):
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_series(path, max_files=50):
    """True when `path` is a folder holding DICOM files (the 'DICM' preamble), directly or in sub-folders.

    Cheap (reads 132 bytes of at most `max_files` files, no pydicom), for callers deciding whether an input
    is a NIfTI file or a DICOM folder; read_ct_series() does the real checks."""
    path = Path(path)
    if not path.is_dir():
        return False
    seen = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(NOT_DICOM_SUFFIXES):
                continue
            if _has_dicm_magic(Path(root) / name):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


def _candidate_files(folder):
    """(files to parse, notes): every file under `folder`, minus hidden files, DICOMDIR and known non-DICOM."""
    files, skipped = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            (skipped if name.lower().endswith(NOT_DICOM_SUFFIXES) else files).append(Path(root) / name)
    notes = [f"skipped {len(skipped)} non-DICOM file(s) ({', '.join(p.name for p in skipped[:3])})"] if skipped else []
    return files, notes


def _read_header(path):
    """Header of one DICOM file without pixel data; DicomError when it is not readable DICOM."""
    pydicom = _pydicom(path)
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not _has_dicm_magic(path))
    except Exception as exc:  # pydicom raises many types for garbage and truncation
        raise DicomError(path, f"unreadable DICOM file ({_line(exc)})") from None
    if not _uid(ds, "SOPClassUID", "MediaStorageSOPClassUID") and "Modality" not in ds:
        raise DicomError(path, "unreadable DICOM file (no SOP Class UID or Modality: truncated, or not DICOM)")
    return ds


def _uid(ds, keyword, meta_keyword=None):
    value = str(ds.get(keyword, "") or "").strip()
    if not value and meta_keyword and getattr(ds, "file_meta", None) is not None:
        value = str(ds.file_meta.get(meta_keyword, "") or "").strip()
    return value


def scan_folder(folder):
    """Every DICOM file under `folder`, sorted into kinds.

    Returns dict(ct={series_uid: [(path, header), ...]}, rtstruct=[(path, header)], other={modality: n},
    notes=[str]). Headers are pydicom Datasets without pixel data. Localizer/scout images (ImageType
    LOCALIZER, dicom2nifti #60) are left out with a note. DicomError for an unreadable file or an empty folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(folder, "DICOM folder not found")
    files, notes = _candidate_files(folder)
    out = dict(ct={}, rtstruct=[], other={}, notes=notes)
    localizers = 0
    for path in files:
        ds = _read_header(path)
        modality = str(ds.get("Modality", "") or "").upper()
        sop_class = _uid(ds, "SOPClassUID", "MediaStorageSOPClassUID")
        if modality == "RTSTRUCT" or sop_class == RTSTRUCT_STORAGE:
            out["rtstruct"].append((path, ds))
        elif modality == "CT" and "ImagePositionPatient" in ds:
            if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
                localizers += 1
                continue
            out["ct"].setdefault(_uid(ds, "SeriesInstanceUID"), []).append((path, ds))
        else:
            key = modality or "unknown"
            if modality == "CT":
                key = "CT without ImagePositionPatient"
            out["other"][key] = out["other"].get(key, 0) + 1
    if localizers:
        notes.append(f"dropped {localizers} localizer/scout image(s)")
    if not files or not (out["ct"] or out["rtstruct"] or out["other"]):
        raise DicomError(folder, "no DICOM files in this folder")
    return out


def _series_label(uid, items):
    desc = str(items[0][1].get("SeriesDescription", "") or "").strip()
    return f"{uid or '(no SeriesInstanceUID)'} ({len(items)} slices{', ' + repr(desc) if desc else ''})"


def choose_ct_series(scan, folder, series_uid=None):
    """(series_uid, [(path, header)]) of the one CT series in a scan_folder() result.

    Several CT series: the one named by series_uid, else DicomError listing them. No CT series: DicomError
    naming what the folder holds instead (MR, RTDOSE, ...)."""
    cts = scan["ct"]
    if series_uid is not None:
        if series_uid not in cts:
            raise DicomError(folder, f"no CT series with SeriesInstanceUID {series_uid} "
                                     f"(found: {', '.join(_series_label(u, v) for u, v in cts.items()) or 'none'})")
        return series_uid, cts[series_uid]
    if not cts:
        found = ", ".join(f"{n} {m}" for m, n in sorted(scan["other"].items()))
        if scan["rtstruct"]:
            found = ", ".join(filter(None, [found, f"{len(scan['rtstruct'])} RTSTRUCT"]))
        raise DicomError(folder, f"no CT series in this folder (found {found or 'nothing usable'}); "
                                 "only CT is supported")
    stacks = {u: v for u, v in cts.items() if len(v) > 1}
    if len(cts) > 1 and len(stacks) == 1:  # the others are single images: scouts not flagged LOCALIZER, dose reports
        scan["notes"].append(f"ignored {len(cts) - 1} single-image CT series (localizer?)")
        return next(iter(stacks.items()))
    if len(cts) > 1:
        raise DicomError(folder, f"{len(cts)} CT series: {'; '.join(_series_label(u, v) for u, v in cts.items())}"
                                 "; choose one by its SeriesInstanceUID")
    return next(iter(cts.items()))


# --- CT series -> image ------------------------------------------------------------------------------------

@dataclass
class SeriesInfo:
    """What a DICOM writer needs to know about a CT series (the output helper codes against these names).

    Slice order everywhere below = increasing index along `slice_axis` of the image read_ct_series() returns
    (for an axial head-first series: inferior -> superior, k = 0, 1, ...):
        folder                 str, the series folder
        study_uid, series_uid, frame_of_reference_uid   str (derived, with a note, when the files lack them)
        sop_instance_uids      [str] per slice, slice order
        sop_class_uids         [str] per slice, slice order (CT Image Storage)
        slice_positions        [[x, y, z]] ImagePositionPatient per slice, LPS mm, slice order
        slice_axis             int, axis of the RAS image along which the slices are stacked (2 for axial)
        slice_spacing          float, mm, from the positions
        files                  [str] per slice, slice order
        datasets               [pydicom.Dataset] per slice, slice order: header copies WITHOUT pixel data
                               (PixelData removed), UIDs filled in as above; the source images for highdicom
        patient                {keyword: str} PATIENT_STUDY_KEYWORDS, '' when absent
        series_description     str
        notes                  [str], what was dropped, derived or fixed on the way
    """
    folder: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list
    sop_class_uids: list
    slice_positions: list
    slice_axis: int
    slice_spacing: float
    files: list
    datasets: list
    patient: dict
    series_description: str = ""
    notes: list = field(default_factory=list)


def _floats(ds, keyword, n, path):
    try:
        values = [float(v) for v in ds[keyword].value]
    except (KeyError, TypeError, ValueError):
        raise DicomError(path, f"missing or unreadable {keyword}") from None
    if len(values) != n or not np.all(np.isfinite(values)):
        raise DicomError(path, f"{keyword} should hold {n} numbers, got {values}")
    return np.asarray(values)


def stack_geometry(items, folder):
    """Check a list of (path, header) slices and order them; returns (order, affine_lps, spacing).

    order: indices of `items` sorted by position along the slice normal (ascending). affine_lps: 4x4, voxel
    (column i, row j, slice k in that order) -> LPS mm. spacing: [column, row, slice] mm. DicomError for mixed
    sizes or orientations, a non-orthogonal orientation, gantry tilt, two slices at one position, a missing
    slice (uneven gaps) or a single slice.
    """
    first_path, first = items[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    ps = _floats(first, "PixelSpacing", 2, first_path)
    size = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
    for path, ds in items[1:]:
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != size:
            raise DicomError(folder, f"mixed slice sizes ({size[0]}x{size[1]} and {ds.get('Rows')}x"
                                     f"{ds.get('Columns')}, e.g. {Path(path).name})")
        if np.max(np.abs(_floats(ds, "ImageOrientationPatient", 6, path) - iop)) > SAME_TOL:
            raise DicomError(folder, f"mixed slice orientations (e.g. {Path(path).name})")
        if np.max(np.abs(_floats(ds, "PixelSpacing", 2, path) - ps)) > SAME_TOL:
            raise DicomError(folder, f"mixed pixel spacings (e.g. {Path(path).name})")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(first_path, "multi-frame (enhanced) CT is not supported; export classic single-frame slices")
    if min(size) < 1 or np.any(ps <= 0):
        raise DicomError(first_path, f"implausible image size {size} or PixelSpacing {ps.tolist()}")
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > ORTHO_TOL or abs(np.linalg.norm(col) - 1) > ORTHO_TOL \
            or abs(float(row @ col)) > ORTHO_TOL:
        raise DicomError(folder, f"non-orthogonal ImageOrientationPatient {iop.round(5).tolist()}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    if len(items) < 2:
        raise DicomError(folder, "only one CT slice; need a 3D series")
    pos = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in items])
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    pos, along = pos[order], along[order]
    off_line = pos - pos[0] - np.outer(along - along[0], normal)  # in-plane drift from slice to slice
    drift = float(np.max(np.linalg.norm(off_line, axis=1)))
    if drift > TILT_TOL_MM:
        tilt = first.get("GantryDetectorTilt", None)
        raise DicomError(folder, f"gantry tilt or sheared stack: slice positions drift {drift:.2f} mm off the slice "
                                 f"normal{f' (GantryDetectorTilt {tilt})' if tilt not in (None, '') else ''}; "
                                 "resample it to an untilted grid first")
    gaps = np.diff(along)
    if np.min(gaps) < 1e-3:
        k = int(np.argmin(gaps))
        names = [Path(items[order[k]][0]).name, Path(items[order[k + 1]][0]).name]
        raise DicomError(folder, f"two slices at the same position ({names[0]}, {names[1]}): duplicate files "
                                 "or two acquisitions in one series")
    spacing = float(np.median(gaps))
    bad = np.abs(gaps - spacing) > config.DICOM_SLICE_GAP_TOL * spacing
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise DicomError(folder, f"uneven slice spacing (missing slice?): gap {gaps[k]:.3f} mm after slice at "
                                 f"{along[k]:.2f} mm along the normal, median gap {spacing:.3f} mm")
    affine = np.eye(4)
    affine[:3, 0] = row * ps[1]  # column index i moves along the row direction by the column spacing
    affine[:3, 1] = col * ps[0]
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = pos[0]
    return order, affine, [float(ps[1]), float(ps[0]), spacing]


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _to_canonical(data, affine_ras):
    """(data, affine, ornt) reoriented to the closest RAS axes; ornt maps native axes to canonical ones."""
    from nibabel import orientations as nio
    ornt = nio.io_orientation(affine_ras)
    out = nio.apply_orientation(data, ornt)
    return out, affine_ras @ nio.inv_ornt_aff(ornt, data.shape), ornt


def _derived_uid(pydicom, sources):
    return pydicom.uid.generate_uid(entropy_srcs=[str(s) for s in sources])


def _series_info(folder, items, affine_lps, ornt, spacing, notes):
    """SeriesInfo from ordered (path, header) items (native order, ascending along the normal)."""
    pydicom = _pydicom(folder)
    slice_axis, flip = int(ornt[2, 0]), ornt[2, 1] < 0
    items = list(reversed(items)) if flip else list(items)
    sops = [_uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID") for _, ds in items]
    if not all(sops):
        raise DicomError(folder, "slices without SOPInstanceUID (neither in the dataset nor its file meta)")
    if any(not _uid(ds, "SOPInstanceUID") for _, ds in items):
        notes.append("SOPInstanceUID taken from the file meta (empty in the dataset: anonymised?)")
    classes = [_uid(ds, "SOPClassUID", "MediaStorageSOPClassUID") or CT_IMAGE_STORAGE for _, ds in items]
    uids = {}
    for key, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                         ("for", "FrameOfReferenceUID")):
        values = {_uid(ds, keyword) for _, ds in items}
        if len(values) > 1:
            raise DicomError(folder, f"slices disagree on {keyword} ({len(values)} values)")
        uids[key] = values.pop()
        if not uids[key]:  # anonymisers blank these; a file we write must still reference something stable
            uids[key] = _derived_uid(pydicom, [keyword] + sops)
            notes.append(f"{keyword} missing in the files: derived {uids[key]} from the SOP Instance UIDs")
    datasets = []
    for (path, ds), sop, cls in zip(items, sops, classes):
        ds = ds.copy()
        if "PixelData" in ds:
            del ds.PixelData
        ds.SOPInstanceUID, ds.SOPClassUID = sop, cls
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["for"]
        datasets.append(ds)
    first = datasets[0]
    patient = {k: str(first.get(k, "") or "") for k in PATIENT_STUDY_KEYWORDS}
    patient["StudyInstanceUID"] = uids["study"]
    return SeriesInfo(folder=str(folder), study_uid=uids["study"], series_uid=uids["series"],
                      frame_of_reference_uid=uids["for"], sop_instance_uids=sops, sop_class_uids=classes,
                      slice_positions=[[float(v) for v in ds.ImagePositionPatient] for ds in datasets],
                      slice_axis=slice_axis, slice_spacing=float(spacing[2]), files=[str(p) for p, _ in items],
                      datasets=datasets, patient=patient,
                      series_description=str(first.get("SeriesDescription", "") or ""), notes=notes)


def _slice_hu(path):
    """One slice's pixels as float64 HU [row, column] (RescaleSlope/Intercept applied)."""
    pydicom = _pydicom(path)
    try:
        ds = pydicom.dcmread(str(path), force=not _has_dicm_magic(path))
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(path, f"cannot read pixel data ({_line(exc)})") from None
    if pixels.ndim != 2:
        raise DicomError(path, f"expected one grey-scale slice, pixel array has shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float64) * slope + intercept


def read_ct_series(folder, series_uid=None, verbose=False, scan=None):
    """Read a folder holding one CT series (other files allowed) -> (nibabel.Nifti1Image, SeriesInfo).

    The image is int16 HU, reoriented to the closest canonical RAS axes (indexed [x, y, z], affine in RAS mm).
    Non-CT files (RTSTRUCT, RTDOSE, RTPLAN, ...) are ignored and localizer images dropped, with a note; with
    several CT series pass series_uid (DicomError lists them otherwise). Notes are in info.notes and
    img.extra["warnings"]; verbose=True prints which series was taken in one line. scan: a scan_folder()
    result for this folder, to skip reading the headers twice.
    Refused (DicomError, one line naming the folder or file): unreadable file, no CT, two CT series, mixed
    sizes/orientations, non-orthogonal orientation, gantry tilt, missing slice (uneven spacing), one slice.
    """
    import nibabel as nib
    folder = Path(folder)
    scan = scan if scan is not None else scan_folder(folder)
    uid, items = choose_ct_series(scan, folder, series_uid)
    notes = list(scan["notes"])
    ignored = [f"{n} {m}" for m, n in sorted(scan["other"].items())]
    if scan["rtstruct"]:
        ignored.append(f"{len(scan['rtstruct'])} RTSTRUCT")
    if len(scan["ct"]) > 1 and series_uid is not None:
        ignored.append(f"{len(scan['ct']) - 1} other CT series")
    if ignored:
        notes.append(f"ignored {', '.join(ignored)} file(s)")
    order, affine_lps, spacing = stack_geometry(items, folder)
    items = [items[i] for i in order]
    hu = np.empty((int(items[0][1].Columns), int(items[0][1].Rows), len(items)), dtype=np.float64)
    for k, (path, _) in enumerate(items):
        s = _slice_hu(path)
        if s.shape != hu.shape[1::-1]:
            raise DicomError(path, f"pixel array {s.shape} does not match Rows x Columns {hu.shape[1::-1]}")
        hu[:, :, k] = s.T  # [row, column] -> [column i, row j]
    rounded = np.rint(hu)
    if np.max(np.abs(rounded - hu)) > 1e-3:
        notes.append("HU rounded to whole numbers (RescaleSlope/Intercept gave fractions)")
    if rounded.min() < -32768 or rounded.max() > 32767:
        notes.append(f"HU clipped to int16 (range was {rounded.min():g}..{rounded.max():g})")
    data = np.clip(rounded, -32768, 32767).astype(np.int16)
    data, affine, ornt = _to_canonical(data, LPS_TO_RAS @ affine_lps)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    info = _series_info(folder, items, affine_lps, ornt, spacing, notes)
    img.extra["warnings"] = [f"{folder}: {n}" for n in notes]
    if verbose:
        print(f"{folder}: CT series {_series_label(uid, items)}, {'x'.join(map(str, data.shape))} voxels, "
              f"{'x'.join(f'{s:.3g}' for s in spacing)} mm" + (f"; {'; '.join(notes)}" if notes else ""))
    return img, info


# --- image -> CT series ------------------------------------------------------------------------------------

def _ds_number(value):
    from pydicom.valuerep import format_number_as_ds
    return format_number_as_ds(float(value))  # <= 16 characters (Eclipse refuses longer, rt-utils #80)


def replace_dir(tmp, final):
    """Move the finished folder `tmp` to `final`, replacing an old `final` only once `tmp` is complete."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_ct_series(img, folder, patient=None, series_description="CT from NIfTI", series_number=1):
    """Write a NIfTI CT (nibabel image, HU, any orientation) as a DICOM CT series; returns its SeriesInfo.

    New Study/Series/Frame of Reference/SOP Instance UIDs (patient["StudyInstanceUID"] keeps a given study).
    Slices are axial-like (the image axis closest to superior), pixels int16 HU (slope 1, intercept 0), so
    read_ct_series(folder) gives back the same voxels and affine. `patient`: {keyword: value} from
    PATIENT_STUDY_KEYWORDS (e.g. a SeriesInfo.patient); PatientID defaults to the folder's parent's name.
    The folder is written beside itself first and replaces an old one only when complete.
    """
    pydicom = _pydicom(folder)
    from nibabel import orientations as nio
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder = Path(folder)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomError(folder, f"expected a 3D CT, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if np.max(np.abs(cols.T @ cols - np.eye(3))) > ORTHO_TOL:
        raise DicomError(folder, "the image's affine has shear; a DICOM series needs orthogonal axes")
    # Reorient to L, P, S axes: columns run to the patient's left, rows posterior, slices upward (the usual
    # head-first axial layout of CT scanners), still only flips and permutations.
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("L", "P", "S")))
    data = nio.apply_orientation(data, ornt)
    lps = LPS_TO_RAS @ affine @ nio.inv_ornt_aff(ornt, np.asanyarray(img.dataobj).shape[:3])
    hu = np.rint(np.asarray(data, dtype=np.float64))
    if hu.min() < -32768 or hu.max() > 32767:
        raise DicomError(folder, f"HU {hu.min():g}..{hu.max():g} do not fit int16")
    hu = hu.astype(np.int16)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    patient = {k: v for k, v in (patient or {}).items() if k in PATIENT_STUDY_KEYWORDS and v not in (None, "")}
    study_uid = patient.pop("StudyInstanceUID", None) or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    patient.setdefault("PatientID", folder.resolve().parent.name or "anonymous")
    patient.setdefault("PatientName", patient["PatientID"])
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = hu.shape[2]
    try:
        for k in range(n):
            sop = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.Modality = "CT"
            for key in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName", "PatientPosition"):
                setattr(ds, key, "")
            ds.PatientPosition = "HFS"  # NIfTI does not say; the geometry itself is in IOP/IPP
            ds.Manufacturer = ""
            for key, value in patient.items():
                setattr(ds, key, value)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
            ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = int(series_number), k + 1, 1
            ds.SeriesDescription = series_description
            ds.PositionReferenceIndicator = ""
            ds.KVP = ""
            position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
            ds.ImagePositionPatient = [_ds_number(v) for v in position]
            ds.ImageOrientationPatient = [_ds_number(v) for v in np.concatenate([row_dir, col_dir])]
            ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]  # [between rows, between columns]
            ds.SliceThickness = _ds_number(spacing[2])
            ds.SliceLocation = _ds_number(position[2])
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).astype("<i2").tobytes()  # [row, column]
            ds.save_as(str(tmp / f"CT{k + 1:04d}.dcm"), enforce_file_format=True)
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    items = [(folder / f"CT{k + 1:04d}.dcm", _read_header(folder / f"CT{k + 1:04d}.dcm")) for k in range(n)]
    order, affine_lps, sp = stack_geometry(items, folder)
    _, _, ornt_back = _to_canonical(np.zeros((1, 1, 1)), LPS_TO_RAS @ affine_lps)
    return _series_info(folder, [items[i] for i in order], affine_lps, ornt_back, sp, [])


# --- RT Structure Sets --------------------------------------------------------------------------------------

@dataclass
class Roi:
    """One ROI of an RT Structure Set.

    contours: [(N, 3) float64 arrays], the CLOSED_PLANAR contours in patient coordinates (LPS mm, as in the
    file); contour_sop_uids: the ReferencedSOPInstanceUID of each ('' when not given); other_contours: how
    many contours of other types (POINT, OPEN_PLANAR) were left out; in_contour_sequence: False when the
    planning system left the ROI out of ROIContourSequence entirely (platipy #143). empty: no contour.
    """
    number: int
    name: str
    contours: list
    contour_sop_uids: list
    frame_of_reference_uid: str
    interpreted_type: str = ""
    color: tuple = None
    source: str = ""
    other_contours: int = 0
    in_contour_sequence: bool = True

    @property
    def empty(self):
        return not any(len(c) for c in self.contours)


@dataclass
class StructureSet:
    """read_rtstruct()'s result: path, frame_of_reference_uid (the first referenced), referenced_series_uids,
    study_uid, label, rois ([Roi] in StructureSetROISequence order), notes."""
    path: str
    frame_of_reference_uid: str
    referenced_series_uids: list
    study_uid: str
    label: str
    rois: list
    notes: list = field(default_factory=list)

    def names(self):
        return [r.name for r in self.rois]

    def roi(self, name):
        """The ROI called `name` (exact, else case-insensitive); KeyError listing the names otherwise."""
        for match in (lambda r: r.name == name, lambda r: r.name.lower() == str(name).lower()):
            hits = [r for r in self.rois if match(r)]
            if hits:
                return hits[0]
        raise KeyError(f"{self.path}: no ROI {name!r} (ROIs: {', '.join(self.names())})")


def read_rtstruct(path):
    """Read a DICOM RT Structure Set -> StructureSet (ROIs with contours in LPS mm, see Roi).

    Empty ROIs are kept (Roi.empty), including ROIs a planning system lists in StructureSetROISequence but
    leaves out of ROIContourSequence. DicomError (one line) for an unreadable file, a file that is not an
    RTSTRUCT, or malformed ContourData.
    """
    pydicom = _pydicom(path)
    path = Path(path)
    if not path.is_file():
        raise DicomError(path, "RTSTRUCT file not found")
    try:
        ds = pydicom.dcmread(str(path), force=not _has_dicm_magic(path))
    except Exception as exc:
        raise DicomError(path, f"unreadable DICOM file ({_line(exc)})") from None
    modality = str(ds.get("Modality", "") or "")
    if modality != "RTSTRUCT" and _uid(ds, "SOPClassUID", "MediaStorageSOPClassUID") != RTSTRUCT_STORAGE:
        raise DicomError(path, f"not an RT Structure Set (Modality {modality or 'missing'})")
    if "StructureSetROISequence" not in ds:
        raise DicomError(path, "RTSTRUCT without StructureSetROISequence (truncated file?)")
    notes, fors, series = [], [], []
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        fors.append(_uid(ref, "FrameOfReferenceUID"))
        for study in ref.get("RTReferencedStudySequence", []):
            series += [_uid(s, "SeriesInstanceUID") for s in study.get("RTReferencedSeriesSequence", [])]
    rois, by_number = [], {}
    for item in ds.StructureSetROISequence:
        roi = Roi(number=int(item.ROINumber), name=str(item.get("ROIName", "") or "").strip(), contours=[],
                  contour_sop_uids=[], frame_of_reference_uid=_uid(item, "ReferencedFrameOfReferenceUID")
                  or (fors[0] if fors else ""), source=str(path), in_contour_sequence=False)
        rois.append(roi)
        by_number[roi.number] = roi
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        roi = by_number.get(number)
        if roi is None:
            notes.append(f"ROIContourSequence refers to ROI {number}, which StructureSetROISequence lacks")
            roi = by_number[number] = Roi(number, f"ROI {number}", [], [], fors[0] if fors else "", source=str(path))
            rois.append(roi)
        roi.in_contour_sequence = True
        if "ROIDisplayColor" in item:
            roi.color = tuple(int(v) for v in item.ROIDisplayColor)
        for c in item.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                roi.other_contours += 1
                continue
            try:
                pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64)
            except (AttributeError, TypeError, ValueError):
                raise DicomError(path, f"ROI {roi.name!r}: unreadable ContourData") from None
            if pts.size % 3 or not np.all(np.isfinite(pts)):
                raise DicomError(path, f"ROI {roi.name!r}: ContourData must be finite x, y, z triplets "
                                       f"(got {pts.size} numbers)")
            roi.contours.append(pts.reshape(-1, 3))
            images = c.get("ContourImageSequence", [])
            roi.contour_sop_uids.append(_uid(images[0], "ReferencedSOPInstanceUID") if len(images) else "")
    for obs in ds.get("RTROIObservationsSequence", []):
        roi = by_number.get(int(obs.get("ReferencedROINumber", -1)))
        if roi is not None:
            roi.interpreted_type = str(obs.get("RTROIInterpretedType", "") or "")
    missing = [r.name for r in rois if not r.in_contour_sequence]
    if missing:
        notes.append(f"ROI(s) without any ROIContourSequence item (empty): {', '.join(missing)}")
    return StructureSet(path=str(path), frame_of_reference_uid=fors[0] if fors else "",
                        referenced_series_uids=[s for s in series if s], study_uid=_uid(ds, "StudyInstanceUID"),
                        label=str(ds.get("StructureSetLabel", "") or ""), rois=rois, notes=notes)


def check_frame_of_reference(structure_set, info):
    """DicomError unless the RTSTRUCT and the CT series (SeriesInfo) share a Frame of Reference UID."""
    ours = {r.frame_of_reference_uid for r in structure_set.rois if r.frame_of_reference_uid}
    ours |= {structure_set.frame_of_reference_uid} - {""}
    if ours and info.frame_of_reference_uid not in ours:
        raise DicomError(structure_set.path, f"Frame of Reference UID {sorted(ours)[0]} does not match the CT "
                                             f"series' {info.frame_of_reference_uid} ({info.folder})")


# --- Rasterisation ------------------------------------------------------------------------------------------

def _fill_polygons(polygons, nu, nv):
    """Even-odd fill of 2D polygons on an nu x nv grid of points (u, v) = (0..nu-1, 0..nv-1) -> bool [u, v].

    One scanline pass for all polygons of a slice: a point is inside when an odd number of polygon edges
    cross its row at or left of it, so holes and nested contours come out right and overlapping contours
    cancel (even-odd, as DICOM intends for CLOSED_PLANAR contours on one plane). Edges own the rows
    [min v, max v), so a vertex on a row is counted once; a point exactly on a left edge is inside, on a right
    edge outside, so two polygons sharing an edge never both claim a point.
    """
    toggles = np.zeros((nv, nu + 1), dtype=np.int32)
    for poly in polygons:
        if len(poly) < 3:  # 1-2 point contours (tiny edge islands, rt-utils #87) enclose nothing
            continue
        u0, v0 = poly[:, 0], poly[:, 1]
        u1, v1 = np.roll(u0, -1), np.roll(v0, -1)
        lo, hi = np.minimum(v0, v1), np.maximum(v0, v1)
        r0 = np.clip(np.ceil(lo), 0, nv).astype(np.int64)  # rows r with lo <= r < hi
        r1 = np.clip(np.ceil(hi), 0, nv).astype(np.int64)
        count = np.maximum(r1 - r0, 0)
        if not count.any():
            continue
        edge = np.repeat(np.arange(len(poly)), count)
        rows = r0[edge] + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
        t = (rows - v0[edge]) / (v1[edge] - v0[edge])
        u = u0[edge] + t * (u1[edge] - u0[edge])
        np.add.at(toggles, (rows, np.clip(np.ceil(u), 0, nu).astype(np.int64)), 1)
    return (np.cumsum(toggles, axis=1)[:, :nu] % 2).astype(bool).T


def rasterise(contours, ref_img, frame_of_reference_uid=None, name=None):
    """Contours -> uint8 0/1 mask on the grid of `ref_img` (its shape and axes; [x, y, z] RAS for images
    from read_ct_series).

    contours: a Roi (from read_rtstruct) or a list of (N, 3) arrays of CLOSED_PLANAR contour points in
    patient coordinates (DICOM LPS mm). A voxel is set when its centre lies inside the contours of its slice
    by the even-odd rule (holes, nested contours, several islands). The contours are polygons through voxel
    boundaries, so rasterising by centres keeps the volume (no half-voxel shrink, rt-utils #86).
    Each contour is assigned to the slice its plane lies on: the plane must be parallel to the grid's slices
    and within config.DICOM_CONTOUR_PLANE_TOL_MM of a slice centre, otherwise DicomError (a contour plane with
    no matching slice is an error, never a silent skip). frame_of_reference_uid: the CT series' UID; DicomError
    when the Roi's differs.
    """
    source = getattr(contours, "source", "") or "contours"
    name = name or getattr(contours, "name", None)
    label = f"ROI {name!r}: " if name else ""
    roi_for = getattr(contours, "frame_of_reference_uid", "")
    if frame_of_reference_uid and roi_for and roi_for != frame_of_reference_uid:
        raise DicomError(source, f"{label}Frame of Reference UID {roi_for} does not match the CT series' "
                                 f"{frame_of_reference_uid}")
    polys = [np.asarray(c, dtype=np.float64).reshape(-1, 3) for c in getattr(contours, "contours", contours)]
    polys = [p for p in polys if len(p) >= 3]  # 1-2 points (tiny edge islands, rt-utils #87) enclose nothing
    shape = tuple(int(s) for s in ref_img.shape[:3])
    mask = np.zeros(shape, dtype=np.uint8)
    if not polys:
        return mask
    affine = np.asarray(ref_img.affine, dtype=np.float64)
    to_index = np.linalg.inv(affine) @ LPS_TO_RAS  # LPS mm -> continuous voxel index of ref_img
    index = [p @ to_index[:3, :3].T + to_index[:3, 3] for p in polys]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    spread = np.array([(ix.max(axis=0) - ix.min(axis=0)) * spacing for ix in index])  # mm, per contour, axis
    tol = float(config.DICOM_CONTOUR_PLANE_TOL_MM)
    area = np.sort(spread, axis=1)[:, 1] > tol  # contours that span an area (not all points on one line)
    if not area.any():
        return mask
    axis = int(np.argmin(spread[area].max(axis=0)))  # the slice axis: the one along which every contour is flat
    by_slice = {}
    for ix, p, s in zip(index, polys, spread):
        centre = float(ix[:, axis].mean())
        world = ", ".join(f"{v:.2f}" for v in p.mean(axis=0))
        if s[axis] > tol:
            raise DicomError(source, f"{label}contour near ({world}) mm (LPS) is not parallel to the CT slices "
                                     f"(spans {s[axis]:.2f} mm across them)")
        k = int(round(centre))
        off = abs(centre - k) * spacing[axis]
        if not 0 <= k < shape[axis] or off > tol:
            near = min(max(k, 0), shape[axis] - 1)
            dist = abs(centre - near) * spacing[axis]
            raise DicomError(source, f"{label}contour plane near ({world}) mm (LPS) matches no CT slice "
                                     f"(nearest slice {dist:.2f} mm away, tolerance {tol:g} mm)")
        by_slice.setdefault(k, []).append(np.delete(ix, axis, axis=1))
    other = [a for a in range(3) if a != axis]
    for k, ps in by_slice.items():
        filled = _fill_polygons(ps, shape[other[0]], shape[other[1]])
        sl = [slice(None)] * 3
        sl[axis] = k
        mask[tuple(sl)] = filled
    return mask


def contour_grid(rois, pixel_mm=1.0, margin_mm=2.0):
    """A reference image (uint8 zeros, RAS) for rasterising axial contours when the CT is not at hand.

    In-plane: pixel_mm pixels covering every contour of `rois` (Roi objects) plus margin_mm; slices: one per
    contour plane, spacing = the smallest gap between planes (every plane must fall on that grid). This is
    the grid the Eclipse phantom RTSTRUCT (which comes without its CT) is measured on.
    """
    pts = [c for r in rois for c in r.contours if len(c)]
    if not pts:
        raise DicomError("contours", "no contours to build a grid from")
    tol = float(config.DICOM_CONTOUR_PLANE_TOL_MM)
    if any(np.ptp(c[:, 2]) > tol for c in pts):
        raise DicomError(getattr(rois[0], "source", "contours"), "contour_grid needs axial contours")
    planes = np.unique(np.round([c[0, 2] for c in pts], 3))
    gap = float(np.min(np.diff(planes))) if len(planes) > 1 else 1.0
    allp = np.concatenate(pts)
    lo = allp[:, :2].min(axis=0) - margin_mm
    hi = allp[:, :2].max(axis=0) + margin_mm
    n_xy = np.ceil((hi - lo) / pixel_mm).astype(int) + 1
    n_z = int(round((planes[-1] - planes[0]) / gap)) + 1
    ras_lo = np.array([-hi[0], -hi[1], planes[0]])  # RAS x = -LPS x: the grid starts at the most negative RAS x
    affine = np.diag([pixel_mm, pixel_mm, gap, 1.0])
    affine[:3, 3] = ras_lo
    import nibabel as nib
    return nib.Nifti1Image(np.zeros((int(n_xy[0]), int(n_xy[1]), n_z), dtype=np.uint8), affine)


def roi_volumes(structure_set, pixel_mm=1.0):
    """{ROI name: volume in cc} rasterised on contour_grid(pixel_mm) (0.0 for empty ROIs): voxel count times
    voxel volume, every contour plane one slice thick."""
    full = [r for r in structure_set.rois if not r.empty]
    if not full:
        return {r.name: 0.0 for r in structure_set.rois}
    grid = contour_grid(full, pixel_mm=pixel_mm)
    voxel_cc = float(np.prod(np.linalg.norm(grid.affine[:3, :3], axis=0))) / 1000.0
    return {r.name: 0.0 if r.empty else float(rasterise(r, grid).sum()) * voxel_cc for r in structure_set.rois}


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python dicom_io.py FOLDER | RTSTRUCT_FILE")
    try:
        if Path(args[0]).is_file():  # an RT Structure Set on its own: ROI volumes on a 1 mm contour grid
            rs = read_rtstruct(args[0])
            print(f"{rs.path}: {len(rs.rois)} ROIs, Frame of Reference {rs.frame_of_reference_uid}")
            for name, cc in roi_volumes(rs).items():
                roi = rs.roi(name)
                print(f"  {name:24s} {len(roi.contours):4d} contours  {'empty' if roi.empty else f'{cc:10.2f} cc'}")
            return
        scan = scan_folder(args[0])
        for uid, items in scan["ct"].items():
            print(f"CT series {_series_label(uid, items)}")
        for path, ds in scan["rtstruct"]:
            rs = read_rtstruct(path)
            print(f"RTSTRUCT {path}: " + ", ".join(f"{r.name}{' (empty)' if r.empty else ''}" for r in rs.rois))
        for modality, n in sorted(scan["other"].items()):
            print(f"{n} {modality} file(s)")
        for note in scan["notes"]:
            print(f"note: {note}")
    except DicomError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
