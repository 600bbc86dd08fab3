"""Synthetic pelvic CT phantom: the embedded default dataset and test fixture (AbdomenAtlas 1.1 layout).

Usage:
    python phantom.py --out data --cases 36 --seed 0 [--grid demo|ct] [--style train|ood] [--workers 2]
    python phantom.py --preview analysis/phantom_preview.png --out data     # contour figure of a few cases
    python phantom.py --dicom --out dicom_phantom --cases 2                  # DICOM CT series + RTSTRUCT per case

Anatomy is defined in patient world coordinates, RAS+ millimetres (+x toward the patient's Left,
+y Anterior, +z Superior; origin on the midline at the top of the pubic symphysis), sampled onto a
canonical RAS voxel grid indexed [x, y, z], and finally stored in a random orientation (RAS, LPS,
LAS, LPI, RPS, ...) with the affine that keeps every voxel's world position truthful.

Each structure is a "level field" d (about mm, d <= 0 inside) evaluated only inside its bounding
box: ellipsoids, capsules (tubes between two points) and z-tubes (an ellipse per axial slice whose
centre and axes follow control points along z). A smooth random displacement (a few low-frequency
sinusoids per axis) makes every shape organic. Tissues are painted in order (later wins), organ masks
are exactly the voxels painted with organ tissue, then the image gets partial-volume blur, correlated
noise and is rounded to int16 HU.

Two styles (STYLES): "train" is what the pipeline learns from, domain-randomised (tissue HU, shapes, sizes,
fields of view from pelvis-only to chest-only, implants and artefacts drawn from wide ranges, so that shape and
context rather than one phantom's exact HU identify an organ); "ood" is the held-out style of the generalisation
check: ranges and anatomy variants that "train" never draws. It must never be used to train or pick a checkpoint.
"""
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import nibabel as nib
from scipy import ndimage

import config
import status
from fileio import save_nifti_atomic, write_text_atomic

MASK_NAMES = ("prostate", "bladder", "rectum", "femur_left", "femur_right")

# --- Tissue HU: (low, high) of the per-case mean, from the CT literature -------------------
# Every case draws its own mean in the range (scanner calibration, hydration and contrast differ).
TISSUE_HU = {
    "air": (-1005, -995),
    "gas": (-1000, -900),          # bowel gas (partial volume with the wall lifts it a little)
    "fat": (-115, -85),            # subcutaneous and pelvic fat, -100 +- 20
    "skin": (20, 40),
    "muscle": (40, 60),
    "cortical": (700, 1200),       # cortical bone shell
    "trabecular": (150, 300),      # cancellous bone core
    "marrow": (-20, 60),           # fatty marrow of the femoral shaft
    "disc": (70, 95),              # intervertebral disc
    "csf": (5, 15),
    "urine": (0, 15),
    "excreted_contrast": (300, 900),  # dependent layer in the bladder on delayed scans
    "bladder_wall": (35, 50),
    "prostate": (30, 50),
    "rectal_wall": (30, 50),
    "stool": (-60, 40),            # base of mottled stool; gas bubbles are painted on top
    "seminal_vesicle": (25, 45),
    "uterus": (40, 60),
    "bowel_wall": (35, 50),
    "bowel_fluid": (5, 20),
    "oral_contrast": (200, 350),
    "blood": (35, 50),             # unenhanced vessel
    "artery_enhanced": (200, 350),
    "vein_enhanced": (120, 180),
    "kidney": (25, 40),
    "liver": (50, 65),
    "lung": (-880, -780),          # aerated lung parenchyma (partial volume with small vessels)
    "heart_enhanced": (150, 450),  # contrast-filled cardiac chambers: organ-like shape, bright
    "calcification": (300, 800),   # phleboliths, prostatic calcifications
    "table_shell": (150, 350),     # carbon-fibre table skin
    "table_core": (-900, -800),    # table foam core
}
ENHANCEMENT_HU = {"prostate": 25, "uterus": 50, "bowel_wall": 30, "kidney": 120, "liver": 50,
                  "seminal_vesicle": 5, "bladder_wall": 20, "rectal_wall": 20}  # added when IV contrast

RANDOMISED_TISSUES = ("fat", "muscle", "prostate", "rectal_wall", "bladder_wall", "seminal_vesicle", "uterus",
                      "bowel_wall", "blood", "kidney", "liver", "stool")  # soft tissues whose ranges widen by the
# style's hu_spread, so that organs and their neighbours overlap in HU and only shape and context tell them apart
ORIENTATIONS = {"LPS": 0.35, "RAS": 0.2, "LAS": 0.15, "LPI": 0.1, "RPS": 0.1, "RAI": 0.1}  # storage codes
FEMALE_FRACTION = 0.4
Z_RANGES = {"pelvis": (-110, 170), "abdomen_pelvis": (-110, 430), "abdomen": (170, 430),
            "chest": (390, 700)}  # mm, before jitter; the femoral heads are at z ~ 5
ORGAN_REGION_Z = {"prostate": (-45, -15), "bladder": (-20, 40), "rectum": (-60, 60)}  # mm x scale: where each
# organ lies in any patient; an empty mask is "absent" when this region is in the scan, else "not_imaged"

# --- Styles: how far patients and scanners vary ------------------------------------------------
# A range is a tuple of (low, high) intervals: a draw picks an interval (by width), then a value in it.
STYLES = {
    "train": dict(
        fovs={"pelvis": 0.35, "abdomen_pelvis": 0.3, "abdomen": 0.17, "chest": 0.18},
        scale=((0.86, 1.16),), fat=(3, 55), bladder_ml=(15, 700), prostate_ml=(15, 120),
        rectum_radius={"gas": (13, 30), "stool": (12, 28), "collapsed": (5, 10), "fluid": (10, 22)},
        rectum_sway=0.0, rectum_x=8, warp=1.0, hu_spread=15, hu_offset=((-12, 12),), noise_sd=(5, 45),
        blur=(0.7, 1.4), p_fiducials=0.25, p_spacer=0.12, p_catheter=0.1, p_prosthesis=0.1,
        p_bilateral_prosthesis=0.0, bladder_power=2.0, p_median_lobe=0.0),
    # Held out: body sizes, scanner calibration and noise outside the training ranges, boxy bladders, a
    # median prostate lobe bulging into the bladder, a tortuous wide rectum, both hips replaced, stronger warps.
    "ood": dict(
        fovs={"pelvis": 0.45, "abdomen_pelvis": 0.15, "abdomen": 0.2, "chest": 0.2},
        scale=((0.80, 0.86), (1.16, 1.22)), fat=(3, 60), bladder_ml=(40, 800), prostate_ml=(40, 140),
        rectum_radius={"gas": (24, 33), "stool": (22, 32), "collapsed": (6, 9), "fluid": (16, 24)},
        rectum_sway=14.0, rectum_x=14, warp=1.8, hu_spread=15, hu_offset=((-30, -14), (14, 30)),
        noise_sd=(45, 65), blur=(0.6, 1.6), p_fiducials=0.3, p_spacer=0.15, p_catheter=0.15, p_prosthesis=0.25,
        p_bilateral_prosthesis=0.6, bladder_power=3.0, p_median_lobe=0.5),
}
GRIDS = {  # in-plane spacing range (mm), slice spacing choices (mm)
    "demo": ((2.0, 2.5), (2.5, 3.0, 4.0, 5.0)),
    "ct": ((0.6, 1.0), (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)),
}
CT_MATRIX = 512  # in-plane matrix of the "ct" grid
COMPRESS_LEVEL = 1  # gzip level: level 1 is ~5x faster than 9 and only ~10 % bigger
WRITE_THREADS = 2  # files compressed at once by write_case


