"""Check, reorient, resample and crop every case once; write arrays, per-case meta, a manifest and seeded splits.

Usage:
    python preprocessing.py                                   # config.DATA_ROOT -> config.PROCESSED_DIR
    python preprocessing.py --data-root DIR --out DIR --workers 2 [--TARGET_SPACING=3,3,3 ...]

Input: AbdomenAtlas 1.1 Mini folders DATA_ROOT/BDMAP_*/ct.nii.gz + segmentations/<organ>.nii.gz
(or combined_labels.nii.gz as a fallback). Output, per case, in OUT/cases/<case_id>/:
    ct.npy     int16 HU, canonical RAS, indexed [x, y, z], config.TARGET_SPACING, cropped to the body
    label.npy  uint8, 0 = background, k = config.ORGANS.index(organ) + 1
    meta.json  written LAST (a case folder without it is unfinished and is redone); meta["geom"] is what
               restore_labels() needs to bring a model-space label map back onto the original grid.
plus OUT/manifest.json and OUT/splits.json (written once, reused while it still covers the cases).

Geometry (one convention, used forwards and backwards): the image is first reoriented to RAS (flips and axis
permutations only, no interpolation); then model voxel i along an axis with scale f (= model voxels per
original voxel = original spacing / target spacing) has its centre at original continuous index
(i + 0.5) / f - 0.5, i.e. both grids share the outer edge of the first voxel (torch's align_corners=False).
The model grid has floor(n * f) voxels, so its spacing is exactly the target. geom["model_affine"] is the
voxel-to-world (RAS mm) affine of the cropped model-space arrays.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import zlib
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio
from scipy import ndimage
from tqdm import tqdm

import config
from fileio import write_atomic

CODE_VERSION = 1  # bump when the output of this file changes for the same settings (forces a redo)
CROP_MARGIN_MM = 10.0  # kept around the body's bounding box
MAX_SPACING_MM = 10.0  # a voxel larger than this is not a usable CT
AFFINE_TOL_MM = 1e-3  # mask vs CT: origin and spacing may differ by this much
AFFINE_TOL_ROT = 1e-4  # mask vs CT: direction cosines may differ by this much
# Overlapping annotations: the first organ listed keeps the voxel. The prostate is small and is the main
# target, so a shared voxel costs it the most; the bladder is the largest and loses the least (relatively).
OVERLAP_PRIORITY = ("prostate", "rectum", "bladder")
MASK_THRESHOLD = 0.5  # float probability masks and interpolated one-hot labels are cut here
VOLUME_THRESHOLD_RANGE = (0.3, 0.7)  # how far a resampled organ's cut may move to keep its volume
LOGIT_FLOOR = -20.0  # restore_labels: an organ's logit beyond the voxels next to what the label map keeps of it


class CaseError(ValueError):
    """A case that cannot be used; the message is one line, 'path: problem'."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), str(problem)
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # survive pickling between worker processes
        return CaseError, (self.path, self.problem)


# --- Intensity ---------------------------------------------------------------------------------------------

def normalize_hu(hu):
    """HU (numpy array or torch tensor) -> float32 in [-1, 1], same type: (clip(HU, *HU_CLIP) - centre) / half.

    A fixed window, not per-image z-scoring: HU are a calibrated physical unit, so one window means the same
    tissue everywhere, whatever the field of view or body size (per-image statistics would shift with how much
    air or bone is in the scan). The default -200..400 HU keeps fat, urine, prostate, rectal wall and contrast
    apart; air and bone saturate at -1 / +1, which is all the model needs to know about them.
    """
    lo, hi = (float(v) for v in config.HU_CLIP)
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    if isinstance(hu, torch.Tensor):
        return (hu.float().clamp(lo, hi) - centre) / half
    return ((np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - centre) / half).astype(np.float32, copy=False)


# --- Reading and checking ----------------------------------------------------------------------------------

def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else "no detail"


