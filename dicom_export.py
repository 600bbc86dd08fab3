"""Organ masks out as DICOM: an RT Structure Set (RTSTRUCT) and a DICOM-SEG that reference the CT series.

Usage (library; predict.py calls it):
    info = write_rtstruct(masks, ref_img, series_info, "out/case/rtstruct.dcm")  # masks: {organ: uint8 (X, Y, Z)}
    check = rtstruct_roundtrip("out/case/rtstruct.dcm", masks, ref_img)         # Dice per organ, read back
    write_seg(masks, ref_img, series_info, "out/case/seg.dcm")
    python phantom.py --dicom --out DIR                                          # phantom CT series + RTSTRUCT
    python dicom_export.py --spacing 1,1,1 3,3,3 --seeds 0 1 2     # round-trip Dice on phantoms (vs rt-utils)

`masks` live on the grid of `ref_img` (the nibabel image dicom_io.read_ct_series returned, or the NIfTI CT that
dicom_io.write_ct_series wrote as a series); `series_info` is the SeriesInfo that came with it. Every slice of
the series is visited through its own header (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), so
the output is right whatever the orientation (LPS, RPI, sagittal, ...) and whatever the InstanceNumbers say.

Contours trace voxel EDGES, not voxel centres (rt-utils #86: centre contours shrink every structure by half a
voxel): each CLOSED_PLANAR contour is the exact outline of the mask's pixels on one slice, in patient mm (LPS),
so a reader that fills pixels whose centre lies inside (even-odd rule, holes and islands as separate contours)
gets back exactly the mask that was written. No contour has fewer than 4 points (rt-utils #87) and every
ContourData number is a decimal string of at most 16 characters (Eclipse refuses longer, rt-utils #80).
pydicom, highdicom and contourpy are imported only when a DICOM file is written (requirements-dicom.txt).
"""
import copy
import datetime
import json
import warnings
from pathlib import Path

import numpy as np

import config
from fileio import write_atomic

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
GRID_TOLERANCE = 0.01  # voxels: a slice pixel must land this close to a voxel centre of ref_img
CONTOUR_DECIMALS = 4  # mm; "-12345.6789" is 11 characters, far below DICOM's 16 for a DS value
EDGE_EPS = 0.1  # pixels; contour samples sit this far inside each pixel edge (any value in (0, 0.25) works)
SOFTWARE = "pelvic-organ-seg predict.py"
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "StudyID", "AccessionNumber", "ReferringPhysicianName")  # must be present, may be empty


class ExportError(ValueError):
    """A mask or series that cannot be written as DICOM (one line)."""


