"""status.py: the femoral-head landmark, each status, each quality flag, thresholds, volumes.json and the tables."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
import torch

import config
import inference
import status
from test_predict import tiny_checkpoint  # noqa: F401  (fixture)

SPACING = 3.0  # mm, isotropic test grid (= STATUS_LANDMARK_SPACING: no block averaging)
SHAPE = (100, 80, 60)  # 300 x 240 x 180 mm, world (0, 0, 0) at the centre


def make_ct(heads=((-88.0, 0.0, 0.0), (88.0, 0.0, 0.0)), radius=24.0, rim_hu=800, core_hu=250, shape=SHAPE,
            flip_x=False, rim_mm=4.0):
    """Body of muscle (40 HU) in air, with balls of `radius` mm at `heads` (world RAS mm): a cortical rim of
    rim_hu around a cancellous core of core_hu. Stored LAS when flip_x (the world stays the same)."""
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * SPACING
    x, y, z = (np.indices(shape).reshape(3, -1).T * SPACING + affine[:3, 3]).T.reshape((3,) + shape)
    hu = np.full(shape, -1000, np.int16)
    hu[(x / 140) ** 2 + (y / 100) ** 2 <= 1] = 40
    for c in heads:
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        hu[d <= radius] = rim_hu
        hu[d <= radius - rim_mm] = core_hu
    if flip_x:
        hu = hu[::-1]
        affine = affine @ np.array([[-1, 0, 0, shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return nib.Nifti1Image(hu, affine)


def world_box(img, lo, hi, value, labels=None):
    """Label map on img's grid with `value` where the world position lies in the box [lo, hi] (mm)."""
    labels = np.zeros(img.shape, np.uint8) if labels is None else labels
    pos = nib.affines.apply_affine(img.affine, np.indices(img.shape).reshape(3, -1).T).reshape(img.shape + (3,))
    inside = np.all((pos >= lo) & (pos <= hi), axis=-1)
    labels[inside] = value
    return labels


@pytest.fixture(autouse=True)
def coarse_grid():
    config.TARGET_SPACING = (SPACING,) * 3


# --- Landmark -------------------------------------------------------------------------------
def test_femoral_heads_found_where_they_are():
    heads = status.find_femoral_heads(np.asarray(make_ct().dataobj), make_ct().affine)
    assert heads["found"]
    (xr, _, zr), (xl, _, zl) = heads["heads_mm"]
    assert abs(xr + 88) <= SPACING and abs(xl - 88) <= SPACING and abs(heads["z_mm"]) <= SPACING
    assert all(20 <= r <= 26 for r in heads["radius_mm"])  # depth inside a 24 mm ball, on a 3 mm grid


def test_femoral_heads_found_in_a_noisy_scan():
    """Cancellous core just above the bone threshold plus 30 HU noise (seed-1 phantom case 7): specks of the
    core fall below 150 HU; the smoothing before the threshold keeps the heads whole."""
    img = make_ct(core_hu=int(config.STATUS_BONE_HU) + 10, rim_mm=2.0)  # a thin cortex, gaps on a 3 mm grid
    noisy = np.asarray(img.dataobj).astype(np.float32)
    body = noisy > config.BODY_THRESHOLD_HU
    noisy[body] += np.random.default_rng(0).normal(0, 30, int(body.sum()))
    assert status.find_femoral_heads(noisy, img.affine)["found"]
    config.STATUS_BONE_SMOOTH_MM = 0.0  # the test can fail: without smoothing the heads are lost
    assert not status.find_femoral_heads(noisy, img.affine)["found"]


def test_a_table_under_the_back_is_not_body_for_the_front_share():
    """A pair at 0.40 of the body's depth (along the columns through the heads) stays rejected when a table lies
    beneath the back, apart from it (with the table counted as body it would sit at 0.53)."""
    img = make_ct(heads=((-88.0, -15.0, 0.0), (88.0, -15.0, 0.0)))
    hu = np.asarray(img.dataobj).copy()
    table = world_box(img, (-150, -118, -100), (150, -110, 100), 1).astype(bool)
    hu[table] = 300
    assert not status.find_femoral_heads(hu, img.affine)["found"]
    config.STATUS_FEMORAL_HEAD_MIN_FRONT = 0.3
    assert status.find_femoral_heads(hu, img.affine)["found"]


def test_a_gluteal_cleft_does_not_move_the_heads_to_the_back():
    """Real buttocks part at the midline: an air cleft 45 mm deep would end the midline column there, and heads
    at half the body's depth would sit at 0.35 of it. The columns through the heads see the whole depth."""
    img = make_ct()
    hu = np.asarray(img.dataobj).copy()
    cleft = world_box(img, (-6, -101, -100), (6, -55, 100), 1).astype(bool)
    hu[cleft] = -1000
    heads = status.find_femoral_heads(hu, img.affine)
    assert heads["found"] and abs(heads["heads_mm"][0][0] + 88) <= SPACING