# --- Grid and shape primitives ---------------------------------------------------------------
class Grid:
    """Canonical RAS voxel grid: world (mm) of voxel [i, j, k] = origin + spacing * [i, j, k]."""

    def __init__(self, shape, spacing, origin):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, np.float64)
        self.origin = np.asarray(origin, np.float64)
        self.axes = [(self.origin[a] + self.spacing[a] * np.arange(self.shape[a])).astype(np.float32)
                     for a in range(3)]

    @property
    def affine(self):
        aff = np.diag(list(self.spacing) + [1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in the world box [lo, hi] (mm), or None if empty."""
        sl = []
        for a in range(3):
            i0 = int(np.ceil((lo[a] - self.origin[a]) / self.spacing[a]))
            i1 = int(np.floor((hi[a] - self.origin[a]) / self.spacing[a])) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl):
        """World x (n,1,1), y (1,n,1), z (1,1,n) of a box, float32 mm (broadcast, never materialised)."""
        x, y, z = (self.axes[a][sl[a]] for a in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]


class Warp:
    """Smooth random displacement: per axis, a few sinusoids of wavelength ~`wavelength` mm.

    Each sinusoid varies along two world axes only, so it is a 2-D array broadcast into 3-D: organic
    3-D deformation for the price of a few additions, even on a 512 x 512 x 300 grid.
    """

    def __init__(self, rng, amp, wavelength, n=3, axes=(0, 1, 2)):
        self.terms = []  # (displaced axis, axis a, axis b, wa, wb, phase, amplitude)
        for out in axes:
            for _ in range(n):
                a, b = rng.choice(3, 2, replace=False)
                ang = rng.uniform(0, 2 * np.pi)
                k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4))
                self.terms.append((out, a, b, k * np.cos(ang), k * np.sin(ang), rng.uniform(0, 2 * np.pi),
                                   amp * rng.uniform(0.5, 1.0) / np.sqrt(n)))

    def __call__(self, x, y, z):
        p = (x, y, z)
        out = [x, y, z]
        for ax, a, b, wa, wb, ph, amp in self.terms:
            term = (amp * np.sin(wa * p[a] + wb * p[b] + ph)).astype(np.float32)
            if out[ax] is not p[ax] and np.broadcast_shapes(out[ax].shape, term.shape) == out[ax].shape:
                out[ax] += term  # in place once the array is full-size (saves a 3-D temporary per term)
            else:
                out[ax] = out[ax] + term
        return out


def ellipsoid(grid, centre, axes, rot=None, warp=None, bend=0.0, power=2.0):
    """Level field of a (rotated, warped) ellipsoid: returns (box slices, d mm, <= 0 inside) or None.

    `bend` (1/mm) curves a plate: the local first axis is shifted by bend * (local second axis)^2.
    `power` > 2 gives a superellipsoid (boxier, flat-sided).
    """
    centre = np.asarray(centre, np.float32)
    reach = max(axes) * 1.35 + 4  # room for the warp
    sl = grid.box(centre - reach, centre + reach)
    if sl is None:
        return None
    x, y, z = grid.coords(sl)
    if warp is not None:
        x, y, z = warp(x, y, z)
    d = [x - centre[0], y - centre[1], z - centre[2]]
    if rot is not None:  # local coordinates q = R^T (p - c)
        d = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    if bend:
        d[0] = d[0] - bend * d[1] ** 2
    if power == 2.0:
        rho = np.sqrt((d[0] / axes[0]) ** 2 + (d[1] / axes[1]) ** 2 + (d[2] / axes[2]) ** 2) + 1e-6
    else:
        rho = (np.abs(d[0] / axes[0]) ** power + np.abs(d[1] / axes[1]) ** power
               + np.abs(d[2] / axes[2]) ** power) ** (1 / power) + 1e-6
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    return sl, (r * (1 - 1 / rho)).astype(np.float32)  # exact along rays from the centre


def capsule(grid, a, b, ra, rb=None, warp=None):
    """Level field of a tube from point a (radius ra) to b (radius rb), rounded ends."""
    rb = ra if rb is None else rb
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    reach = max(ra, rb) + 6
    sl = grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
    if sl is None:
        return None
    x, y, z = grid.coords(sl)
    if warp is not None:
        x, y, z = warp(x, y, z)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0, 1)
    dist = np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)
    return sl, (dist - (ra + t * (rb - ra))).astype(np.float32)


def ztube(grid, ctrl, warp=None, grow=0.0):
    """Level field of a z-tube; ctrl rows (z, cx, cy, ax, ay) in mm, z increasing; `grow` adds to both axes.

    Each axial slice holds an ellipse whose centre and semi-axes interpolate linearly between control rows.
    """
    ctrl = np.asarray(ctrl, np.float32)
    z0, z1 = ctrl[0, 0], ctrl[-1, 0]
    reach = max(0.0, grow) + 12  # warp and deformation margin
    lo = (ctrl[:, 1].min() - ctrl[:, 3].max() - reach, ctrl[:, 2].min() - ctrl[:, 4].max() - reach, z0)
    hi = (ctrl[:, 1].max() + ctrl[:, 3].max() + reach, ctrl[:, 2].max() + ctrl[:, 4].max() + reach, z1)
    sl = grid.box(lo, hi)
    if sl is None:
        return None
    x, y, z = grid.coords(sl)
    zz = z.ravel()
    cx, cy, ax, ay = (np.interp(zz, ctrl[:, 0], ctrl[:, i]).astype(np.float32)[None, None, :] for i in (1, 2, 3, 4))
    ax, ay = ax + grow, ay + grow
    if warp is not None:
        x, y, _ = warp(x, y, z)
    # In-place arithmetic: the body outline covers the whole grid, so every temporary costs ~0.1 s at 512^2 x 300.
    shape = tuple(s.stop - s.start for s in sl)
    dx, dy = x - cx, y - cy
    dx = dx if dx.shape == shape else np.array(np.broadcast_to(dx, shape))
    dy = dy if dy.shape == shape else np.array(np.broadcast_to(dy, shape))
    r = dx * dx
    r += dy * dy
    np.sqrt(r, out=r)
    dx /= ax
    dx *= dx
    dy /= ay
    dy *= dy
    dx += dy
    np.sqrt(dx, out=dx)
    dx += 1e-6
    np.reciprocal(dx, out=dx)
    np.subtract(1, dx, out=dx)
    dx *= r  # d = |p - c| (1 - 1/rho): exact along rays from the centre line
    return sl, dx


def rotation(yaw=0.0, pitch=0.0, roll=0.0):
    """Rotation matrix from angles in degrees about z (yaw), x (pitch) and y (roll)."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return (rz @ rx @ ry).astype(np.float32)


class Canvas:
    """The HU volume being painted on the canonical grid, plus the truth masks (full-size bool)."""

    def __init__(self, grid, hu_means):
        self.grid = grid
        self.hu = np.full(grid.shape, hu_means["air"], np.float32)
        self.hu_means = hu_means
        # Masks in Fortran order, the NIfTI byte order: saving then needs no transposing copy (~0.7 s each at 512^2).
        self.masks = {name: np.zeros(grid.shape, bool, order="F") for name in MASK_NAMES}
        self.bone = np.zeros(grid.shape, bool, order="F")

    def paint(self, field, tissue, inside=0.0, outside=None, where=None):
        """Set `tissue` where outside < d <= inside (d from a primitive); `where` is an extra bool/callable."""
        if field is None:
            return None
        sl, d = field
        region = d <= inside
        if outside is not None:
            region &= d > outside
        if where is not None:
            region &= where(*self.grid.coords(sl)) if callable(where) else where
        value = self.hu_means[tissue] if isinstance(tissue, str) else tissue
        self.hu[sl][region] = value
        return sl, region


# --- Random draws: acquisition and patient ----------------------------------------------------
def draw(rng, intervals):
    """A value from a tuple of (low, high) intervals: an interval chosen by width, then uniform in it."""
    widths = np.array([hi - lo for lo, hi in intervals], float)
    lo, hi = intervals[int(rng.choice(len(intervals), p=widths / widths.sum()))]
    return float(rng.uniform(lo, hi))


def draw_acquisition(rng, grid_kind, forced, st):
    """Sex, field of view, voxel grid and storage orientation of one case (before any forced value)."""
    if grid_kind not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}; got {grid_kind!r}")
    fovs = st["fovs"]
    acq = {
        "sex": "female" if rng.random() < FEMALE_FRACTION else "male",
        "fov": str(rng.choice(list(fovs), p=np.array(list(fovs.values())) / sum(fovs.values()))),
        "orientation": str(rng.choice(list(ORIENTATIONS), p=list(ORIENTATIONS.values()))),
    }
    (lo, hi), slices = GRIDS[grid_kind]
    inplane = round(float(rng.uniform(lo, hi)), 3)
    acq["spacing"] = (inplane, inplane, float(rng.choice(slices)))
    acq["fov_jitter"] = rng.uniform(-1, 1, 4)  # z limits, in-plane centre offsets
    acq["cut"] = str(rng.choice(["none", "low", "high"], p=[0.8, 0.1, 0.1]))  # organ cut by the z edge
    acq["inplane_fov"] = float(rng.uniform(380, 480))  # mm, demo grid (the ct grid uses a 512 matrix)
    acq["noise_sd"] = float(rng.uniform(*st["noise_sd"]))
    acq["blur"] = float(rng.uniform(*st["blur"]))  # reconstruction kernel: < 1 sharp, > 1 smooth
    acq["sharpen"] = float(rng.uniform(0, 0.8)) if rng.random() < 0.3 else 0.0  # edge-enhancing kernel overshoot
    acq["hu_offset"] = draw(rng, st["hu_offset"])  # scanner calibration of soft tissue, HU
    acq["iv_contrast"] = bool(rng.random() < 0.5)
    acq["bladder_contrast"] = bool(rng.random() < 0.25)
    acq["table"] = bool(rng.random() < 0.7)
    for key in ("sex", "fov", "orientation", "spacing", "shape", "iv_contrast", "bladder_contrast", "table",
                "noise_sd", "cut"):
        if key in forced:
            acq[key] = tuple(float(v) for v in forced[key]) if key == "spacing" else forced[key]
    unknown = set(forced) - set(acq) - {"shape"}
    if unknown:
        raise ValueError(f"make_case: unknown forced setting(s) {sorted(unknown)}")
    return acq


def draw_patient(rng, sex, st):
    """Anatomical parameters (mm, mL) of one patient; only `rng`, `sex` and the style decide them."""
    female = sex == "female"
    logu = lambda lo, hi: float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # noqa: E731
    p = {
        "scale": draw(rng, st["scale"]) * (0.97 if female else 1.0),
        "fat": float(rng.uniform(*st["fat"])),  # subcutaneous fat thickness: thin to obese
        "bladder_ml": logu(*st["bladder_ml"]),  # nearly empty .. distended
        "prostate_ml": logu(*st["prostate_ml"]) if not female else 0.0,
        "rectum_content": str(rng.choice(["gas", "stool", "collapsed", "fluid"], p=[0.3, 0.35, 0.25, 0.1])),
        "rectum_x": float(rng.uniform(-st["rectum_x"], st["rectum_x"])),
        "rectum_sway": float(rng.uniform(0.5, 1.0) * st["rectum_sway"] * rng.choice([-1, 1])),
        "prostate_calcified": bool(rng.random() < 0.3),
        "oral_contrast": bool(rng.random() < 0.3),
        "fiducials": bool(not female and rng.random() < st["p_fiducials"]),  # gold markers for IGRT
        "spacer": bool(not female and rng.random() < st["p_spacer"]),  # rectal spacer hydrogel
        "spacer_iodinated": bool(rng.random() < 0.3),
        "catheter": bool(rng.random() < st["p_catheter"]),  # Foley balloon in the bladder
        "prosthesis": (("both" if rng.random() < st["p_bilateral_prosthesis"] else str(rng.choice(["left", "right"])))
                       if rng.random() < st["p_prosthesis"] else "none"),
        "median_lobe": bool(not female and rng.random() < st["p_median_lobe"]),
        "bladder_power": st["bladder_power"],
        "warp": st["warp"],
    }
    return p


# --- Anatomy: one function per structure group -----------------------------------------------
def paint_body(cv, rng, p, table):
    """Body outline: skin, subcutaneous fat, and the muscle-walled 'frame' that holds everything else.

    The trunk is a z-tube; below the perineum the two thighs are separate tubes. The back lies flat on
    the table. Returns the trunk control rows and warp (the abdominal wall muscle follows the same outline).
    """
    s, fat = p["scale"], p["fat"]
    trunk = np.array([[-100, 0, -25, 150, 100], [-30, 0, -25, 162, 102], [40, 0, -20, 152, 100],
                      [130, 0, -12, 145, 100], [210, 0, -5, 135, 98], [350, 0, 0, 140, 104],
                      [470, 0, 0, 145, 108], [600, 0, 0, 150, 110], [760, 0, 5, 148, 112]], np.float32)
    trunk *= s
    thighs = [np.array([[-260, side * 92, 5, 68, 70], [-150, side * 95, 5, 74, 76], [-80, side * 90, -5, 80, 85]],
                       np.float32) for side in (-1, 1)]
    thighs = [t * s for t in thighs]
    warp = Warp(rng, 6, 120, axes=(0, 1))
    back = float((trunk[:, 2] - trunk[:, 4]).min() - fat + 10 * s)  # the buttocks flatten 10 mm on the table
    flat = (lambda x, y, z: y > back) if table else None
    fields = [ztube(cv.grid, tube, warp, grow=fat + 2) for tube in [trunk] + thighs]
    for f in fields:
        cv.paint(f, "skin", where=flat)
    for f in fields:  # second pass so the thighs' skin does not cut through the trunk where they join
        cv.paint(f, "fat", inside=-2.0, where=flat)
    if table:
        top = back - 1.0
        lo, hi = (-230, top - 40, -1e4), (230, top, 1e4)
        sl = cv.grid.box(lo, hi)
        if sl is not None:
            x, y, z = cv.grid.coords(sl)
            curve = top - 0.0004 * x ** 2  # slightly curved table top
            d = np.broadcast_to(np.maximum(y - curve, curve - 30 - y), cv.hu[sl].shape)
            cv.paint((sl, d), "table_shell")
            cv.paint((sl, d), "table_core", inside=-3)
    return trunk, warp


def paint_muscles(cv, rng, p, trunk, warp):
    """Gluteal, thigh, abdominal wall, rectus, psoas/iliacus, obturator internus, levator ani, paraspinal."""
    s = p["scale"]
    w = Warp(rng, 4, 70)
    # Abdominal wall: a muscle shell inside the fat, on the front and sides above the pelvis.
    cv.paint(ztube(cv.grid, trunk, warp), "muscle", outside=-12,
             where=lambda x, y, z: (z > 90 * s) & (y > -40 * s) | (z > -15 * s) & (np.abs(x) < 60 * s) & (y > 40 * s))
    for side in (-1, 1):
        # Rectus abdominis: paired straps just under the anterior fat, from the pubis up.
        cv.paint(ztube(cv.grid, np.array([[-15, side * 30, 70, 22, 7], [100, side * 38, 82, 30, 8],
                                          [470, side * 45, 92, 35, 9]]) * s, w), "muscle")
        # Gluteus maximus: the posterior bulk of the buttock.
        cv.paint(ztube(cv.grid, np.array([[-110, side * 85, -75, 55, 35], [-40, side * 90, -95, 70, 42],
                                          [40, side * 85, -100, 65, 35], [110, side * 70, -100, 40, 20]]) *
                       s, w), "muscle")
        # Gluteus medius/minimus: lateral to the iliac wing.
        cv.paint(ellipsoid(cv.grid, np.array([side * 120, -35, 85]) * s, np.array([22, 50, 55]) * s,
                           rotation(yaw=side * 35), w), "muscle")
        # Thigh muscles around the femoral shaft (adductors medial, quadriceps anterior).
        cv.paint(ztube(cv.grid, np.array([[-260, side * 85, 5, 60, 62], [-120, side * 85, 5, 62, 64],
                                          [-60, side * 90, 10, 50, 55]]) * s, w), "muscle")
        # Iliopsoas: from the lumbar spine along the iliac fossa, over the pubic brim, to the thigh.
        cv.paint(ztube(cv.grid, np.array([[-90, side * 95, 25, 14, 14], [-20, side * 82, 40, 17, 15],
                                          [40, side * 72, 22, 20, 18], [100, side * 62, -15, 24, 20],
                                          [180, side * 48, -38, 24, 22], [300, side * 40, -42, 20, 18],
                                          [420, side * 30, -40, 10, 10]]) * s, w), "muscle")
        # Obturator internus: lines the lateral pelvic wall medial to the acetabulum.
        cv.paint(ellipsoid(cv.grid, np.array([side * 60, 0, -18]) * s, np.array([9, 38, 28]) * s,
                           rotation(yaw=side * 10), w), "muscle")
        # Paraspinal muscles: behind the spine and the sacrum.
        cv.paint(ztube(cv.grid, np.array([[0, side * 25, -115, 18, 12], [120, side * 35, -108, 25, 18],
                                          [470, side * 40, -85, 28, 22], [760, side * 35, -90, 26, 20]]) * s, w),
                 "muscle")
    # Levator ani: a thin funnel below the rectum and prostate, open anteriorly.
    funnel = np.array([[-55, 0, -25, 18, 15], [-35, 0, -25, 35, 30], [-10, 0, -20, 55, 50]]) * s
    cv.paint(ztube(cv.grid, funnel, w), "muscle", outside=-5, where=lambda x, y, z: y < -8 * s)


def bone_parts(cv, rng, p):
    """Pelvic bones and femora as (level field, side) pairs; side -1 right, +1 left femur, 0 pelvis."""
    s = p["scale"]
    g = cv.grid
    w = Warp(rng, 2.5, 60)
    parts = []
    S = lambda *v: np.asarray(v, np.float32) * s  # noqa: E731 (world point scaled to this patient)
    for side in (-1, 1):
        head = S(side * 88, 8, 5)
        r_head = 24 * s
        troch = S(side * 128, 0, -28)
        # Femur: head, neck, greater trochanter, shaft (inclines medially downward).
        fem = [ellipsoid(g, head, (r_head,) * 3),
               capsule(g, head, troch, 15 * s, 17 * s, w),
               ellipsoid(g, troch + S(side * 3, -6, 8), S(18, 20, 24), warp=w),
               capsule(g, troch + S(-side * 8, 0, 0), S(side * 108, 10, -270), 16 * s, 13 * s, w),
               ellipsoid(g, S(side * 112, 5, -60), S(16, 14, 14), warp=w)]  # lesser trochanter region
        parts += [(f, side) for f in fem]
        # Acetabulum: a cup around the femoral head, open laterally, separated by a joint space.
        acet = ellipsoid(g, head, (r_head + 13,) * 3)
        if acet is not None:
            sl, d_out = acet
            x, y, z = g.coords(sl)
            rr = np.sqrt((x - head[0]) ** 2 + (y - head[1]) ** 2 + (z - head[2]) ** 2)
            d = np.maximum(d_out, (r_head + 2.5) - rr)
            d = np.maximum(d, side * (x - head[0]) - 6 * s)  # open on the lateral side
            parts.append(((sl, d.astype(np.float32)), 0))
        # Ilium: thick body above the acetabulum, then the thin curved wing up to the crest.
        parts.append((capsule(g, head + S(-side * 8, -5, 18), S(side * 52, -62, 75), 17 * s, 14 * s, w), 0))
        parts.append((ellipsoid(g, S(side * 88, -15, 105), S(6, 72, 55), rotation(yaw=-side * 38), w,
                                bend=-side * 0.006 / s), 0))  # iliac fossa: concave medially
        parts.append((capsule(g, S(side * 60, -60, 60), S(side * 50, -72, 120), 14 * s, 12 * s, w), 0))  # SI joint
        # Pubis: superior ramus to the symphysis body, inferior ramus to the ischium.
        parts.append((capsule(g, head + S(-side * 18, 25, 0), S(side * 10, 52, -12), 11 * s, 10 * s, w), 0))
        parts.append((capsule(g, S(side * 9, 50, -18), S(side * 8, 48, -35), 10 * s, 9 * s, w), 0))
        parts.append((capsule(g, S(side * 12, 45, -40), S(side * 55, -5, -62), 8 * s, 10 * s, w), 0))
        # Ischium: acetabulum down to the tuberosity.
        parts.append((capsule(g, head + S(-side * 12, -18, -8), S(side * 58, -25, -60), 14 * s, 15 * s, w), 0))
    # Sacrum and coccyx: curved, concave anteriorly; alae reach the iliac wings at the SI joints.
    sacrum = np.array([[-45, 0, -70, 5, 4], [-28, 0, -82, 9, 6], [-5, 0, -92, 17, 9], [20, 0, -95, 30, 12],
                       [50, 0, -88, 45, 14], [80, 0, -72, 55, 16], [112, 0, -52, 50, 18]]) * s
    parts.append((ztube(g, sacrum, w), 0))
    # Lumbar then thoracic vertebral bodies (discs painted separately) and their posterior arches.
    for i in range(N_VERTEBRAE):
        z0 = (118 + i * 36) * s
        dy = spine_y(i) + 40
        c = S(0, spine_y(i), 0)
        parts.append((ztube(g, [[z0, c[0], c[1], 22 * s, 17 * s], [z0 + 27 * s, c[0], c[1], 24 * s, 18 * s]], w), 0))
        parts.append((capsule(g, S(0, -72 + dy, 0) + np.array([0, 0, z0 + 10 * s], np.float32),
                              S(0, -95 + dy, 0) + np.array([0, 0, z0 + 5 * s], np.float32), 6 * s), 0))
        for side in (-1, 1):
            parts.append((capsule(g, S(side * 12, -58 + dy, 0) + np.array([0, 0, z0 + 12 * s], np.float32),
                                  S(side * 35, -50 + dy, 0) + np.array([0, 0, z0 + 12 * s], np.float32), 5 * s), 0))
    parts.append((capsule(g, S(0, 88, 470), S(0, 95, 640), 9 * s, 7 * s, w), 0))  # sternum
    return parts


N_VERTEBRAE = 17  # L5 .. T1 (z from ~118 mm up past the top of the chest field of view)


def spine_y(i):
    """AP position (mm, before scaling) of vertebral body i: lumbar lordosis forward, thoracic kyphosis back."""
    return -40 + 4 * i if i < 6 else -20 - 3 * (i - 5)


def paint_bones(cv, rng, p):
    """Cortical shell over a trabecular core; union done in two passes so joins show no inner cortex."""
    s = p["scale"]
    parts = [(f, side) for f, side in bone_parts(cv, rng, p) if f is not None]
    for (sl, d), side in parts:  # pass 1: everything inside any bone is cortical
        cv.paint((sl, d), "cortical")
        cv.bone[sl] |= d <= 0
        if side:
            cv.masks["femur_left" if side > 0 else "femur_right"][sl] |= d <= 0
    for (sl, d), side in parts:  # pass 2: the core of any part becomes trabecular
        cv.paint((sl, d), "trabecular", inside=-2.0 * s)
    for side in (-1, 1):  # femoral shaft: a thick cortex around fatty marrow
        cv.paint(capsule(cv.grid, np.array([side * 118, 5, -90]) * s, np.array([side * 108, 10, -270]) * s, 8 * s),
                 "marrow")
    for i in range(N_VERTEBRAE):  # intervertebral discs sit between the vertebral bodies (L5/S1 included)
        z0 = (118 + i * 36) * s
        cv.paint(ztube(cv.grid, [[z0 - 8 * s, 0, spine_y(i) * s, 21 * s, 16 * s], [z0 - 1, 0, spine_y(i) * s,
                                                                                  22 * s, 17 * s]]), "disc")
        cv.paint(ellipsoid(cv.grid, np.array([0, spine_y(i) - 26, z0 / s + 14]) * s, np.array([8, 7, 16]) * s),
                 "csf")


def paint_vessels(cv, rng, p, iv):
    """Aorta/IVC, iliac arteries and veins (enhanced when IV contrast), and a few phleboliths."""
    s = p["scale"]
    art = "artery_enhanced" if iv else "blood"
    vein = "vein_enhanced" if iv else "blood"
    cv.paint(ztube(cv.grid, np.array([[175, 8, -12, 8, 8], [470, 10, -10, 11, 11], [700, 20, -45, 13, 13]]) * s), art)
    cv.paint(ztube(cv.grid, np.array([[165, -18, -14, 12, 10], [470, -25, -8, 13, 12], [520, -25, 0, 14, 13]]) * s),
             vein)
    for side in (-1, 1):
        # Common iliac, then external iliac along the pelvic brim to the femoral vessels; internal iliac dives down.
        cv.paint(ztube(cv.grid, np.array([[-60, side * 88, 35, 5, 5], [10, side * 80, 38, 5, 5],
                                          [80, side * 62, 10, 5, 5], [130, side * 30, -15, 6, 6],
                                          [178, side * 6, -14, 7, 7]]) * s), art)
        cv.paint(ztube(cv.grid, np.array([[-60, side * 78, 35, 7, 6], [10, side * 70, 30, 7, 6],
                                          [80, side * 55, 0, 7, 7], [130, side * 22, -25, 8, 7],
                                          [168, side * 8, -18, 9, 8]]) * s), vein)
        cv.paint(ztube(cv.grid, np.array([[40, side * 55, -55, 4, 4], [90, side * 50, -42, 5, 5],
                                          [125, side * 35, -25, 5, 5]]) * s), art)
    for _ in range(rng.integers(0, 4)):  # phleboliths: calcified pelvic vein thrombi, lateral to the bladder
        c = np.array([rng.choice([-1, 1]) * rng.uniform(35, 55), rng.uniform(-30, 10), rng.uniform(-25, 20)]) * s
        cv.paint(ellipsoid(cv.grid, c, (rng.uniform(1.5, 2.5),) * 3), "calcification")


def paint_small_structures(cv, rng, p, iv):
    """Lymph nodes along the iliac vessels and small vessels in the pelvic fat: organ-like HU specks near organs."""
    s = p["scale"]
    for _ in range(rng.integers(3, 9)):  # lymph nodes: 5-15 mm ovals beside the external/internal iliac vessels
        side = rng.choice([-1, 1])
        c = np.array([side * rng.uniform(40, 65), rng.uniform(-45, 30), rng.uniform(0, 110)]) * s
        cv.paint(ellipsoid(cv.grid, c, rng.uniform(2.5, 7.5, 3), warp=Warp(rng, 1, 20)),
                 cv.hu_means["muscle"] - 10 + (15 if iv else 0))
    vessel = "vein_enhanced" if iv else "blood"
    for _ in range(rng.integers(15, 30)):  # small perirectal / perivesical vessels
        a = np.array([rng.uniform(-55, 55), rng.uniform(-70, 40), rng.uniform(-40, 90)]) * s
        b = a + rng.normal(scale=15, size=3)
        cv.paint(capsule(cv.grid, a, b, rng.uniform(1.0, 2.5)), vessel)


def paint_hip_streak(cv, rng, p):
    """Beam-hardening artifact: a dark band between the femoral heads, the classic pelvic CT streak."""
    s = p["scale"]
    depth = rng.uniform(0, 40)  # HU at the band centre; 0 = no visible streak
    y0, z0, half_x = 8 * s, 5 * s, 88 * s
    sl = cv.grid.box((-half_x, y0 - 12, z0 - 25 * s), (half_x, y0 + 12, z0 + 25 * s))
    if sl is None or depth < 5:
        return
    x, y, z = cv.grid.coords(sl)
    band = np.exp(-0.5 * ((y - y0) / 4.0) ** 2) * np.cos(np.clip((z - z0) / (25 * s), -1, 1) * np.pi / 2) ** 2
    cv.hu[sl] -= (depth * band * (1 - (x / half_x) ** 2) ** 0.5).astype(np.float32)


def paint_chest(cv, rng, p, trunk, iv):
    """Lungs with their vessels, the heart (contrast-filled when IV contrast) and ribs: only on chest fields
    of view. A chest scan holds no pelvic organ; the heart's bright chambers are the classic false bladder."""
    s, g = p["scale"], cv.grid
    if g.box((-1e4, -1e4, 380 * s), (1e4, 1e4, 1e4)) is None:
        return
    w = Warp(rng, 5, 90)
    dome = float(rng.uniform(470, 510)) * s  # diaphragm dome; the liver lies beneath it on the right
    for side in (-1, 1):
        lung = ellipsoid(g, np.array([side * 75, -12, dome + 165]) * [s, s, 1], np.array([62, 80, 170]) * s, warp=w)
        cv.paint(lung, "lung")
        for _ in range(12):  # pulmonary vessels
            a = np.array([side * rng.uniform(30, 110), rng.uniform(-70, 50), dome + rng.uniform(20, 250)], np.float32)
            vessel = capsule(g, a, a + rng.normal(scale=25, size=3), rng.uniform(1.0, 3.0))
            if vessel is not None:  # only inside aerated lung (not in the air around the body)
                cv.paint(vessel, "blood", where=(cv.hu[vessel[0]] > -950) & (cv.hu[vessel[0]] < -600))
    centre = np.array([15, 22, dome + 70], np.float32) * [s, s, 1]
    axes = np.array([62, 48, 56], np.float32) * s * float(rng.uniform(0.85, 1.15))
    heart = ellipsoid(g, centre, axes, rotation(yaw=35, pitch=-20), Warp(rng, 4, 60))
    cv.paint(heart, cv.hu_means["muscle"] + (30 if iv else 0))  # myocardium
    cv.paint(heart, "heart_enhanced" if iv else "blood", inside=-9.0)  # chambers
    # Ribs: hoops in the chest wall, one every ~26 mm, painted as cortical bone (the bone pass keeps them bone).
    rows = trunk[trunk[:, 0] >= 330 * s]
    phase = float(rng.uniform(0, 26))
    ribs = ztube(g, rows, Warp(rng, 3, 80, axes=(0, 1)))
    cv.paint(ribs, "cortical", inside=-13.0, outside=-19.0,
             where=lambda x, y, z: (np.mod(z + phase + 0.15 * y, 26 * s) < 9 * s) & (z > 390 * s))


def paint_prosthesis(cv, rng, p):
    """Total hip replacement (one or both sides): metal head, neck, stem and cup, with beam-hardening streaks
    and photon-starvation bands across the pelvis. Femur masks keep the implant (it replaces the bone)."""
    if p["prosthesis"] == "none":
        return
    s, g = p["scale"], cv.grid
    sides = {"left": (1,), "right": (-1,), "both": (-1, 1)}[p["prosthesis"]]
    for side in sides:
        head = np.array([side * 88, 8, 5], np.float32) * s
        for f in (ellipsoid(g, head, (22 * s,) * 3), capsule(g, head, np.array([side * 120, 0, -30]) * s, 9 * s),
                  capsule(g, np.array([side * 122, 2, -30]) * s, np.array([side * 112, 8, -160]) * s, 8 * s, 5 * s)):
            cv.paint(f, 3071.0)
        cup = ellipsoid(g, head, (27 * s,) * 3)
        cv.paint(cup, 3071.0, inside=0.0, outside=-3.0, where=lambda x, y, z: side * (x - head[0]) < 4)
    sl = g.box((-220, -180, -40 * s), (220, 180, 50 * s))
    if sl is None:
        return
    x, y, z = g.coords(sl)
    streak = np.zeros(cv.hu[sl].shape, np.float32)
    for side in sides:
        hx, hy, hz = side * 88 * s, 8 * s, 5 * s
        ang = np.arctan2(y - hy, x - hx)
        rr = np.sqrt((x - hx) ** 2 + (y - hy) ** 2) + 1.0
        streak += (float(rng.uniform(150, 500)) * np.cos(int(rng.integers(4, 9)) * 2 * ang + rng.uniform(0, 6.3))
                   * np.exp(-rr / 70) * np.exp(-((z - hz) / 30) ** 2)).astype(np.float32)
    if len(sides) == 2:  # dark band along the line joining the two implants
        streak -= (float(rng.uniform(150, 400)) * np.exp(-0.5 * ((y - 8 * s) / 6) ** 2)
                   * np.exp(-((z - 5 * s) / 20) ** 2) * (np.abs(x) < 90 * s)).astype(np.float32)
    cv.hu[sl] += streak


def bowel_loop(cv, rng, start, n_seg, radius, lo, hi, content, oral):
    """A random-walk tube of capsules kept inside the box [lo, hi]: wall, then fluid/gas/contrast lumen."""
    pts = [np.asarray(start, np.float32)]
    direction = rng.normal(size=3)
    for _ in range(n_seg):
        direction = direction / np.linalg.norm(direction) + rng.normal(scale=0.6, size=3)
        step = pts[-1] + 28 * direction / np.linalg.norm(direction)
        step = np.where(step < lo, 2 * lo - step, np.where(step > hi, 2 * hi - step, step))
        direction = step - pts[-1]
        pts.append(step.astype(np.float32))
    segs = [capsule(cv.grid, a, b, radius) for a, b in zip(pts[:-1], pts[1:])]
    for f in segs:
        cv.paint(f, "bowel_wall")
    lumen = "oral_contrast" if oral else ("gas" if content == "gas" else "bowel_fluid")
    for f in segs:
        cv.paint(f, lumen, inside=-2.5)
    if content == "mixed":  # gas rises to the non-dependent (anterior) side of the lumen
        for f in segs:
            if f is not None:
                sl, d = f
                y = cv.grid.coords(sl)[1]
                cy = np.median(np.broadcast_to(y, d.shape)[d <= -2.5]) if (d <= -2.5).any() else 0
                cv.paint(f, "gas", inside=-2.5, where=lambda x, yy, z, cy=cy: yy > cy + radius * 0.2)


def paint_bowel(cv, rng, p, bladder_top):
    """Small bowel and sigmoid loops above the bladder, colon in the flanks: organ-like HU distractors."""
    s = p["scale"]
    lo = np.array([-100, -40, bladder_top + 5], np.float32) * [s, s, 1]
    hi = np.array([100, 70, 420], np.float32) * [s, s, 1]
    pelvis_hi = np.array([hi[0], hi[1], max(bladder_top + 60, 150 * s)], np.float32)
    for i in range(rng.integers(10, 16)):
        top = pelvis_hi if i < 5 else hi  # the first loops fill the pelvis above the bladder, the rest the abdomen
        start = rng.uniform(lo, top)
        bowel_loop(cv, rng, start, rng.integers(4, 9), rng.uniform(9, 14), lo, top,
                   rng.choice(["fluid", "gas", "mixed", "fluid"]), p["oral_contrast"] and rng.random() < 0.7)
    # Ascending (right, -x) and descending (left, +x) colon: wide tubes with gas or stool.
    for side in (-1, 1):
        ctrl = np.array([[150, side * 85, 0, 22, 20], [300, side * 90, -10, 20, 18], [420, side * 80, -5, 20, 18]]) * s
        tube = ztube(cv.grid, ctrl, Warp(rng, 5, 60))
        cv.paint(tube, "bowel_wall")
        cv.paint(tube, "gas" if rng.random() < 0.5 else "stool", inside=-2.5)


def paint_abdominal_organs(cv, rng, p, iv):
    """Kidneys and the liver tip: only seen on abdominal fields of view."""
    s = p["scale"]
    enh = ENHANCEMENT_HU["kidney"] if iv else 0
    for side in (-1, 1):
        c = np.array([side * 68, -42, 300 + (15 if side < 0 else 0)]) * s
        cv.paint(ellipsoid(cv.grid, c, np.array([25, 22, 52]) * s, rotation(yaw=side * 30, roll=side * 10),
                           Warp(rng, 3, 60)), cv.hu_means["kidney"] + enh)
    cv.paint(ellipsoid(cv.grid, np.array([-60, 10, 470]) * s, np.array([105, 85, 90]) * s, warp=Warp(rng, 6, 100)),
             cv.hu_means["liver"] + (ENHANCEMENT_HU["liver"] if iv else 0))


def organ_layout(rng, p, sex, st):
    """Centres and sizes of rectum, prostate, bladder (world mm), sized from the drawn volumes."""
    s = p["scale"]
    female = sex == "female"
    content = p["rectum_content"]
    r_lumen = float(rng.uniform(*st["rectum_radius"][content]))  # 1-6 cm wide, collapsed to distended
    z_top = float(rng.uniform(75, 100) * s)
    rx = p["rectum_x"]
    back = -8 * s if female else 0.0  # in women the vagina and cervix sit between bladder and rectum
    # Rectum centre line: anal canal (posteroinferior), anorectal junction, then up along the sacral hollow.
    rect = np.array([[-72 * s, rx * 0.3, -42 * s, 7, 7], [-48 * s, rx * 0.5, -28 * s + back, 9, 9],
                     [-22 * s, rx, -26 * s + back, r_lumen * 1.1, r_lumen * 0.85],
                     [10 * s, rx, -48 * s + back, r_lumen * 1.15, r_lumen],
                     [45 * s, rx + 5, -55 * s, r_lumen, r_lumen * 0.9],
                     [z_top, rx + 15, -42 * s, r_lumen * 0.8, r_lumen * 0.75]], np.float32)
    rect[2:, 1] += p["rectum_sway"] * np.array([0.6, -1.0, 1.0, -0.5], np.float32)  # tortuous (held-out style)
    lay = {"rectum": rect, "rectum_top": z_top}
    rect_front_y = -26 * s + back + r_lumen * 0.85 + 3  # anterior rectal wall at the prostate / cervix level
    lay["spacer_y"] = float(rect_front_y)
    if p["spacer"]:
        rect_front_y += float(rng.uniform(7, 12))  # the gel pushes the prostate ~1 cm away from the rectal wall
    if not female:
        k = (p["prostate_ml"] * 1000 / (4 / 3 * np.pi * 1.35 * 1.0 * 1.15)) ** (1 / 3)  # V = 4/3 pi abc
        axes = np.array([1.35 * k, 1.0 * k, 1.15 * k], np.float32)
        apex = -42 * s
        lay["prostate"] = (np.array([rx * 0.3, rect_front_y + 2 + axes[1], apex + axes[2]], np.float32), axes)
        neck_z = apex + 2 * axes[2] - 3
        neck_y = rect_front_y + 2 + axes[1] + 4
    else:
        neck_z, neck_y = -18 * s, 12 * s  # no prostate: the bladder neck sits lower, behind the symphysis
    # Bladder: between the pubis (in front) and the rectum / uterus (behind) there is little AP room, so a
    # filling bladder grows sideways a little and upwards a lot, above the symphysis.
    v = p["bladder_ml"] * 1000
    b_axes = np.array([1.3, 0.95, 1.0], np.float32) * (v / (4 / 3 * np.pi * 1.3 * 0.95)) ** (1 / 3)
    b_axes[:2] = np.minimum(b_axes[:2], np.array([48, 40], np.float32) * s)  # true pelvis ~ +-55 mm wide
    b_axes[2] = v / (4 / 3 * np.pi * b_axes[0] * b_axes[1])  # keep the drawn volume
    lay["bladder"] = (np.array([rx * 0.2, neck_y + 6, neck_z + b_axes[2] * 0.95], np.float32), b_axes)
    lay["bladder_top"] = float(lay["bladder"][0][2] + b_axes[2])
    lay["rect_front_y"] = float(rect_front_y)
    lay["r_lumen"] = r_lumen
    return lay


def paint_pelvic_distractors(cv, rng, p, sex, lay, iv):
    """Seminal vesicles (male) or uterus, cervix and vagina (female), and the sigmoid loop."""
    s = p["scale"]
    w = Warp(rng, 2.5, 40)
    if sex == "male":
        pc, pa = lay["prostate"]
        for side in (-1, 1):
            c = pc + np.array([side * 20, -pa[1] * 0.9, pa[2] + 6], np.float32)
            cv.paint(ellipsoid(cv.grid, c, (24, 6.5, 9), rotation(yaw=side * 35, roll=side * 15), w),
                     cv.hu_means["seminal_vesicle"] + (ENHANCEMENT_HU["seminal_vesicle"] if iv else 0))
    else:
        enh = ENHANCEMENT_HU["uterus"] if iv else 0
        bc, ba = lay["bladder"]
        y_mid = float(min(bc[1] - 0.6 * ba[1], (bc[1] - ba[1] + lay["rect_front_y"]) / 2))  # behind the bladder
        base = float(bc[2] - ba[2])
        cv.paint(ztube(cv.grid, [[-55 * s, 0, y_mid + 12, 14, 6], [base + 5, 0, y_mid, 16, 8]], w),
                 cv.hu_means["muscle"] - 5)  # vagina, collapsed
        cervix = np.array([0, y_mid, base + 22], np.float32)
        cv.paint(ellipsoid(cv.grid, cervix, (16, 13, 20), rotation(pitch=-25), w), cv.hu_means["uterus"] + enh * 0.6)
        # Anteverted over the dome of an empty bladder; a full bladder pushes the fundus up and back.
        forward = 22 if p["bladder_ml"] < 150 else -2
        body = cervix + np.array([rng.uniform(-10, 10), forward, 38], np.float32)
        cv.paint(ellipsoid(cv.grid, body, (rng.uniform(25, 35), 20, rng.uniform(30, 42)), rotation(pitch=-40), w),
                 cv.hu_means["uterus"] + enh)
        for side in (-1, 1):  # ovaries
            cv.paint(ellipsoid(cv.grid, body + np.array([side * 45, -20, 5]), (14, 10, 12), warp=w),
                     cv.hu_means["uterus"] - 15)
    # Sigmoid colon: continues the rectum forward and to the left, then loops.
    top = lay["rectum"][-1]
    start = np.array([top[1], top[2], top[0]], np.float32)
    lo = np.array([-60, -70, lay["rectum_top"]], np.float32) * [s, s, 1]
    hi = np.array([90, 30, lay["rectum_top"] + 80], np.float32) * [s, s, 1]
    bowel_loop(cv, rng, start, 5, lay["r_lumen"] * 0.6 + 6, lo, hi, rng.choice(["gas", "fluid", "mixed"]), False)


def paint_organs(cv, rng, p, sex, lay, acq):
    """Rectum, bladder and prostate last, non-overlapping, clipped by bone; masks = painted voxels."""
    g = cv.grid
    iv = acq["iv_contrast"]
    wall = ENHANCEMENT_HU["rectal_wall"] if iv else 0
    # Rectum: wall plus lumen; the rectum stops at the rectosigmoid junction (sigmoid painted earlier).
    k = p["warp"]  # shape irregularity (stronger in the held-out style)
    rect = ztube(g, lay["rectum"], Warp(rng, 3 * k, 50, axes=(0, 1)))
    rect_lumen = ztube(g, lay["rectum"][2:], Warp(rng, 2 * k, 50, axes=(0, 1)), grow=-3.0)
    bl_c, bl_a = lay["bladder"]
    bl = ellipsoid(g, bl_c, bl_a, rotation(pitch=-10), Warp(rng, (0.08 * bl_a.min() + 2) * k, 70),
                   power=p["bladder_power"])
    pr = lobe = None
    if sex == "male":
        pc, pa = lay["prostate"]
        pr = ellipsoid(g, pc, pa, rotation(pitch=-15), Warp(rng, 2.0 * k, 35))
        if p["median_lobe"]:  # benign hyperplasia: a median lobe bulging up into the bladder base
            lobe = ellipsoid(g, pc + np.array([0, 0.2 * pa[1], 0.85 * pa[2]], np.float32), 0.5 * pa, warp=Warp(rng, 1, 25))
    fields = [f for f in (rect, bl, pr, lobe) if f is not None]
    if not fields:  # abdomen-only field of view: the pelvic organs are outside the grid
        return
    # Work inside the union box of the three organs (C-order sub-arrays: cheap even on a 512^2 grid).
    box = tuple(slice(min(f[0][a].start for f in fields), max(f[0][a].stop for f in fields)) for a in range(3))
    hu, bone = cv.hu[box], cv.bone[box]
    prostate = (in_box(pr, box) | in_box(lobe, box)) & ~bone
    bladder = in_box(bl, box) & ~bone & ~prostate
    rectum = in_box(rect, box) & ~bone & ~prostate & ~bladder
    # Rectum: wall, then its content inside the lumen.
    hu[rectum] = cv.hu_means["rectal_wall"] + wall
    lumen = in_box(rect_lumen, box) & rectum
    content = p["rectum_content"]
    if content == "gas":
        hu[lumen] = cv.hu_means["gas"]
    elif content == "stool":
        # Mottled stool: smoothed noise; its top ~30 % become gas bubbles, the rest soft debris around -50..+40 HU.
        n = ndimage.gaussian_filter(rng.standard_normal(lumen.shape).astype(np.float32), 1.2)
        n /= n.std() + 1e-6
        hu[lumen] = np.where(n > 0.5, cv.hu_means["gas"], cv.hu_means["stool"] + 30 * n)[lumen]
    elif content == "fluid":  # enema or diarrhoea: fluid with a gas cap on the anterior (non-dependent) side
        y = np.broadcast_to(g.coords(box)[1], lumen.shape)
        cap = np.quantile(y[lumen], rng.uniform(0.7, 1.0)) if lumen.any() else np.inf
        hu[lumen] = np.where(y > cap, cv.hu_means["gas"], cv.hu_means["bowel_fluid"])[lumen]
    else:  # collapsed: mucus between apposed walls
        hu[lumen] = cv.hu_means["rectal_wall"] - 10
    # Bladder: wall (thicker when empty), urine, optional dependent (posterior) layer of excreted contrast.
    hu[bladder] = cv.hu_means["bladder_wall"] + (ENHANCEMENT_HU["bladder_wall"] if iv else 0)
    wall_mm = 5.0 if p["bladder_ml"] < 100 else 3.0
    urine = in_box(bl, box, -wall_mm) & bladder
    hu[urine] = cv.hu_means["urine"]
    if acq["bladder_contrast"] and urine.any():
        y = np.broadcast_to(g.coords(box)[1], urine.shape)
        level = np.quantile(y[urine], rng.uniform(0.2, 0.6))  # fluid-fluid level; supine, posterior is down
        hu[urine & (y < level)] = cv.hu_means["excreted_contrast"]
    # Prostate: soft tissue, sometimes with small calcifications.
    hu[prostate] = cv.hu_means["prostate"] + (ENHANCEMENT_HU["prostate"] if iv else 0)
    if pr is not None and p["prostate_calcified"]:
        pc, pa = lay["prostate"]
        for _ in range(rng.integers(1, 4)):
            calc = ellipsoid(g, pc + rng.uniform(-0.4, 0.4, 3) * pa, (rng.uniform(1.2, 2.5),) * 3)
            hu[in_box(calc, box) & prostate] = cv.hu_means["calcification"]
    paint_devices(cv, rng, p, lay, box, prostate, bladder, rectum)
    for name, mask in (("prostate", prostate), ("bladder", bladder), ("rectum", rectum)):
        cv.masks[name][box] = mask


def paint_devices(cv, rng, p, lay, box, prostate, bladder, rectum):
    """Radiotherapy and urology devices inside the organs' box: gold fiducials in the prostate (with their
    star-shaped streaks), a Foley catheter balloon in the bladder, a rectal spacer gel behind the prostate.
    Organ masks are not changed: contours include a balloon or a marker, as planners draw them."""
    g, hu = cv.grid, cv.hu[box]
    bone = cv.bone[box]
    bc, ba = lay["bladder"]
    if p["catheter"]:
        neck = bc - np.array([0, 0, ba[2] * 0.75], np.float32)
        r = float(rng.uniform(9, 14))
        balloon = in_box(ellipsoid(g, neck, (r, r, r * 0.9)), box) & bladder
        hu[balloon] = cv.hu_means["bladder_wall"]  # the balloon's wall
        fill = rng.choice(["water", "air", "contrast"], p=[0.7, 0.15, 0.15])
        hu[in_box(ellipsoid(g, neck, (r - 1.5, r - 1.5, r * 0.9 - 1.5)), box) & bladder] = \
            {"water": cv.hu_means["urine"], "air": cv.hu_means["gas"], "contrast": cv.hu_means["excreted_contrast"]}[fill]
        tube = in_box(capsule(g, neck, neck - np.array([0, -10, 90], np.float32), 3.0), box) & ~bone
        hu[tube & ~in_box(ellipsoid(g, neck, (r, r, r)), box)] = float(rng.uniform(80, 250))  # silicone / latex
    if p["spacer"] and "prostate" in lay:
        pc, pa = lay["prostate"]
        gel = ellipsoid(g, np.array([pc[0], lay["spacer_y"] + 4, pc[2]], np.float32), (pa[0] * 0.9, 5.5, pa[2] * 1.1),
                        warp=Warp(rng, 1.5, 30))
        region = in_box(gel, box) & ~prostate & ~rectum & ~bladder & ~bone
        hu[region] = float(rng.uniform(150, 300)) if p["spacer_iodinated"] else float(rng.uniform(5, 30))
    if p["fiducials"] and "prostate" in lay:
        pc, pa = lay["prostate"]
        x, y, z = g.coords(box)
        for _ in range(3):
            c = pc + rng.uniform(-0.5, 0.5, 3).astype(np.float32) * pa
            # A 1 x 3 mm gold seed blooms to a voxel or two at 3071 HU whatever the voxel size.
            seed = in_box(capsule(g, c - [0, 0, 1.5], c + [0, 0, 1.5], 0.6 * float(g.spacing.max())), box)
            if not seed.any():
                continue
            # Streaks: alternating bright and dark rays in the axial plane, fading with distance and off-slice.
            dx, dy, dz = x - c[0], y - c[1], z - c[2]
            rr = np.sqrt(dx ** 2 + dy ** 2) + 1.0
            ang = np.arctan2(dy, dx)
            amp = float(rng.uniform(60, 250))
            hu += (amp * np.cos(int(rng.integers(3, 7)) * 2 * ang + rng.uniform(0, 6.3)) * np.exp(-rr / 25)
                   * np.exp(-(dz / 4) ** 2)).astype(np.float32)
            hu[seed] = 3071


def in_box(field, box, inside=0.0):
    """Bool array over `box` (slices): True where the field's d <= inside (False outside the field's own box)."""
    out = np.zeros(tuple(s.stop - s.start for s in box), bool)
    if field is None:
        return out
    sl, d = field
    lo = [max(a.start, b.start) for a, b in zip(sl, box)]
    hi = [min(a.stop, b.stop) for a, b in zip(sl, box)]
    if any(h <= l for l, h in zip(lo, hi)):
        return out
    out[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, box))] = \
        d[tuple(slice(l - a.start, h - a.start) for l, h, a in zip(lo, hi, sl))] <= inside
    return out


