"""metrics.py: hand-made cases with known answers, the empty rule, and a cross-check against MONAI."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import metrics

ORGANS = ("prostate", "bladder", "rectum")


def cube(shape, corner, side):
    m = np.zeros(shape, bool)
    m[tuple(slice(c, c + side) for c in corner)] = True
    return m


def test_identical_masks():
    ref = cube((21, 19, 17), (4, 5, 6), 7)
    m = metrics.organ_metrics(ref, ref, (0.7, 0.9, 2.5))
    assert m["status"] == "present_detected"
    assert m["dice"] == 1.0 and m["iou"] == 1.0
    assert m["hd"] == 0.0 and m["hd95"] == 0.0 and m["assd"] == 0.0
    assert m["nsd1"] == m["nsd2"] == m["nsd3"] == 1.0
    assert m["vol_pred_ml"] == m["vol_ref_ml"] == pytest.approx(7 ** 3 * 0.7 * 0.9 * 2.5 / 1000)


@pytest.mark.parametrize("axis,k", [(0, 1), (1, 2), (2, 3)])
def test_shifted_cube_anisotropic(axis, k):
    spacing = (0.8, 1.3, 2.5)
    side = 8
    ref = cube((23, 24, 25), (6, 6, 6), side)
    corner = [6, 6, 6]
    corner[axis] += k
    pred = cube(ref.shape, corner, side)
    m = metrics.organ_metrics(pred, ref, spacing)
    # Overlap is a (side - k) slab of the cube: Dice = (side - k) / side, IoU = (side - k) / (side + k).
    assert m["dice"] == pytest.approx((side - k) / side)
    assert m["iou"] == pytest.approx((side - k) / (side + k))
    # The far face moved k voxels along `axis`; nothing is farther from the other surface.
    assert m["hd"] == pytest.approx(k * spacing[axis])
    assert 0 < m["hd95"] <= m["hd"] + 1e-9
    assert 0 < m["assd"] < m["hd"]
    # A shift within the tolerance is fully "correct" for NSD; beyond it the moved faces are not.
    for tol, key in zip((1.0, 2.0, 3.0), ("nsd1", "nsd2", "nsd3")):
        if k * spacing[axis] <= tol:
            assert m[key] == 1.0
        else:
            assert m[key] < 1.0


def test_disjoint_masks():
    ref = cube((30, 12, 12), (2, 2, 2), 6)
    pred = cube((30, 12, 12), (20, 2, 2), 6)  # 12 voxels of background in between
    m = metrics.organ_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["status"] == "present_detected"
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd"] == pytest.approx(18.0)  # pred far face (x = 25) to the nearest ref face (x = 7)
    assert m["nsd3"] == 0.0


def test_empty_rules():
    shape, sp = (9, 10, 11), (1.0, 2.0, 3.0)
    empty, blob = np.zeros(shape, np.uint8), cube(shape, (2, 2, 2), 3).astype(np.uint8)
    both = metrics.organ_metrics(empty, empty, sp)
    assert both["status"] == "correctly_absent"
    assert all(both[k] is None for k in metrics.SUMMARY_METRICS)
    assert both["vol_pred_ml"] == both["vol_ref_ml"] == 0.0

    false = metrics.organ_metrics(blob, empty, sp)
    assert false["status"] == "false_organ"
    assert all(false[k] is None for k in metrics.SUMMARY_METRICS)
    assert false["vol_pred_ml"] == pytest.approx(27 * 6 / 1000)

    missed = metrics.organ_metrics(empty, blob, sp)
    assert missed["status"] == "missed"
    assert missed["dice"] == missed["iou"] == missed["nsd1"] == missed["nsd2"] == missed["nsd3"] == 0.0
    assert missed["hd95"] is None and missed["hd"] is None and missed["assd"] is None
    assert "missed" in metrics.EMPTY_RULE and "false_organ" in metrics.EMPTY_RULE


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match="shape"):
        metrics.organ_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.organ_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 0, 1))


def test_case_metrics_and_summary():
    shape, sp = (16, 15, 13), (1.0, 1.0, 2.0)
    ref = np.zeros(shape, np.uint8)
    ref[2:6, 2:6, 2:6] = 1  # prostate
    ref[8:14, 8:14, 4:10] = 2  # bladder; rectum absent
    cases = []
    # case a: prostate exact, bladder missed, rectum correctly absent
    pred_a = np.where(ref == 1, 1, 0).astype(np.uint8)
    cases.append(metrics.case_metrics(pred_a, ref, sp, case_id="a", organs=ORGANS))
    # case b: everything exact plus a false rectum; reference given as a dict with an absent file (None)
    pred_b = ref.copy()
    pred_b[0:2, 12:14, 0:2] = 3
    ref_masks = {"prostate": ref == 1, "bladder": ref == 2, "rectum": None}
    cases.append(metrics.case_metrics(pred_b, ref_masks, sp, case_id="b", organs=ORGANS))

    assert list(cases[0]) == metrics.csv_columns(ORGANS)
    assert cases[0]["status_bladder"] == "missed" and cases[0]["status_rectum"] == "correctly_absent"
    assert cases[1]["status_rectum"] == "false_organ"
    assert cases[1]["vol_pred_ml_rectum"] == pytest.approx(8 * 2 / 1000)

    s = metrics.summarize(cases, organs=ORGANS, checkpoint="x.pth")
    assert s["n_cases"] == 2 and s["empty_rule"] == metrics.EMPTY_RULE
    bladder = s["organs"]["bladder"]
    assert bladder["n_present"] == 2
    assert bladder["dice"]["n"] == 2 and bladder["dice"]["mean"] == pytest.approx(0.5)
    assert bladder["dice"]["median"] == pytest.approx(0.5) and bladder["dice"]["std"] == pytest.approx(math.sqrt(0.5))
    assert bladder["hd95"]["n"] == 1  # distances only where detected
    assert bladder["detection"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 0}
    rectum = s["organs"]["rectum"]
    assert rectum["n_present"] == 0 and rectum["dice"]["mean"] is None
    assert rectum["detection"] == {"tp": 0, "fp": 1, "fn": 0, "tn": 1}
    assert rectum["false_organ_volumes_ml"] == [pytest.approx(0.016)]
    assert s["mean_dice_present"] == pytest.approx((1.0 + 0.5) / 2)


def random_blob(rng, shape, threshold):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.5)
    return field > threshold * field.std()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation notice inside get_mask_edges
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_monai(seed):
    """Same surface definition (face-connected erosion, voxel counts) as MONAI without sub-voxels,
    so Dice, HD95 and NSD agree to float precision; only MONAI's float32 distances need a tolerance."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    shape, spacing = (33, 35, 17), (0.7, 1.1, 2.9)
    ref = random_blob(rng, shape, 0.5)
    if seed == 0:  # a larger, overlapping shape
        pred = random_blob(rng, shape, 0.5) | ref
    else:  # a dilated reference with holes and specks
        pred = ndimage.binary_dilation(ref) ^ random_blob(rng, shape, 1.5)
    mine = metrics.organ_metrics(pred, ref, spacing)

    def onehot(m):
        return torch.from_numpy(m[None, None].astype(np.float32))

    p, r = onehot(pred), onehot(ref)
    dice = compute_dice(p, r, include_background=True).item()
    hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing).item()
    hd = compute_hausdorff_distance(p, r, include_background=True, spacing=spacing).item()
    nsd = [compute_surface_dice(p, r, [tol], include_background=True, spacing=spacing).item() for tol in (1, 2, 3)]
    assert mine["dice"] == pytest.approx(dice, abs=1e-6)
    assert mine["hd"] == pytest.approx(hd, abs=1e-4)
    assert mine["hd95"] == pytest.approx(hd95, abs=1e-4)
    # NSD counts distances <= tol; our 1e-6 mm slack and MONAI's float32 could only differ on a distance
    # that equals the tolerance to 1e-6, which these spacings do not produce.
    assert [mine["nsd1"], mine["nsd2"], mine["nsd3"]] == pytest.approx(nsd, abs=1e-6)


def test_kdtree_path_equals_distance_transform():
    """Far-apart blobs make a large box; both distance back-ends must give the same distances."""
    rng = np.random.default_rng(5)
    shape, spacing = (41, 37, 23), (0.6, 0.9, 3.0)
    ref = random_blob(rng, shape, 0.8)
    pred = ref.copy()
    pred[0:2, 0:2, 0:2] = True  # a distant false-positive speck
    pred[-3:, -2:, -2:] = True
    edt = metrics.surface_distances(pred, ref, spacing)
    tree = metrics.surface_distances(pred, ref, spacing, edt_max_voxels=0)
    for a, b in zip(edt, tree):
        np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=1e-9, atol=1e-9)