def test_a_table_against_the_front_does_not_count_as_body():
    """A prone patient on a 30 mm table (shell 300 HU, foam core -850 HU) that touches the flattened front: filled
    like gas inside the body, the table's core would put heads at 0.52 of the body's depth at 0.43."""
    img = make_ct()
    hu = np.asarray(img.dataobj).copy()
    hu[world_box(img, (-200, 72, -100), (200, 120, 100), 1).astype(bool)] = -1000  # the front flattened at y = 72
    hu[world_box(img, (-150, 72, -100), (150, 104, 100), 1).astype(bool)] = 300  # the table, against it: shell ...
    hu[world_box(img, (-146, 76, -100), (146, 101, 100), 1).astype(bool)] = -850  # ... around a foam core
    assert status.find_femoral_heads(hu, img.affine)["found"]


def test_a_pair_in_the_back_of_the_body_passes_only_without_the_front_share():
    """The pair of test_no_femoral_heads' kidney case is femoral heads in every other respect."""
    back = make_ct(heads=((-88.0, -60.0, 0.0), (88.0, -60.0, 0.0)))
    config.STATUS_FEMORAL_HEAD_MIN_FRONT = 0.0
    assert status.find_femoral_heads(np.asarray(back.dataobj), back.affine)["found"]


@pytest.mark.parametrize("kwargs, why", [
    (dict(heads=((-88.0, 0.0, 0.0),)), "one ball is not a pair"),
    (dict(heads=((-140.0, 0.0, 0.0), (140.0, 0.0, 0.0)), shape=(120, 80, 60)), "too far apart (shoulders)"),
    (dict(heads=((-88.0, 0.0, -45.0), (88.0, 0.0, 45.0))), "not at the same height"),
    (dict(radius=9.0), "too thin for a femoral head"),
    (dict(rim_hu=200, core_hu=200), "no cortical rim (an enhanced kidney)"),
    (dict(heads=((-10.0, 0.0, 0.0), (160.0, 0.0, 0.0)), shape=(120, 80, 60)), "not either side of the midline"),
    (dict(heads=()), "no bone at all"),
    (dict(heads=((-88.0, -60.0, 0.0), (88.0, -60.0, 0.0))), "in the back fifth of the body (enhanced kidneys' place)"),
])
def test_no_femoral_heads(kwargs, why):
    img = make_ct(**kwargs)
    assert not status.find_femoral_heads(np.asarray(img.dataobj), img.affine)["found"], why


# --- Status -----------------------------------------------------------------------------------
def test_region_cleanup_removes_pieces_far_from_the_femoral_heads():
    hu = np.asarray(make_ct().dataobj)  # RAS, SPACING mm: model space; heads at z index 29.5
    grid = np.diag([SPACING] * 3 + [1.0])  # voxel -> mm from voxel 0
    pelvis = status.find_femoral_heads(hu, grid)
    assert pelvis["found"] and abs(pelvis["z_mm"] - 29.5 * SPACING) <= SPACING
    labels = np.zeros(hu.shape, np.uint8)
    at = lambda dz: int(round(29.5 + dz / SPACING))  # z index dz mm above the heads
    k_prostate, k_bladder = config.ORGANS.index("prostate") + 1, config.ORGANS.index("bladder") + 1
    lo, hi = config.STATUS_ORGAN_Z_MM["prostate"]
    margin = config.STATUS_REGION_MARGIN_MM
    for dz in (-30.0, hi + margin - 6, hi + margin + 6):  # expected, just inside the margin, just outside
        labels[40:44, 40:44, at(dz) - 1:at(dz) + 2] = k_prostate
    labels[60:64, 40:44, at(config.STATUS_ORGAN_Z_MM["bladder"][0] - margin - 6)] = k_bladder
    before = labels.copy()
    out = status.keep_in_region(labels, pelvis, grid)
    kept = ndimage.label(out == k_prostate)[1]
    assert kept == 2 and not (out[:, :, at(hi + margin + 6)] == k_prostate).any()
    assert not (out == k_bladder).any() and (labels == before).all()  # the input is left as it was
    # the same volume placed elsewhere in the world (a model affine with an offset): heads and pieces move together
    world = grid.copy()
    world[:3, 3] = (-120.0, 35.0, -480.0)
    moved = status.find_femoral_heads(hu, world)
    assert abs(moved["z_mm"] - (pelvis["z_mm"] - 480.0)) < 1e-6
    assert (status.keep_in_region(labels, moved, world) == out).all()

    # lateral: a piece at the prostate's height is kept up to the margin beyond a femoral head's centre
    side = np.zeros_like(labels)
    x_of = lambda mm: int(round(mm / SPACING))  # grid voxel of a grid position (mm)
    (right_x, *_), (left_x, *_) = pelvis["heads_mm"]
    for x in (left_x + margin - 6, left_x + margin + 6, right_x - margin - 6):  # inside, outside, outside
        side[x_of(x) - 1:x_of(x) + 2, 40:43, at(-30.0) - 1:at(-30.0) + 2] = k_prostate
    kept = status.keep_in_region(side, pelvis, grid) == k_prostate
    assert ndimage.label(kept)[1] == 1 and kept[x_of(left_x + margin - 6)].any()

    none = status.find_femoral_heads(np.asarray(make_ct(heads=()).dataobj), grid)
    assert not none["found"] and status.keep_in_region(labels, none, grid) is labels
    config.STATUS_REGION_MARGIN_MM = 1e9  # off (conftest restores the settings after each test)
    assert (status.keep_in_region(labels, pelvis, grid) == labels).all()


