"""Tests of the synthetic phantom: layout, HU per tissue, world-space anatomy, orientations, determinism."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import config
import phantom

COARSE = (3.0, 3.0, 4.0)  # mm; coarse voxels keep every case well under a second
ORGAN_NAMES = ("prostate", "bladder", "rectum")


def case(seed, **forced):
    forced.setdefault("spacing", COARSE)
    return phantom.make_case(seed, grid="demo", **forced)


def arr(img):
    return np.asanyarray(img.dataobj)


def centroid_mm(img):
    """Centroid of a mask in world RAS mm, through the affine (whatever the storage orientation)."""
    idx = np.argwhere(arr(img) > 0)
    assert len(idx), "empty mask"
    return nib.affines.apply_affine(img.affine, idx.mean(0))


def eroded(mask, iterations=1):
    return ndimage.binary_erosion(mask, iterations=iterations)


@pytest.fixture(scope="module")
def male():
    return case(11, sex="male", fov="pelvis", cut="none", orientation="LPS", iv_contrast=False,
                bladder_contrast=False, blur=1.0, sharpen=0.0, hu_offset=0.0)  # literature HU, standard kernel


def test_dataset_layout_labels_and_idempotence(tmp_path):
    dirs = phantom.generate_dataset(tmp_path, n_cases=2, seed=3, grid="demo", workers=1)
    assert [d.name for d in dirs] == ["BDMAP_00000001", "BDMAP_00000002"]
    for d in dirs:
        ct = nib.load(d / "ct.nii.gz")
        assert ct.get_data_dtype() == np.int16
        assert int(ct.header["qform_code"]) == 1 and int(ct.header["sform_code"]) == 1
        assert np.allclose(ct.header.get_qform(), ct.affine) and np.allclose(ct.header.get_sform(), ct.affine)
        combined = arr(nib.load(d / "combined_labels.nii.gz"))
        assert combined.shape == ct.shape and combined.dtype == np.uint8
        for name in phantom.MASK_NAMES:
            m = nib.load(d / "segmentations" / f"{name}.nii.gz")
            assert m.get_data_dtype() == np.uint8 and m.shape == ct.shape
            assert np.allclose(m.affine, ct.affine)
            data = arr(m)
            assert set(np.unique(data)) <= {0, 1}
            assert np.all(combined[data > 0] == config.LABEL_VALUES[name])
        assert set(np.unique(combined)) <= {0, *config.LABEL_VALUES.values()}
        meta = json.loads((d / "meta.json").read_text())
        assert meta["shape"] == list(ct.shape)
        assert np.allclose(meta["spacing"], ct.header.get_zooms())
        assert "".join(nib.aff2axcodes(ct.affine)) == meta["orientation"]
    marker = json.loads((tmp_path / "phantom.json").read_text())
    assert (marker["seed"], marker["grid"], marker["n_cases"]) == (3, "demo", 2)
    stamp = (dirs[0] / "ct.nii.gz").stat().st_mtime_ns
    phantom.generate_dataset(tmp_path, n_cases=2, seed=3, grid="demo", workers=1)
    assert (dirs[0] / "ct.nii.gz").stat().st_mtime_ns == stamp  # finished cases are skipped
    with pytest.raises(ValueError, match="phantom.json"):  # never top up a folder made with another seed
        phantom.generate_dataset(tmp_path, n_cases=2, seed=4, grid="demo", workers=1)


def test_same_seed_same_arrays_and_worker_count_does_not_matter(tmp_path):
    a, b = case(5), case(5)
    assert np.array_equal(arr(a["ct"]), arr(b["ct"]))
    for name in phantom.MASK_NAMES:
        assert np.array_equal(arr(a["masks"][name]), arr(b["masks"][name]))
    assert phantom.case_seed(0, 1) != phantom.case_seed(0, 2) != phantom.case_seed(1, 1)
    dirs = phantom.generate_dataset(tmp_path, n_cases=2, seed=7, grid="demo", workers=2)
    ref = phantom.make_case(phantom.case_seed(7, 1), "demo")
    assert np.array_equal(arr(nib.load(dirs[1] / "ct.nii.gz")), arr(ref["ct"]))


def test_tissue_hu(male):
    ct = arr(male["ct"]).astype(np.float32)
    assert arr(male["ct"]).dtype == np.int16
    bladder = arr(male["masks"]["bladder"]) > 0
    urine = eroded(bladder, 2)
    assert urine.sum() > 20
    assert -5 <= np.median(ct[urine]) <= 25  # urine 0-15 HU (+ noise)
    prostate = eroded(arr(male["masks"]["prostate"]) > 0)
    assert 20 <= np.median(ct[prostate]) <= 60
    femur = arr(male["masks"]["femur_left"]) > 0
    cortical = male["meta"]["hu_means"]["cortical"]  # this case's draw from the literature range
    assert 700 <= cortical <= 1200
    assert 0.55 * cortical <= np.percentile(ct[femur], 95) <= 1.1 * cortical  # a 2 mm shell in 3-4 mm voxels
    assert 100 <= np.median(ct[eroded(femur, 2)]) <= 400  # trabecular core / marrow
    # Air: the grid corners lie outside the (elliptic) body.
    ends = (slice(0, 3), slice(-3, None))
    air = np.concatenate([ct[i, j, :].ravel() for i in ends for j in ends])
    assert np.median(air) < -950
    # Fat: the most common body HU between -300 and -20 sits at about -100.
    body = ct[(ct > -300) & (ct < -20)]
    hist, edges = np.histogram(body, bins=56, range=(-300, -20))
    mode = edges[np.argmax(hist)] + 2.5
    assert -130 <= mode <= -70
    # Noise: a correlated 10-30 HU sd, measured inside the homogeneous urine.
    assert 3 <= np.std(ct[urine]) <= 45


def test_world_anatomy_holds_in_every_orientation():
    for code in ("RAS", "LPS", "LPI", "RPS", "LAS"):
        c = case(21, sex="male", fov="pelvis", cut="none", orientation=code)
        assert "".join(nib.aff2axcodes(c["ct"].affine)) == code
        cen = {name: centroid_mm(img) for name, img in c["masks"].items()}
        assert cen["prostate"][2] < cen["bladder"][2], code  # prostate inferior to the bladder
        assert cen["prostate"][1] > cen["rectum"][1], code  # and anterior to the rectum
        assert cen["femur_left"][0] > 50 and cen["femur_right"][0] < -50, code  # RAS+: left femur at +x
        assert abs(cen["prostate"][0]) < 20 and abs(cen["bladder"][0]) < 25, code  # midline organs


def test_lps_and_ras_storage_give_the_same_world_anatomy():
    ras = case(4, orientation="RAS", fov="pelvis", sex="male", cut="none")
    lps = case(4, orientation="LPS", fov="pelvis", sex="male", cut="none")
    assert not np.array_equal(ras["ct"].affine, lps["ct"].affine)
    for name in phantom.MASK_NAMES:
        assert np.allclose(centroid_mm(ras["masks"][name]), centroid_mm(lps["masks"][name]), atol=1e-3)
    canon = [np.asanyarray(nib.as_closest_canonical(c["ct"]).dataobj) for c in (ras, lps)]
    assert np.array_equal(*canon)


def test_organ_volumes_in_stated_ranges_and_masks_do_not_overlap():
    for seed in range(6):
        c = case(100 + seed, sex="male", fov="pelvis", cut="none")
        vol = c["meta"]["volumes_ml"]
        lo, hi = phantom.STYLES["train"]["prostate_ml"]
        assert 0.7 * lo <= vol["prostate"] <= 1.1 * hi, (seed, vol)  # the drawn volume, less bone and voxelisation
        assert 5 <= vol["bladder"] <= 1.1 * phantom.STYLES["train"]["bladder_ml"][1], (seed, vol)
        assert vol["rectum"] > 5, (seed, vol)
        stack = sum(arr(c["masks"][n]).astype(int) for n in ORGAN_NAMES)
        assert stack.max() <= 1  # prostate, bladder and rectum never share a voxel
        voxel_ml = np.prod(c["ct"].header.get_zooms()) / 1000
        assert np.isclose(arr(c["masks"]["prostate"]).sum() * voxel_ml, vol["prostate"], rtol=1e-3)


def test_absent_organs_are_all_zero():
    abdomen = case(8, fov="abdomen", sex="male")
    for name in phantom.MASK_NAMES:
        assert arr(abdomen["masks"][name]).sum() == 0, name
        assert abdomen["meta"]["volumes_ml"][name] == 0
    female = case(8, fov="pelvis", sex="female", cut="none")
    assert arr(female["masks"]["prostate"]).sum() == 0
    assert arr(female["masks"]["bladder"]).sum() > 0 and arr(female["masks"]["rectum"]).sum() > 0
    assert female["meta"]["sex"] == "female"


def test_excreted_contrast_layers_posteriorly():
    c = case(13, fov="pelvis", cut="none", bladder_contrast=True, orientation="RPS")
    bladder = arr(c["masks"]["bladder"]) > 0
    ct = arr(c["ct"])
    bright = bladder & (ct > 200)
    assert bright.sum() > 10
    y_all = nib.affines.apply_affine(c["ct"].affine, np.argwhere(bladder))[:, 1].mean()
    y_bright = nib.affines.apply_affine(c["ct"].affine, np.argwhere(bright))[:, 1].mean()
    assert y_bright < y_all  # supine patient: the dense layer is posterior (dependent)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="grid"):
        phantom.make_case(0, grid="huge")
    with pytest.raises(ValueError, match="unknown"):
        phantom.make_case(0, colour="blue")


def test_true_status_of_every_field_of_view():
    """meta["status"]: what evaluation compares the predicted status with."""
    male = case(8, fov="pelvis", sex="male", cut="none")["meta"]["status"]
    assert set(male.values()) <= {"present", "partially_imaged"} and male["prostate"] == "present"
    female = case(8, fov="pelvis", sex="female", cut="none")["meta"]["status"]
    assert female["prostate"] == "absent" and female["bladder"] in ("present", "partially_imaged")
    for fov in ("abdomen", "chest"):
        meta = case(8, fov=fov, sex="female")["meta"]
        assert meta["status"] == {o: "not_imaged" for o in config.ORGANS}, fov
        assert meta["z_extent_mm"][0] > meta["femoral_head_z_mm"]


def test_chest_has_lungs_heart_and_no_pelvic_organ():
    c = case(9, fov="chest", iv_contrast=True)
    ct = arr(nib.as_closest_canonical(c["ct"]))
    assert (ct < -700).mean() > 0.1 and ((ct > -900) & (ct < -700)).sum() > 1000  # aerated lung, not just air
    assert (ct > 150).sum() * np.prod(COARSE) / 1000 > 100  # > 100 mL of bright heart, bone and aorta
    assert all(c["meta"]["volumes_ml"][o] == 0 for o in ORGAN_NAMES)


def test_held_out_style_differs_from_training_and_is_recorded(tmp_path):
    train, ood = phantom.STYLES["train"], phantom.STYLES["ood"]
    tr_lo, tr_hi = train["scale"][0]
    assert all(hi <= tr_lo or lo >= tr_hi for lo, hi in ood["scale"])  # body sizes training never draws
    assert min(ood["noise_sd"]) >= max(train["noise_sd"])
    assert train["p_median_lobe"] == 0 and ood["p_median_lobe"] > 0
    a = phantom.make_case(5, "demo", "train", spacing=COARSE, fov="pelvis", sex="male")
    b = phantom.make_case(5, "demo", "ood", spacing=COARSE, fov="pelvis", sex="male")
    assert a["meta"]["style"] == "train" and b["meta"]["style"] == "ood"
    assert not np.array_equal(arr(a["masks"]["rectum"]), arr(b["masks"]["rectum"]))
    phantom.generate_dataset(tmp_path, n_cases=1, seed=3, workers=1, style="ood")
    assert json.loads((tmp_path / "phantom.json").read_text())["style"] == "ood"
    with pytest.raises(ValueError, match="style"):
        phantom.generate_dataset(tmp_path, n_cases=1, seed=3, workers=1, style="train")
    with pytest.raises(ValueError, match="style"):
        phantom.make_case(1, "demo", "nonsense")
