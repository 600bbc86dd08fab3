"""Segmentation metrics per case and organ, in the ORIGINAL image space, plus their aggregation.

Usage (library; evaluate.py is the caller):
    row = case_metrics(pred_labels, ref_masks, spacing=header_spacing_mm, case_id="BDMAP_00000001")
    summary = summarize(rows)

Arrays are indexed [x, y, z] (any consistent axis order works as long as `spacing` follows it);
spacing in mm comes from the image header, always. Volumes in mL, distances in mm.

Surface definition (one place, used by HD95, HD, ASSD and NSD): the surface of a mask is
mask XOR binary_erosion(mask) with FACE connectivity (6-neighbourhood, scipy's default cross),
i.e. the object voxels that have at least one face-neighbour outside the object; voxels on the
image border count as surface (outside the image is background). This is the same definition as
MONAI's get_mask_edges without sub-voxel areas, so our numbers agree with MONAI's.
Distances are Euclidean in mm between surface-voxel centres (distance_transform_edt with
sampling=spacing on the bounding box of both masks plus a one-voxel margin; cropping cannot change
a distance because every surface voxel lies inside that box; a k-d tree gives the same numbers when
scattered false positives make the box huge).
HD95 = max of the two directed 95th percentiles (linear interpolation), as MONAI; HD = max of all
distances; ASSD = mean over the pooled distances of both directions; NSD@tau = share of surface
voxels of both masks whose distance to the other surface is <= tau mm (voxels counted, not areas).
"""
import math

import numpy as np
from scipy import ndimage

# The single source of truth for empty masks; evaluate.py copies it into every report.
EMPTY_RULE = (
    "Reference and prediction both empty -> 'correctly_absent': no metric is defined (all empty). "
    "Reference empty, prediction not -> 'false_organ': counted as a false positive detection and its "
    "predicted volume (mL) reported; no overlap or distance metric. "
    "Reference present, prediction empty -> 'missed': Dice 0, IoU 0, NSD 0, distances (HD95, HD, ASSD) "
    "undefined and reported as missing, never as a made-up number. "
    "Both present -> 'present_detected': all metrics. "
    "Summary statistics use organ-present cases only (present_detected + missed); distance statistics "
    "therefore cover detected cases only and their n says how many."
)

STATUSES = ("present_detected", "missed", "false_organ", "correctly_absent")
NSD_TOLERANCES_MM = (1.0, 2.0, 3.0)  # nsd1, nsd2, nsd3
METRIC_NAMES = ("dice", "iou", "hd95", "hd", "assd", "nsd1", "nsd2", "nsd3", "vol_pred_ml", "vol_ref_ml")
EDT_MAX_VOXELS = 8_000_000  # larger bounding boxes use a k-d tree instead of a distance transform (memory)
SUMMARY_METRICS = ("dice", "iou", "hd95", "hd", "assd", "nsd1", "nsd2", "nsd3")
_FACE = ndimage.generate_binary_structure(3, 1)  # 6-neighbourhood


def _organs():
    import config
    return tuple(config.ORGANS)


def csv_columns(organs=None):
    """metrics_per_case.csv header: case_id, then per organ status_<organ> and <metric>_<organ>."""
    cols = ["case_id"]
    for organ in organs or _organs():
        cols += [f"status_{organ}"] + [f"{m}_{organ}" for m in METRIC_NAMES]
    return cols


def _check_spacing(spacing, ndim):
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm, got {spacing}")
    return spacing