def _read_nifti(path):
    """(data array, affine float64, header, warnings) with a 4D singleton axis squeezed; CaseError on bad files."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, "file not found")
    try:
        img = nib.load(str(path))
    except (EOFError, zlib.error) as exc:
        raise CaseError(path, f"truncated or corrupt file ({type(exc).__name__}: {_first_line(exc)})")
    except Exception as exc:  # nibabel raises many types for garbage; the reason is all the caller needs
        raise CaseError(path, f"not a readable NIfTI file ({type(exc).__name__}: {_first_line(exc)})")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(path, f"not a NIfTI image ({type(img).__name__})")
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise CaseError(path, f"cannot read voxel data, truncated or corrupt file ({type(exc).__name__}: "
                              f"{_first_line(exc)})")
    try:  # nibabel silently "fixes" zero/negative pixdim on load; the raw header tells the truth
        with nib.openers.ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:
        pixdim = np.ones(3)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise CaseError(path, f"implausible voxel spacing {pixdim.tolist()} mm in the header (pixdim)")
    warnings = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        warnings.append(f"{path.name}: 4D with a singleton 4th axis, squeezed to 3D")
    if data.ndim != 3:
        raise CaseError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise CaseError(path, f"expected a 3D volume, got a single slice (shape {tuple(data.shape)})")
    return data, np.asarray(img.affine, dtype=np.float64), img.header, warnings


def _check_spacing(path, affine, header):
    """Voxel spacing (mm) from the affine; CaseError unless positive, finite and <= MAX_SPACING_MM."""
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for s in (zooms, spacing):  # the header's pixdim and the affine must both be sane
        if not np.all(np.isfinite(s)) or np.any(s <= 0) or np.any(s > MAX_SPACING_MM):
            raise CaseError(path, f"implausible voxel spacing {np.round(s, 4).tolist()} mm "
                                  f"(need 0 < spacing <= {MAX_SPACING_MM:g})")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CaseError(path, "singular or non-finite affine")
    return spacing


def _check_hu(path, data):
    """Refuse non-finite, constant and unrescaled CT; returns data as int16 when it holds whole numbers."""
    if data.dtype.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise CaseError(path, f"{bad} NaN/Inf voxels")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise CaseError(path, f"constant image (every voxel = {lo:g}), not a CT")
    if lo >= 0:
        raise CaseError(path, f"looks unrescaled (no air at -1000; values {lo:g}..{hi:g}): apply "
                              "RescaleSlope/Intercept to get HU")
    if data.dtype.kind == "f" and lo >= -32768 and hi <= 32767 and np.array_equal(data, np.round(data)):
        data = data.astype(np.int16)
    return data


def _same_grid(affine_a, affine_b):
    """'' when two affines describe the same grid within AFFINE_TOL_*, else the difference in words."""
    za, zb = np.linalg.norm(affine_a[:3, :3], axis=0), np.linalg.norm(affine_b[:3, :3], axis=0)
    if np.max(np.abs(za - zb)) > AFFINE_TOL_MM:
        return f"spacing {np.round(zb, 4).tolist()} != CT {np.round(za, 4).tolist()}"
    if np.max(np.abs(affine_a[:3, :3] / za - affine_b[:3, :3] / zb)) > AFFINE_TOL_ROT:
        return "direction differs from the CT"
    if np.max(np.abs(affine_a[:3, 3] - affine_b[:3, 3])) > AFFINE_TOL_MM:
        return f"origin {np.round(affine_b[:3, 3], 3).tolist()} != CT {np.round(affine_a[:3, 3], 3).tolist()}"
    return ""


def _binarize(path, data):
    """Binary uint8 mask from a mask file's values, with a warning when values needed fixing.

    Rule: {0,1} as is; {0,k} for one integer k > 1 (e.g. 0/255) -> warn, voxel > 0; floats in [0,1] that are
    not all 0/1 (probabilities) -> warn, voxel >= 0.5; anything else (negative, several labels, floats > 1,
    NaN) -> CaseError, because guessing would silently train on a wrong organ.
    """
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise CaseError(path, "mask has NaN/Inf values")
        if not np.array_equal(data, np.round(data)):
            lo, hi = float(data.min()), float(data.max())
            if lo < 0 or hi > 1:
                raise CaseError(path, f"mask values {lo:g}..{hi:g} are neither labels nor probabilities")
            note = f"{Path(path).name}: float probabilities, thresholded at {MASK_THRESHOLD}"
            return (data >= MASK_THRESHOLD).astype(np.uint8), note
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        raise CaseError(path, f"mask has negative values (min {lo:g})")
    if hi <= 1:
        return data.astype(np.uint8, copy=False), ""
    if hi > 255:
        values = np.unique(data)
    else:
        values = np.flatnonzero(np.bincount(data.astype(np.uint8, copy=False).ravel(), minlength=256))
    if len(values) > 2:
        raise CaseError(path, f"mask is not binary (values {values[:8].tolist()}{'...' if len(values) > 8 else ''})")
    return (data > 0).astype(np.uint8), f"{Path(path).name}: values {{0,{int(values[-1])}}} binarised (> 0)"


def load_ct(path):
    """Read and check a CT volume; returns a nib.Nifti1Image holding the (3D) array in memory.

    Raises CaseError(path, reason) for a missing/unreadable/truncated file, a non-3D volume (a 4D one with a
    singleton 4th axis is squeezed), non-finite values, implausible spacing, a constant image or values that
    look unrescaled. Warnings are in img.extra["warnings"].
    """
    if Path(path).is_dir():  # a DICOM CT series folder (BDMAP_x/ct/): dicom_io sorts, checks and converts it
        import dicom_io
        try:
            img, _ = dicom_io.read_ct_series(path)
        except dicom_io.DicomError as exc:
            raise CaseError(exc.path, exc.problem) from None
        data, affine, header, warnings = np.asanyarray(img.dataobj), img.affine, img.header, img.extra["warnings"]
    else:
        data, affine, header, warnings = _read_nifti(path)
    _check_spacing(path, affine, header)
    data = _check_hu(path, data)
    img = nib.Nifti1Image(data, affine)
    img.extra["warnings"] = warnings
    return img


def _check_on_ct_grid(path, data, affine, ct):
    """CaseError unless a mask (data, affine) from `path` lies on the CT's voxel grid (shape and affine)."""
    if data.shape != ct.shape:
        raise CaseError(path, f"mask shape {tuple(data.shape)} != CT shape {tuple(ct.shape)}")
    diff = _same_grid(ct.affine, affine)
    if diff:
        raise CaseError(path, f"mask affine differs from the CT: {diff}")


def _load_mask(path, ct):
    """(uint8 0/1 mask on the CT grid, warnings); CaseError on wrong grid or values."""
    data, affine, _, warnings = _read_nifti(path)
    _check_on_ct_grid(path, data, affine, ct)
    mask, warning = _binarize(path, data)
    return mask, warnings + ([warning] if warning else [])


