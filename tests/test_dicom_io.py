"""dicom_io.py: CT series in (against SimpleITK), CT series out (round trip), RTSTRUCT reading and rasterisation
(against dicompyler-core's contour mask and rt-utils' writer), and the real Eclipse structure set.

Synthetic series are written slice by slice with pydicom here (not with dicom_io), with asymmetric content,
unequal row/column spacing and scrambled InstanceNumbers, so that any flip, swap or sort by InstanceNumber shows.
"""
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

import dicom_io  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
THORAX = REALDATA / "ct_dicom_thorax"
ECLIPSE = REALDATA / "eclipse_prostate_rtstruct"
AXIAL_LPS = (1, 0, 0, 0, 1, 0)  # columns to the patient's left, rows posterior: slices stack upward (LPS)
AXIAL_RPI = (-1, 0, 0, 0, 1, 0)  # columns to the right, rows posterior: the normal points down (RPI)
SAGITTAL = (0, 1, 0, 0, 0, -1)  # columns posterior, rows downward
CORONAL = (1, 0, 0, 0, 0, -1)  # columns left, rows downward
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
OBLIQUE = (_c, _s, 0, -_s, _c, 0)  # axial, rotated 20 degrees about the patient's z axis (not tilted)


# --- hand-made DICOM ---------------------------------------------------------------------------------------

def write_slices(folder, vol, iop=AXIAL_LPS, pixel_spacing=(0.8, 1.1), gap=2.5, origin=(-20.0, -30.0, 50.0),
                 seed=0, modality="CT", uids=None, intercept=-1024, slope=1, extra=None, names="random"):
    """Write vol[i, j, k] (HU; i = column, j = row, k = slice along the normal) as single-slice DICOM files.
    InstanceNumbers are a random permutation and the file names do not follow the slice order. Returns the
    paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uids = uids or dict(study=generate_uid(), series=generate_uid(), frame=generate_uid())
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    n = vol.shape[2]
    instance = rng.permutation(n) + 1
    paths = []
    for k in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dicom_io.CT_IMAGE_STORAGE, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = dicom_io.CT_IMAGE_STORAGE, sop, modality
        ds.PatientName, ds.PatientID, ds.StudyDate = "TEST^PATIENT", "P001", "20260101"
        for key in ("PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "StudyTime",
                    "StudyID", "StudyDescription", "SeriesDate", "SeriesTime", "SeriesDescription",
                    "AccessionNumber", "ReferringPhysicianName"):
            setattr(ds, key, "")  # present and empty, as type 2 attributes may be (rt-utils copies them)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.InstanceNumber, ds.SeriesNumber = int(instance[k]), 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        pos = np.asarray(origin) + k * gap * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [str(pixel_spacing[0]), str(pixel_spacing[1])]
        ds.SliceThickness = "3"  # deliberately not the gap: spacing must come from the positions
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = str(intercept), str(slope)
        stored = np.round((vol[:, :, k].T - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        for key, value in (extra or {}).get(k, {}).items():
            setattr(ds, key, value)
        name = f"IM{rng.integers(1_000_000):07d}_{k}" if names == "random" else f"CT{k:04d}.dcm"
        ds.save_as(str(folder / name), enforce_file_format=True)
        paths.append(folder / name)
    return paths


def test_volume(shape=(13, 11, 7), seed=0):
    """Asymmetric HU content: a ramp along each axis plus noise, so every flip and swap changes the array."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape)
    return (-1000 + 7 * i + 31 * j + 101 * k + rng.integers(0, 5, shape)).astype(np.int16)


test_volume.__test__ = False  # a helper, not a test


def sitk_canonical(folder):
    """SimpleITK's ImageSeriesReader (the independent reference) -> nibabel image in closest-canonical RAS."""
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # [x, y, z] in SimpleITK's index order
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return nib.as_closest_canonical(nib.Nifti1Image(data, np.diag([-1.0, -1, 1, 1]) @ affine))


