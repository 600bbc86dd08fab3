"""Per-organ status (present / absent / not_imaged / partially_imaged) and quality flags for a prediction.

Usage (library; predict.py and evaluate.py call it):
    labels = inference.predict_case(model, ct_img, device)           # uint8 labels on the CT's own grid
    labels, report = assess(ct_img, labels, model, device, thresholds_of(ckpt))
    python status.py --fit [--checkpoint PATH]       # fit the flag thresholds on the val split, store them
    python status.py --measure evaluation_results/metrics_per_case.csv [more.csv]   # flags vs bad results
    python status.py --landmarks CT.nii.gz [...]     # where the femoral heads were found (or not)
    python status.py --check-rule DATA_ROOT          # the rule on the reference masks vs the phantom's truth

Status rule (the README has the same text):
  1. Pelvis landmark: the two femoral heads, searched in the HU image (model space: RAS, coarse grid). Bone is
     HU > STATUS_BONE_HU after a Gaussian of STATUS_BONE_SMOOTH_MM (noise), holes filled slice by slice (cancellous core inside the cortex); the depth inside bone
     (Euclidean distance to the nearest non-bone voxel, mm) has a local maximum of STATUS_FEMORAL_HEAD_RADIUS_MM
     at the centre of a head, and the ball of that radius holds cortical bone (95th percentile HU >=
     STATUS_CORTICAL_HU). A pair of such maxima on either side of the body's midline, at the same height and
     depth, STATUS_FEMORAL_HEAD_SEPARATION_MM apart, and in the front part of the body's depth
     (STATUS_FEMORAL_HEAD_MIN_FRONT: not where the kidneys lie), is the pelvis. The heads are the thickest bone
     of the body and come in a pair at a fixed distance, which vertebrae (one, in the midline), ribs (thin) and
     humeral heads (further apart) do not.
  2. No pelvis in the scan: every organ is `not_imaged` and its prediction is removed (a bladder in a chest
     scan is not a bladder).
  3. Pelvis found: an organ predicted on the CT grid is `partially_imaged` when its mask touches a face of the
     grid (its volume is then a lower bound), else `present`. An organ not predicted is `absent` when its
     expected centre, STATUS_ORGAN_CENTRE_MM above the femoral heads' centres, lies inside the scan's z-extent
     (voxel centres), else `not_imaged`. (The flag outside_region uses the wider STATUS_ORGAN_Z_MM.)
  4. Mirror confirmation: an organ of PRESENCE_MIRROR_ORGANS (the prostate: midline, left-right symmetric) that
     the prediction on the mirrored CT does not keep after the same clean-up as the labels (region, largest
     component, minimum volume: inference.clean_up) is `absent`, and removed.
  5. Anatomical order: a prostate whose centre is not below the bladder's centre (both predicted) is `absent`,
     and removed. The bladder rests on the prostate; every such 'prostate' on the development phantoms was a
     false one (a cervix or uterus in a woman's pelvis), no true prostate ever was.

Flags: each a short code and a one-line reason (FLAGS). Their thresholds are fitted on the validation split by
fit_thresholds() (train.py calls it after training; the volume range also holds the training split's whole
organs, and the edge-leak maximum comes from the training split's reference masks) and stored in the checkpoint under "status_thresholds";
a checkpoint from before that gets config.STATUS_DEFAULT_THRESHOLDS with a note. Arrays are indexed [x, y, z];
positions are world RAS mm; volumes mL.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

import config

STATUSES = ("present", "absent", "not_imaged", "partially_imaged")
FLAGS = {  # code -> what it means (the reason printed with it adds the numbers)
    "volume_low": "volume below the range seen in training",
    "volume_high": "volume above the range seen in training",
    "fragmented": "more than one connected component above the size limit",
    "order_rectum": "rectum not posterior to the prostate and bladder",
    "outside_region": "centre outside the organ's expected height relative to the femoral heads",
    "low_confidence": "low mean probability inside the mask",
    "mirror_disagreement": "plain and left-right mirrored predictions disagree",
    "uncertain_absence": "absent, but the model's probability for it peaks high somewhere in the scan",
    "edge_leak": "the scan just outside the mask looks like its inside (organ cut short?)",
}
THRESHOLD_KEYS = ("volume_ml", "min_component_ml", "min_confidence", "min_mirror_dice", "max_absent_probability",
                  "max_edge_leak")


# --------------------------------------------------------------------------------------------
# Pelvis landmark: the femoral heads
# --------------------------------------------------------------------------------------------
def _block_mean(hu, affine, target_mm):
    """Average blocks of whole voxels so that spacing is about target_mm (never finer than given); returns
    (array, affine of the coarse grid)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    f = np.maximum(1, np.floor(target_mm / spacing + 1e-6)).astype(int)
    if (f == 1).all():
        return np.asarray(hu, np.float32), np.asarray(affine, np.float64)
    n = np.asarray(hu.shape) // f
    if (n < 1).any():
        f = np.minimum(f, hu.shape)
        n = np.asarray(hu.shape) // f
    a = np.asarray(hu[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]], np.float32)
    a = a.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = (f - 1) / 2.0  # coarse voxel i covers fine voxels i*f .. i*f+f-1
    return a, np.asarray(affine, np.float64) @ step