# --- Acquisition: grid, image formation, storage -----------------------------------------------
def make_grid(acq, grid_kind, forced_shape=None):
    """The canonical RAS grid covering the drawn field of view."""
    sx, sy, sz = acq["spacing"]
    j = acq["fov_jitter"]
    z_lo, z_hi = Z_RANGES[acq["fov"]]
    z_lo, z_hi = z_lo + 25 * j[0], z_hi + 30 * j[1]
    if acq["cut"] == "low" and acq["fov"] in ("pelvis", "abdomen_pelvis"):
        z_lo = -30 + 15 * j[0]  # through the prostate / lower rectum
    elif acq["cut"] == "high" and acq["fov"] == "pelvis":
        z_hi = 40 + 20 * j[1]  # through the bladder
    centre = np.array([10 * j[2], -20 + 10 * j[3], (z_lo + z_hi) / 2])
    if forced_shape is not None:
        shape = tuple(int(n) for n in forced_shape)
    elif grid_kind == "ct":
        shape = (CT_MATRIX, CT_MATRIX, int(round((z_hi - z_lo) / sz)) + 1)
    else:
        fov = acq["inplane_fov"]
        shape = (int(round(fov / sx)), int(round(fov / sy)), int(round((z_hi - z_lo) / sz)) + 1)
    origin = centre - (np.array(shape) - 1) / 2 * np.array([sx, sy, sz])
    return Grid(shape, (sx, sy, sz), origin)