def make_rtstruct(path, info, rois, omit=(), frame_uid=None):
    """Minimal RTSTRUCT referencing `info` (a SeriesInfo): rois = {name: [(N, 3) LPS contours]}; names in
    `omit` are listed in StructureSetROISequence but left out of ROIContourSequence (as some planning systems do)."""
    meta = FileMetaDataset()
    sop = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dicom_io.RTSTRUCT_STORAGE, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = dicom_io.RTSTRUCT_STORAGE, sop, "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = info.study_uid, generate_uid()
    ref = Dataset()
    ref.FrameOfReferenceUID = frame_uid or info.frame_of_reference_uid
    ds.ReferencedFrameOfReferenceSequence = [ref]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        item = Dataset()
        item.ROINumber, item.ROIName, item.ReferencedFrameOfReferenceUID = number, name, ref.FrameOfReferenceUID
        ds.StructureSetROISequence.append(item)
        if name in omit:
            continue
        rc = Dataset()
        rc.ReferencedROINumber, rc.ROIDisplayColor = number, [255, 0, 0]
        rc.ContourSequence = []
        for c in contours:
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(c)
            contour.ContourData = [f"{v:.6f}" for v in np.asarray(c, float).ravel()]
            rc.ContourSequence.append(contour)
        ds.ROIContourSequence.append(rc)
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


# --- CT series in --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not THORAX.is_dir(), reason="shared real DICOM series not available")
def test_real_thorax_series_lands_on_totalsegmentators_grid_with_simpleitks_hu():
    img, info = dicom_io.read_ct_series(THORAX)
    ref = nib.as_closest_canonical(nib.load(str(REALDATA / "ct_dicom_thorax_totalsegmentator_labels.nii.gz")))
    assert img.shape == ref.shape == (512, 512, 20)
    assert np.abs(img.affine - ref.affine).max() < 1e-3  # the same voxel centres in the same order
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [0.9765625, 0.9765625, 2.0])  # not 3 mm
    sitk_img = sitk_canonical(THORAX)
    assert np.abs(sitk_img.affine - img.affine).max() < 1e-3
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16 and np.array_equal(data, np.asarray(sitk_img.dataobj))
    assert -1100 < data.min() < -900  # RescaleIntercept -1024 applied: air is about -1000 HU
    # The anonymised files have empty UIDs: SOP UIDs come from the file meta, study/series ones are derived
    assert len(set(info.sop_instance_uids)) == 20 and all(info.sop_instance_uids)
    assert info.study_uid and info.series_uid and info.frame_of_reference_uid.startswith("1.3.12.2")
    z = [p[2] for p in info.slice_positions]
    assert z == sorted(z) and info.slice_axis == 2 and info.slice_spacing == pytest.approx(2.0)
    assert all("PixelData" not in ds for ds in info.datasets) and info.patient["Manufacturer"] == "SIEMENS"


@pytest.mark.parametrize("iop", [AXIAL_LPS, AXIAL_RPI, SAGITTAL, CORONAL, OBLIQUE],
                         ids=["axial-LPS", "axial-RPI", "sagittal", "coronal", "oblique"])
def test_orientations_and_scrambled_instance_numbers_match_simpleitk(tmp_path, iop):
    vol = test_volume()
    write_slices(tmp_path / "ct", vol, iop=iop)
    img, info = dicom_io.read_ct_series(tmp_path / "ct")
    ref = sitk_canonical(tmp_path / "ct")
    assert img.shape == ref.shape
    assert np.abs(img.affine - ref.affine).max() < 1e-4
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))
    assert np.allclose(sorted(np.linalg.norm(img.affine[:3, :3], axis=0)), sorted([0.8, 1.1, 2.5]), atol=1e-5)
    # slice order: the k-th SOP UID is the slice at index k along slice_axis of the returned image
    centres = img.affine[:3, :3] @ np.eye(3)[info.slice_axis][:, None] * np.arange(img.shape[info.slice_axis])
    centres = (centres.T + img.affine[:3, 3]) * [-1, -1, 1]  # LPS, of voxel 0 of each slice's plane
    normal = np.cross(iop[:3], iop[3:])
    assert np.allclose(np.array(info.slice_positions) @ normal, centres @ normal, atol=1e-4)
    for ds, sop in zip(info.datasets, info.sop_instance_uids):
        assert ds.SOPInstanceUID == sop


