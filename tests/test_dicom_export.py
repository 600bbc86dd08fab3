"""dicom_export.py: RTSTRUCT and DICOM-SEG land on the right voxels of the right slices, whatever the orientation.

Ground truth is drawn in each series' own DICOM layout (slice, row, column), so the checks below do not go through
the code under test: contours are projected back onto their slice with the slice's own header and filled with
matplotlib (even-odd), and rt-utils and highdicom read the files independently.
"""
import json

import numpy as np
import nibabel as nib
import pytest

import config

pydicom = pytest.importorskip("pydicom")

# (row direction, column direction) in LPS: ImageOrientationPatient; the slice normal is their cross product.
ORIENTATIONS = {
    "axial_LPS": ((1, 0, 0), (0, 1, 0)),       # the usual head-first supine axial series
    "axial_RPI": ((-1, 0, 0), (0, 1, 0)),      # columns toward patient right, slices stacked toward the feet
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
}


def write_series(folder, orientation, rows=14, cols=17, n=9, spacing=(1.25, 0.75, 2.5), seed=0):
    """A small CT series, InstanceNumbers and file names scrambled; returns (folder, D-layout geometry).

    spacing = (between rows, between columns, between slices) in mm; pixel (s, i, j) lies at
    origin + s * ds * normal + i * dr * column_dir + j * dc * row_dir (LPS mm).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    row_dir, col_dir = (np.asarray(v, float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_dir, col_dir)
    dr, dc, ds = spacing
    origin = np.array([-10.0, 20.0, 30.0])
    rng = np.random.default_rng(seed)
    hu = np.full((n, rows, cols), -1000, np.int16)
    hu[:, 2:-2, 2:-2] = 40 + rng.integers(-10, 10, (n, rows - 4, cols - 4))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = rng.permutation(n)
    folder.mkdir(parents=True)
    for s in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        d = Dataset()
        d.file_meta = meta
        d.SOPClassUID, d.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        d.Modality, d.PatientName, d.PatientID = "CT", "Test^Phantom", "T1"
        d.StudyInstanceUID, d.SeriesInstanceUID, d.FrameOfReferenceUID = study, series, frame
        d.StudyDate, d.StudyTime, d.SeriesNumber, d.InstanceNumber = "20260101", "120000", 1, int(order[s]) + 1
        d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        d.ImagePositionPatient = [f"{v:.4f}" for v in origin + s * ds * normal]
        d.ImageOrientationPatient = [f"{v:g}" for v in (*row_dir, *col_dir)]
        d.PixelSpacing = [f"{dr:g}", f"{dc:g}"]
        d.SliceThickness = f"{ds:g}"
        d.Rows, d.Columns = rows, cols
        d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
        d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 1
        d.RescaleIntercept, d.RescaleSlope = "0", "1"
        d.PixelData = hu[s].tobytes()
        d.save_as(folder / f"IM{order[s]:04d}_{rng.integers(1e6)}.dcm", enforce_file_format=True)
    geometry = dict(origin=origin, row_dir=row_dir, col_dir=col_dir, normal=normal, spacing=spacing,
                    shape=(n, rows, cols))
    return folder, geometry


def to_ras_grid(d_array, g):
    """A (slice, row, column) array as it lies on the canonical RAS grid read_ct_series uses."""
    dr, dc, ds = g["spacing"]
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2] = g["row_dir"] * dc, g["col_dir"] * dr, g["normal"] * ds
    affine_lps[:3, 3] = g["origin"]
    img = nib.Nifti1Image(np.ascontiguousarray(d_array.transpose(2, 1, 0)), np.diag([-1, -1, 1, 1]) @ affine_lps)
    canon = nib.as_closest_canonical(img)
    return np.asanyarray(canon.dataobj), canon.affine


def organ_truth(g):
    """Two organs in D layout: an L shape with a hole on some slices plus a one-pixel island at the image edge
    (rt-utils #87), and a small block; slice 0 and the last slice empty."""
    n, rows, cols = g["shape"]
    a = np.zeros(g["shape"], np.uint8)
    a[1:6, 3:10, 4:8] = 1
    a[1:6, 7:10, 8:14] = 1  # the foot of the L: any flip or transposition moves it
    a[2:4, 5:7, 5:7] = 0  # a hole
    a[3, 0, cols - 1] = 1  # a lone pixel in the image corner
    a[5, 12, 2] = 1  # an island
    b = np.zeros(g["shape"], np.uint8)
    b[4:n - 1, 1:4, 10:15] = 1
    return {"bladder": a, "rectum": b, "prostate": np.zeros(g["shape"], np.uint8)}


def read_series(folder, g):
    import dicom_io

    img, info = dicom_io.read_ct_series(folder)
    _, affine = to_ras_grid(np.zeros(g["shape"]), g)
    np.testing.assert_allclose(img.affine, affine, atol=1e-3)  # the reader agrees with the geometry we wrote
    return img, info


def contour_frames(ds, roi_number, headers_by_uid):
    """{SOP Instance UID: (rows, cols) bool}: the ROI's contours filled even-odd on their slice (matplotlib)."""
    from matplotlib.path import Path as MplPath

    frames = {}
    item = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == roi_number)
    for c in item.ContourSequence:
        uid = c.ContourImageSequence[0].ReferencedSOPInstanceUID
        h = headers_by_uid[uid]
        pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
        ipp = np.asarray([float(v) for v in h.ImagePositionPatient])
        iop = np.asarray([float(v) for v in h.ImageOrientationPatient])
        dr, dc = (float(v) for v in h.PixelSpacing)
        rel = pts - ipp
        assert np.abs(rel @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # on the plane of the slice it references
        col, row = rel @ iop[:3] / dc, rel @ iop[3:] / dr
        rr, cc = np.mgrid[0:int(h.Rows), 0:int(h.Columns)]
        inside = MplPath(np.c_[col, row]).contains_points(np.c_[cc.ravel(), rr.ravel()]).reshape(rr.shape)
        frames[uid] = frames.get(uid, np.zeros(rr.shape, bool)) ^ inside
    return frames


def position_order(headers):
    """Indices of the headers by position along the slice normal: D-layout slice order."""
    normal = np.cross(*np.asarray([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3))
    return np.argsort([np.dot(normal, [float(v) for v in h.ImagePositionPatient]) for h in headers])


# --------------------------------------------------------------------------------------------
# Polygons
# --------------------------------------------------------------------------------------------
def test_edge_polygons_are_the_exact_pixel_outlines():
    from matplotlib.path import Path as MplPath
    import dicom_export

    rng = np.random.default_rng(1)
    frames = [rng.random((23, 19)) > 0.55, np.zeros((5, 6), bool)]
    frames[1][0, 0] = frames[1][4, 5] = True  # lone corner pixels
    for frame in frames:
        polygons = dicom_export.edge_polygons(frame)
        rr, cc = np.mgrid[0:frame.shape[0], 0:frame.shape[1]]
        filled = np.zeros(frame.shape, bool)
        for p in polygons:
            assert len(p) >= 4  # never a 1-2 point contour (rt-utils #87)
            assert np.all(p * 2 % 2 == 1)  # every vertex on a pixel corner: edges traced, not centres (rt-utils #86)
            filled ^= MplPath(p).contains_points(np.c_[cc.ravel(), rr.ravel()]).reshape(frame.shape)
        np.testing.assert_array_equal(filled, frame)
        assert sum(dicom_export.polygon_area(p) for p in polygons) == pytest.approx(frame.sum())  # holes negative
    assert [len(p) for p in dicom_export.edge_polygons(frames[1])] == [4, 4]


def test_decimal_strings_fit_sixteen_characters():
    import dicom_export

    for v in (-123456.123456789, 0.1 + 0.2, -0.00001, 99999.99995, 1e-12):
        text = dicom_export._ds(v)
        assert len(text) <= 16 and abs(float(text) - v) <= 1e-4
    assert dicom_export._ds(-0.00001) == "0"


# --------------------------------------------------------------------------------------------
# RTSTRUCT
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_rtstruct_contours_land_on_the_right_pixels(tmp_path, orientation):
    """Non-square, anisotropic pixels, InstanceNumbers scrambled, four orientations: each contour references
    the slice it lies on, and filling it there gives back exactly the organ pixels drawn in that slice."""
    import dicom_export

    folder, g = write_series(tmp_path / "CT", orientation)
    img, info = read_series(folder, g)
    truth = organ_truth(g)
    masks = {o: to_ras_grid(m, g)[0] for o, m in truth.items()}
    out = dicom_export.write_rtstruct(masks, img, info, tmp_path / "rs.dcm")
    assert set(out["contours"]) == {"bladder", "rectum"}  # the empty prostate gets no ROI

    ds = pydicom.dcmread(tmp_path / "rs.dcm")
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == info.study_uid
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == info.frame_of_reference_uid
    series_ref = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == info.series_uid
    assert {c.ReferencedSOPInstanceUID for c in series_ref.ContourImageSequence} == set(info.sop_instance_uids)
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    assert sorted(names.values()) == [config.ROI_NAMES["bladder"], config.ROI_NAMES["rectum"]]
    colours = {c.ReferencedROINumber: [int(v) for v in c.ROIDisplayColor] for c in ds.ROIContourSequence}

    headers = info.datasets
    by_uid = {h.SOPInstanceUID: h for h in headers}
    order = position_order(headers)
    for number, name in names.items():
        organ = {v: k for k, v in config.ROI_NAMES.items()}[name]
        assert colours[number] == list(config.ROI_COLOURS[organ])
        frames = contour_frames(ds, number, by_uid)
        for s, k in enumerate(order):  # D slice s is the s-th slice by position
            uid = headers[k].SOPInstanceUID
            expected = truth[organ][s].astype(bool)
            assert (uid in frames) == expected.any(), (organ, s)  # contours on every slice it touches, no others
            if expected.any():
                np.testing.assert_array_equal(frames[uid], expected, err_msg=f"{organ} slice {s}")
    for item in ds.ROIContourSequence:
        for c in item.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR" and int(c.NumberOfContourPoints) >= 4
            assert len(c.ContourData) == 3 * int(c.NumberOfContourPoints)
    raw = pydicom.dcmread(tmp_path / "rs.dcm")  # the decimal strings as stored (Eclipse: <= 16 characters)
    for item in raw.ROIContourSequence:
        for c in item.ContourSequence:
            assert max(len(str(v.original_string if hasattr(v, "original_string") else v)) for v in c.ContourData) <= 16


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_rtstruct_read_by_rt_utils(tmp_path, orientation):
    """rt-utils (independent reader) finds the ROIs where they were drawn and not mirrored or rotated.
    rt-utils rounds vertices to whole pixels and fills inclusively, so the check is overlap, not equality;
    it is used on square, isotropic-in-plane slices only (it mixes up rows and columns otherwise)."""
    rt_utils = pytest.importorskip("rt_utils")
    import dicom_export

    folder, g = write_series(tmp_path / "CT", orientation, rows=18, cols=18, spacing=(0.9, 0.9, 2.0))
    img, info = read_series(folder, g)
    truth = organ_truth(g)
    masks = {o: to_ras_grid(m, g)[0] for o, m in truth.items()}
    dicom_export.write_rtstruct(masks, img, info, tmp_path / "rs.dcm")
    rs = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(tmp_path / "rs.dcm"))
    assert sorted(rs.get_roi_names()) == ["Bladder", "Rectum"]
    for organ in ("bladder", "rectum"):
        theirs = rs.get_roi_mask_by_name(config.ROI_NAMES[organ]).transpose(2, 0, 1)  # (slice, row, col), by position
        ours = truth[organ].astype(bool)
        flips = [ours[::-1], ours[:, ::-1], ours[:, :, ::-1], ours.transpose(0, 2, 1)]
        assert dicom_export.dice(theirs, ours) > 0.75, organ
        assert np.all(theirs[ours.any(axis=(1, 2)) == 0] == 0)  # nothing on slices without the organ
        assert all(dicom_export.dice(theirs, ours) > dicom_export.dice(theirs, f) + 0.2 for f in flips), organ


def test_round_trip_keeps_the_volume(tmp_path):
    """Read back with dicom_io (another rasteriser) on the CT grid: the same voxels; and the contour areas in mm
    (from ContourData alone) times the slice spacing equal the mask volume: no half-voxel shrink (rt-utils #86)."""
    import dicom_export

    folder, g = write_series(tmp_path / "CT", "axial_RPI")
    img, info = read_series(folder, g)
    masks = {o: to_ras_grid(m, g)[0] for o, m in organ_truth(g).items()}
    dicom_export.write_rtstruct(masks, img, info, tmp_path / "rs.dcm")
    check = dicom_export.rtstruct_roundtrip(tmp_path / "rs.dcm", masks, img, info.frame_of_reference_uid)
    assert check["dice"] == {"bladder": 1.0, "rectum": 1.0, "prostate": None} and not check["warnings"]
    assert check["voxels"]["bladder"][0] == check["voxels"]["bladder"][1] == int(masks["bladder"].sum())

    ds = pydicom.dcmread(tmp_path / "rs.dcm")
    dr, dc, ds_mm = g["spacing"]
    normal = g["normal"]
    for item in ds.ROIContourSequence:
        area = 0.0
        for c in item.ContourSequence:
            p = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
            area += 0.5 * np.dot(np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0), normal)  # signed: holes subtract
        organ = {v: k for k, v in config.ROI_NAMES.items()}[
            next(r.ROIName for r in ds.StructureSetROISequence if r.ROINumber == item.ReferencedROINumber)]
        assert abs(area) * ds_mm == pytest.approx(masks[organ].sum() * dr * dc * ds_mm, rel=1e-9)