class BoxLogits(torch.nn.Module):
    """Prostate logit +5 in the given boxes (model voxels), -5 elsewhere; no other organ: a net with known output."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = boxes
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # predict_logits moves the model and reads its parameters

    def forward(self, x):  # (B, 1, X, Y, Z) -> (B, 3, X, Y, Z); one window covers the whole test volume
        out = torch.full((x.shape[0], 3) + tuple(x.shape[2:]), -5.0)
        for box in self.boxes:
            out[(slice(None), 0) + box] = 5.0
        return out


def test_segment_applies_the_region_clean_up():
    hu = np.asarray(make_ct().dataobj)  # model space: RAS at SPACING mm, femoral heads at z index 29.5
    margin = config.STATUS_REGION_MARGIN_MM
    far = int(round(29.5 + (config.STATUS_ORGAN_Z_MM["prostate"][1] + margin + 6) / SPACING))  # above its range
    assert far + 4 <= SHAPE[2]
    near = (slice(45, 55), slice(40, 48), slice(16, 22))  # 20-40 mm below the heads: where a prostate lies
    high = (slice(45, 60), slice(40, 50), slice(far, far + 4))  # the bigger piece, far above
    model = BoxLogits([near, high])
    config.AMP, config.PRESENCE_RULE, config.ORGAN_LOGIT_OFFSET = False, "off", {}
    kw = dict(patch_size=SHAPE, overlap=0.0, sw_batch=1, mirror=False, device="cpu")
    labels = inference.segment(model, hu, keep_largest=True, **kw)
    assert (labels == 1).sum() == 10 * 8 * 6 and (labels[near] == 1).all()  # the far piece went, not the true one
    config.STATUS_REGION_MARGIN_MM = 1e9  # off: the largest component is now the far piece
    labels = inference.segment(model, hu, keep_largest=True, **kw)
    assert (labels == 1).sum() == 15 * 10 * 4 and not (labels[near] == 1).any()


def test_predict_case_from_logits_already_computed():
    """predict_case with the logits of the prepared volume (the threshold fit after training gets validation's)
    gives the labels a fresh pass gives, without running the net; logits of another shape are refused."""
    config.PATCH_SIZE, config.AMP, config.PRESENCE_RULE = (32, 32, 32), False, "off"
    img = make_ct(heads=((60.0, 0.0, 0.0),))
    prepared = inference.prepare_case(img)
    import preprocessing
    logits = inference.predict_logits(Bright(), preprocessing.normalize_hu(prepared["hu"]), config.PATCH_SIZE,
                                      config.SW_OVERLAP, config.SW_BATCH, False, "cpu").numpy()
    fresh = inference.predict_case(Bright(), img, "cpu", prepared)
    assert (fresh == 2).sum() > 100
    assert np.array_equal(inference.predict_case(None, img, "cpu", prepared, logits), fresh)  # None: no net run
    with pytest.raises(ValueError, match="logits of shape"):
        inference.predict_case(None, img, "cpu", prepared, logits[:, 1:])


def test_status_rule_table():
    assert status.organ_status(True, False, True, True) == "present"
    assert status.organ_status(True, True, True, True) == "partially_imaged"
    assert status.organ_status(False, False, True, True) == "absent"
    assert status.organ_status(False, False, False, True) == "not_imaged"
    assert status.organ_status(True, False, True, False) == "not_imaged"  # no pelvis: whatever was predicted


def test_centre_in_scan():
    config.STATUS_ORGAN_CENTRE_MM = {"prostate": -35.0}
    pelvis = {"found": True, "z_mm": 5.0}
    assert status.centre_in_scan("prostate", pelvis, (-200.0, 200.0))
    assert status.centre_in_scan("prostate", pelvis, (-30.0, 200.0))
    assert not status.centre_in_scan("prostate", pelvis, (-29.0, 200.0))
    assert not status.centre_in_scan("prostate", {"found": False}, (-200.0, 200.0))


def test_assess_each_status_on_hand_made_scans():
    thresholds = dict(config.STATUS_DEFAULT_THRESHOLDS)
    # Pelvis: bladder above the heads, prostate not predicted, rectum cut by the top face of the grid.
    img = make_ct(flip_x=True)
    labels = world_box(img, (-20, 20, 15), (20, 50, 50), 2)
    labels = world_box(img, (-15, -60, 40), (15, -40, 90), 3, labels)
    out, report = status.assess(img, labels, None, "cpu", thresholds)
    got = {o: e["status"] for o, e in report["organs"].items()}
    assert got == {"prostate": "absent", "bladder": "present", "rectum": "partially_imaged"}
    assert report["pelvis"]["found"] and np.array_equal(out, labels)
    assert not report["organs"]["rectum"]["flags"]  # cut by the edge is its status, not a flag
    # Chest: no femoral heads; a predicted "bladder" there is removed.
    chest = make_ct(heads=())
    labels = world_box(chest, (-20, 20, 15), (20, 50, 50), 2)
    out, report = status.assess(chest, labels, None, "cpu", thresholds)
    assert {e["status"] for e in report["organs"].values()} == {"not_imaged"}
    assert not out.any() and report["organs"]["bladder"]["removed_ml"] == pytest.approx((labels == 2).sum() * 27e-3)
    config.STATUS_CLEAR_NOT_IMAGED = False
    out, _ = status.assess(chest, labels, None, "cpu", thresholds)
    assert np.array_equal(out, labels)


def test_a_prostate_the_mirrored_scan_does_not_find_is_absent(monkeypatch):
    """PRESENCE_MIRROR_ORGANS: a predicted prostate that the mirrored pass does not keep is removed and called
    absent; kept when the mirrored pass keeps any of it, when there is no mirrored pass, and for other organs."""
    thresholds = dict(config.STATUS_DEFAULT_THRESHOLDS)
    img = make_ct()
    labels = world_box(img, (-15, -10, -50), (15, 15, -20), 1)  # prostate below the heads
    labels = world_box(img, (-20, 20, 15), (20, 50, 50), 2, labels)  # bladder
    real = status.model_evidence

    def evidence(kept_ml):
        def fake(model, ct_img, labels, organs, device, prepared=None):
            out = real(None, ct_img, labels, organs, device, prepared)  # the landmarks only
            out["organs"] = {o: {"mirror_kept_ml": kept_ml} for o in organs}
            return out
        return fake

    monkeypatch.setattr(status, "model_evidence", evidence(0.0))
    out, report = status.assess(img, labels, None, "cpu", thresholds)
    prostate = report["organs"]["prostate"]
    assert prostate["status"] == "absent" and prostate["ml"] == 0.0
    assert prostate["removed_because"] == "not_in_mirrored_scan"
    assert prostate["removed_ml"] == pytest.approx((labels == 1).sum() * 27e-3)
    assert not (out == 1).any() and np.array_equal(out == 2, labels == 2)  # the bladder is not a midline organ
    assert report["organs"]["bladder"]["status"] == "present" and "removed_ml" not in report["organs"]["bladder"]
    for kept_ml in (0.3, None):  # found again (any of it), or no mirrored pass
        monkeypatch.setattr(status, "model_evidence", evidence(kept_ml))
        out, report = status.assess(img, labels, None, "cpu", thresholds)
        assert report["organs"]["prostate"]["status"] == "present" and np.array_equal(out, labels)
    monkeypatch.setattr(status, "model_evidence", evidence(0.0))
    config.PRESENCE_MIRROR_ORGANS = ()
    out, report = status.assess(img, labels, None, "cpu", thresholds)
    assert report["organs"]["prostate"]["status"] == "present" and np.array_equal(out, labels)


def test_a_prostate_not_below_the_bladder_is_absent():
    """Status rule 5: a predicted prostate whose centre is at or above the bladder's is removed and called absent
    (with the reason on the console line); below it, or with no bladder predicted, it stays."""
    thresholds = dict(config.STATUS_DEFAULT_THRESHOLDS)
    img = make_ct()
    bladder = world_box(img, (-20, 20, 15), (20, 50, 50), 2)
    for z, kept in (((-50, -20), True), ((20, 50), False), ((30, 60), False)):  # below, level with, above
        labels = world_box(img, (-15, -10, z[0]), (15, 15, z[1]), 1, bladder.copy())
        out, report = status.assess(img, labels, None, "cpu", thresholds)
        prostate = report["organs"]["prostate"]
        assert (prostate["status"] == "present") == kept and (out == 1).any() == kept, z
        assert np.array_equal(out == 2, labels == 2) and report["organs"]["bladder"]["status"] == "present"
        if not kept:
            assert prostate["removed_because"] == "not_below_bladder" and prostate["ml"] == 0.0
            assert prostate["removed_ml"] == pytest.approx((labels == 1).sum() * 27e-3)
            assert "mL predicted, not below the bladder)" in status.console_line("x", report["organs"])
    # a rectum behind the bladder is not flagged for lying in front of the removed 'prostate'
    labels = world_box(img, (-15, -60, 30), (15, -40, 60), 1, bladder.copy())  # above the bladder, behind the rectum
    labels = world_box(img, (-15, -10, -50), (15, 10, -10), 3, labels)  # rectum: behind the bladder
    _, report = status.assess(img, labels, None, "cpu", thresholds)
    assert report["organs"]["prostate"]["removed_because"] == "not_below_bladder"
    assert "order_rectum" not in [f["code"] for f in report["organs"]["rectum"]["flags"]]
    labels = world_box(img, (-15, -10, 20), (15, 15, 50), 1)  # no bladder predicted: nothing to compare with
    out, report = status.assess(img, labels, None, "cpu", thresholds)
    assert report["organs"]["prostate"]["status"] == "present" and np.array_equal(out, labels)


# --- Flags ------------------------------------------------------------------------------------
THRESHOLDS = {"volume_ml": {"prostate": [10.0, 60.0], "bladder": [50.0, 500.0], "rectum": [20.0, 120.0]},
              "min_component_ml": {"prostate": 1.0, "bladder": 2.0, "rectum": 2.0},
              "min_confidence": {"prostate": 0.7, "bladder": 0.7, "rectum": 0.7},
              "min_mirror_dice": {"prostate": 0.8, "bladder": 0.8, "rectum": 0.8},
              "max_absent_probability": {"prostate": 0.3, "bladder": 0.3, "rectum": 0.3},
              "max_edge_leak": {"prostate": 0.5, "bladder": 0.5, "rectum": 0.5}}


def organ(ml=30.0, centre=(0.0, 0.0, 0.0), **kw):
    e = dict(voxels=int(ml * 100), ml=ml, at_edge=False, centroid_mm=None if centre is None else list(centre),
             components_ml=[ml] if ml else [],
             confidence=0.9, mirror_dice=0.95, mirror_ml=ml, peak_probability=0.99, centre_imaged=True,
             edge_leak=0.1)
    e.update(kw)
    return e


def flags_of(name, e, others=None, pelvis=None, st="present"):
    organs = {"prostate": organ(30, (0, 10, -30)), "bladder": organ(200, (0, 20, 20)), "rectum": organ(60, (0, -30, 0))}
    organs.update(others or {})
    organs[name] = e
    measures = {"organs": organs, "pelvis": pelvis or {"found": True, "z_mm": 0.0}}
    return [f["code"] for f in status.organ_flags(name, e, measures, st, THRESHOLDS)]


def test_good_organs_carry_no_flag():
    for name, e in {"prostate": organ(30, (0, 10, -30)), "bladder": organ(200, (0, 20, 20)),
                    "rectum": organ(60, (0, -30, 0))}.items():
        assert flags_of(name, e) == [], name


@pytest.mark.parametrize("name, e, code", [
    ("bladder", organ(700, (0, 20, 20)), "volume_high"),
    ("prostate", organ(4, (0, 10, -30)), "volume_low"),
    ("bladder", organ(200, (0, 20, 20), components_ml=[190.0, 10.0]), "fragmented"),
    ("rectum", organ(60, (0, 30, 0)), "order_rectum"),
    ("bladder", organ(200, (0, 20, 150)), "outside_region"),
    ("rectum", organ(60, (0, -30, 0), confidence=0.5), "low_confidence"),
    ("rectum", organ(60, (0, -30, 0), mirror_dice=0.6), "mirror_disagreement"),
    ("bladder", organ(200, (0, 20, 20), edge_leak=0.7), "edge_leak"),
])
def test_each_flag(name, e, code):
    got = flags_of(name, e)
    assert code in got, got
    assert len(got) == 1, got


def test_flags_of_absent_organs_and_reasons():
    assert flags_of("prostate", organ(0, None, voxels=0, peak_probability=0.6, mirror_ml=0), st="absent") == \
        ["uncertain_absence"]
    assert flags_of("prostate", organ(0, None, voxels=0, peak_probability=0.1, mirror_ml=5.0), st="absent") == \
        ["mirror_disagreement"]
    assert flags_of("prostate", organ(0, None, voxels=0, peak_probability=0.1, mirror_ml=0), st="absent") == []
    # a cut organ's small volume is a lower bound: no volume_low
    assert flags_of("prostate", organ(4, (0, 10, -30), at_edge=True)) == []
    e = organ(700, (0, 20, 20))
    reason = status.organ_flags("bladder", e, {"organs": {"bladder": e}, "pelvis": {}}, "present", THRESHOLDS)
    assert reason == [{"code": "volume_high", "reason": "volume above the range seen in training (700.0 mL > 500.0)"}]


def test_console_line():
    organs = {"prostate": {"status": "absent", "ml": 0.0, "flags": []},
              "bladder": {"status": "present", "ml": 312.2, "flags": [{"code": "volume_high", "reason": "x"}]},
              "rectum": {"status": "not_imaged", "ml": 0.0, "flags": []}}
    assert status.console_line("BDMAP_x", organs) == \
        "BDMAP_x: prostate absent, bladder 312 mL (flag: volume_high), rectum not imaged"
    organs["prostate"].update(removed_ml=9.04, removed_because="not_in_mirrored_scan")
    assert status.console_line("BDMAP_x", organs).startswith(
        "BDMAP_x: prostate absent (9.0 mL predicted, not found in the mirrored scan), bladder 312 mL")
    assert status.console_line("BDMAP_x", organs, {"found": True}) == status.console_line("BDMAP_x", organs)
    chest = {o: {"status": "not_imaged", "ml": 0.0, "flags": []} for o in ("prostate", "bladder", "rectum")}
    chest["bladder"].update(removed_ml=77.06, removed_because="region_not_imaged")
    assert status.console_line("chest", chest, {"found": False}) == ("chest: prostate not imaged, bladder not imaged, "
                                                                     "rectum not imaged (no femoral heads found; "
                                                                     "removed: bladder 77.1 mL)")


# --- Thresholds -------------------------------------------------------------------------------
def test_old_checkpoint_gets_defaults_with_a_message(capsys):
    got = status.thresholds_of({"model": {}, "model_config": {}})
    assert got["volume_ml"] == config.STATUS_DEFAULT_THRESHOLDS["volume_ml"] and got["fitted_on"] is None
    assert "no fitted status thresholds" in capsys.readouterr().out
    fitted = dict(THRESHOLDS, fitted_on={"split": "val"})
    assert status.thresholds_of({"status_thresholds": fitted}) == fitted
    # fitted before a threshold existed: the others are kept, the new one is the default, and it says so
    older = {k: v for k, v in fitted.items() if k != "max_edge_leak"}
    got = status.thresholds_of({"status_thresholds": older})
    assert got["max_edge_leak"] == config.STATUS_DEFAULT_THRESHOLDS["max_edge_leak"]
    assert got["min_confidence"] == THRESHOLDS["min_confidence"] and got["fitted_on"] == {"split": "val"}
    assert "predate max_edge_leak" in capsys.readouterr().out


def test_edge_leak_against_box_geometry():
    """A uniform box organ in fat; a 6-connected shell of one voxel outside a box mask is its six face slabs, so
    the share counted by hand: the whole box leaks nothing, the box cut in half leaks through its cut face."""
    config.STATUS_EDGE_SHELL_MM = 3.0
    hu = np.full((20, 20, 20), -100.0, np.float32)
    hu[5:15, 5:15, 5:15] = 10.0
    spacing = np.array([3.0, 3.0, 3.0])
    whole = np.zeros(hu.shape, bool)
    whole[5:15, 5:15, 5:15] = True
    assert status.edge_leak(hu, whole, spacing) == 0.0
    half = np.zeros(hu.shape, bool)
    half[5:15, 5:15, 5:10] = True  # faces: x 2 * 10 * 5, y 2 * 10 * 5, z 2 * 10 * 10; the z = 10 face is organ
    assert status.edge_leak(hu, half, spacing) == pytest.approx(100 / 400)
    config.STATUS_EDGE_SHELL_MM = 6.0  # two voxels: the shell is the 2-step 6-connected dilation less the mask
    shell = ndimage.binary_dilation(half, iterations=2) & ~half
    assert status.edge_leak(hu, half, spacing) == pytest.approx((shell & (hu == 10.0)).sum() / shell.sum())
    assert status.edge_leak(hu, np.zeros(hu.shape, bool), spacing) is None


def test_training_edge_leaks_from_the_reference_masks(tmp_path):
    """Reference masks that are whole organs in fat leak nothing; one cut short inside its organ does."""
    grid = np.indices((30, 30, 30)).transpose(1, 2, 3, 0)
    ball = np.linalg.norm(grid - 15, axis=-1) < 9
    for cid, label in (("BDMAP_00000001", ball * 2), ("BDMAP_00000002", (ball & (grid[..., 2] < 15)) * 2),
                       ("BDMAP_00000003", ball * 3)):
        folder = tmp_path / "cases" / cid
        folder.mkdir(parents=True)
        np.save(folder / "ct.npy", np.where(ball, 10, -100).astype(np.int16))
        np.save(folder / "label.npy", label.astype(np.uint8))
        (folder / "meta.json").write_text(json.dumps({"geom": {"model_spacing": [3.0, 3.0, 3.0]}}))
    (tmp_path / "cases" / "BDMAP_00000004").mkdir()  # nothing readable: skipped
    got = status.training_edge_leaks(tmp_path, ["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000003",
                                                "BDMAP_00000004"], config.ORGANS)
    assert got["prostate"] == [] and len(got["bladder"]) == 2 and len(got["rectum"]) == 1
    whole, cut = got["bladder"]
    assert whole < 0.1 and got["rectum"][0] == pytest.approx(whole) and cut > 0.2  # the flat face: ~1/3 of a half ball's surface


def test_tolerance_factor_against_monte_carlo():
    """mean - k * sd of n normal draws lies below the population's 5 % point in 90 % of samples."""
    rng = np.random.default_rng(0)
    z05 = -1.6448536
    for n in (5, 20):
        k = status.tolerance_factor(n, 0.05, 0.9)
        draws = rng.standard_normal((40000, n))
        covered = (draws.mean(1) - k * draws.std(1, ddof=1) <= z05).mean()
        assert covered == pytest.approx(0.9, abs=0.01)
    assert status.tolerance_factor(5, 0.05, 0.9) > status.tolerance_factor(20, 0.05, 0.9) > 1.6449


def test_fit_from_results_uses_the_good_validation_results():
    config.STATUS_FIT_MIN_RESULTS = 5
    conf = [0.80, 0.85, 0.90, 0.92, 0.95]
    good = [organ(ml, confidence=c, mirror_dice=c + 0.02, components_ml=[ml] + extra)
            for ml, c, extra in zip((40, 50, 60, 70, 80), conf, ([], [1.5], [], [], []))]
    bad = organ(5, confidence=0.3, mirror_dice=0.2)
    absent = [organ(0, voxels=0, peak_probability=p) for p in (0.05, 0.1, 0.2, 0.3, 0.35)]
    results = [("bladder", e, 0.95, True) for e in good] + [("bladder", bad, 0.2, True)] + \
        [("bladder", e, None, False) for e in absent] + [("prostate", organ(30), 0.95, True)]
    train_volumes = [45.0, 50.0, 55.0, 60.0, 65.0, 70.0]
    leak = [0.1, 0.15, 0.2, 0.25, 0.3]  # the training split's reference bladders
    got = status.fit_from_results(results, {"bladder": train_volumes}, ("bladder", "prostate"), {"bladder": leak})
    # by hand: tolerance bound on the logit scale, k for n = 5
    k = status.tolerance_factor(5, config.STATUS_FLAG_GOOD_QUANTILE, config.STATUS_FLAG_CONFIDENCE)
    z = np.log(np.array(conf) / (1 - np.array(conf)))
    assert got["min_confidence"]["bladder"] == pytest.approx(1 / (1 + np.exp(-(z.mean() - k * z.std(ddof=1)))), abs=1e-4)
    assert got["min_confidence"]["bladder"] < 0.8 and got["min_mirror_dice"]["bladder"] < 0.82  # no good one flagged
    assert got["min_confidence"]["bladder"] > 0.3  # the bad one is
    lo, hi = got["volume_ml"]["bladder"]
    assert lo < 40 and hi > 80  # every training organ and good prediction inside, with a margin
    assert got["min_component_ml"]["bladder"] == pytest.approx(np.quantile([0, 1.5, 0, 0, 0], 0.95))
    assert 0.35 < got["max_absent_probability"]["bladder"] < 0.99
    assert got["max_edge_leak"]["bladder"] == pytest.approx(status.tolerance_bound(leak, "high", "logit"), abs=1e-4)
    assert 0.3 < got["max_edge_leak"]["bladder"] < 0.99
    assert got["fitted_on"]["results"]["bladder"] == {"good": 5, "correctly_absent": 5}
    assert not any(d.endswith(".bladder") for d in got["fitted_on"]["defaults"] + got["fitted_on"]["pooled_over_organs"])
    # one good prostate: its confidence and mirror thresholds come from the good results of all organs (6), the
    # rest are the defaults; both listed
    all_conf = conf + [organ(30)["confidence"]]
    assert got["min_confidence"]["prostate"] == pytest.approx(status.tolerance_bound(all_conf, "low", "logit"), abs=1e-4)
    assert {"min_confidence.prostate", "min_mirror_dice.prostate"} <= set(got["fitted_on"]["pooled_over_organs"])
    for key in ("volume_ml", "min_component_ml", "max_absent_probability", "max_edge_leak"):  # never pooled
        assert got[key]["prostate"] == config.STATUS_DEFAULT_THRESHOLDS[key]["prostate"]
        assert f"{key}.prostate" in got["fitted_on"]["defaults"]
    # too few good results even over all organs: defaults
    alone = status.fit_from_results([("prostate", organ(30), 0.95, True)], {}, ("prostate",))
    for key in status.THRESHOLD_KEYS:
        assert alone[key]["prostate"] == config.STATUS_DEFAULT_THRESHOLDS[key]["prostate"]


# --- Model evidence ---------------------------------------------------------------------------
class Bright(torch.nn.Module):
    """Pointwise: bladder logit 8 * (intensity - 0.2), the other organs -5; mirroring commutes with it."""

    def forward(self, x):
        return torch.cat([torch.full_like(x, -5.0), 8 * (x - 0.2), torch.full_like(x, -5.0)], dim=1)


def test_model_evidence_confidence_and_mirror():
    config.PATCH_SIZE, config.AMP = (32, 32, 32), False
    config.LARGEST_COMPONENT = "off"
    img = make_ct()  # two femoral heads: the pelvis is found
    hu = np.asarray(img.dataobj)
    labels = (hu > 100).astype(np.uint8) * 2
    ev = status.model_evidence(Bright(), img, labels, config.ORGANS, "cpu")["organs"]
    import preprocessing
    norm = torch.from_numpy(preprocessing.normalize_hu(hu[labels == 2].astype(np.float32)))
    logits = torch.stack([torch.zeros_like(norm), torch.full_like(norm, -5.0), 8 * (norm - 0.2),
                          torch.full_like(norm, -5.0)])
    expected = torch.softmax(logits, dim=0)[2].mean().item()  # independent: torch's softmax on the voxels
    assert ev["bladder"]["confidence"] == pytest.approx(expected, rel=1e-4)
    assert ev["bladder"]["mirror_dice"] == pytest.approx(1.0)
    assert ev["bladder"]["mirror_ml"] > 0 and ev["bladder"]["mirror_kept_ml"] == pytest.approx(ev["bladder"]["mirror_ml"])
    # the mirrored pass is cleaned up as the labels were: the presence rule removes a bladder smaller than its minimum
    config.MIN_ORGAN_ML = {"bladder": 2 * ev["bladder"]["mirror_ml"]}
    again = status.model_evidence(Bright(), img, labels, config.ORGANS, "cpu")["organs"]["bladder"]
    assert again["mirror_ml"] == ev["bladder"]["mirror_ml"] and again["mirror_kept_ml"] == 0
    assert ev["prostate"]["confidence"] is None and ev["prostate"]["peak_probability"] < 0.01
    # the mask is the ball: its shell leaks only where the 2 mm smoothing blurs the rim into it
    assert 0.0 <= ev["bladder"]["edge_leak"] < 0.5 and ev["prostate"]["edge_leak"] is None


def test_model_evidence_skips_scans_without_a_pelvis():
    """No femoral heads: every organ is not_imaged, so no forward pass is spent on evidence nothing reads."""
    config.PATCH_SIZE, config.AMP = (32, 32, 32), False
    calls = []

    class Counting(Bright):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    img = make_ct(heads=((60.0, 0.0, 0.0),))  # one ball: no pair of heads
    labels = (np.asarray(img.dataobj) > 100).astype(np.uint8) * 2
    ev = status.model_evidence(Counting(), img, labels, config.ORGANS, "cpu")
    assert not ev["pelvis"].get("found") and ev["organs"] == {} and calls == []
    _, report = status.assess(img, labels, Counting(), "cpu", config.STATUS_DEFAULT_THRESHOLDS)
    assert calls == [] and {e["status"] for e in report["organs"].values()} == {"not_imaged"}
    assert report["organs"]["bladder"]["removed_ml"] > 0 and report["organs"]["bladder"]["flags"] == []


# --- Tables ---------------------------------------------------------------------------------------
def test_summarize_confusion_and_catch_rates():
    rows = [{"status_bladder": "present_detected", "dice_bladder": "0.95", "pred_status_bladder": "present",
             "true_status_bladder": "present", "flags_bladder": ""},
            {"status_bladder": "present_detected", "dice_bladder": "0.5", "pred_status_bladder": "present",
             "true_status_bladder": "present", "flags_bladder": "low_confidence"},
            {"status_bladder": "false_organ", "dice_bladder": "", "pred_status_bladder": "present",
             "true_status_bladder": "absent", "flags_bladder": ""},
            {"status_bladder": "correctly_absent", "dice_bladder": "", "pred_status_bladder": "not_imaged",
             "true_status_bladder": "not_imaged", "flags_bladder": ""}]
    s = status.summarize(rows, ["bladder"])
    assert s["confusion"]["absent"]["present"] == 1 and s["status_correct"] == 3 and s["status_known"] == 4
    assert (s["bad"], s["bad_flagged"], s["good"], s["good_flagged"]) == (2, 1, 1, 0)
    assert s["per_flag"] == {"low_confidence": {"bad": 1, "good": 0, "other": 0}}
    text = "\n".join(status.report_markdown(s))
    assert "| absent | 1 | 0 | 0 | 0 |" in text and "1/2 (50 %)" in text


def test_true_status_from_meta_or_masks(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"status": {"prostate": "absent"}}))
    m = np.zeros((5, 5, 5), np.uint8)
    edge = m.copy()
    edge[0, 2, 2] = 1
    inner = m.copy()
    inner[2, 2, 2] = 1
    got = status.true_status(tmp_path, {"prostate": None, "bladder": inner, "rectum": edge},
                             ("prostate", "bladder", "rectum"))
    assert got == {"prostate": "absent", "bladder": "present", "rectum": "partially_imaged"}
    assert status.true_status(tmp_path / "none", {"prostate": m}, ("prostate",)) == {"prostate": None}