def test_rescale_slope_and_intercept_applied(tmp_path):
    vol = test_volume()
    vol = (vol // 2) * 2  # representable with slope 2
    write_slices(tmp_path / "ct", vol, slope=2, intercept=-2048)
    img, _ = dicom_io.read_ct_series(tmp_path / "ct")
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(sitk_canonical(tmp_path / "ct").dataobj))
    assert np.array_equal(np.sort(np.asarray(img.dataobj).ravel()), np.sort(vol.ravel()))


def test_folder_with_rtstruct_and_localizer_picks_the_ct_series(tmp_path):
    vol = test_volume()
    write_slices(tmp_path / "p", vol)
    write_slices(tmp_path / "p", test_volume((13, 11, 1)), seed=5, iop=CORONAL,
                 extra={0: {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}})  # a scout in the same folder
    img, info = dicom_io.read_ct_series(tmp_path / "p")
    make_rtstruct(tmp_path / "p" / "RS.dcm", info, {"Bladder": []})
    (tmp_path / "p" / "notes.txt").write_text("not DICOM")
    img2, info2 = dicom_io.read_ct_series(tmp_path / "p")
    assert img2.shape == (13, 11, 7) and info2.sop_instance_uids == info.sop_instance_uids
    text = " ".join(info2.notes)
    assert "localizer" in text and "RTSTRUCT" in text and "non-DICOM" in text
    write_slices(tmp_path / "p", test_volume((13, 11, 1)), seed=6, iop=SAGITTAL)  # an unflagged scout series
    img3, info3 = dicom_io.read_ct_series(tmp_path / "p")
    assert info3.sop_instance_uids == info.sop_instance_uids and "single-image CT series" in " ".join(info3.notes)
    assert dicom_io.is_dicom_series(tmp_path / "p") and not dicom_io.is_dicom_series(tmp_path / "p" / "RS.dcm")


def test_two_ct_series_need_a_choice(tmp_path):
    write_slices(tmp_path / "p", test_volume(), seed=1)
    a = write_slices(tmp_path / "p", test_volume(seed=3), seed=2)
    with pytest.raises(dicom_io.DicomError, match="2 CT series"):
        dicom_io.read_ct_series(tmp_path / "p")
    uid = pydicom.dcmread(str(a[0])).SeriesInstanceUID
    img, info = dicom_io.read_ct_series(tmp_path / "p", series_uid=uid)
    assert info.series_uid == uid and np.array_equal(np.asarray(img.dataobj), np.asarray(
        sitk_canonical_files(a).dataobj))


def sitk_canonical_files(paths):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage([str(p) for p in paths])
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return nib.as_closest_canonical(nib.Nifti1Image(data, np.diag([-1.0, -1, 1, 1]) @ affine))


# --- CT series out -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codes", [("L", "A", "S"), ("R", "A", "S"), ("P", "I", "R")])
def test_write_ct_series_round_trip_is_exact(tmp_path, codes):
    from nibabel import orientations as nio
    vol = test_volume((9, 12, 6))
    aff = np.diag([0.7, 1.3, 2.0, 1.0])
    aff[:3, 3] = [-10.5, 20.25, -33.0]
    ras = nib.Nifti1Image(vol, aff)
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(codes))
    src = ras.as_reoriented(ornt)  # the same image stored in another axis order
    info = dicom_io.write_ct_series(src, tmp_path / "ct", patient={"PatientID": "case7", "PatientName": "A^B"})
    img, info2 = dicom_io.read_ct_series(tmp_path / "ct")
    assert np.array_equal(np.asarray(img.dataobj), vol) and np.abs(img.affine - aff).max() < 1e-6
    assert info2.sop_instance_uids == info.sop_instance_uids and info2.series_uid == info.series_uid
    assert info2.patient["PatientID"] == "case7" and len(info.datasets) == img.shape[info.slice_axis]
    ref = sitk_canonical(tmp_path / "ct")  # another reader sees the same
    assert np.array_equal(np.asarray(ref.dataobj), vol) and np.abs(ref.affine - aff).max() < 1e-4
    for ds in info.datasets:  # Eclipse refuses decimal strings longer than 16 characters (rt-utils #80)
        assert all(len(str(v)) <= 16 for v in list(ds.ImagePositionPatient) + list(ds.ImageOrientationPatient))