def form_image(cv, rng, acq):
    """Partial-volume blur (scanner PSF + slice profile) and correlated noise; returns int16 HU."""
    sx, sy, sz = acq["spacing"]
    # Sigmas in voxels: ~0.7 mm in-plane PSF; the slice profile mixes neighbouring slices when slices are thick.
    b = acq["blur"]
    sig = (max(0.7 * b / sx, 0.45 * b), max(0.7 * b / sy, 0.45 * b), 0.5 * b if sz >= 2.5 else 0.35 * b)
    soft = cv.hu > -300  # scanner calibration shifts soft tissue and bone, not air
    cv.hu[soft] += acq["hu_offset"]
    # White noise of sd n has sd n * sqrt(sum k^2) after the blur: pre-scale so the final sd is noise_sd.
    gain = 1.0
    for sg in sig:
        delta = np.zeros(41, np.float32)
        delta[20] = 1
        gain *= float(np.sqrt((ndimage.gaussian_filter1d(delta, sg, truncate=3.0) ** 2).sum()))
    noise = rng.standard_normal(cv.hu.shape, dtype=np.float32)
    noise *= acq["noise_sd"] / gain
    cv.hu += noise  # in place throughout: a 512^2 x 300 float32 volume is 300 MB
    del noise
    ndimage.gaussian_filter(cv.hu, sig, output=cv.hu, truncate=3.0)
    if acq["sharpen"]:  # edge-enhancing (bone / lung) kernel: unsharp mask, overshoot at edges
        cv.hu += acq["sharpen"] * (cv.hu - ndimage.gaussian_filter(cv.hu, 1.0, truncate=2.0))
    np.rint(cv.hu, out=cv.hu)
    np.clip(cv.hu, -1024, 3071, out=cv.hu)
    return cv.hu.astype(np.int16)