def test_round_trip_warns_below_threshold(tmp_path):
    import dicom_export

    folder, g = write_series(tmp_path / "CT", "axial_LPS")
    img, info = read_series(folder, g)
    masks = {o: to_ras_grid(m, g)[0] for o, m in organ_truth(g).items()}
    dicom_export.write_rtstruct(masks, img, info, tmp_path / "rs.dcm")
    other = dict(masks, rectum=np.roll(masks["rectum"], 2, axis=0))  # not what was written
    check = dicom_export.rtstruct_roundtrip(tmp_path / "rs.dcm", other, img)
    assert check["dice"]["bladder"] == 1.0 and check["dice"]["rectum"] < config.ROUNDTRIP_MIN_DICE
    assert len(check["warnings"]) == 1 and "rectum" in check["warnings"][0] and "\n" not in check["warnings"][0]


def test_mask_on_another_grid_is_refused(tmp_path):
    import dicom_export

    folder, g = write_series(tmp_path / "CT", "axial_LPS")
    img, info = read_series(folder, g)
    shifted = nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine @ np.diag([1, 1, 1, 1.0]) +
                              np.array([[0, 0, 0, 0.4], [0] * 4, [0] * 4, [0] * 4]))
    masks = {"bladder": to_ras_grid(organ_truth(g)["bladder"], g)[0]}
    with pytest.raises(dicom_export.ExportError, match="not on the voxel grid"):
        dicom_export.write_rtstruct(masks, shifted, info, tmp_path / "rs.dcm")
    assert not (tmp_path / "rs.dcm").exists()