def ct_path(case_dir):
    """The case's CT: ct.nii.gz, else a DICOM series folder ct/ (slice files, any names)."""
    case_dir = Path(case_dir)
    nifti = case_dir / "ct.nii.gz"
    return case_dir / "ct" if not nifti.is_file() and (case_dir / "ct").is_dir() else nifti


def read_case(case_dir):
    """Read and check one case folder.

    Returns dict(case_id, ct=nib image (3D, checked), masks={organ: uint8 0/1 array on the CT grid or None if
    no file has it} for config.ORGANS, extra={name: array or None} for config.EXTRA_MASKS, warnings=[str],
    overlaps={"a&b": voxels}). Masks come from segmentations/<organ>.nii.gz, else from combined_labels.nii.gz
    (values config.LABEL_VALUES). Overlapping organ voxels are given to the first organ in OVERLAP_PRIORITY.
    Raises CaseError for a case that cannot be used. An unreadable optional extra mask is only a warning.
    """
    case_dir = Path(case_dir)
    ct = load_ct(ct_path(case_dir))
    warnings = list(ct.extra.get("warnings", []))
    combined, combined_path = None, case_dir / "combined_labels.nii.gz"

    def from_combined(name):
        nonlocal combined
        if combined is None:
            data, affine, _, w = _read_nifti(combined_path)
            _check_on_ct_grid(combined_path, data, affine, ct)
            if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
                raise CaseError(combined_path, "label map holds non-integer values")
            warnings.extend(w)
            combined = data
        return (combined == config.LABEL_VALUES[name]).astype(np.uint8)

    def read(name, optional):
        path = case_dir / "segmentations" / f"{name}.nii.gz"
        try:
            if path.is_file():
                mask, w = _load_mask(path, ct)
                warnings.extend(w)
                return mask
            if combined_path.is_file() and name in config.LABEL_VALUES:
                return from_combined(name)
        except CaseError as exc:
            if not optional:
                raise
            warnings.append(f"{name} ignored: {exc}")
        return None

    masks = {organ: read(organ, optional=False) for organ in config.ORGANS}
    extra = {name: read(name, optional=True) for name in config.EXTRA_MASKS}
    for organ, mask in masks.items():
        if mask is None:
            warnings.append(f"no mask for {organ} (treated as absent)")
    overlaps = _resolve_overlaps(masks)
    if overlaps:
        warnings.append(f"overlapping organ voxels {overlaps} resolved by priority {list(OVERLAP_PRIORITY)}")
    return dict(case_id=case_dir.name, ct=ct, masks=masks, extra=extra, warnings=warnings, overlaps=overlaps)