def to_storage(data, grid, code):
    """Reorient a canonical RAS array to axis code `code`; returns (array, affine) with truthful world positions."""
    img = nib.Nifti1Image(data, grid.affine)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(tuple(code)))
    out = img.as_reoriented(ornt)
    return np.asanyarray(out.dataobj), out.affine


def nifti(data, affine):
    """A NIfTI image with qform and sform both set to the scanner affine (code 1)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(data.dtype)
    return img


# --- Public API ---------------------------------------------------------------------------------
def make_case(seed, grid="demo", style="train", **forced):
    """One synthetic case: dict(ct=int16 NIfTI, masks={name: uint8 NIfTI}, meta=dict).

    `style` picks the ranges (STYLES). `forced` overrides random draws: sex, fov, orientation, spacing (mm,
    x y z), shape (voxels), iv_contrast, bladder_contrast, table, noise_sd, cut. The anatomy depends only on
    `seed`, sex and style, so the same seed in two orientations gives the same world-space organs.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    st = STYLES[style]
    root = np.random.SeedSequence(int(seed))
    acq_rng, anat_rng, noise_rng = (np.random.default_rng(s) for s in root.spawn(3))
    acq = draw_acquisition(acq_rng, grid, forced, st)
    if acq["fov"] not in Z_RANGES:
        raise ValueError(f"fov must be one of {', '.join(Z_RANGES)}; got {acq['fov']!r}")
    p = draw_patient(anat_rng, acq["sex"], st)
    g = make_grid(acq, grid, forced.get("shape"))
    spread = {k: st["hu_spread"] if k in RANDOMISED_TISSUES else 0.0 for k in TISSUE_HU}
    means = {k: float(anat_rng.uniform(lo - spread[k], hi + spread[k])) for k, (lo, hi) in TISSUE_HU.items()}
    cv = Canvas(g, means)
    trunk, warp = paint_body(cv, anat_rng, p, acq["table"])
    paint_muscles(cv, anat_rng, p, trunk, warp)
    lay = organ_layout(anat_rng, p, acq["sex"], st)
    paint_bowel(cv, anat_rng, p, lay["bladder_top"])
    paint_abdominal_organs(cv, anat_rng, p, acq["iv_contrast"])
    paint_chest(cv, anat_rng, p, trunk, acq["iv_contrast"])
    paint_vessels(cv, anat_rng, p, acq["iv_contrast"])
    paint_pelvic_distractors(cv, anat_rng, p, acq["sex"], lay, acq["iv_contrast"])
    paint_small_structures(cv, anat_rng, p, acq["iv_contrast"])
    paint_bones(cv, anat_rng, p)
    paint_organs(cv, anat_rng, p, acq["sex"], lay, acq)
    paint_prosthesis(cv, anat_rng, p)
    paint_hip_streak(cv, anat_rng, p)
    hu = form_image(cv, noise_rng, acq)

    code = acq["orientation"]
    ct, affine = to_storage(hu, g, code)
    masks = {name: nifti(to_storage(cv.masks[name].astype(np.uint8), g, code)[0], affine) for name in MASK_NAMES}
    voxel_ml = float(np.prod(g.spacing)) / 1000.0
    volumes = {name: round(float(cv.masks[name].sum()) * voxel_ml, 3) for name in MASK_NAMES}
    meta = {
        "seed": int(seed), "grid": grid, "style": style, "sex": acq["sex"], "fov": acq["fov"], "orientation": code,
        "status": organ_status(cv.masks, g, p["scale"]),
        "femoral_head_z_mm": round(5 * p["scale"], 1), "z_extent_mm": [round(float(g.axes[2][0]), 1),
                                                                        round(float(g.axes[2][-1]), 1)],
        "spacing": [float(v) for v in nib.affines.voxel_sizes(affine)], "shape": list(ct.shape),
        "volumes_ml": volumes, "present": {k: v > 0 for k, v in volumes.items()},
        "touches_fov_edge": {name: bool(status.touches_edge(cv.masks[name])) for name in MASK_NAMES},
        "bladder_fill_ml": round(p["bladder_ml"], 1), "prostate_ml_drawn": round(p["prostate_ml"], 1),
        "iv_contrast": acq["iv_contrast"], "bladder_contrast": acq["bladder_contrast"],
        "rectum_content": p["rectum_content"], "table": acq["table"], "noise_sd_hu": round(acq["noise_sd"], 1),
        "fov_cut": acq["cut"], "patient_scale": round(p["scale"], 3), "fat_mm": round(p["fat"], 1),
        "devices": {"fiducials": p["fiducials"], "spacer": p["spacer"], "catheter": p["catheter"],
                    "prosthesis": p["prosthesis"]},
        "median_lobe": p["median_lobe"], "hu_offset": round(acq["hu_offset"], 1), "kernel_blur": round(acq["blur"], 2),
        "hu_means": {k: round(v, 1) for k, v in means.items()},
    }
    return {"ct": nifti(ct, affine), "masks": masks, "meta": meta}