# --------------------------------------------------------------------------------------------
# DICOM-SEG
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", ["axial_RPI", "sagittal"])
def test_seg_frames_segments_and_codes(tmp_path, orientation):
    hd = pytest.importorskip("highdicom")
    import dicom_export

    folder, g = write_series(tmp_path / "CT", orientation)
    img, info = read_series(folder, g)
    truth = organ_truth(g)
    masks = {o: to_ras_grid(m, g)[0] for o, m in truth.items()}
    out = dicom_export.write_seg(masks, img, info, tmp_path / "seg.dcm")
    assert out["segments"] == ["bladder", "rectum"]

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == info.study_uid
    assert seg.FrameOfReferenceUID == info.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_uid
    for k, organ in enumerate(out["segments"], start=1):
        desc = seg.get_segment_description(k)
        assert desc.segment_label == config.ROI_NAMES[organ]
        code = config.SEG_CODES[organ]
        assert (desc.segmented_property_type.value, desc.segmented_property_type.scheme_designator) == code[:2]
        assert desc.segmented_property_category.value == config.SEG_CATEGORY[0]
    headers = info.datasets
    order = position_order(headers)
    uids = [headers[k].SOPInstanceUID for k in order]  # D slice order
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                               ignore_spatial_locations=True)  # (slice, row, col, segment)
    np.testing.assert_array_equal(frames[..., 0], truth["bladder"])
    np.testing.assert_array_equal(frames[..., 1], truth["rectum"])