# --- predict.py: volumes.json schema, console line, preview -----------------------------------------
def test_predict_writes_status_schema_and_preview(tmp_path, tiny_checkpoint, capsys, monkeypatch):  # noqa: F811
    import predict

    config.AMP, config.SW_OVERLAP, config.SW_BATCH = False, 0.0, 8  # few windows: this test is about the outputs
    src = tmp_path / "scan.nii.gz"
    nib.save(make_ct(flip_x=True, shape=(80, 50, 30)), str(src))
    searches = []  # the region clean-up (segment) and the status rule (assess) share one search per scan
    search = status.find_femoral_heads
    monkeypatch.setattr(status, "find_femoral_heads", lambda *a: searches.append(1) or search(*a))
    done, failed = predict.predict_files([src], tmp_path / "out", tiny_checkpoint, preview=True)
    assert not failed and len(done) == 1 and len(searches) == 1
    out = capsys.readouterr().out
    assert "no fitted status thresholds" in out and "predict: scan: prostate " in out
    record = json.loads((tmp_path / "out" / "scan" / "volumes.json").read_text())
    assert record["pelvis"]["found"] and len(record["scan_z_mm"]) == 2
    for name, e in record["organs"].items():
        assert e["status"] in status.STATUSES and isinstance(e["ml"], float) and isinstance(e["present"], bool)
        assert all(set(f) == {"code", "reason"} and f["code"] in status.FLAGS for f in e["flags"])
        assert e["present"] == (e["status"] in ("present", "partially_imaged"))
    assert (tmp_path / "out" / "scan" / "preview.png").stat().st_size > 1000