def organ_status(masks, grid, scale):
    """True status of each segmented organ: present, partially_imaged (cut by the grid edge), absent (its
    region, ORGAN_REGION_Z, is in the scan but the organ is not: a female prostate) or not_imaged."""
    z0, z1 = float(grid.axes[2][0]), float(grid.axes[2][-1])
    out = {}
    for organ in config.ORGANS:
        m = masks[organ]
        if m.any():
            out[organ] = "partially_imaged" if status.touches_edge(m) else "present"
        else:
            lo, hi = (v * scale for v in ORGAN_REGION_Z[organ])
            out[organ] = "absent" if z0 <= (lo + hi) / 2 <= z1 else "not_imaged"
    return out


def write_case(case, case_dir):
    """Write ct.nii.gz, segmentations/*.nii.gz, combined_labels.nii.gz and meta.json (last, = done marker)."""
    case_dir = Path(case_dir)
    (case_dir / "segmentations").mkdir(parents=True, exist_ok=True)
    combined = np.zeros(case["ct"].shape, np.uint8, order="F")
    jobs = [(case["ct"], case_dir / "ct.nii.gz")]
    for name, img in case["masks"].items():
        combined[np.asanyarray(img.dataobj) > 0] = config.LABEL_VALUES[name]
        jobs.append((img, case_dir / "segmentations" / f"{name}.nii.gz"))
    jobs.append((nifti(combined, case["ct"].affine), case_dir / "combined_labels.nii.gz"))
    # zlib releases the GIL, so two threads compress two files at once (the CT dominates on big grids).
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        list(pool.map(lambda job: save_nifti_atomic(*job, level=COMPRESS_LEVEL), jobs))
    write_text_atomic(case_dir / "meta.json", json.dumps(case["meta"], indent=1))