# --------------------------------------------------------------------------------------------
# End to end: phantom -> DICOM -> convert -> preprocess -> train -> predict on DICOM -> RTSTRUCT -> read back
# --------------------------------------------------------------------------------------------
def test_dicom_end_to_end(tmp_path, capsys):
    convert_dicom = pytest.importorskip("convert_dicom")
    import dicom_export
    import dicom_io
    import phantom
    import predict
    import run_pipeline

    n_cases = 5
    dicom_root = tmp_path / "dicom"
    small = dict(spacing=(4.0, 4.0, 5.0))  # coarse voxels: the test is about the chain, not about accuracy
    dirs = dicom_export.write_phantom_dicom(dicom_root, n_cases, seed=0, grid="demo", **small)
    records, failures = convert_dicom.convert(dicom_root, tmp_path / "data")
    assert not failures and len(records) == n_cases
    cases = [phantom.make_case(phantom.case_seed(0, i), "demo", **small) for i in range(n_cases)]

    # The converted labels are the phantom's own masks, voxel for voxel (written as RTSTRUCT, rasterised back).
    for folder, case in zip(dirs, cases):
        case_dir = tmp_path / "data" / convert_dicom.case_id(folder)
        ct = nib.load(str(case_dir / "ct.nii.gz"))
        for organ in config.ORGANS:
            truth = nib.as_closest_canonical(case["masks"][organ])
            np.testing.assert_allclose(truth.affine, ct.affine, atol=1e-3)
            path = case_dir / "segmentations" / f"{organ}.nii.gz"
            converted = np.asanyarray(nib.load(str(path)).dataobj) if path.is_file() else 0 * truth.get_fdata()
            np.testing.assert_array_equal(converted > 0, np.asanyarray(truth.dataobj) > 0, err_msg=organ)

    argv = ["--preprocess", "--train", f"--OUTPUT_ROOT={tmp_path}", f"--DATA_ROOT={tmp_path / 'data'}",
            "--TARGET_SPACING=6,6,6", "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4", "--DEPTH=3", "--EPOCHS=1",
            "--ITERS_PER_EPOCH=2", "--BATCH_SIZE=1", "--VAL_EVERY=100", "--NUM_WORKERS=1", "--AMP=false"]
    assert run_pipeline.main(argv) == 0
    checkpoint = tmp_path / "checkpoints" / "checkpoint_last.pth"  # no validation in a 2-step run
    series = [d / "CT" for d in dirs[:2]]
    done, failed = predict.predict_files(series, tmp_path / "pred", checkpoint, formats=("nifti", "rtstruct"))
    assert not failed and [c.name for _, c in done] == [d.name for d in dirs[:2]]  # phantom_001/CT -> phantom_001
    converted = [tmp_path / "data" / convert_dicom.case_id(d) / "ct.nii.gz" for d in dirs[:2]]
    done_nifti, failed = predict.predict_files(converted, tmp_path / "pred_nifti", checkpoint)
    assert not failed and len(done_nifti) == 2
    for (src, case_dir), (_, nifti_dir), case in zip(done, done_nifti, cases):
        img, info = dicom_io.read_ct_series(src)
        rs = dicom_io.read_rtstruct(case_dir / "rtstruct.dcm")
        assert rs.referenced_series_uids == [info.series_uid]
        back = {r.name: dicom_io.rasterise(r, img, info.frame_of_reference_uid) for r in rs.rois}
        record = json.loads((case_dir / "volumes.json").read_text())
        for organ in config.ORGANS:
            pred = np.asanyarray(nib.load(str(case_dir / "segmentations" / f"{organ}.nii.gz")).dataobj)
            read = back.get(config.ROI_NAMES[organ], np.zeros_like(pred))
            np.testing.assert_array_equal(read, pred)  # the RTSTRUCT holds exactly the predicted mask
            expected = None if not pred.any() else 1.0
            assert record["dicom"]["rtstruct"]["roundtrip_dice"][organ] == expected
            same = np.asanyarray(nib.load(str(nifti_dir / "segmentations" / f"{organ}.nii.gz")).dataobj)
            np.testing.assert_array_equal(read, same)  # DICOM in gives the prediction the converted NIfTI gets
            truth = np.asanyarray(nib.as_closest_canonical(case["masks"][organ]).dataobj) > 0
            print(f"{src.parent.name} {organ}: Dice against the phantom's own mask {dicom_export.dice(read, truth):.3f}")