def _resolve_overlaps(masks):
    """Count pairwise overlaps and make the masks exclusive in place (OVERLAP_PRIORITY order wins)."""
    present = [o for o in masks if masks[o] is not None and masks[o].any()]
    overlaps = {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            n = int(np.count_nonzero(masks[a] & masks[b]))
            if n:
                overlaps[f"{a}&{b}"] = n
    if overlaps:
        order = [o for o in OVERLAP_PRIORITY if o in present] + [o for o in present if o not in OVERLAP_PRIORITY]
        taken = np.zeros_like(masks[order[0]], dtype=bool)  # same memory order as the masks: mixing C and
        # Fortran order (NIfTI data is Fortran) makes these element-wise ops ~10x slower
        for organ in order:
            masks[organ] = (masks[organ].astype(bool) & ~taken).astype(np.uint8)
            taken |= masks[organ].astype(bool)
    return overlaps


# --- Geometry ----------------------------------------------------------------------------------------------

def _to_ras(data, geom):
    return nio.apply_orientation(data, nio.ornt_transform(np.array(geom["orientation_ornt"]), nio.axcodes2ornt("RAS")))


def _from_ras(data, geom):
    return nio.apply_orientation(data, nio.ornt_transform(nio.axcodes2ornt("RAS"), np.array(geom["orientation_ornt"])))


def _geometry(img):
    """Everything about the grids that does not need the voxel values (JSON-serialisable)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    shape = tuple(int(s) for s in img.shape[:3])
    ornt = nio.io_orientation(affine)
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    ras_affine = affine @ nio.inv_ornt_aff(transform, shape)
    ras_shape = [0, 0, 0]
    for ax, (new_ax, _) in enumerate(transform):
        ras_shape[int(new_ax)] = shape[ax]
    ras_spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    target = np.asarray(config.TARGET_SPACING, dtype=np.float64)
    scale = ras_spacing / target
    scale[np.abs(scale - 1) < 1e-4] = 1.0  # float32 header noise must not resample a grid already on target
    resampled = []
    for ax in range(3):
        n = float(ras_shape[ax]) * scale[ax]
        if n - math.floor(n) > 1 - 1e-3:  # 255.9999 means 256: nudge the scale instead of losing a voxel
            scale[ax] = math.ceil(n) / ras_shape[ax]
            while math.floor(float(ras_shape[ax]) * scale[ax]) < math.ceil(n):
                scale[ax] = np.nextafter(scale[ax], np.inf)
        resampled.append(math.floor(float(ras_shape[ax]) * scale[ax]))  # torch's own formula for the size
    if min(resampled) < 1:
        raise ValueError(f"image of {shape} voxels is smaller than one voxel at TARGET_SPACING {target.tolist()} mm")
    step = np.eye(4)
    step[:3, :3] = np.diag(1.0 / scale)
    step[:3, 3] = 0.5 / scale - 0.5
    return dict(original_shape=list(shape), original_affine=affine.tolist(),
                original_spacing=[float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                orientation="".join(nio.aff2axcodes(affine)), orientation_ornt=ornt.tolist(),
                ras_shape=list(ras_shape), ras_affine=ras_affine.tolist(), ras_spacing=ras_spacing.tolist(),
                scale=scale.tolist(), target_spacing=target.tolist(), resampled_shape=resampled,
                resampled_affine=(ras_affine @ step).tolist())


def _resample_ct(ras, geom):
    """RAS volume (any dtype, any memory layout) -> float32 on the resampled grid, indexed [x, y, z] (possibly a
    non-contiguous view). Trilinear, torch align_corners=False with our exact scale.

    NIfTI voxels arrive in Fortran order; the axes are permuted so that the one int16 -> float32 copy streams
    through memory and torch gets a contiguous tensor, then permuted back (views, no copies).

    Measured on 2 cores, 512x512x300 -> 273x273x300: torch F.interpolate 0.3 s, scipy.ndimage.zoom(order=1)
    1.2 s, affine_transform(order=1) 1.0 s; torch it is. Passing scale_factor (not size) with
    recompute_scale_factor=False makes torch use exactly our scale in the coordinate map.
    """
    scale = geom["scale"]
    perm = [int(a) for a in np.argsort([-abs(s) for s in ras.strides], kind="stable")]  # slowest axis first
    x = np.ascontiguousarray(ras.transpose(perm), dtype=np.float32)
    if any(s != 1.0 for s in scale):
        t = F.interpolate(torch.from_numpy(x)[None, None], scale_factor=tuple(float(scale[a]) for a in perm),
                          mode="trilinear", align_corners=False, recompute_scale_factor=False)[0, 0]
        x = t.numpy()
    out = x.transpose(np.argsort(perm))
    assert list(out.shape) == list(geom["resampled_shape"]), (out.shape, geom["resampled_shape"])
    return out


def _body_box(hu, geom):
    """[[lo, hi), ...] crop box on the resampled grid: largest component above BODY_THRESHOLD_HU + margin."""
    body = hu > float(config.BODY_THRESHOLD_HU)
    stride = 2 if body.size > 8_000_000 else 1  # the margin covers the stride; labelling 22 M voxels costs ~1 s
    coarse = body[::stride, ::stride, ::stride]
    labels, n = ndimage.label(coarse)
    full = [[0, int(s)] for s in hu.shape]
    if n == 0:
        return full, "no voxel above BODY_THRESHOLD_HU: not cropped"
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    obj = _bbox(labels == int(sizes.argmax()))
    margin = np.ceil(CROP_MARGIN_MM / np.asarray(geom["target_spacing"])).astype(int)
    box = []
    for ax, (start, stop) in enumerate(obj):
        lo = start * stride - margin[ax]
        hi = stop * stride + margin[ax]
        box.append([int(max(0, lo)), int(min(hu.shape[ax], hi))])
    return box, ""


def prepare_ct(img):
    """CT image -> (int16 HU array in model space [x, y, z], geom dict).

    Model space = canonical RAS, config.TARGET_SPACING (mm), cropped to the body (largest connected component
    above config.BODY_THRESHOLD_HU plus CROP_MARGIN_MM). Trilinear resampling. geom is JSON-serialisable and is
    what restore_labels() and prepare_labels() need; geom["model_affine"] maps model voxels to world mm.
    """
    geom = _geometry(img)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    hu = _resample_ct(_to_ras(data, geom), geom)
    box, warning = _body_box(hu, geom)
    geom["crop_box"] = box
    geom["warnings"] = [warning] if warning else []
    sl = tuple(slice(lo, hi) for lo, hi in box)
    out = np.empty([hi - lo for lo, hi in box], dtype=np.int16)  # C order: patches are cut along any axis
    np.rint(np.clip(hu[sl], -32768, 32767), out=out, casting="unsafe")
    shift = np.eye(4)
    shift[:3, 3] = [lo for lo, _ in box]
    geom["model_shape"] = list(out.shape)
    geom["model_affine"] = (np.asarray(geom["resampled_affine"]) @ shift).tolist()
    geom["spacing"] = geom["target_spacing"]  # nominal; the exact one (within 1e-4) is model_spacing
    geom["model_spacing"] = [float(v) for v in np.linalg.norm(np.asarray(geom["model_affine"])[:3, :3], axis=0)]
    return out, geom


def _bbox(mask):
    """[(lo, hi), ...] bounding box of the non-zero voxels, or None. Axis projections: ~40x faster than
    ndimage.find_objects on a 512x512x300 mask."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if not len(hit):
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box


def _bbox_block(mask, offset, grid_shape, values=None, fill=0.0):
    """(float32 block, origin) covering mask's object plus one voxel of `fill`, on a grid of grid_shape where mask
    is known from `offset` on (`fill` elsewhere); the block holds the mask (0/1), or `values` (an array of the
    mask's shape) where the mask is set. None when the mask is empty."""
    obj = _bbox(mask)
    if obj is None:
        return None
    lo = [max(0, a + o - 1) for (a, _), o in zip(obj, offset)]
    hi = [min(s, b + o + 1) for (_, b), o, s in zip(obj, offset, grid_shape)]
    block = np.full([h - l for l, h in zip(lo, hi)], fill, dtype=np.float32)
    src = tuple(slice(max(l - o, 0), min(h - o, m)) for l, h, o, m in zip(lo, hi, offset, mask.shape))
    dst = tuple(slice(s.start + o - l, s.stop + o - l) for s, o, l in zip(src, offset, lo))
    block[dst] = mask[src] if values is None else np.where(mask[src], values[src], fill)
    return block, lo


def _labelwise(blocks, src_shape, dst_box, scale_src_per_dst, logits=False):
    """Label-wise linear resampling onto dst_box ([[lo, hi), ...] of the destination grid) -> uint8.

    blocks: {k: (float32 block, origin) on the source grid}, each organ's one-hot (0/1), or its logit when
    `logits`. Each is interpolated linearly on its own bounding box only (cheap); a voxel takes the organ with the
    largest value if that is above the cut: 0 (the background's logit) for logits; for one-hot blocks
    MASK_THRESHOLD, moved (within VOLUME_THRESHOLD_RANGE) so that the organ keeps its volume: a plain 0.5 cut
    shrinks thin or curved organs by 1-3 % at 3 mm (linear interpolation rounds off convex corners), a matched
    cut keeps them within ~0.5 % and costs one np.partition per organ.
    scale_src_per_dst[ax] = source voxels per destination voxel; indices follow the module's edge-aligned
    convention.
    """
    r = np.asarray(scale_src_per_dst, dtype=np.float64)
    src_of = lambda ax, i: (i + 0.5) * r[ax] - 0.5  # destination index -> source continuous index
    dst_of = lambda ax, j: (j + 0.5) / r[ax] - 0.5
    out_shape = [hi - lo for lo, hi in dst_box]
    label = np.zeros(out_shape, dtype=np.uint8)
    best = np.full(out_shape, 0.0 if logits else MASK_THRESHOLD, dtype=np.float32)
    for k, (block, origin) in blocks.items():
        lo, hi, clipped = [], [], False
        for ax in range(3):
            a, b = origin[ax], origin[ax] + block.shape[ax]
            full_lo = int(np.floor(dst_of(ax, a))) if a > 0 else 0
            full_hi = int(np.ceil(dst_of(ax, b - 1))) + 1 if b < src_shape[ax] else dst_box[ax][1]
            lo.append(max(dst_box[ax][0], full_lo))
            hi.append(min(dst_box[ax][1], full_hi))
            clipped |= lo[-1] > full_lo or hi[-1] < full_hi
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        offset = [src_of(ax, lo[ax]) - origin[ax] for ax in range(3)]
        # 'nearest' only matters at true grid edges: elsewhere the block already ends in a zero (or floor) layer
        prob = ndimage.affine_transform(block, r, offset=offset, output_shape=tuple(h - l for l, h in zip(lo, hi)),
                                        order=1, mode="nearest")
        if not logits and not clipped:  # a whole organ's one-hot: match its volume
            n_keep = int(round(float(block.sum()) / float(np.prod(r))))
            flat = prob.ravel()
            if 0 < n_keep < flat.size:
                cut = float(np.partition(flat, flat.size - n_keep - 1)[flat.size - n_keep - 1])  # (n_keep+1)-th largest
                prob += MASK_THRESHOLD - float(np.clip(cut, *VOLUME_THRESHOLD_RANGE))
        sl = tuple(slice(l - box[0], h - box[0]) for l, h, box in zip(lo, hi, dst_box))
        win = prob > best[sl]
        best[sl][win] = prob[win]
        label[sl][win] = k
    return label


def prepare_labels(masks, geom):
    """{organ: uint8 mask on the original grid or None} -> uint8 label map in model space (the grid of the CT
    from prepare_ct with this geom). Label k = config.ORGANS.index(organ) + 1; masks must be mutually
    exclusive (read_case makes them so)."""
    box = geom["crop_box"]
    ras = {config.ORGANS.index(o) + 1: _to_ras(m, geom) for o, m in masks.items()
           if m is not None and o in config.ORGANS}
    if all(s == 1.0 for s in geom["scale"]):  # same spacing: exact, no interpolation
        label = np.zeros(geom["model_shape"], dtype=np.uint8)
        for k, m in ras.items():
            label[m[tuple(slice(lo, hi) for lo, hi in box)] > 0] = k
        return label
    blocks = {}
    for k, m in ras.items():
        b = _bbox_block(m, (0, 0, 0), m.shape)
        if b is not None:
            blocks[k] = b
    return _labelwise(blocks, geom["ras_shape"], box, [1.0 / s for s in geom["scale"]])


def restore_labels(label_map, geom, logits=None):
    """uint8 label map in model space (shape geom["model_shape"]) -> uint8 label map on the ORIGINAL grid
    (shape geom["original_shape"], axis order of the original file; save it with the original affine).

    Undoes the crop (outside it = background), the resampling and the reorientation (exact). The resampling is
    exact when none was needed; else, given the organ logits (n, X, Y, Z) the label map came from (their
    argmax against the background's 0, after any offset), each organ's logit is interpolated linearly around
    what the map keeps of it and a voxel takes the largest above 0, so a boundary lands where the net put it
    between two model voxels (as nnU-Net resamples probabilities, not labels); without logits, label-wise
    linear (the one-hot of each label).
    """
    label_map = np.asarray(label_map)
    if list(label_map.shape) != list(geom["model_shape"]):
        raise ValueError(f"label map shape {tuple(label_map.shape)} != model shape {tuple(geom['model_shape'])}")
    if logits is not None and tuple(np.shape(logits)[1:]) != label_map.shape:
        raise ValueError(f"logits of shape {tuple(np.shape(logits))} for a label map of shape {label_map.shape}")
    box = geom["crop_box"]
    offset = [lo for lo, _ in box]
    if all(s == 1.0 for s in geom["scale"]):
        ras = np.zeros(geom["ras_shape"], dtype=np.uint8)
        ras[tuple(slice(lo, hi) for lo, hi in box)] = label_map
    else:
        blocks, grid = {}, geom["resampled_shape"]
        for k in np.unique(label_map):
            if not k:
                continue
            if logits is None:
                blocks[int(k)] = _bbox_block(label_map == k, offset, grid)
            else:  # the organ's logit next to what the map keeps of it, LOGIT_FLOOR beyond (a removed piece stays gone)
                near = ndimage.binary_dilation(label_map == k, np.ones((3, 3, 3), bool))
                blocks[int(k)] = _bbox_block(near, offset, grid, np.asarray(logits[k - 1]), LOGIT_FLOOR)
        ras = _labelwise(blocks, grid, [[0, s] for s in geom["ras_shape"]], geom["scale"], logits is not None)
    return np.ascontiguousarray(_from_ras(ras, geom), dtype=np.uint8)


# --- Per-case processing -----------------------------------------------------------------------------------

def settings_used():
    """The settings that change what preprocessing writes (hashed into every meta.json)."""
    return dict(TARGET_SPACING=[float(v) for v in config.TARGET_SPACING],
                BODY_THRESHOLD_HU=float(config.BODY_THRESHOLD_HU), ORGANS=list(config.ORGANS),
                LABEL_VALUES=dict(config.LABEL_VALUES), CROP_MARGIN_MM=CROP_MARGIN_MM,
                OVERLAP_PRIORITY=list(OVERLAP_PRIORITY), MASK_THRESHOLD=MASK_THRESHOLD,
                VOLUME_THRESHOLD_RANGE=list(VOLUME_THRESHOLD_RANGE), CODE_VERSION=CODE_VERSION)


def settings_hash(settings=None):
    text = json.dumps(settings or settings_used(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(case_dir):
    """{relative path: [size, mtime_ns]} of the input files, so an edited input is redone."""
    case_dir = Path(case_dir)
    files = [case_dir / "ct.nii.gz", case_dir / "combined_labels.nii.gz"]
    files += sorted(p for p in (case_dir / "ct").rglob("*") if p.is_file()) if (case_dir / "ct").is_dir() else []
    files += sorted((case_dir / "segmentations").glob("*.nii.gz"))
    return {str(p.relative_to(case_dir)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}


def save_npy(path, array):
    write_atomic(path, lambda f: np.save(f, array))


def save_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _organ_stats(mask, affine, voxel_ml):
    """Presence, voxels, mL, world z-extent (mm, of voxel centres) and FOV-edge contact of a mask (orig grid).
    edge_sides names the anatomical sides of the field of view the organ touches: "I" = cut at the inferior end."""
    if mask is None:
        return dict(present=False, file=False, voxels=0, ml=0.0, z_extent_mm=None, touches_fov_edge=False,
                    edge_sides=[])
    n = int(np.count_nonzero(mask))
    stats = dict(present=n > 0, file=True, voxels=n, ml=round(n * voxel_ml, 4), z_extent_mm=None,
                 touches_fov_edge=False, edge_sides=[])
    if n:
        sl = [slice(a, b) for a, b in _bbox(mask)]
        corners = np.array([[i, j, k, 1.0] for i in (sl[0].start, sl[0].stop - 1)
                            for j in (sl[1].start, sl[1].stop - 1) for k in (sl[2].start, sl[2].stop - 1)])
        z = (corners @ np.asarray(affine).T)[:, 2]  # bounding-box corners: exact for axis-aligned grids
        stats["z_extent_mm"] = [round(float(z.min()), 3), round(float(z.max()), 3)]
        codes = nio.aff2axcodes(affine)
        opposite = dict(zip("LRAPSI", "RLPAIS"))  # index 0 faces away from the axis code, the last index toward it
        sides = [opposite[codes[ax]] for ax, s in enumerate(sl) if s.start == 0]
        sides += [codes[ax] for ax, s in enumerate(sl) if s.stop == mask.shape[ax]]
        stats["touches_fov_edge"] = bool(sides)
        stats["edge_sides"] = sides
    return stats


def process_case(case_dir, out_case_dir):
    """Check and convert one case; writes ct.npy, label.npy, then meta.json. Returns the meta dict.
    Raises CaseError when the case cannot be used."""
    case_dir, out_case_dir = Path(case_dir), Path(out_case_dir)
    case = read_case(case_dir)
    ct = case["ct"]
    try:
        hu, geom = prepare_ct(ct)
    except ValueError as exc:
        raise CaseError(ct_path(case_dir), str(exc)) from None
    label = prepare_labels(case["masks"], geom)
    warnings = case["warnings"] + geom.pop("warnings")
    voxel_ml = float(np.prod(geom["original_spacing"])) / 1000.0
    organs = {o: _organ_stats(case["masks"][o], ct.affine, voxel_ml) for o in config.ORGANS}
    for k, o in enumerate(config.ORGANS, start=1):
        organs[o]["voxels_model"] = int(np.count_nonzero(label == k))
        if organs[o]["present"] and not organs[o]["voxels_model"]:
            warnings.append(f"{o}: present on the original grid but lost in model space "
                            "(tiny, or outside the body crop)")
    extra = {name: _organ_stats(m, ct.affine, voxel_ml) for name, m in case["extra"].items()}
    out_case_dir.mkdir(parents=True, exist_ok=True)
    (out_case_dir / "meta.json").unlink(missing_ok=True)  # from now on the folder is "unfinished"
    for stale in out_case_dir.glob(".*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    save_npy(out_case_dir / "ct.npy", hu)
    save_npy(out_case_dir / "label.npy", label)
    meta = dict(case_id=case["case_id"], source=str(case_dir), settings_hash=settings_hash(),
                settings=settings_used(), inputs=_fingerprint(case_dir), geom=geom,
                hu_range=[int(hu.min()), int(hu.max())], organs=organs, extra_masks=extra,
                overlaps=case["overlaps"], warnings=warnings)
    save_json(out_case_dir / "meta.json", meta)  # last: its presence means the case is complete
    return meta


def _is_done(case_dir, out_case_dir):
    """The saved meta if this case is complete with today's settings and unchanged inputs, else None."""
    try:
        meta = json.loads((Path(out_case_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("settings_hash") != settings_hash() or meta.get("inputs") != _fingerprint(case_dir):
        return None
    if not all((Path(out_case_dir) / f).is_file() for f in ("ct.npy", "label.npy")):
        return None
    return meta


def _worker(job):
    """(case_dir, out_case_dir) -> ("done"|"reused", meta) or ("skipped", reason). Runs in a pool."""
    case_dir, out_case_dir = job
    meta = _is_done(case_dir, out_case_dir)
    if meta is not None:
        return "reused", meta
    try:
        return "done", process_case(case_dir, out_case_dir)
    except CaseError as exc:
        (Path(out_case_dir) / "meta.json").unlink(missing_ok=True)
        return "skipped", str(exc)
    except MemoryError:
        return "skipped", f"{case_dir}: out of memory"
    except Exception as exc:  # a bug or an input we did not foresee: keep going, but say so loudly
        return "skipped", f"{case_dir}: unexpected error ({type(exc).__name__}: {_first_line(exc)}); please report"


def _init_worker(threads, settings):
    """A spawned worker starts from config.py's defaults: give it this run's settings."""
    torch.set_num_threads(threads)
    config.restore(settings)


# --- Dataset: cases, splits, manifest ----------------------------------------------------------------------

def find_cases(data_root):
    """Sorted case folders: BDMAP_* sub-folders, else any sub-folder holding a ct.nii.gz."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found (set --data-root or PELVIS_DATA_ROOT)")
    cases = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("BDMAP_"))
    if not cases:
        cases = sorted(p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    if not cases:
        raise FileNotFoundError(f"{root}: no BDMAP_* case folders (expected BDMAP_xxxxxxxx/ct.nii.gz)")
    return cases


def _split_sizes(n, fractions):
    """Case counts per split; every split with a non-zero fraction gets >= 1 case when n allows, train first."""
    fr = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    sizes = np.floor(fr * n).astype(int)
    priority = (0, 2, 1)  # on equal remainders: train, then test, then val
    for i in sorted(range(3), key=lambda i: (-(fr[i] * n - sizes[i]), priority[i]))[: n - sizes.sum()]:
        sizes[i] += 1
    for i in (0, 2, 1):  # a tiny dataset: train, then test, then val get their first case
        while sizes[i] == 0 and fr[i] > 0 and n >= 1:
            donor = int(np.argmax(sizes))
            if sizes[donor] <= 1:
                break
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes.tolist()


def make_splits(case_organs, fractions, seed, previous=None):
    """{"seed", "train", "val", "test"} from {case_id: [present organs]}.

    Stratified greedy: cases carrying the rarest organs are placed first, each into the split (with room left)
    that still lacks most of its organs; ties go to the emptiest split, then train > test > val. So every split
    gets a case with each organ whenever there are enough such cases. With `previous` (an older splits dict),
    cases already assigned stay where they were (no test case ever moves into train); new cases fill the
    splits furthest below their target size.
    """
    names = ("train", "val", "test")
    rng = np.random.default_rng(seed)
    ids = sorted(case_organs)
    order = [ids[i] for i in rng.permutation(len(ids))]
    splits = {s: [] for s in names}
    if previous:
        for s in names:
            splits[s] = [c for c in previous.get(s, []) if c in case_organs]
    placed = {c for s in names for c in splits[s]}
    todo = [c for c in order if c not in placed]
    sizes = dict(zip(names, _split_sizes(len(ids), fractions)))
    counts = {o: sum(o in case_organs[c] for c in ids) for o in config.ORGANS}
    todo.sort(key=lambda c: min([counts[o] for o in case_organs[c]] or [len(ids) + 1]))  # stable: rng order kept
    tie = {"train": 0, "test": 1, "val": 2}
    for c in todo:
        def score(s):
            lacking = sum(1 for o in case_organs[c] if not any(o in case_organs[x] for x in splits[s]))
            room = sizes[s] - len(splits[s])
            return (room > 0, lacking if room > 0 else 0, room / max(sizes[s], 1), -tie[s])
        splits[max(names, key=score)].append(c)
    return dict(seed=int(seed), fractions=[float(f) for f in fractions], **{s: sorted(splits[s]) for s in names})


def _stats(metas):
    """Dataset statistics for the manifest: spacing and organ presence / volume."""
    if not metas:
        return dict(n_cases=0)
    sp = np.array([m["geom"]["original_spacing"] for m in metas])
    out = dict(n_cases=len(metas),
               spacing_mm={k: np.round(f(sp, axis=0), 4).tolist() for k, f in
                           (("min", np.min), ("median", np.median), ("max", np.max))},
               orientations={}, organ_present={}, organ_ml={})
    for m in metas:
        out["orientations"][m["geom"]["orientation"]] = out["orientations"].get(m["geom"]["orientation"], 0) + 1
    for o in config.ORGANS:
        ml = [m["organs"][o]["ml"] for m in metas if m["organs"][o]["present"]]
        out["organ_present"][o] = len(ml)
        out["organ_ml"][o] = dict(min=min(ml), median=float(np.median(ml)), max=max(ml)) if ml else None
    return out


def preprocess(data_root=None, out_dir=None, workers=None):
    """Process every case of data_root (default config.DATA_ROOT) into out_dir (default config.PROCESSED_DIR).

    Idempotent: a case whose meta.json carries today's settings hash and input fingerprint is reused; changed
    or unfinished ones are redone. Failing cases are skipped with their reason. Returns the manifest dict
    (also written to out_dir/manifest.json); manifest["run"] counts processed / reused / skipped cases.
    """
    data_root = Path(data_root if data_root is not None else config.DATA_ROOT)
    out_dir = Path(out_dir if out_dir is not None else config.PROCESSED_DIR)
    workers = int(workers if workers is not None else config.NUM_WORKERS)
    cases = find_cases(data_root)
    try:
        (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a path through a regular file, read-only disk
        raise ValueError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None
    settings = settings_used()
    jobs = [(str(c), str(out_dir / "cases" / c.name)) for c in cases]
    bar = dict(total=len(jobs), desc="preprocess", unit="case", disable=not sys.stderr.isatty())
    if workers <= 1 or len(jobs) == 1:
        results = [_worker(j) for j in tqdm(jobs, **bar)]
    else:
        # Spawned, not forked: a worker forked from a process whose PyTorch (OpenMP) threads have run (training,
        # then evaluate preprocessing held-out cases) hangs in its first multi-threaded op.
        threads = max(1, (os.cpu_count() or 1) // workers)
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker,
                                                       initargs=(threads, config.settings())) as pool:
            results = list(tqdm(pool.imap(_worker, jobs), **bar))
    metas, skipped, run = [], [], dict(processed=0, reused=0, skipped=0)
    for (case_dir, _), (status, payload) in zip(jobs, results):
        if status == "skipped":
            skipped.append(dict(case_id=Path(case_dir).name, reason=payload))
            run["skipped"] += 1
        else:
            metas.append(payload)
            run["processed" if status == "done" else "reused"] += 1
    manifest = dict(settings=settings, settings_hash=settings_hash(settings), data_root=str(data_root),
                    cases=[dict(case_id=m["case_id"], ok=True, model_shape=m["geom"]["model_shape"],
                                original_shape=m["geom"]["original_shape"],
                                spacing=m["geom"]["original_spacing"], orientation=m["geom"]["orientation"],
                                organs_present={o: m["organs"][o]["present"] for o in config.ORGANS},
                                organ_ml={o: m["organs"][o]["ml"] for o in config.ORGANS},
                                n_warnings=len(m["warnings"])) for m in metas],
                    skipped=skipped, stats=_stats(metas), run=run)
    save_json(out_dir / "manifest.json", manifest)
    _write_splits(out_dir, {m["case_id"]: [o for o in config.ORGANS if m["organs"][o]["present"]] for m in metas})
    return manifest


def _write_splits(out_dir, case_organs):
    """splits.json: reused unchanged while it holds exactly the usable cases; otherwise updated (see make_splits)."""
    path = Path(out_dir) / "splits.json"
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
    if previous and previous.get("seed") == config.SEED:
        held = sorted(c for s in ("train", "val", "test") for c in previous.get(s, []))
        if held == sorted(case_organs):
            return previous
    else:
        previous = None
    splits = make_splits(case_organs, config.SPLIT_FRACTIONS, config.SEED, previous)
    save_json(path, splits)
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None, help="folder of BDMAP_* cases (config.DATA_ROOT)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (config.PROCESSED_DIR)")
    parser.add_argument("--workers", type=int, default=None, help="processes (config.NUM_WORKERS)")
    args, rest = parser.parse_known_args(argv)
    profile, overrides = config.configure(rest)  # device profile (e.g. cpu: 3 mm) and --NAME=value overrides
    print(f"preprocess: profile {profile}, TARGET_SPACING {tuple(config.TARGET_SPACING)} mm"
          + (f", overrides {overrides}" if overrides else ""))
    manifest = preprocess(args.data_root, args.out, args.workers)
    run = manifest["run"]
    print(f"preprocess: {run['processed']} processed, {run['reused']} reused, {run['skipped']} skipped "
          f"-> {args.out or config.PROCESSED_DIR}")
    for s in manifest["skipped"]:
        print(f"  skipped {s['reason']}")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:  # a usage problem (SettingError is one): one line, no traceback
        sys.exit(f"preprocessing: {exc}")