def _bbox(mask, margin):
    """Slices of the bounding box of `mask` grown by `margin` voxels, clipped to the array."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def surface(mask):
    """Surface voxels: mask XOR face-connected erosion (outside the array counts as background)."""
    return mask ^ ndimage.binary_erosion(mask, structure=_FACE, border_value=0)


def surface_distances(pred, ref, spacing, edt_max_voxels=None):
    """(pred surface -> ref surface, ref surface -> pred surface) distances in mm, both masks non-empty.

    Exact Euclidean distances either way: a distance transform on the bounding box, or, when that box is
    larger than edt_max_voxels (default EDT_MAX_VOXELS; scattered false positives can stretch it over a whole
    512 x 512 x 300 CT, where the EDT needs ~2 GB), a k-d tree over the surface-voxel centres.
    """
    box = _bbox(pred | ref, margin=1)
    surf_p, surf_r = surface(pred[box]), surface(ref[box])
    limit = EDT_MAX_VOXELS if edt_max_voxels is None else edt_max_voxels
    if surf_p.size <= limit:
        # EDT measures the distance to the nearest zero, so invert the surfaces.
        d_pr = ndimage.distance_transform_edt(~surf_r, sampling=spacing)[surf_p]
        d_rp = ndimage.distance_transform_edt(~surf_p, sampling=spacing)[surf_r]
        return d_pr, d_rp
    from scipy.spatial import cKDTree

    pts_p, pts_r = np.argwhere(surf_p) * np.asarray(spacing), np.argwhere(surf_r) * np.asarray(spacing)
    return cKDTree(pts_r).query(pts_p)[0], cKDTree(pts_p).query(pts_r)[0]


def organ_metrics(pred, ref, spacing):
    """Metrics for one binary mask pair; see EMPTY_RULE for what an empty mask gives.

    pred, ref: arrays of equal shape (non-zero = organ); spacing: mm per voxel, same axis order.
    Returns {"status", "dice", "iou", "hd95", "hd", "assd", "nsd1", "nsd2", "nsd3", "vol_pred_ml",
    "vol_ref_ml"}; undefined values are None.
    """
    pred, ref = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = _check_spacing(spacing, pred.ndim)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out = {name: None for name in METRIC_NAMES}
    out.update(vol_pred_ml=n_pred * voxel_ml, vol_ref_ml=n_ref * voxel_ml)
    # --- The empty rule (EMPTY_RULE above says the same in words) ---
    if n_ref == 0:
        out["status"] = "correctly_absent" if n_pred == 0 else "false_organ"
        return out  # nothing defined; a false organ is judged by detection counts and its volume
    if n_pred == 0:
        out.update(status="missed", dice=0.0, iou=0.0, nsd1=0.0, nsd2=0.0, nsd3=0.0)
        return out  # distances to an empty surface do not exist: left None
    inter = int(np.count_nonzero(pred & ref))
    out.update(status="present_detected", dice=2.0 * inter / (n_pred + n_ref), iou=inter / (n_pred + n_ref - inter))
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    both = np.concatenate([d_pr, d_rp])
    out["hd95"] = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    out["hd"] = float(both.max())
    out["assd"] = float(both.mean())
    for k, tol in enumerate(NSD_TOLERANCES_MM, start=1):
        # 1e-6 mm slack: a distance of exactly tol (e.g. 2 x 1.0 mm) must not fail on float rounding
        out[f"nsd{k}"] = float(np.count_nonzero(both <= tol + 1e-6)) / both.size
    return out


def _as_masks(data, organs, what):
    """{organ: bool mask or None} from a label map (k = organ index + 1) or a dict of masks."""
    if isinstance(data, dict):
        return {o: (None if data.get(o) is None else np.asarray(data[o]) != 0) for o in organs}
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"{what} must be a 3D label map or a dict of masks, got shape {data.shape}")
    return {o: data == k for k, o in enumerate(organs, start=1)}


def case_metrics(pred, ref, spacing, case_id=None, organs=None):
    """One flat metrics_per_case.csv row for a case.

    pred, ref: a uint8 label map (label k = organs.index(organ) + 1) or a dict {organ: mask};
    a reference mask that is None (file absent) is treated as all-zero, the AbdomenAtlas convention.
    spacing: mm per voxel from the header of the original image, same axis order as the arrays.
    Returns {"case_id", "status_<organ>", "<metric>_<organ>", ...} (keys as csv_columns()).
    """
    organs = tuple(organs or _organs())
    pred_m, ref_m = _as_masks(pred, organs, "prediction"), _as_masks(ref, organs, "reference")
    row = {"case_id": case_id}
    for organ in organs:
        p, r = pred_m[organ], ref_m[organ]
        shape = next((m.shape for m in (p, r) if m is not None), None)
        if shape is None:
            raise ValueError(f"{organ}: neither a predicted nor a reference mask was given")
        p = np.zeros(shape, bool) if p is None else p
        r = np.zeros(shape, bool) if r is None else r
        m = organ_metrics(p, r, spacing)
        row[f"status_{organ}"] = m.pop("status")
        row.update({f"{name}_{organ}": value for name, value in m.items()})
    return row


def describe(values):
    """{"mean", "std", "median", "q1", "q3", "n"} of the defined values (None skipped).

    std is the sample standard deviation (ddof=1); 0.0 for a single value; all None when n = 0.
    """
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return dict(mean=None, std=None, median=None, q1=None, q3=None, n=0)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0, median=float(median),
                q1=float(q1), q3=float(q3), n=int(v.size))


def summarize(rows, organs=None, checkpoint=None):
    """summary_statistics.json dict from case_metrics() rows (contract schema).

    Per organ: statistics over organ-present cases (status present_detected or missed), the detection
    table by presence (tp = present_detected, fn = missed, fp = false_organ, tn = correctly_absent)
    and the predicted volumes of false organs. mean_dice_present = mean over organs of their mean
    Dice (organs with no present case are left out).
    """
    organs = tuple(organs or _organs())
    out = {"checkpoint": None if checkpoint is None else str(checkpoint), "n_cases": len(rows),
           "empty_rule": EMPTY_RULE, "organs": {}}
    for organ in organs:
        status = [r[f"status_{organ}"] for r in rows]
        present = [r for r, s in zip(rows, status) if s in ("present_detected", "missed")]
        entry = {"n_present": len(present)}
        for name in SUMMARY_METRICS:
            entry[name] = describe(r[f"{name}_{organ}"] for r in present)
        entry["detection"] = {"tp": status.count("present_detected"), "fp": status.count("false_organ"),
                              "fn": status.count("missed"), "tn": status.count("correctly_absent")}
        entry["false_organ_volumes_ml"] = [r[f"vol_pred_ml_{organ}"] for r, s in zip(rows, status)
                                           if s == "false_organ"]
        out["organs"][organ] = entry
    means = [e["dice"]["mean"] for e in out["organs"].values() if e["dice"]["mean"] is not None]
    out["mean_dice_present"] = float(np.mean(means)) if means else None
    return out


def main():
    """Smoke check: a sphere against itself shifted by two voxels, anisotropic spacing."""
    grid = np.indices((40, 40, 30)).astype(float)
    ref = ((grid[0] - 20) ** 2 + (grid[1] - 20) ** 2 + (grid[2] - 15) ** 2) <= 100
    pred = np.roll(ref, 2, axis=0)
    for key, value in organ_metrics(pred, ref, (0.8, 0.8, 2.5)).items():
        print(f"{key:12s} {value}")


if __name__ == "__main__":
    main()