def find_femoral_heads(hu, affine):
    """The femoral heads in an HU volume (canonical RAS, affine voxel -> world mm).

    Returns dict(found, heads_mm=[[x, y, z] right, left] or [], radius_mm=[r, r], z_mm=height or None,
    candidates=number of bone-depth maxima considered).
    """
    hu, affine = _block_mean(np.asarray(hu), affine, config.STATUS_LANDMARK_SPACING)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    in_plane = np.zeros((3, 3, 1), bool)
    in_plane[:, :, 0] = ndimage.generate_binary_structure(2, 1)
    # Smoothed first: in a noisy scan (30 HU) the cancellous core of a head (~160 HU) dips below the threshold
    # in specks, holes that reach the cortex are not filled, and the depth inside bone falls short of a head's.
    smooth = ndimage.gaussian_filter(hu, config.STATUS_BONE_SMOOTH_MM / spacing)
    bone = ndimage.binary_fill_holes(smooth > config.STATUS_BONE_HU, structure=in_plane)
    none = dict(found=False, heads_mm=[], radius_mm=[], z_mm=None, candidates=0)
    if not bone.any():
        return none
    depth = ndimage.distance_transform_edt(bone, sampling=spacing)  # mm to the nearest non-bone voxel
    r_lo, r_hi = config.STATUS_FEMORAL_HEAD_RADIUS_MM
    size = np.maximum(3, 2 * np.round(r_lo / spacing).astype(int) + 1)
    peaks = (depth == ndimage.maximum_filter(depth, size=tuple(size))) & (depth >= r_lo) & (depth <= r_hi)
    comps, n = ndimage.label(peaks, structure=np.ones((3, 3, 3), bool))  # a plateau is one candidate
    if n == 0:
        return none
    idx = np.asarray(ndimage.center_of_mass(peaks, comps, range(1, n + 1))).reshape(-1, 3)
    radius = np.asarray(ndimage.maximum(depth, comps, range(1, n + 1)), float).reshape(-1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    # A femoral head has a cortical rim and the acetabulum around it; an enhanced kidney or a contrast-filled
    # loop of bowel, as thick, has not: keep candidates whose ball (radius + one voxel) holds cortical HU.
    rim = []
    for c, r in zip(idx, radius):
        reach = (r + spacing.max()) / spacing  # voxels per axis
        lo = np.maximum(0, np.floor(c - reach)).astype(int)
        hi = np.minimum(hu.shape, np.ceil(c + reach) + 1).astype(int)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        ball = sum(((g - ci) * sp) ** 2 for g, ci, sp in zip(grid, c, spacing)) <= (r + spacing.max()) ** 2
        block = hu[tuple(slice(a, b) for a, b in zip(lo, hi))]
        rim.append(float(np.percentile(block[ball], 95)) >= config.STATUS_CORTICAL_HU)
    body = hu > config.BODY_THRESHOLD_HU
    sep_lo, sep_hi = config.STATUS_FEMORAL_HEAD_SEPARATION_MM
    best = None
    for i in range(n):
        for j in range(n):
            a, b = world[i], world[j]
            if not (rim[i] and rim[j]):
                continue
            if not (sep_lo <= b[0] - a[0] <= sep_hi):  # i on the right (smaller x), j on the left
                continue
            if max(abs(a[1] - b[1]), abs(a[2] - b[2])) > config.STATUS_FEMORAL_HEAD_MAX_OFFSET_MM:
                continue
            # The patient at the heads' height: the piece of body (gas inside filled) that holds the heads'
            # midpoint; a table or arms apart from it are left out.
            k = int(np.clip(np.round((idx[i, 2] + idx[j, 2]) / 2), 0, hu.shape[2] - 1))
            col = int(np.clip(np.round((idx[i, 0] + idx[j, 0]) / 2), 0, hu.shape[0] - 1))
            row = int(np.clip(np.round((idx[i, 1] + idx[j, 1]) / 2), 0, hu.shape[1] - 1))
            pieces, _ = ndimage.label(ndimage.binary_fill_holes(body[:, :, k]))
            if not pieces[col, row]:
                continue
            patient = pieces == pieces[col, row]
            xs = np.nonzero(patient.any(axis=1))[0]
            mid = np.array([(xs.min() + xs.max()) / 2.0, row, k])
            centre_x = float(affine[0, :3] @ mid + affine[0, 3])  # world x of the body's left-right middle
            if abs((a[0] + b[0]) / 2 - centre_x) > config.STATUS_MIDLINE_TOLERANCE_MM:
                continue
            # Front to back: each head's share of the body's depth along the column through that head (through the
            # buttock and the groin; the midline column would end at the bottom of the gluteal cleft), averaged. Gas
            # is not filled there: no bowel lies beside the heads, and a table's foam core, which filling would add
            # to the patient wherever the table touches, ends the column at the table's top.
            unfilled = patient & body[:, :, k]
            front = float(np.mean([_front_share(unfilled, affine, idx[h], k) for h in (i, j)]))
            if front < config.STATUS_FEMORAL_HEAD_MIN_FRONT:
                continue
            score = min(radius[i], radius[j])
            if best is None or score > best[0]:
                best = (score, i, j)
    if best is None:
        return dict(none, candidates=int(n))
    _, i, j = best
    return dict(found=True, heads_mm=[[round(float(v), 1) for v in world[i]], [round(float(v), 1) for v in world[j]]],
                radius_mm=[round(float(radius[i]), 1), round(float(radius[j]), 1)],
                z_mm=round(float((world[i, 2] + world[j, 2]) / 2), 1), candidates=int(n))


def _front_share(patient, affine, voxel, k):
    """How far in front of the body's back a head's centre (voxel index) lies, as a share of the body's depth along
    the front-back column through it: the run of `patient` (2D slice k) in that column that holds the centre."""
    col = int(np.clip(np.round(voxel[0]), 0, patient.shape[0] - 1))
    row = int(np.clip(np.round(voxel[1]), 0, patient.shape[1] - 1))
    column = patient[col]
    if not column[row]:
        return 0.0
    runs, _ = ndimage.label(column)
    ys = np.nonzero(runs == runs[row])[0]
    ends = [float(affine[1, :3] @ np.array([col, y, k]) + affine[1, 3]) for y in (ys.min(), ys.max())]
    centre_y = float(affine[1, :3] @ np.asarray(voxel, float) + affine[1, 3])
    return (centre_y - min(ends)) / max(abs(ends[1] - ends[0]), 1e-6)


def organ_z_range(organ, pelvis):
    """(low, high) z (mm, the pelvis' frame) where the organ's centre lies: STATUS_ORGAN_Z_MM above the heads."""
    return tuple(pelvis["z_mm"] + d for d in config.STATUS_ORGAN_Z_MM[organ])


def keep_in_region(labels, pelvis, affine):
    """Region clean-up of a model-space label map: with the femoral heads found (find_femoral_heads with the same
    voxel -> world `affine`), remove each organ's connected pieces whose centre lies more than
    STATUS_REGION_MARGIN_MM outside its STATUS_ORGAN_Z_MM range above the heads (a 'rectum' in the colon, a
    'bladder' in a bowel loop of the upper abdomen), or more than that margin lateral to a femoral head's centre:
    the three organs lie in the true pelvis, between the hip joints (a 'rectum' in the skin of the flank, which
    the largest-component rule could keep in place of a small true one). Without the heads the labels
    stay as they are (the status rule then calls every organ not imaged). Returns a new array only when it
    removes."""
    if not pelvis.get("found"):
        return labels
    margin = float(config.STATUS_REGION_MARGIN_MM)
    rows = np.asarray(affine, float)[:3]
    heads_x = sorted(h[0] for h in pelvis["heads_mm"])
    out = labels
    for k, organ in enumerate(config.ORGANS, start=1):
        mask = labels == k
        if not mask.any():
            continue
        comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        lo, hi = organ_z_range(organ, pelvis)
        voxel = np.asarray(ndimage.center_of_mass(mask, comps, range(1, n + 1))).reshape(-1, 3)
        x, _, z = (voxel @ rows[:, :3].T + rows[:, 3]).T
        outside = np.nonzero((z < lo - margin) | (z > hi + margin)
                             | (x < heads_x[0] - margin) | (x > heads_x[1] + margin))[0] + 1
        if len(outside):
            out = out.copy() if out is labels else out
            out[np.isin(comps, outside)] = 0
    return out


def scan_z_extent(img):
    """(lowest, highest) world z (mm) of the voxel centres of an image's grid."""
    shape = np.asarray(img.shape[:3]) - 1
    corners = np.array([[i, j, k] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
    z = corners @ np.asarray(img.affine)[2, :3] + img.affine[2, 3]
    return float(z.min()), float(z.max())


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------
def touches_edge(mask):
    """True when a mask reaches any face of its grid."""
    return any(mask[i].any() or mask[:, i].any() or mask[:, :, i].any() for i in (0, -1))


def centre_in_scan(organ, pelvis, scan_z):
    """True when the organ's expected centre (STATUS_ORGAN_CENTRE_MM above the femoral heads) lies inside the
    scan's z-extent; False when no pelvis was found."""
    if not pelvis.get("found"):
        return False
    return scan_z[0] <= pelvis["z_mm"] + config.STATUS_ORGAN_CENTRE_MM[organ] <= scan_z[1]


def organ_status(predicted, at_edge, centre_imaged, pelvis_found):
    """The status rule (module docstring) for one organ: predicted and at_edge on the CT grid, centre_imaged
    from centre_in_scan()."""
    if not pelvis_found:
        return "not_imaged"
    if predicted:
        return "partially_imaged" if at_edge else "present"
    return "absent" if centre_imaged else "not_imaged"


# --------------------------------------------------------------------------------------------
# Evidence from the model: probabilities and the mirrored prediction
# --------------------------------------------------------------------------------------------
def _probabilities(logits):
    """Softmax over [background logit 0, organ logits] -> organ probabilities (n, X, Y, Z) float32."""
    z = np.concatenate([np.zeros((1,) + logits.shape[1:], np.float32), logits], axis=0)
    z -= z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z[1:]


def model_evidence(model, ct_img, labels, organs, device, prepared=None):
    """Per organ: mean probability inside the predicted mask, Dice between the prediction and the prediction on
    the left-right mirrored CT (flipped back), the volume the mirrored prediction keeps after the same clean-up as
    the labels (inference.clean_up; decide()'s mirror confirmation), and the peak probability anywhere (model
    space). Plus the femoral heads found in the model-space CT (prepared: inference.prepare_case(ct_img), when the
    caller has it already). One extra forward pass over the CT: of the mirrored CT when STATUS_MIRROR_CHECK, else
    of the CT itself (then no mirror Dice). Probabilities and the mirrored labels come from the logits with the
    organs' logit offsets added, as the labels were made. No pass and no organ evidence where no femoral heads were
    found: every organ is then not_imaged, which no flag, veto or fitted threshold reads."""
    import inference
    import preprocessing

    prepared = prepared or inference.prepare_case(ct_img)
    hu, geom = prepared["hu"], prepared["geom"]
    out = {"pelvis": prepared["pelvis"], "organs": {}}
    if model is None or not prepared["pelvis"].get("found"):
        return out
    mirror = bool(config.STATUS_MIRROR_CHECK)
    norm = preprocessing.normalize_hu(hu)
    if mirror:
        norm = np.ascontiguousarray(norm[::-1])  # x is axis 0 in RAS model space
    logits = inference.predict_logits(model, norm, tuple(config.PATCH_SIZE), float(config.SW_OVERLAP),
                                      int(config.SW_BATCH), False, device).numpy()
    if mirror:
        logits = np.ascontiguousarray(logits[:, ::-1])
    logits = inference.offset_logits(logits, organs=organs)
    prob = _probabilities(logits)
    other = np.asarray(inference.logits_to_labels(logits))
    kept = inference.clean_up(other, len(organs), geom["model_affine"], prepared["pelvis"],
                              inference.keep_largest_on(config.LARGEST_COMPONENT)) if mirror else None  # as made
    mine = preprocessing.prepare_labels({o: (labels == k).astype(np.uint8) for k, o in enumerate(organs, 1)}, geom)
    spacing = np.asarray(geom["model_spacing"], float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    smooth = ndimage.gaussian_filter(np.asarray(hu, np.float32), config.STATUS_BONE_SMOOTH_MM / spacing)
    for k, organ in enumerate(organs, start=1):
        m, o = mine == k, other == k
        n_m, n_o = int(m.sum()), int(o.sum())
        out["organs"][organ] = {
            "edge_leak": edge_leak(smooth, m, spacing),
            "confidence": float(prob[k - 1][m].mean()) if n_m else None,
            "mirror_dice": (2.0 * int((m & o).sum()) / (n_m + n_o) if n_m + n_o else 1.0) if mirror else None,
            "mirror_ml": n_o * voxel_ml if mirror else None,
            "mirror_kept_ml": int((kept == k).sum()) * voxel_ml if mirror else None,  # after the clean-up
            "peak_probability": float(prob[k - 1].max()),
        }
    return out


def edge_leak(smooth, mask, spacing):
    """Share of the shell just outside `mask` (STATUS_EDGE_SHELL_MM thick) whose smoothed HU lies within the 10-90 %
    range of the mask's core (the mask less a rim as thick; the whole mask when that leaves too little). A mask
    that stops inside a homogeneous organ (a bladder cut short in its urine) leaks; one that follows the organ's
    wall does not. None for an empty mask."""
    if not mask.any():
        return None
    steps = max(1, int(round(config.STATUS_EDGE_SHELL_MM / float(np.min(spacing)))))
    ball = ndimage.generate_binary_structure(3, 1)
    core = ndimage.binary_erosion(mask, ball, iterations=steps)
    if core.sum() < 27:
        core = mask
    shell = ndimage.binary_dilation(mask, ball, iterations=steps) & ~mask
    if not shell.any():
        return None
    lo, hi = np.percentile(smooth[core], [10, 90])
    outside = smooth[shell]
    return float(((outside >= lo) & (outside <= hi)).mean())


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------
def thresholds_of(ckpt, quiet=False):
    """The flag thresholds stored in a checkpoint; config.STATUS_DEFAULT_THRESHOLDS (with a note) for one that
    predates them, and for each threshold added since it was fitted."""
    stored = (ckpt or {}).get("status_thresholds")
    if stored:
        missing = [k for k in THRESHOLD_KEYS if k not in stored]
        if missing and not quiet:
            print(f"note: this checkpoint's status thresholds predate {', '.join(missing)}; using "
                  "config.STATUS_DEFAULT_THRESHOLDS for those (refit: python status.py --fit --checkpoint PATH)")
        return dict({k: config.STATUS_DEFAULT_THRESHOLDS[k] for k in missing}, **stored)
    if not quiet:
        print("note: this checkpoint has no fitted status thresholds (trained before they existed); using "
              "config.STATUS_DEFAULT_THRESHOLDS. Fit them on the validation split: python status.py --fit "
              "--checkpoint PATH")
    return dict(config.STATUS_DEFAULT_THRESHOLDS, fitted_on=None)


def _per_organ(thresholds, key, organ):
    value = thresholds[key]
    return value.get(organ) if isinstance(value, dict) else value


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def _components_ml(mask, voxel_ml):
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())[1:] * voxel_ml
    return sorted((float(s) for s in sizes), reverse=True)


def raw_measures(ct_img, labels, organs, evidence):
    """Everything the status and flags are decided from, per organ, before any threshold."""
    affine = np.asarray(ct_img.affine)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    pelvis = evidence["pelvis"]
    scan_z = scan_z_extent(ct_img)
    out = {"pelvis": pelvis, "scan_z_mm": [round(v, 1) for v in scan_z], "organs": {}}
    for k, organ in enumerate(organs, start=1):
        mask = labels == k
        n = int(mask.sum())
        e = dict(voxels=n, ml=n * voxel_ml, at_edge=bool(n and touches_edge(mask)), centroid_mm=None,
                 components_ml=[], centre_imaged=centre_in_scan(organ, pelvis, scan_z))
        if n:
            e["centroid_mm"] = [float(v) for v in affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]]
            e["components_ml"] = _components_ml(mask, voxel_ml)
        e.update(evidence["organs"].get(organ, {}))
        out["organs"][organ] = e
    return out


def _flag(code, detail):
    return {"code": code, "reason": f"{FLAGS[code]} ({detail})"}


def organ_flags(organ, e, measures, status, thresholds):
    """The quality flags of one organ (list of {"code", "reason"}) from raw_measures() and the thresholds."""
    flags = []
    if status == "not_imaged":
        return flags
    if status == "absent":
        peak, limit = e.get("peak_probability"), _per_organ(thresholds, "max_absent_probability", organ)
        if peak is not None and limit is not None and peak > limit:
            flags.append(_flag("uncertain_absence", f"peak {peak:.2f} > {limit:.2f}"))
        if e.get("mirror_ml") and e["mirror_ml"] >= _per_organ(thresholds, "min_component_ml", organ):
            flags.append(_flag("mirror_disagreement", f"mirrored prediction finds {e['mirror_ml']:.1f} mL"))
        return flags
    lo, hi = _per_organ(thresholds, "volume_ml", organ) or (None, None)
    if hi is not None and e["ml"] > hi:
        flags.append(_flag("volume_high", f"{e['ml']:.1f} mL > {hi:.1f}"))
    if lo is not None and e["ml"] < lo and not e["at_edge"]:  # a cut organ's volume is only a lower bound
        flags.append(_flag("volume_low", f"{e['ml']:.1f} mL < {lo:.1f}"))
    size = _per_organ(thresholds, "min_component_ml", organ)
    big = [c for c in e["components_ml"] if c >= size]
    if len(big) > 1:
        flags.append(_flag("fragmented", f"{len(big)} components of >= {size:.1f} mL"))
    others = measures["organs"]
    c = e["centroid_mm"]
    if organ == "rectum":
        ahead = [o for o in ("prostate", "bladder") if others.get(o, {}).get("centroid_mm")
                 and others[o]["centroid_mm"][1] <= c[1]]
        if ahead:
            flags.append(_flag("order_rectum", f"not behind the {' and '.join(ahead)} (y)"))
    pelvis = measures["pelvis"]
    if pelvis.get("found"):
        lo_z, hi_z = organ_z_range(organ, pelvis)
        if not lo_z <= c[2] <= hi_z:
            flags.append(_flag("outside_region", f"z {c[2] - pelvis['z_mm']:+.0f} mm, expected "
                               f"{lo_z - pelvis['z_mm']:+.0f} to {hi_z - pelvis['z_mm']:+.0f}"))
    conf, limit = e.get("confidence"), _per_organ(thresholds, "min_confidence", organ)
    if conf is not None and limit is not None and conf < limit:
        flags.append(_flag("low_confidence", f"{conf:.2f} < {limit:.2f}"))
    md, limit = e.get("mirror_dice"), _per_organ(thresholds, "min_mirror_dice", organ)
    if md is not None and limit is not None and md < limit:
        flags.append(_flag("mirror_disagreement", f"Dice {md:.2f} < {limit:.2f}"))
    leak, limit = e.get("edge_leak"), _per_organ(thresholds, "max_edge_leak", organ)
    if leak is not None and limit is not None and leak > limit:
        flags.append(_flag("edge_leak", f"{leak:.2f} of the surrounding shell > {limit:.2f}"))
    return flags


def unconfirmed(organ, e):
    """True when `organ` must be found again in the left-right mirrored scan (config.PRESENCE_MIRROR_ORGANS) and
    was not: predicted here, nothing kept there after the same clean-up. False without a mirrored pass."""
    return organ in config.PRESENCE_MIRROR_ORGANS and e["voxels"] > 0 and e.get("mirror_kept_ml") == 0


def above_bladder(organ, e, measures):
    """True for a predicted prostate whose centre is not below the predicted bladder's (status rule 5)."""
    bladder = measures["organs"].get("bladder", {}).get("centroid_mm")
    return organ == "prostate" and e["voxels"] > 0 and bool(bladder) and e["centroid_mm"][2] >= bladder[2]


REMOVED_BECAUSE = {  # removed_because -> what the console line says (region_not_imaged: the status says it)
    "region_not_imaged": "",
    "not_in_mirrored_scan": "not found in the mirrored scan",
    "not_below_bladder": "not below the bladder",
}


def decide(measures, thresholds):
    """{organ: {"status", "flags", "ml", ...}} from raw_measures(). A prediction that is removed (its region not
    imaged, not confirmed by the mirrored scan: unconfirmed(), or a prostate not below the bladder:
    above_bladder()) gets "removed_ml" and "removed_because" (REMOVED_BECAUSE)."""
    found = bool(measures["pelvis"].get("found"))
    vetoes = {organ: "not_in_mirrored_scan" if unconfirmed(organ, e)
              else "not_below_bladder" if above_bladder(organ, e, measures) else None
              for organ, e in measures["organs"].items()}
    # the other organs' order flags compare with the organs that stay
    staying = dict(measures, organs={o: dict(e, centroid_mm=None) if vetoes[o] else e
                                     for o, e in measures["organs"].items()})
    report = {}
    for organ, e in measures["organs"].items():
        veto = vetoes[organ]
        status = organ_status(e["voxels"] > 0 and not veto, e["at_edge"], e["centre_imaged"], found)
        kept = status in ("present", "partially_imaged")
        entry = {"status": status, "ml": e["ml"] if kept else 0.0,
                 "flags": organ_flags(organ, e, staying, status, thresholds)}
        if e["voxels"] and not kept:
            entry["removed_ml"] = round(e["ml"], 3)
            entry["removed_because"] = "region_not_imaged" if status == "not_imaged" else veto
        for key in ("confidence", "mirror_dice", "edge_leak"):
            if e.get(key) is not None and kept:
                entry[key] = round(e[key], 4)
        report[organ] = entry
    return report


def assess(ct_img, labels, model, device, thresholds, organs=None, prepared=None):
    """(labels with removed organs cleared, report) for one CT and its predicted label map (original grid): organs
    whose region is not imaged, those the mirrored scan does not confirm and a prostate not below the bladder
    (decide()).
    prepared: inference.prepare_case(ct_img) as predict_case used it (computed here when not given).

    report = {"organs": {organ: {"status", "ml", "flags": [{"code", "reason"}], ...}}, "pelvis": {...},
    "scan_z_mm": [lo, hi]}. With STATUS_CLEAR_NOT_IMAGED off, predictions whose region is not imaged stay.
    """
    organs = tuple(organs or config.ORGANS)
    evidence = model_evidence(model, ct_img, labels, organs, device, prepared)
    measures = raw_measures(ct_img, labels, organs, evidence)
    per_organ = decide(measures, thresholds)
    labels = np.asarray(labels)
    why = {o: per_organ[o].get("removed_because") for o in organs}
    gone = [k for k, o in enumerate(organs, 1)
            if why[o] and (why[o] != "region_not_imaged" or config.STATUS_CLEAR_NOT_IMAGED)]
    if gone:
        labels = np.where(np.isin(labels, gone), 0, labels).astype(labels.dtype)
    return labels, {"organs": per_organ, "pelvis": measures["pelvis"], "scan_z_mm": measures["scan_z_mm"],
                    "_measures": measures}


def console_line(name, organs_report, pelvis=None):
    """'BDMAP_x: prostate absent, bladder 312 mL (flag: volume_high), rectum not imaged'. With the report's `pelvis`
    and no femoral heads found in it, the line says so and what the net predicted there (removed)."""
    parts = []
    for organ, e in organs_report.items():
        s = e["status"]
        text = f"{organ} {e['ml']:.0f} mL" if s in ("present", "partially_imaged") else f"{organ} {s.replace('_', ' ')}"
        if s == "partially_imaged":
            text += " (cut by the scan edge)"
        if REMOVED_BECAUSE.get(e.get("removed_because")):
            text += f" ({e['removed_ml']:.1f} mL predicted, {REMOVED_BECAUSE[e['removed_because']]})"
        codes = [f["code"] for f in e["flags"]]
        if codes:
            text += f" (flag: {', '.join(codes)})"
        parts.append(text)
    line = f"{name}: " + ", ".join(parts)
    if pelvis is not None and not pelvis.get("found"):
        removed = [f"{o} {e['removed_ml']:.1f} mL" for o, e in organs_report.items() if e.get("removed_ml")]
        line += " (no femoral heads found" + (f"; removed: {', '.join(removed)}" if removed else "") + ")"
    return line


# --------------------------------------------------------------------------------------------
# Truth and evaluation rows
# --------------------------------------------------------------------------------------------
def true_status(case_dir, masks, organs):
    """{organ: true status or None}: the phantom's meta.json "status" where it has one; else from the reference
    mask where that settles it (non-empty: present / partially_imaged by the edge), None when unknown."""
    meta = {}
    path = Path(case_dir) / "meta.json"
    if path.is_file():
        try:
            meta = json.loads(path.read_text()).get("status") or {}
        except ValueError:
            meta = {}
    out = {}
    for organ in organs:
        if organ in meta:
            out[organ] = meta[organ]
            continue
        m = masks.get(organ)
        out[organ] = None if m is None or not m.any() else ("partially_imaged" if touches_edge(m) else "present")
    return out


def csv_columns(organs):
    """Columns evaluate.py adds to metrics_per_case.csv."""
    return [f"{c}_{o}" for o in organs for c in ("pred_status", "true_status", "flags")]


def row_fields(report, truth, organs):
    """Those columns for one case."""
    row = {}
    for organ in organs:
        row[f"pred_status_{organ}"] = report["organs"][organ]["status"]
        row[f"true_status_{organ}"] = truth.get(organ)
        row[f"flags_{organ}"] = ";".join(f["code"] for f in report["organs"][organ]["flags"])
    return row


def quality(row, organ):
    """'bad' (Dice < STATUS_BAD_DICE, a false organ, or a missed organ), 'good' (Dice >= STATUS_GOOD_DICE) or
    None (in between, correctly absent, or not imaged)."""
    s = row.get(f"status_{organ}")
    dice = row.get(f"dice_{organ}")
    dice = None if dice in (None, "") else float(dice)
    if s in ("false_organ", "missed"):
        return "bad"
    if s == "present_detected" and dice is not None:
        return "bad" if dice < config.STATUS_BAD_DICE else "good" if dice >= config.STATUS_GOOD_DICE else None
    return None


def summarize(rows, organs):
    """Status confusion (true -> predicted -> count), status accuracy, and how well the flags pick out bad
    results: share of bad results with >= 1 flag, share of good ones with >= 1 flag."""
    confusion = {t: {p: 0 for p in STATUSES} for t in STATUSES}
    known = correct = 0
    n = {"bad": 0, "good": 0}
    flagged = {"bad": 0, "good": 0}
    per_flag = {}
    for row in rows:
        for organ in organs:
            t, p = row.get(f"true_status_{organ}"), row.get(f"pred_status_{organ}")
            if t in confusion and p in STATUSES:
                confusion[t][p] += 1
                known += 1
                correct += t == p
            q = quality(row, organ)
            codes = [c for c in (row.get(f"flags_{organ}") or "").split(";") if c]
            for c in codes:
                per_flag.setdefault(c, {"bad": 0, "good": 0, "other": 0})[q or "other"] += 1
            if q:
                n[q] += 1
                flagged[q] += bool(codes)
    rate = lambda a, b: a / b if b else None  # noqa: E731
    return {"confusion": confusion, "status_known": known, "status_correct": correct,
            "status_accuracy": rate(correct, known), "bad": n["bad"], "bad_flagged": flagged["bad"],
            "good": n["good"], "good_flagged": flagged["good"], "catch_rate": rate(flagged["bad"], n["bad"]),
            "good_flagged_rate": rate(flagged["good"], n["good"]), "per_flag": per_flag,
            "rule": f"bad = Dice < {config.STATUS_BAD_DICE}, a false organ or a missed organ; good = Dice >= "
                    f"{config.STATUS_GOOD_DICE}"}


def _pct(a, b):
    return "–" if not b else f"{a}/{b} ({100.0 * a / b:.0f} %)"


def report_markdown(summary):
    """Markdown lines: status confusion table and flag catch rates (for evaluation_report.md)."""
    lines = ["## Organ status (predicted vs true)", ""]
    if summary["status_known"]:
        lines += ["| true \\ predicted | " + " | ".join(STATUSES) + " |", "|---|" + "---|" * len(STATUSES)]
        for t in STATUSES:
            lines.append(f"| {t} | " + " | ".join(str(summary["confusion"][t][p]) for p in STATUSES) + " |")
        lines += ["", f"Status accuracy: {_pct(summary['status_correct'], summary['status_known'])} of organ "
                      "results with a known true status.", ""]
    else:
        lines += ["No true status known for these cases (the phantom's meta.json has one).", ""]
    lines += ["## Quality flags", "", summary["rule"] + ".", "",
              f"- bad results with at least one flag: {_pct(summary['bad_flagged'], summary['bad'])}",
              f"- good results with at least one flag: {_pct(summary['good_flagged'], summary['good'])}", ""]
    if summary["per_flag"]:
        lines += ["| flag | on bad | on good | on other |", "|---|---|---|---|"]
        for code, c in sorted(summary["per_flag"].items()):
            lines.append(f"| {code} | {c['bad']} | {c['good']} | {c['other']} |")
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------
# Fitting the thresholds on the validation split
# --------------------------------------------------------------------------------------------
def _quantile(values, q):
    return float(np.quantile(np.asarray(values, float), q)) if len(values) else None


def tolerance_factor(n, share, confidence):
    """k of the one-sided normal tolerance bound: with probability `confidence`, mean - k * sd of n draws lies
    below all but `share` of the population (non-central t). A small sample gets a wide margin: k = 3.4 for
    n = 5, 2.2 for n = 20 (share 0.05, confidence 0.9), against 1.64 for a known distribution."""
    from scipy import stats
    return float(stats.nct.ppf(confidence, n - 1, stats.norm.ppf(1 - share) * np.sqrt(n)) / np.sqrt(n))


def _logit(p):
    p = np.clip(np.asarray(p, float), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def tolerance_bound(values, side, scale):
    """The fitted threshold from the values of the reference results (good or correctly absent, validation
    split): the one-sided normal tolerance bound (STATUS_FLAG_GOOD_QUANTILE, STATUS_FLAG_CONFIDENCE) on a
    logit ("logit": probabilities, Dice) or log ("log": volumes) scale, below ("low") or above ("high") them and
    never inside their range, so no reference result carries the flag. None for fewer than
    STATUS_FIT_MIN_RESULTS values: too few to fit."""
    values = np.asarray([v for v in values if v is not None], float)
    if len(values) < max(2, config.STATUS_FIT_MIN_RESULTS):
        return None
    z = _logit(values) if scale == "logit" else np.log(np.maximum(values, 1e-6))
    k = tolerance_factor(len(z), config.STATUS_FLAG_GOOD_QUANTILE, config.STATUS_FLAG_CONFIDENCE)
    t = z.mean() - k * z.std(ddof=1) if side == "low" else z.mean() + k * z.std(ddof=1)
    t = float(1.0 / (1.0 + np.exp(-t))) if scale == "logit" else float(np.exp(t))
    return min(t, float(values.min())) if side == "low" else max(t, float(values.max()))


def training_volumes(processed_dir, case_ids, organs):
    """{organ: [mL, ...]} of the training cases where the organ is whole (present, not cut by the edge)."""
    out = {}
    for organ in organs:
        vols = []
        for cid in case_ids:
            try:
                e = json.loads((Path(processed_dir) / "cases" / cid / "meta.json").read_text())["organs"][organ]
            except (OSError, ValueError, KeyError):
                continue
            if e.get("present") and not e.get("touches_fov_edge"):
                vols.append(float(e["ml"]))
        out[organ] = vols
    return out


def training_edge_leaks(processed_dir, case_ids, organs):
    """{organ: [edge_leak of the reference mask, ...]} of the training cases that hold the organ (model space, as
    model_evidence measures a prediction): how much a mask that follows the organ's true border leaks."""
    out = {organ: [] for organ in organs}
    for cid in case_ids:
        folder = Path(processed_dir) / "cases" / cid
        try:
            label = np.load(folder / "label.npy")
            hu = np.load(folder / "ct.npy").astype(np.float32)
            spacing = np.asarray(json.loads((folder / "meta.json").read_text())["geom"]["model_spacing"], float)
        except (OSError, ValueError, KeyError):
            continue
        smooth = ndimage.gaussian_filter(hu, config.STATUS_BONE_SMOOTH_MM / spacing)
        for k, organ in enumerate(organs, start=1):
            leak = edge_leak(smooth, label == k, spacing)
            if leak is not None:
                out[organ].append(leak)
    return out


def fit_from_results(results, volumes, organs, leaks=None):
    """Thresholds from validation results: a list of (organ, raw measure dict, reference Dice or None, reference
    present). Each is a tolerance bound (tolerance_bound) of the good results (Dice >= STATUS_GOOD_DICE; for
    the absence flag, the correctly absent ones): meant to flag at most STATUS_FLAG_GOOD_QUANTILE of such
    results, with a margin that grows as the split gets smaller. With fewer than STATUS_FIT_MIN_RESULTS of
    them the confidence and mirror thresholds use the good results of all organs (fitted_on.pooled_over_organs);
    when those are too few as well, or for the other thresholds, config.STATUS_DEFAULT_THRESHOLDS
    (fitted_on.defaults).
    volumes: {organ: [whole-organ volumes of the training split, mL]} (training_volumes). The edge-leak maximum is
    the tolerance bound of `leaks`, the reference masks of the training split (training_edge_leaks): a property
    of the anatomy, not of the model, and many more organs than the validation split's good predictions (5 good
    validation bladders gave 0.25 and flagged 4 good bladders of the development phantoms)."""
    default = config.STATUS_DEFAULT_THRESHOLDS
    out = {k: {} for k in THRESHOLD_KEYS}
    counts, defaults, pooled = {}, [], []
    good_of = [(o, e) for o, e, d, ref in results if d is not None and d >= config.STATUS_GOOD_DICE]
    all_good = [e for _, e in good_of]

    def pick(key, organ, value):
        if value is None:
            defaults.append(f"{key}.{organ}")
            value = default[key][organ]
        out[key][organ] = [round(v, 4) for v in value] if isinstance(value, (list, tuple)) else round(value, 4)

    for organ in organs:
        good = [e for o, e in good_of if o == organ]
        tn = [e for o, e, d, ref in results if o == organ and not ref and e["voxels"] == 0
              and e.get("peak_probability") is not None]  # none where no pelvis was found: not_imaged, not absent
        counts[organ] = {"good": len(good), "correctly_absent": len(tn)}
        # volume: every whole training organ, every good validation prediction, and the log-normal tolerance
        # bounds of the training volumes (a training split holds few organs; patients vary more)
        vols = list(volumes.get(organ) or [])
        lo, hi = tolerance_bound(vols, "low", "log"), tolerance_bound(vols, "high", "log")
        seen = vols + [e["ml"] for e in good if not e["at_edge"]]
        pick("volume_ml", organ, None if lo is None else [min([lo] + seen), max([hi] + seen)])
        second = [e["components_ml"][1] if len(e["components_ml"]) > 1 else 0.0 for e in good]
        fitted = _quantile(second, 1 - config.STATUS_FLAG_GOOD_QUANTILE) \
            if len(second) >= config.STATUS_FIT_MIN_RESULTS else None
        pick("min_component_ml", organ, None if fitted is None else max(config.STATUS_MIN_COMPONENT_FLOOR_ML, fitted))
        for key, name in (("min_confidence", "confidence"), ("min_mirror_dice", "mirror_dice")):
            # too few good results of this organ: those of every organ (a probability and a Dice mean the same
            # for each), and only then the default
            t = tolerance_bound([e.get(name) for e in good], "low", "logit")
            if t is None:
                t = tolerance_bound([e.get(name) for e in all_good], "low", "logit")
                if t is not None:
                    pooled.append(f"{key}.{organ}")
            pick(key, organ, t)
        pick("max_absent_probability", organ,
             tolerance_bound([e.get("peak_probability") for e in tn], "high", "logit"))
        pick("max_edge_leak", organ, tolerance_bound((leaks or {}).get(organ) or [], "high", "logit"))
    out["fitted_on"] = {"split": "val", "results": counts, "good_quantile": config.STATUS_FLAG_GOOD_QUANTILE,
                        "confidence": config.STATUS_FLAG_CONFIDENCE, "good_dice": config.STATUS_GOOD_DICE,
                        "defaults": defaults, "pooled_over_organs": pooled}
    return out


def _dice(a, b):
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / n if n else None


def fit_thresholds(checkpoint, split="val", show_progress=None, logits=None):
    """Run the checkpoint over `split` in each case's original geometry, fit the flag thresholds and store them
    in the checkpoint (atomically) under "status_thresholds"; returns them. logits: {case id: the checkpoint's
    model-space logits of that case} from training's last validation (the same weights, the same volume:
    processed/ holds what prepare_case makes), so that pass is not run again; a case whose logits do not match
    its volume's shape is predicted afresh."""
    import evaluate
    import inference
    import preprocessing
    import train

    checkpoint = Path(checkpoint)
    device = inference.pick_device()
    model, ckpt, _ = inference.load_model(checkpoint, device)
    inference.use_checkpoint_settings(ckpt, quiet=True)
    organs = tuple(ckpt["model_config"].get("organs", config.ORGANS))
    splits = json.loads((Path(config.PROCESSED_DIR) / "splits.json").read_text())
    case_ids = splits.get(split) or []
    root = evaluate.data_root()
    results = []
    for cid in case_ids:
        try:
            case = preprocessing.read_case(root / cid)
        except (preprocessing.CaseError, FileNotFoundError) as exc:
            print(f"status: fit skipped {cid}: {exc}")
            continue
        prepared = inference.prepare_case(case["ct"])
        known = (logits or {}).get(cid)
        if known is not None and (config.TTA_MIRROR or known.shape[1:] != prepared["hu"].shape):
            known = None  # validation predicts without mirroring; another volume than the one validated
        labels = inference.predict_case(model, case["ct"], device, prepared, known)
        measures = raw_measures(case["ct"], labels, organs,
                                model_evidence(model, case["ct"], labels, organs, device, prepared))
        for k, organ in enumerate(organs, start=1):
            ref = case["masks"].get(organ)
            ref = np.zeros(labels.shape, bool) if ref is None else ref > 0
            results.append((organ, measures["organs"][organ], _dice(labels == k, ref) if ref.any() else None,
                            bool(ref.any())))
    volumes = training_volumes(config.PROCESSED_DIR, splits.get("train") or [], organs)
    leaks = training_edge_leaks(config.PROCESSED_DIR, splits.get("train") or [], organs)
    thresholds = fit_from_results(results, volumes, organs, leaks)
    thresholds["fitted_on"]["cases"] = len(case_ids)
    ckpt["status_thresholds"] = thresholds
    train.save_atomic(ckpt, checkpoint)
    notes = [f"{what}: {', '.join(thresholds['fitted_on'][key])}" for what, key in
             (("too few good results, pooled over organs", "pooled_over_organs"),
              ("too few to fit, defaults", "defaults")) if thresholds["fitted_on"][key]]
    print(f"status: thresholds fitted on {len(case_ids)} {split} cases, stored in {checkpoint}"
          + "".join(f"\n  {n}" for n in notes))
    return thresholds


def fit_thresholds_safely(checkpoint, split="val", logits=None):
    """fit_thresholds() for train.py: a failure costs the fitted thresholds (defaults are used), not the run; the
    settings it takes from the checkpoint are put back afterwards, so training's own config is left as it was."""
    saved = {name: getattr(config, name) for name in dir(config) if name.isupper()}
    try:
        return fit_thresholds(checkpoint, split, logits=logits)
    except (ValueError, OSError, KeyError) as exc:
        print(f"status: flag thresholds not fitted ({exc}); evaluation and prediction will use "
              "config.STATUS_DEFAULT_THRESHOLDS")
        return None
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


# --------------------------------------------------------------------------------------------
# Preview PNG
# --------------------------------------------------------------------------------------------
PREVIEW_COLORS = {"prostate": "tab:orange", "bladder": "tab:blue", "rectum": "tab:green"}
PREVIEW_HU = (-200, 400)  # display window


def preview_png(ct_img, labels, organs, path, title):
    """Axial, coronal and sagittal slices through the organs' centre with each organ's outline (RAS, radiological:
    patient right on the viewer's left)."""
    from nibabel import orientations as nio
    from fileio import pyplot, save_figure

    plt = pyplot()
    to_ras = nio.ornt_transform(nio.io_orientation(ct_img.affine), nio.axcodes2ornt("RAS"))
    ct = nio.apply_orientation(np.asanyarray(ct_img.dataobj).astype(np.float32), to_ras)
    lab = nio.apply_orientation(np.asarray(labels), to_ras)
    spacing = np.asarray(sorted(zip(nio.io_orientation(ct_img.affine)[:, 0],
                                    np.linalg.norm(ct_img.affine[:3, :3], axis=0))))[:, 1]
    centre = np.round(np.argwhere(lab > 0).mean(0)).astype(int) if lab.any() else np.asarray(ct.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, axis, (a, b)) in zip(axes, [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        extent = [0, ct.shape[a] * spacing[a], 0, ct.shape[b] * spacing[b]]
        ax.imshow(ct[tuple(sl)].T, cmap="gray", vmin=PREVIEW_HU[0], vmax=PREVIEW_HU[1], origin="lower",
                  extent=extent, interpolation="nearest")
        for k, organ in enumerate(organs, start=1):
            m = (lab[tuple(sl)] == k).T
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=PREVIEW_COLORS.get(organ, "red"), linewidths=1.2, origin="lower",
                           extent=extent)
        if axis != 0:
            ax.invert_xaxis()
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.lines import Line2D
    fig.legend(handles=[Line2D([], [], color=PREVIEW_COLORS.get(o, "red"), label=o) for o in organs],
               loc="lower center", ncol=len(organs), fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def read_rows(paths):
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def check_rule(data_root):
    """The status rule applied to the reference masks themselves (a perfect segmenter) on every case of a
    labelled folder whose meta.json holds the true status: isolates the landmark and the rule from the model.
    Returns (summary, mismatches)."""
    import preprocessing

    rows, mismatches = [], []
    organs = tuple(config.ORGANS)
    for case_dir in preprocessing.find_cases(data_root):
        case = preprocessing.read_case(case_dir)
        labels = np.zeros(case["ct"].shape, np.uint8)
        for k, organ in enumerate(organs, start=1):
            if case["masks"][organ] is not None:
                labels[case["masks"][organ] > 0] = k
        _, report = assess(case["ct"], labels, None, "cpu", dict(config.STATUS_DEFAULT_THRESHOLDS), organs)
        truth = true_status(case_dir, case["masks"], organs)
        rows.append(row_fields(report, truth, organs))
        for organ in organs:
            if truth[organ] != report["organs"][organ]["status"]:
                mismatches.append(f"{case_dir.name} {organ}: true {truth[organ]}, rule "
                                  f"{report['organs'][organ]['status']} (pelvis {report['pelvis']}, scan z "
                                  f"{report['scan_z_mm']})")
    return summarize(rows, organs), mismatches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="fit the flag thresholds on the val split")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: CHECKPOINT_DIR/best_model.pth")
    parser.add_argument("--measure", nargs="+", type=Path, metavar="CSV", help="metrics_per_case.csv files")
    parser.add_argument("--landmarks", nargs="+", type=Path, metavar="CT", help="report the femoral heads")
    parser.add_argument("--check-rule", type=Path, metavar="DATA_ROOT",
                        help="status rule on the reference masks vs the true status in each meta.json")
    args, rest = parser.parse_known_args(argv)
    try:
        config.configure(rest)
        if args.fit:
            fit_thresholds(args.checkpoint or Path(config.CHECKPOINT_DIR) / "best_model.pth")
        if args.measure:
            rows = read_rows(args.measure)
            organs = [c[len("pred_status_"):] for c in rows[0] if c.startswith("pred_status_")] if rows else []
            print("\n".join(report_markdown(summarize(rows, organs))))
        if args.check_rule:
            summary, mismatches = check_rule(args.check_rule)
            print("\n".join(report_markdown(summary)[:12] + mismatches))
        for path in args.landmarks or []:
            import preprocessing
            img = preprocessing.load_ct(path)
            hu, geom = preprocessing.prepare_ct(img)
            heads = find_femoral_heads(hu, np.asarray(geom["model_affine"]))
            print(f"{path}: scan z {scan_z_extent(img)} mm; femoral heads {heads}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        sys.exit(f"status: {exc}")
    if not (args.fit or args.measure or args.landmarks or args.check_rule):
        parser.print_help()


if __name__ == "__main__":
    main()