def case_seed(seed, index):
    """Seed of case `index` (0-based): depends only on (seed, index), whatever the worker count."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def case_done(case_dir):
    case_dir = Path(case_dir)
    files = [case_dir / "meta.json", case_dir / "ct.nii.gz", case_dir / "combined_labels.nii.gz"]
    files += [case_dir / "segmentations" / f"{n}.nii.gz" for n in MASK_NAMES]
    return all(f.is_file() for f in files)


def _generate_one(job):
    out_dir, seed, index, grid, style = job
    case_dir = Path(out_dir) / f"BDMAP_{index + 1:08d}"
    if not case_done(case_dir):
        write_case(make_case(case_seed(seed, index), grid, style), case_dir)
    return str(case_dir)


def _claim_root(out_dir, seed, grid, n_cases, style="train"):
    """Write out_dir/phantom.json, the marker that says 'these cases are the phantom' (run_pipeline, analyze).

    Cases are skipped when already written, so a folder made with another seed or grid must not be topped up.
    """
    marker = out_dir / "phantom.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if (old.get("seed"), old.get("grid"), old.get("style", "train")) != (seed, grid, style):
            raise ValueError(f"{marker}: phantom written with seed {old.get('seed')} grid {old.get('grid')} style "
                             f"{old.get('style', 'train')}, asked for seed {seed} grid {grid} style {style}; "
                             "use another folder or delete it")
        n_cases = max(n_cases, int(old.get("n_cases", 0)))
    info = {"generator": "phantom.py", "seed": seed, "grid": grid, "style": style, "n_cases": n_cases,
            "layout": "AbdomenAtlas 1.1 Mini", "label_values": config.LABEL_VALUES}
    write_text_atomic(marker, json.dumps(info, indent=1))


def generate_dataset(out_dir, n_cases=None, seed=None, grid=None, workers=None, style="train"):
    """Write cases BDMAP_00000001.. under out_dir (skipping finished ones); returns the case dirs."""
    from tqdm import tqdm
    n_cases = config.PHANTOM_CASES if n_cases is None else n_cases
    seed = config.PHANTOM_SEED if seed is None else seed
    grid = config.PHANTOM_GRID if grid is None else grid
    workers = config.NUM_WORKERS if workers is None else workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    _claim_root(out_dir, seed, grid, n_cases, style)
    jobs = [(str(out_dir), seed, i, grid, style) for i in range(n_cases)]
    if workers > 1:
        with Pool(workers) as pool:
            dirs = list(tqdm(pool.imap(_generate_one, jobs), total=n_cases, desc="phantom", unit="case"))
    else:
        dirs = [_generate_one(j) for j in tqdm(jobs, desc="phantom", unit="case")]
    return [Path(d) for d in dirs]


def preview(data_dir, out_png, n=4):
    """Axial / coronal / sagittal slices through the organs of the first n cases, with organ contours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted(Path(data_dir).glob("BDMAP_*"))[:n]
    colours = {"prostate": "tab:red", "bladder": "yellow", "rectum": "tab:cyan",
               "femur_left": "tab:green", "femur_right": "lime"}
    fig, axes = plt.subplots(len(cases), 3, figsize=(12, 4 * len(cases)), squeeze=False)
    for row, case_dir in zip(axes, cases):
        ct_img = nib.as_closest_canonical(nib.load(case_dir / "ct.nii.gz"))
        ct = np.asanyarray(ct_img.dataobj)
        masks = {n: np.asanyarray(nib.as_closest_canonical(nib.load(case_dir / "segmentations" / f"{n}.nii.gz"))
                                  .dataobj) for n in MASK_NAMES}
        meta = json.loads((case_dir / "meta.json").read_text())
        organs = sum(masks[o] for o in ("prostate", "bladder", "rectum"))
        centre = (np.argwhere(organs).mean(0).astype(int) if organs.any() else np.array(ct.shape) // 2)
        sp = nib.affines.voxel_sizes(ct_img.affine)
        views = [("axial", lambda a: a[:, :, centre[2]].T, sp[1] / sp[0]),
                 ("coronal", lambda a: a[:, centre[1], :].T, sp[2] / sp[0]),
                 ("sagittal", lambda a: a[centre[0], :, :].T, sp[2] / sp[1])]
        for ax, (name, cut, aspect) in zip(row, views):
            ax.imshow(cut(ct), cmap="gray", vmin=-200, vmax=300, origin="lower", aspect=aspect)
            for organ, colour in colours.items():
                m = cut(masks[organ])
                if m.any():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{case_dir.name} {name} ({meta['sex']}, {meta['fov']}, {meta['orientation']})", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default config.DATA_ROOT)")
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None)
    parser.add_argument("--style", choices=sorted(STYLES), default="train",
                        help="train (default) or ood, the held-out style of the generalisation check")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--preview", type=Path, default=None, help="also write a preview PNG here")
    parser.add_argument("--dicom", action="store_true", help="write DICOM CT series + RTSTRUCT per case instead "
                                                             "(dicom_export.write_phantom_dicom; --cases default 1)")
    args = parser.parse_args()
    out = args.out or config.DATA_ROOT
    if args.dicom:
        import dicom_export
        dirs = dicom_export.write_phantom_dicom(out, args.cases, args.seed, args.grid, args.style)
        print(f"{len(dirs)} DICOM cases (CT/ + RS.dcm) in {out}")
        return
    t0 = time.time()
    try:
        dirs = generate_dataset(out, args.cases, args.seed, args.grid, args.workers, args.style)
    except ValueError as err:  # bad settings: one line, no traceback
        raise SystemExit(f"phantom.py: {err}")
    print(f"{len(dirs)} cases in {out} ({time.time() - t0:.1f} s)")
    if args.preview:
        print(f"preview: {preview(out, args.preview)}")


if __name__ == "__main__":
    main()