def _need(module):
    """Import an optional DICOM package, or stop with one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"DICOM output needs {module}: pip install -r requirements-dicom.txt") from None


# --------------------------------------------------------------------------------------------
# Geometry: mask on the NIfTI grid -> one 2D frame per DICOM slice
# --------------------------------------------------------------------------------------------
def slice_headers(series_info):
    """The series' per-slice headers (pydicom Datasets without pixels), in series_info's slice order."""
    headers = getattr(series_info, "datasets", None)
    if not headers:
        raise ExportError("series information carries no slice headers (read it with dicom_io.read_ct_series)")
    return list(headers)


def slice_frame_geometry(header):
    """(origin, row_step, col_step) in LPS mm: pixel (row i, column j) centre = origin + i*row_step + j*col_step."""
    origin = np.asarray([float(v) for v in header.ImagePositionPatient])
    iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
    d_row, d_col = (float(v) for v in header.PixelSpacing)  # between rows, between columns
    return origin, iop[3:] * d_row, iop[:3] * d_col  # rows advance along the column cosines, columns along the row ones


def _voxel_index_map(header, affine):
    """Voxel index of ref_img for pixel (0, 0) and its steps per row and per column (ints), or ExportError."""
    to_voxel = np.linalg.inv(np.asarray(affine, float))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    origin, row_step, col_step = slice_frame_geometry(header)
    v0 = to_voxel[:3, :3] @ (origin * lps_to_ras) + to_voxel[:3, 3]
    dv_row = to_voxel[:3, :3] @ (row_step * lps_to_ras)
    dv_col = to_voxel[:3, :3] @ (col_step * lps_to_ras)
    parts = np.stack([v0, dv_row, dv_col])
    if np.abs(parts - np.round(parts)).max() > GRID_TOLERANCE:
        raise ExportError(f"slice {header.SOPInstanceUID}: its pixels are not on the voxel grid of the image")
    return np.round(parts).astype(int)


def mask_frames(mask, affine, headers):
    """(n_slices, Rows, Columns) uint8: the mask (X, Y, Z on the grid `affine`) as seen by each DICOM slice."""
    mask = np.asarray(mask)
    frames = []
    for h in headers:
        v0, dv_row, dv_col = _voxel_index_map(h, affine)
        rows, cols = int(h.Rows), int(h.Columns)
        idx = v0[:, None, None] + dv_row[:, None, None] * np.arange(rows)[None, :, None] \
            + dv_col[:, None, None] * np.arange(cols)[None, None, :]  # (3, rows, cols)
        if idx.min() < 0 or np.any(idx.reshape(3, -1).max(1) >= np.asarray(mask.shape)):
            raise ExportError(f"slice {h.SOPInstanceUID}: outside the image grid (mask shape {mask.shape})")
        frames.append(mask[idx[0], idx[1], idx[2]])
    return np.stack(frames).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Polygons on pixel edges
# --------------------------------------------------------------------------------------------
def _edge_samples(n):
    """Sample positions along an axis of n pixels: two per pixel, EDGE_EPS inside its edges, plus a zero border."""
    c = np.empty(2 * n + 2)
    c[0], c[-1] = -0.5 - EDGE_EPS, n - 0.5 + EDGE_EPS
    k = np.arange(n)
    c[1:-1:2], c[2:-1:2] = k - 0.5 + EDGE_EPS, k + 0.5 - EDGE_EPS
    return c


def edge_polygons(frame):
    """Closed outlines of the pixels of a 2D mask (rows, cols), along pixel edges, as [(k, 2) arrays of
    (column, row) pixel coordinates]; outer boundaries counter-clockwise, holes clockwise (in (column, row)).

    Marching squares (contourpy) on the mask sampled twice per pixel, just inside its edges: between two
    neighbouring pixels of different value the 0.5 level lies exactly on their shared edge, and the corner a
    marching-squares cell cuts is EDGE_EPS small, so snapping every vertex to the half-pixel grid gives the
    exact outline. Straight runs are reduced to their corners, so a single pixel is 4 points, never 1 or 2.
    """
    import contourpy

    frame = np.asarray(frame) > 0
    rows, cols = frame.shape
    z = np.zeros((2 * rows + 2, 2 * cols + 2))
    z[1:-1, 1:-1] = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)
    gen = contourpy.contour_generator(_edge_samples(cols), _edge_samples(rows), z, line_type="Separate")
    polygons = []
    for line in gen.lines(0.5):
        p = np.round(np.asarray(line) * 2) / 2  # onto the pixel-edge grid (k + 0.5)
        p = p[np.any(p != np.roll(p, 1, axis=0), axis=1)]  # repeated points, incl. the closing one
        before, after = p - np.roll(p, 1, axis=0), np.roll(p, -1, axis=0) - p
        p = p[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0]  # keep corners only
        if len(p) >= 4:  # an outline on the pixel grid has at least 4 corners
            polygons.append(p)
    return polygons


def polygon_area(p):
    """Signed area (shoelace) of a closed polygon given as (k, 2) points."""
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def contour_data(polygon, header):
    """Patient-mm (LPS) ContourData strings for a polygon in (column, row) pixel coordinates of `header`."""
    origin, row_step, col_step = slice_frame_geometry(header)
    xyz = origin + polygon[:, 1:2] * row_step + polygon[:, 0:1] * col_step  # (k, 3)
    return [_ds(v) for v in xyz.ravel()]


def _ds(value):
    """A decimal string of at most 16 characters (DICOM DS; Eclipse refuses longer ones)."""
    text = f"{value:.{CONTOUR_DECIMALS}f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        raise ExportError(f"coordinate {value} mm does not fit a 16-character DICOM decimal string")
    return text


# --------------------------------------------------------------------------------------------
# RT Structure Set
# --------------------------------------------------------------------------------------------
def roi_name(organ):
    """TG-263 ROI name of an organ (config.ROI_NAMES)."""
    return config.ROI_NAMES.get(organ, organ.capitalize())


def _series_uid(series_info, headers, attr, keyword):
    value = getattr(series_info, attr, None) or getattr(headers[0], keyword, None)
    if not value:
        raise ExportError(f"series information has no {keyword}")
    return str(value)


def _base_dataset(series_info, modality, sop_class, series_description):
    """A new DICOM instance of `sop_class` in the CT's study (patient and study attributes copied)."""
    import dicom_io

    _need("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    patient = getattr(series_info, "patient", None) or {}
    for keyword in dicom_io.PATIENT_STUDY_KEYWORDS:  # the CT's patient and study, so that they file together
        if patient.get(keyword) and keyword not in ("Manufacturer", "PatientPosition"):
            setattr(ds, keyword, patient[keyword])
    for keyword in TYPE2_PATIENT_STUDY:  # type 2: present, may be empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 901 if modality == "RTSTRUCT" else 902
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.Manufacturer = "pelvic-organ-seg"
    ds.ManufacturerModelName = "MultiDecoderUNet"
    ds.SoftwareVersions = SOFTWARE
    ds.InstanceNumber = 1
    return ds


def _image_ref(header):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = getattr(header, "SOPClassUID", None) or CT_SOP_CLASS
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def build_rtstruct(masks, ref_img, series_info, label="AUTO_ORGANS"):
    """The RTSTRUCT Dataset and {organ: contour count} for masks {organ: uint8 (X, Y, Z) on ref_img's grid}.

    One ROI per present organ (an all-zero mask is left out), in config.ORGANS order, named by config.ROI_NAMES,
    coloured by config.ROI_COLOURS; one CLOSED_PLANAR contour per outline and hole on every slice it touches,
    each referencing the SOP Instance UID of that slice.
    """
    _need("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    headers = slice_headers(series_info)
    study_uid = _series_uid(series_info, headers, "study_uid", "StudyInstanceUID")
    series_uid = _series_uid(series_info, headers, "series_uid", "SeriesInstanceUID")
    for_uid = _series_uid(series_info, headers, "frame_of_reference_uid", "FrameOfReferenceUID")
    ds = _base_dataset(series_info, "RTSTRUCT", RTSTRUCT_SOP_CLASS, "organs (automatic)")
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = for_uid
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ApprovalStatus = "UNAPPROVED"  # machine output: a person has to review it

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = series_uid
    series_ref.ContourImageSequence = Sequence([_image_ref(h) for h in headers])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as the standard's examples)
    study_ref.ReferencedSOPInstanceUID = study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = for_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])

    rois, contours_of, observations, counts = [], [], [], {}
    colours = getattr(config, "ROI_COLOURS", {})
    organs = [o for o in config.ORGANS if o in masks] + [o for o in masks if o not in config.ORGANS]
    for organ in organs:
        if not np.asarray(masks[organ]).any():
            continue
        number = len(rois) + 1
        frames = mask_frames(masks[organ], ref_img.affine, headers)
        items = []
        for header, frame in zip(headers, frames):
            if not frame.any():
                continue
            rows, cols = np.flatnonzero(frame.any(axis=1)), np.flatnonzero(frame.any(axis=0))
            crop = frame[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # contour only the organ's box: 1 mm CT is big
            for polygon in (p + np.array([cols[0], rows[0]]) for p in edge_polygons(crop)):  # (column, row)
                c = Dataset()
                c.ContourImageSequence = Sequence([_image_ref(header)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(polygon)
                c.ContourNumber = len(items) + 1
                c.ContourData = contour_data(polygon, header)
                items.append(c)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = roi_name(organ)
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        rc = Dataset()
        rc.ROIDisplayColor = list(colours.get(organ, (255, 0, 0)))
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence(items)
        contours_of.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
        counts[organ] = len(items)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_of)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds, counts


def save_dataset(ds, path):
    """Write a DICOM Part-10 file atomically (temporary file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True))


def write_rtstruct(masks, ref_img, series_info, path):
    """Write one RT Structure Set for masks {organ: uint8 (X, Y, Z) on ref_img's grid} that references the CT
    series `series_info` (from dicom_io); returns {"path", "sop_instance_uid", "contours": {organ: n}}."""
    ds, counts = build_rtstruct(masks, ref_img, series_info)
    save_dataset(ds, path)
    return {"path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID), "contours": counts}


# --------------------------------------------------------------------------------------------
# Round trip: read the RTSTRUCT back and compare with what was written
# --------------------------------------------------------------------------------------------
def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def rtstruct_roundtrip(path, masks, ref_img, frame_of_reference_uid=None):
    """Read the RTSTRUCT at `path` back (dicom_io.read_rtstruct + rasterise on ref_img's grid) and compare it
    with `masks`: returns {"dice": {organ: Dice or None when absent in both}, "voxels": {organ: [written, read]},
    "warnings": [str]}; a Dice below config.ROUNDTRIP_MIN_DICE or an ROI that did not come back is a warning."""
    import dicom_io

    names = {roi_name(o): o for o in masks}
    back = {o: np.zeros(np.shape(m), np.uint8) for o, m in masks.items()}
    for roi in dicom_io.read_rtstruct(path).rois:
        if roi.name in names:
            back[names[roi.name]] = dicom_io.rasterise(roi, ref_img, frame_of_reference_uid)
    out = {"dice": {}, "voxels": {}, "warnings": []}
    for organ, mask in masks.items():
        written, read = int((np.asarray(mask) > 0).sum()), int(back[organ].sum())
        out["voxels"][organ] = [written, read]
        out["dice"][organ] = None if written == read == 0 else round(dice(mask, back[organ]), 6)
        if out["dice"][organ] is not None and out["dice"][organ] < config.ROUNDTRIP_MIN_DICE:
            out["warnings"].append(f"{Path(path).name}: {organ} read back with Dice {out['dice'][organ]:.3f} "
                                   f"< {config.ROUNDTRIP_MIN_DICE} ({written} voxels written, {read} read)")
    return out


# --------------------------------------------------------------------------------------------
# DICOM-SEG (highdicom)
# --------------------------------------------------------------------------------------------
def _code(triple):
    from pydicom.sr.coding import Code

    value, scheme, meaning = triple
    return Code(value, scheme, meaning)


def build_seg(masks, ref_img, series_info):
    """A highdicom Segmentation (BINARY) of the present organs, one segment each (label = TG-263 name, property
    type = the organ's SNOMED CT code in config.SEG_CODES), frames referencing the CT slices."""
    _need("pydicom")
    hd = _need("highdicom")
    from pydicom.uid import generate_uid

    headers = slice_headers(series_info)
    organs = [o for o in config.ORGANS if o in masks and np.asarray(masks[o]).any()]
    if not organs:
        raise ExportError("no organ found: a DICOM-SEG needs at least one non-empty segment")
    pixels = np.stack([mask_frames(masks[o], ref_img.affine, headers) for o in organs], axis=-1)  # (n, r, c, s)
    algorithm = hd.AlgorithmIdentificationSequence(name="MultiDecoderUNet", version=SOFTWARE,
                                                   family=_code(config.SEG_ALGORITHM_FAMILY))
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=roi_name(organ),
        segmented_property_category=_code(config.SEG_CATEGORY), segmented_property_type=_code(config.SEG_CODES[organ]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_uid=generate_uid(), tracking_id=f"{organ} (automatic)")
        for k, organ in enumerate(organs, start=1)]
    first = copy.deepcopy(headers[0])  # highdicom copies patient and study from the first source image
    for keyword in TYPE2_PATIENT_STUDY:  # type 2: present, may be empty; exports often leave them out
        if keyword not in first:
            setattr(first, keyword, "")
    headers = [first] + headers[1:]
    with warnings.catch_warnings():  # a one-word PatientName (e.g. from a NIfTI file name) is fine here
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(hd, headers, pixels, segments)
    return seg, organs


def _segmentation(hd, headers, pixels, segments):
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=headers, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=902,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="pelvic-organ-seg",
        manufacturer_model_name="MultiDecoderUNet", software_versions=SOFTWARE, device_serial_number="0",
        series_description="organs (automatic)", omit_empty_frames=True)


def write_seg(masks, ref_img, series_info, path):
    """Write a DICOM-SEG of masks {organ: uint8 (X, Y, Z) on ref_img's grid} referencing the CT series;
    returns {"path", "sop_instance_uid", "segments": [organ, ...]}."""
    seg, organs = build_seg(masks, ref_img, series_info)
    save_dataset(seg, path)
    return {"path": str(path), "sop_instance_uid": str(seg.SOPInstanceUID), "segments": organs}


# --------------------------------------------------------------------------------------------
# The phantom as a planning-system export (phantom.py --dicom)
# --------------------------------------------------------------------------------------------
def write_phantom_dicom(out_dir, n_cases=None, seed=None, grid=None, style="train", **forced):
    """Write phantom cases as DICOM: out_dir/phantom_<k>/CT/ (CT series) + out_dir/phantom_<k>/RS.dcm (RTSTRUCT
    of every organ and femoral head the case holds), the layout convert_dicom.py reads. Case k is the same
    anatomy as BDMAP_<k> of `phantom.py --seed` (phantom.case_seed); `forced` goes to phantom.make_case
    (e.g. spacing=(4, 4, 4)). Returns the case folders."""
    import dicom_io
    import phantom

    n_cases = 1 if n_cases is None else int(n_cases)
    seed = config.PHANTOM_SEED if seed is None else int(seed)
    grid = config.PHANTOM_GRID if grid is None else grid
    dirs = []
    for index in range(n_cases):
        case = phantom.make_case(phantom.case_seed(seed, index), grid, style, **forced)
        case_dir = Path(out_dir) / f"phantom_{index + 1:03d}"
        patient = {"PatientID": case_dir.name, "PatientName": f"Phantom^{index + 1:03d}"}
        info = dicom_io.write_ct_series(case["ct"], case_dir / "CT", patient=patient,
                                        series_description=f"phantom seed {seed} case {index + 1}")
        masks = {name: np.asanyarray(img.dataobj) for name, img in case["masks"].items()}
        write_rtstruct(masks, case["ct"], info, case_dir / "RS.dcm")
        dirs.append(case_dir)
    return dirs


# --------------------------------------------------------------------------------------------
# Round-trip figures on the phantom (README)
# --------------------------------------------------------------------------------------------
def _rt_utils_roundtrip(series_dir, masks, ref_img, info):
    """Dice per organ of rt-utils' RTSTRUCT writer (contours through voxel centres) read back by dicom_io:
    the comparison for rt-utils #86. rt-utils is test-only; None when it is not installed."""
    import tempfile

    import dicom_io

    try:
        from rt_utils import RTStructBuilder
    except ImportError:
        return None
    headers = slice_headers(info)
    order = np.argsort([np.dot(np.cross(*np.asarray(h.ImageOrientationPatient, float).reshape(2, 3)),
                               np.asarray(h.ImagePositionPatient, float)) for h in headers])
    rs = RTStructBuilder.create_new(dicom_series_path=str(series_dir))
    for organ, mask in masks.items():
        if mask.any():  # rt-utils wants (rows, columns, slices) in its own slice order (by position)
            frames = mask_frames(mask, ref_img.affine, [headers[k] for k in order])
            rs.add_roi(mask=frames.transpose(1, 2, 0).astype(bool), name=roi_name(organ))
    with tempfile.TemporaryDirectory() as tmp:
        rs.save(str(Path(tmp) / "rs.dcm"))
        back = {r.name: r for r in dicom_io.read_rtstruct(Path(tmp) / "rs.dcm").rois}
        read = {o: dicom_io.rasterise(back[roi_name(o)], ref_img) for o, m in masks.items() if m.any()}
        return {o: (dice(masks[o], r), int(r.sum())) for o, r in read.items()}


def phantom_roundtrip(spacings, seeds, compare_rt_utils=True):
    """Rows of {spacing, seed, organ, voxels, dice, dice_rt_utils, max_chars, contours} for phantom cases
    written as DICOM series + RTSTRUCT and read back."""
    import tempfile
    import time

    import dicom_io
    import phantom
    import pydicom

    rows = []
    for spacing in spacings:
        for seed in seeds:
            case = phantom.make_case(seed, "demo", spacing=tuple(spacing))
            masks = {o: np.asanyarray(case["masks"][o].dataobj) for o in config.ORGANS}
            with tempfile.TemporaryDirectory() as tmp:
                info = dicom_io.write_ct_series(case["ct"], Path(tmp) / "CT")
                t0 = time.perf_counter()
                written = write_rtstruct(masks, case["ct"], info, Path(tmp) / "rs.dcm")
                seconds = time.perf_counter() - t0
                check = rtstruct_roundtrip(Path(tmp) / "rs.dcm", masks, case["ct"], info.frame_of_reference_uid)
                theirs = _rt_utils_roundtrip(Path(tmp) / "CT", masks, case["ct"], info) if compare_rt_utils else None
                ds = pydicom.dcmread(Path(tmp) / "rs.dcm")
                chars = max((len(str(v)) for item in ds.ROIContourSequence for c in item.ContourSequence
                             for v in c.ContourData), default=0)
            for organ in config.ORGANS:
                if check["dice"][organ] is None:
                    continue
                rows.append(dict(spacing=list(spacing), seed=seed, shape=list(case["ct"].shape), organ=organ,
                                 voxels=check["voxels"][organ][0], dice=check["dice"][organ],
                                 dice_rt_utils=None if theirs is None else round(theirs[organ][0], 4),
                                 voxels_rt_utils=None if theirs is None else theirs[organ][1],
                                 contours=written["contours"][organ], max_chars=chars, seconds=round(seconds, 2)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    """Round-trip Dice of RTSTRUCTs written from phantom cases at the given voxel sizes (printed as JSON lines)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--spacing", nargs="+", default=["1,1,1", "2,2,2", "3,3,3"], help="mm, x,y,z per run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-rt-utils", action="store_true", help="skip the rt-utils comparison")
    args = parser.parse_args(argv)
    spacings = [tuple(float(v) for v in s.split(",")) for s in args.spacing]
    phantom_roundtrip(spacings, args.seeds, not args.no_rt_utils)


if __name__ == "__main__":
    main()