# --- RTSTRUCT and rasterisation ------------------------------------------------------------------------------

def axial_grid(shape=(20, 18, 5), spacing=(1.0, 1.0, 2.0), origin_lps=(10.0, -5.0, 0.0)):
    """A reference image whose voxel (i, j, k) centre is at LPS origin + (i, j, k) * spacing."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return nib.Nifti1Image(np.zeros(shape, np.uint8), aff)


def square(i0, i1, j0, j1, k, grid):
    """A contour (LPS mm) along voxel edges enclosing voxels i0..i1, j0..j1 of slice k."""
    corners = np.array([[i0 - .5, j0 - .5, k], [i1 + .5, j0 - .5, k], [i1 + .5, j1 + .5, k], [i0 - .5, j1 + .5, k]])
    world = corners @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return world * [-1, -1, 1]


def test_rasterise_edges_holes_islands_and_nesting():
    grid = axial_grid()
    outer, hole, island = square(2, 15, 2, 14, 1, grid), square(5, 12, 5, 11, 1, grid), square(7, 9, 7, 8, 1, grid)
    other = square(17, 18, 0, 1, 3, grid)
    mask = dicom_io.rasterise([outer, hole, island, other], grid)
    expect = np.zeros(grid.shape, np.uint8)
    expect[2:16, 2:15, 1] = 1
    expect[5:13, 5:12, 1] = 0
    expect[7:10, 7:9, 1] = 1
    expect[17:19, 0:2, 3] = 1
    assert mask.dtype == np.uint8 and np.array_equal(mask, expect)
    # contours along voxel edges: the volume is exact, not half a voxel short all round (rt-utils #86)
    assert dicom_io.rasterise([square(3, 6, 4, 9, 2, grid)], grid).sum() == 4 * 6
    # 1- and 2-point contours (tiny islands) enclose nothing and are not an error (rt-utils #87)
    assert dicom_io.rasterise([outer[:1], outer[:2]], grid).sum() == 0


def test_rasterise_matches_dicompyler_core_contour_mask():
    """Random star polygons with off-grid vertices; dicompyler-core's get_contour_mask (matplotlib's
    point-in-polygon on the same voxel centres), combined even-odd per plane, is the reference."""
    dvhcalc = pytest.importorskip("dicompylercore.dvhcalc")
    grid = axial_grid(shape=(40, 36, 3), spacing=(0.9, 1.2, 2.5), origin_lps=(-17.3, 4.1, -12.5))
    rng = np.random.default_rng(3)
    xs = -17.3 + 0.9 * np.arange(40)
    ys = 4.1 + 1.2 * np.arange(36)
    xx, yy = np.meshgrid(xs, ys)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    contours, expect = [], np.zeros(grid.shape, bool)
    for k, n_polys in ((0, 1), (1, 2), (2, 3)):
        for p in range(n_polys):
            t = np.sort(rng.uniform(0, 2 * np.pi, 23))
            r = rng.uniform(3, 14 - 3 * p, t.size)
            cx, cy = xs.mean() + rng.normal(0, 2), ys.mean() + rng.normal(0, 2)
            c = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(t.size, -12.5 + 2.5 * k)])
            contours.append(c)
            dd = dict(lut=[xs, ys], x_lut_index=0)
            expect[:, :, k] ^= dvhcalc.get_contour_mask(dd, 0, points, c[:, :2]).T  # [row, col] -> [i, j]
    mask = dicom_io.rasterise(contours, grid)
    assert expect.sum() > 500 and np.array_equal(mask.astype(bool), expect)


def test_rtstruct_written_by_rt_utils_lands_on_our_grid(tmp_path):
    """Orientation cross-check (rt-utils #84/#102, TotalSegmentator #140): a blob in an RPI series with
    scrambled InstanceNumbers, contoured by rt-utils from its own view of the series, rasterised by us."""
    rt_utils = pytest.importorskip("rt_utils")
    vol = np.full((24, 22, 9), -1000, np.int16)
    i, j, k = np.indices(vol.shape)
    blob = ((i - 8) / 5.0) ** 2 + ((j - 13) / 6.0) ** 2 + ((k - 3) / 2.5) ** 2 < 1  # off-centre in every axis
    vol[blob] = 200
    write_slices(tmp_path / "ct", vol, iop=AXIAL_RPI, pixel_spacing=(1.0, 1.0), gap=2.0)
    img, info = dicom_io.read_ct_series(tmp_path / "ct")
    truth = np.asarray(sitk_canonical(tmp_path / "ct").dataobj) == 200  # where the blob is, per SimpleITK
    builder = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(tmp_path / "ct"))
    # rt-utils' mask is [row, column, slice] over its slices sorted along the normal: our native order
    builder.add_roi(mask=blob.transpose(1, 0, 2), name="Bladder")
    builder.save(str(tmp_path / "RS.dcm"))
    rs = dicom_io.read_rtstruct(tmp_path / "RS.dcm")
    dicom_io.check_frame_of_reference(rs, info)
    mask = dicom_io.rasterise(rs.roi("bladder"), img, info.frame_of_reference_uid).astype(bool)
    # rt-utils traces voxel centres (a polygon through the outer voxels' centres), so boundary voxels are on
    # the contour: we may lose them, but every voxel we set is inside the blob and the blob's core is covered
    from scipy import ndimage
    core = ndimage.binary_erosion(truth, structure=np.ones((3, 3, 1), bool))
    assert not (mask & ~truth).any() and (core & ~mask).sum() == 0 and mask.sum() > 0.4 * truth.sum()


def test_read_rtstruct_keeps_empty_rois_and_ones_left_out_of_the_contour_sequence(tmp_path):
    grid_img, info = dicom_io.read_ct_series(write_slices(tmp_path / "ct", test_volume())[0].parent)
    c = np.array([[-15.0, -25.0, 50.0], [-10.0, -25.0, 50.0], [-10.0, -20.0, 50.0]])
    make_rtstruct(tmp_path / "RS.dcm", info, {"Bladder": [c], "CTV": [], "PROS": []}, omit=("PROS",))
    rs = dicom_io.read_rtstruct(tmp_path / "RS.dcm")
    assert rs.names() == ["Bladder", "CTV", "PROS"]
    assert not rs.roi("Bladder").empty and rs.roi("CTV").empty and rs.roi("PROS").empty
    assert not rs.roi("PROS").in_contour_sequence and "PROS" in " ".join(rs.notes)
    assert rs.frame_of_reference_uid == info.frame_of_reference_uid
    np.testing.assert_allclose(rs.roi("Bladder").contours[0], c)
    assert dicom_io.rasterise(rs.roi("CTV"), grid_img).sum() == 0


def test_rasterise_refuses_contour_between_slices_and_foreign_frame_of_reference():
    grid = axial_grid()
    c = square(3, 6, 4, 9, 2, grid)
    shifted = c + [0, 0, 0.2 + dicom_io.config.DICOM_CONTOUR_PLANE_TOL_MM]
    with pytest.raises(dicom_io.DicomError, match="matches no CT slice"):
        dicom_io.rasterise([c, shifted], grid)
    near = c + [0, 0, 0.5 * dicom_io.config.DICOM_CONTOUR_PLANE_TOL_MM]  # within tolerance: slice 2
    assert dicom_io.rasterise([near], grid)[:, :, 2].sum() == 24
    roi = dicom_io.Roi(1, "Bladder", [c], [""], "1.2.3", source="RS.dcm")
    with pytest.raises(dicom_io.DicomError, match="Frame of Reference"):
        dicom_io.rasterise(roi, grid, frame_of_reference_uid="1.2.4")


@pytest.mark.skipif(not (ECLIPSE / "RS.dcm").is_file(), reason="shared Eclipse RTSTRUCT not available")
def test_real_eclipse_structure_set_volumes_within_3_percent_of_eclipse_and_slicer():
    rs = dicom_io.read_rtstruct(ECLIPSE / "RS.dcm")
    grid = dicom_io.contour_grid(rs.rois, pixel_mm=1.0)  # contours' extent, 1 mm in-plane, a slice per plane
    assert np.allclose(np.linalg.norm(grid.affine[:3, :3], axis=0), [1.0, 1.0, 2.5])
    volumes = dicom_io.roi_volumes(rs, pixel_mm=1.0)  # rasterised on that grid
    with open(ECLIPSE / "reference_volumes.csv") as f:
        reference = {r["structure"]: (float(r["eclipse_cc"]), float(r["slicerrt_cc"])) for r in csv.DictReader(f)}
    for name in ("Bladder", "Rectum", "Femoral Head Lt", "Femoral Head RT", "BODY"):
        cc = volumes[name]
        for ref in reference[name]:
            assert abs(cc / ref - 1) < 0.03, (name, cc, reference[name])
    empty = {r.name for r in rs.rois if r.empty}
    assert {"PROS", "CTV", "optBladder", "optRectum"} <= empty and not empty & set(reference)
    assert rs.roi("PROS").empty and dicom_io.rasterise(rs.roi("PROS"), grid).sum() == 0


# --- convert_dicom.py and a DICOM case folder in preprocessing -------------------------------------------

def planning_export(folder, frame_uid=None, seed=0):
    """A patient folder as a planning system exports it: CT/ slices + RS/RS.dcm with planning ROI names.
    Returns (expected {organ: mask on our RAS grid}, CT image as we read it)."""
    vol = np.full((30, 28, 8), -1000, np.int16)
    vol[3:27, 3:25, :] = 30
    write_slices(Path(folder) / "CT", vol, pixel_spacing=(1.0, 1.0), gap=2.0, seed=seed)
    img, info = dicom_io.read_ct_series(Path(folder) / "CT")
    boxes = {"BLADDER": [(5, 12, 6, 14, k) for k in (2, 3, 4)],
             "Rectum": [(16, 24, 10, 20, k) for k in (1, 2)] + [(19, 21, 13, 16, k) for k in (1, 2)],  # ring
             "Femoral Head Lt": [(4, 8, 18, 22, 5)], "optBladder": [(5, 8, 6, 8, 3)],
             "BODY": [(3, 26, 3, 24, k) for k in range(8)]}
    rois = {name: [square(*b, img) for b in bs] for name, bs in boxes.items()}
    rois.update({"PROS": [], "CTV": []})
    (Path(folder) / "RS").mkdir(parents=True)
    make_rtstruct(Path(folder) / "RS" / "RS.dcm", info, rois, omit=("CTV",), frame_uid=frame_uid)
    expect = {}
    for organ, name in (("bladder", "BLADDER"), ("rectum", "Rectum"), ("femur_left", "Femoral Head Lt")):
        m = np.zeros(img.shape, np.uint8)
        for i0, i1, j0, j1, k in boxes[name]:
            m[i0:i1 + 1, j0:j1 + 1, k] ^= 1
        expect[organ] = m
    return expect, img


def test_convert_dicom_writes_abdomenatlas_cases_and_goes_on_past_bad_patients(tmp_path, capsys):
    import convert_dicom
    import preprocessing as pp
    root = tmp_path / "dicom"
    expect, img = planning_export(root / "patient1")
    planning_export(root / "patient2", frame_uid="1.2.3.999")  # contours drawn on another frame of reference
    (root / "patient3").mkdir()
    make_rtstruct(root / "patient3" / "RS.dcm", dicom_io.read_ct_series(root / "patient1" / "CT")[1], {})  # no CT
    rc = convert_dicom.main([str(root), "-o", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert rc == 1
    failed = [l for l in err.splitlines() if l.startswith("failed:")]
    assert len(failed) == 2 and "Frame of Reference" in failed[0] and "patient2" in failed[0]
    assert "RTSTRUCT without CT" in failed[1] and "patient3" in failed[1]
    case = tmp_path / "data" / "BDMAP_patient1"
    assert not (tmp_path / "data" / "BDMAP_patient2").exists()
    assert sorted(p.name for p in (case / "segmentations").iterdir()) == [
        "bladder.nii.gz", "femur_left.nii.gz", "rectum.nii.gz"]
    record = json.loads((case / "conversion.json").read_text())
    assert record["organs"]["prostate"] == dict(status="absent", roi="PROS", reason="ROI has no contours")
    assert record["organs"]["femur_right"]["status"] == "absent" and record["organs"]["femur_right"]["roi"] is None
    assert set(record["unmatched_rois"]) == {"optBladder", "BODY", "CTV"} and record["empty_unmatched_rois"] == ["CTV"]
    line = next(l for l in out.splitlines() if l.startswith("BDMAP_patient1"))
    assert "prostate absent ('PROS' has no contours)" in line and "optBladder" in line
    ct = nib.load(str(case / "ct.nii.gz"))
    assert np.array_equal(np.asarray(ct.dataobj), np.asarray(img.dataobj)) and np.allclose(ct.affine, img.affine)
    for organ, m in expect.items():
        assert np.array_equal(np.asarray(nib.load(str(case / "segmentations" / f"{organ}.nii.gz")).dataobj), m)
    # the pipeline reads the converted case unchanged: the empty PROS is an absent prostate
    read = pp.read_case(case)
    assert read["masks"]["prostate"] is None and read["masks"]["bladder"].sum() == expect["bladder"].sum()
    assert any("no mask for prostate" in w for w in read["warnings"])


def test_synonyms_are_case_insensitive_and_exact():
    import convert_dicom
    table = convert_dicom.synonym_table()
    for name, organ in (("BLADDER", "bladder"), ("Blase", "bladder"), ("prostate_gland", "prostate"),
                        ("PROS", "prostate"), ("RECTUM", "rectum"), ("Femoral Head RT", "femur_right"),
                        ("femoral_head_lt", "femur_left")):
        assert table[convert_dicom.normalise_roi_name(name)] == organ, name
    for name in ("optBladder", "Bladder_wall", "PTV", "BODY", "Rectum PRV"):
        assert convert_dicom.normalise_roi_name(name) not in table, name


def test_two_rois_with_contours_for_one_organ_are_refused(tmp_path):
    import convert_dicom
    _, img = planning_export(tmp_path / "p")
    rs = dicom_io.read_rtstruct(tmp_path / "p" / "RS" / "RS.dcm")
    rs.roi("optBladder").name = "Blase"  # now two ROIs with contours read as the bladder
    with pytest.raises(dicom_io.DicomError, match="2 ROIs with contours for bladder"):
        convert_dicom.match_rois(rs)


def test_preprocessing_accepts_a_dicom_series_folder_as_the_ct(tmp_path):
    import preprocessing as pp
    case = tmp_path / "BDMAP_00000001"
    expect, img = planning_export(tmp_path / "export")
    shutil.copytree(tmp_path / "export" / "CT", case / "ct")
    (case / "segmentations").mkdir()
    nib.save(nib.Nifti1Image(expect["bladder"], img.affine), str(case / "segmentations" / "bladder.nii.gz"))
    read = pp.read_case(case)
    assert np.array_equal(np.asarray(read["ct"].dataobj), np.asarray(img.dataobj))
    assert np.array_equal(read["masks"]["bladder"], expect["bladder"])
    meta = pp.process_case(case, tmp_path / "out" / case.name)
    assert meta["organs"]["bladder"]["present"] and any(k.startswith("ct/") for k in meta["inputs"])
