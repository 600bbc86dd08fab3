"""Settings shared by every stage, defined once.

Scripts read them as ``config.NAME`` (module attribute, never ``from config import``) so that a
command-line override such as ``python run_pipeline.py --all --EPOCHS=5 --PATCH_SIZE=96,96,96`` is
seen everywhere. ``apply_profile()`` fills the device-dependent settings (CPU demo vs GPU) first;
``apply_overrides()`` then applies ``--NAME=value`` pairs, type-checked against the default.

Conventions: arrays in canonical RAS, indexed ``[x, y, z]``; spacing in mm in the same order;
tensors ``(B, C, X, Y, Z)``; CT stored as int16 HU; masks uint8 0/1.
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent

# --- Organs and AbdomenAtlas labels ---------------------------------------------------------
ORGANS = ("prostate", "bladder", "rectum")  # model channel order, decoder keys, metric column names
EXTRA_MASKS = ("femur_left", "femur_right")  # read when present, never segmented
LABEL_VALUES = {"bladder": 12, "prostate": 24, "rectum": 25, "femur_left": 17, "femur_right": 18}  # combined_labels.nii.gz

# --- DICOM: ROI names, synonyms and geometry tolerances (dicom_io.py, convert_dicom.py) ------
ROI_NAMES = {"prostate": "Prostate", "bladder": "Bladder", "rectum": "Rectum",
             "femur_left": "Femur_Head_L", "femur_right": "Femur_Head_R"}  # TG-263 name of each organ's ROI
# ROI names read as each organ: compared case-insensitively with runs of spaces, '_' and '-' made one '_';
# exact matches only (no substrings), so optimisation structures such as 'optBladder' are never taken.
ROI_SYNONYMS = {
    "prostate": ("Prostate", "PROS", "prostate_gland", "Prostata", "ProstateGland"),
    "bladder": ("Bladder", "Blase", "Harnblase", "UrinaryBladder", "Urinary_Bladder", "Vessie"),
    "rectum": ("Rectum", "Rektum", "Rectum_Outer", "Recto"),
    "femur_left": ("Femur_Head_L", "Femoral Head Lt", "Femoral_Head_L", "FemoralHead_L", "Femur_L",
                   "Hip_L", "Femoral Head Left"),
    "femur_right": ("Femur_Head_R", "Femoral Head RT", "Femoral_Head_R", "FemoralHead_R", "Femur_R",
                    "Hip_R", "Femoral Head Right"),
}  # TG-263 name first
DICOM_SLICE_GAP_TOL = 0.01  # a gap between CT slice positions may differ from the median gap by this fraction
DICOM_CONTOUR_PLANE_TOL_MM = 0.1  # a contour lies on a slice when its plane is within this distance (mm)

# --- Folders (environment variables only for these machine-specific paths) -----------------
DEFAULT_DATA_ROOT = REPO / "data"  # where the phantom is written when no real data is given
DATA_ROOT = Path(os.environ.get("PELVIS_DATA_ROOT", DEFAULT_DATA_ROOT))  # BDMAP_* case folders
OUTPUT_ROOT = Path(os.environ.get("PELVIS_OUTPUT_ROOT", REPO))  # parent of every output folder below
PROCESSED_DIR = OUTPUT_ROOT / "processed"  # arrays, manifest.json, splits.json
CHECKPOINT_DIR = OUTPUT_ROOT / "checkpoints"  # best_model.pth, checkpoint_last.pth
LOG_DIR = OUTPUT_ROOT / "logs"  # train_log.jsonl (one JSON line per epoch), run.json
EVAL_DIR = OUTPUT_ROOT / "evaluation_results"  # metrics_per_case.csv, summary_statistics.json, plots
ANALYSIS_DIR = OUTPUT_ROOT / "analysis"  # figures and report.md

# --- Synthetic phantom (the embedded default dataset) -------------------------------------
PHANTOM_CASES = 48  # cases generated when DATA_ROOT holds no BDMAP_* folder (about a third show no pelvis)
PHANTOM_SEED = 0  # same seed, same arrays
PHANTOM_GRID = "demo"  # "demo": coarse voxels for CPU runs; "ct": clinical in-plane 0.6-1.0 mm

# --- Generalisation check: held out, never used to train, tune or pick a checkpoint -------------
HELDOUT_DATA_ROOT = OUTPUT_ROOT / "data_heldout"  # phantoms of the held-out "ood" style (phantom.STYLES)
HELDOUT_CASES = 12  # written once by run_pipeline's eval stage; 0 skips the check
HELDOUT_SEED = 1000  # never the training phantom's seed
EMPTY_CTS = tuple(str(p) for p in (REPO.parent / "shared" / "realdata" / name for name in (
    "aorta_ct_cropped.nii.gz", "pulm_ct_cropped.nii.gz", "ct_dicom_thorax")) if p.exists())  # real chest CTs
# (two NIfTI, one DICOM series): nothing pelvic to find, so any predicted voxel is a false organ

# --- Preprocessing --------------------------------------------------------------------------
TARGET_SPACING = (1.5, 1.5, 1.5)  # mm, [x, y, z]; set by the profile
HU_CLIP = (-200.0, 400.0)  # HU window; normalised intensity = (clip(HU) - centre) / half-width
BODY_THRESHOLD_HU = -500.0  # voxels above this (largest component) are "body" for the crop
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, seeded by SEED
NUM_WORKERS = 2  # processes for preprocessing and phantom generation

# --- Model ----------------------------------------------------------------------------------
BASE_CHANNELS = 8  # width of the first encoder level (8 -> ~2.7 M parameters)
DEPTH = 5  # resolution levels, including the full-resolution one
ATTENTION = True  # cross-decoder attention on/off (ablation switch)
ACTIVATION_CHECKPOINTING = False  # recompute decoder activations in backward to save memory

# --- Training -------------------------------------------------------------------------------
PATCH_SIZE = (128, 128, 128)  # voxels [x, y, z]; training patch and sliding window; set by profile
BATCH_SIZE = 1  # patches per step; set by the profile
EPOCHS = 100  # set by the profile
ITERS_PER_EPOCH = 250  # optimiser steps per epoch (fixed, as in nnU-Net)
OPTIMIZER = "adamw"  # "adamw" (cosine schedule after warm-up) or "sgd" (Nesterov, poly schedule as in nnU-Net)
LR = 4e-3  # peak learning rate
WEIGHT_DECAY = 1e-4  # optimiser weight decay
WARMUP_EPOCHS = 1  # linear LR warm-up before the schedule
FOREGROUND_FRACTION = 0.5  # share of patches centred on an organ voxel (organs balanced); 0.7 and 0.85 on the CPU demo:
                           # no consistent gain over seeds (README, Results)
ABSENCE_FRACTION = 0.15  # share of patches centred on the other organs of a case that lacks an organ (data.py);
                         # with the logit offsets: fewer false and missed organs on three seeds (README, Results)
AUGMENT = True  # on-the-fly augmentation on/off
AUGMENT_ON = "auto"  # where: "worker" (loader processes), "device" (training device after the copy), "auto" =
                    # device on CUDA, worker on the CPU (bench.py measures both)
LOADER_WORKERS = 2  # background processes that cut (and augment) training patches; 0 = in the training process;
                    # set by the profile
VAL_EVERY = 5  # epochs between validations (sliding window over the whole val split)
AMP = True  # bf16/fp16 autocast (bf16 on CPU)
SEED = 42  # seeds splits, sampling, augmentation and weights

# --- Inference ------------------------------------------------------------------------------
SW_OVERLAP = 0.5  # sliding-window overlap (fraction of the window)
SW_BATCH = 2  # windows per forward pass
TTA_MIRROR = False  # average over left-right mirroring
LARGEST_COMPONENT = "auto"  # largest connected component per organ: "on", "off", or "auto" = decided on the
                            # validation split during training and stored in the checkpoint
PRESENCE_RULE = "auto"  # "auto": an organ predicted smaller than a minimum volume is absent, the minimum per organ
                        # decided on the validation split during training and stored in the checkpoint; "off"
PRESENCE_BOUNDS = (0.1, 0.5)  # the minimum stays between these fractions of the smallest whole organ of the
                              # training split: never keep less than a tenth of it, never drop half of it
MIN_ORGAN_ML = {}  # that decision (mL per organ, model space); set from the checkpoint by evaluate and predict
PRESENCE_MIRROR_ORGANS = ("prostate",)  # evaluate and predict (with STATUS_MIRROR_CHECK): such an organ is absent
    # unless the prediction on the left-right mirrored CT, cleaned up alike (minimum volume included), keeps it too;
    # () = off (--PRESENCE_MIRROR_ORGANS=). Midline organs only. Three demo nets on the development phantoms:
    # false prostates 12 -> 8, one poor true one (Dice 0.33) missed; test split and held-out set unchanged. On the
    # rectum (the sigmoid is not symmetric) it removed 2 small true ones (README, status section)
LOGIT_OFFSET = "auto"  # "auto": an offset added to each organ's logit before the argmax, the one of LOGIT_OFFSETS
                      # that maximises the validation score after clean-up, chosen per organ in training and stored
                      # in the checkpoint (an under-segmenting net gets a positive one); "off": none
LOGIT_OFFSETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # the candidates (+3 only changed a seed-7 demo prostate: README)
ORGAN_LOGIT_OFFSET = {}  # that decision (per organ); set from the checkpoint by evaluate and predict

# --- DICOM export ---------------------------------------------------------------------------
ROI_COLOURS = {"prostate": (255, 128, 0), "bladder": (255, 255, 0), "rectum": (139, 69, 19),
               "femur_left": (0, 200, 0), "femur_right": (0, 160, 255)}  # RTSTRUCT ROIDisplayColor, RGB
SEG_CATEGORY = ("91723000", "SCT", "Anatomical Structure")  # DICOM-SEG segmented property category (DICOM CID 7150)
SEG_CODES = {"prostate": ("41216001", "SCT", "Prostate"), "bladder": ("89837001", "SCT", "Urinary bladder"),
             "rectum": ("34402009", "SCT", "Rectum")}  # DICOM-SEG segmented property type of each organ (SNOMED CT)
SEG_ALGORITHM_FAMILY = ("123110", "DCM", "Artificial Intelligence")  # DICOM-SEG algorithm family (DICOM CID 7162)
ROUNDTRIP_MIN_DICE = 0.95  # an RTSTRUCT read back below this Dice against the mask written is a warning

# --- Status and quality flags ---------------------------------------------------------------
# Status rule and flags: status.py's docstring and the README. Anatomy (not fitted): where the femoral heads
# are and how big; thresholds of the flags are fitted on the validation split and stored in the checkpoint.
STATUS_LANDMARK_SPACING = 3.0  # mm, grid on which the femoral heads are searched (coarser than this: as is)
STATUS_BONE_HU = 100.0  # HU above which a voxel is bone (cancellous ~150-400, osteoporotic lower, cortical > 500);
                        # 130 lost the heads of 3 of 12 stress-test phantoms with 70-120 HU cancellous bone, 150 a
                        # small, noisy (51 HU) ood phantom with 157 HU cancellous bone (seed 2000)
STATUS_BONE_SMOOTH_MM = 2.0  # Gaussian sigma (mm) applied before that threshold, so image noise leaves no holes
STATUS_CORTICAL_HU = 250.0  # a femoral head's ball (radius + 1 voxel) reaches this HU at its 95th percentile (300
                            # missed thin 450-700 HU cortices on the 3 mm grid, where they read ~275)
STATUS_FEMORAL_HEAD_MIN_FRONT = 0.45  # the heads' centres lie at least this share of the body's back-to-front depth
                                      # in front of its back (at their height, along the column through each head,
                                      # the two averaged; the midline column would end at the bottom of the gluteal
                                      # cleft; a table's foam core is not body); contrast-enhanced kidneys, the one
                                      # pair that passes the tests above on the phantoms, lie at 0.305, the best
                                      # pair of each pelvis at 0.60-0.73
STATUS_FEMORAL_HEAD_RADIUS_MM = (15.0, 35.0)  # depth inside bone at a femoral head's centre (head 40-55 mm across)
STATUS_FEMORAL_HEAD_SEPARATION_MM = (120.0, 240.0)  # left-right distance of the two heads' centres (adults)
STATUS_FEMORAL_HEAD_MAX_OFFSET_MM = 25.0  # the two heads differ by at most this in height and in depth
STATUS_MIDLINE_TOLERANCE_MM = 40.0  # their midpoint lies this close to the body's left-right middle
STATUS_ORGAN_Z_MM = {"prostate": (-60.0, 20.0), "bladder": (-40.0, 90.0), "rectum": (-50.0, 100.0)}  # range of
                    # each organ's centre, mm above the femoral heads' centres (superior +)
STATUS_ORGAN_CENTRE_MM = {"prostate": -35.0, "bladder": 5.0, "rectum": -5.0}  # expected organ centre, mm above
                         # the femoral heads: in the scan and organ not found -> "absent", else "not_imaged"
STATUS_CLEAR_NOT_IMAGED = True  # remove the prediction of an organ whose region is not in the scan
STATUS_REGION_MARGIN_MM = 30.0  # region clean-up (inference, validation): a connected piece of an organ whose centre lies
                               # more than this outside its STATUS_ORGAN_Z_MM range, or this far lateral to a femoral
                               # head's centre, is removed (1e9: off); wider than the flag's range, since removing a
                               # true organ costs more than flagging it (reference centres on 120 phantoms reach
                               # 95 mm for an 800 mL bladder; laterally 40 % of the way from the midpoint to a head)
STATUS_MIRROR_CHECK = True  # extra pass on the left-right mirrored CT for the mirror and confidence flags
STATUS_GOOD_DICE = 0.9  # a result with Dice >= this is "good" (threshold fitting, flag measurement)
STATUS_BAD_DICE = 0.7  # a result with Dice < this (or a false or missed organ) is "bad"
STATUS_FLAG_GOOD_QUANTILE = 0.05  # each fitted threshold is meant to flag at most this share of good results,
STATUS_FLAG_CONFIDENCE = 0.9  # with this confidence: a one-sided normal tolerance bound of the good validation
                              # results (logit scale for probabilities and Dice, log for volumes), so a small
                              # validation split gets a wider margin (status.tolerance_bound)
STATUS_FIT_MIN_RESULTS = 5  # fewer good (or correctly absent) validation results of an organ: default threshold
STATUS_MIN_COMPONENT_FLOOR_ML = 0.5  # "fragmented" never counts components smaller than this (mL)
STATUS_EDGE_SHELL_MM = 3.0  # "edge_leak": thickness of the shell just outside a mask (and of the rim left out of its
                            # core), compared after a Gaussian of STATUS_BONE_SMOOTH_MM (image noise)
STATUS_DEFAULT_THRESHOLDS = {  # a checkpoint that predates fitted thresholds, or too few validation results to fit:
    # volumes: adult literature ranges; confidence and mirror Dice: chosen on development phantoms (test split,
    # seeds 1 and 2000) for the 20-epoch demo net, whose validation split holds one good result (0.6 / 0.8
    # caught 47 of 59 bad results there, 0.75 / 0.85 52, both flagging none of the 9 good ones)
    "volume_ml": {"prostate": [10.0, 120.0], "bladder": [20.0, 900.0], "rectum": [15.0, 300.0]},
    "min_component_ml": {"prostate": 1.0, "bladder": 2.0, "rectum": 2.0},
    "min_confidence": {"prostate": 0.75, "bladder": 0.75, "rectum": 0.75},
    "min_mirror_dice": {"prostate": 0.85, "bladder": 0.85, "rectum": 0.85},
    "max_absent_probability": {"prostate": 0.45, "bladder": 0.45, "rectum": 0.45},
    # edge leak (share of the shell just outside the mask whose HU lies in the mask core's 10-90 % range): fitted on
    # the reference masks of the training split; these defaults, for a checkpoint without them, were chosen on
    # the development phantoms (seeds 1 and 2000, the demo net, model space): good bladders 0.08-0.30, middling
    # ones (Dice 0.7-0.9) up to 0.69, the two under-segmented bladders no other flag caught 0.55 and 0.61;
    # prostates and rectums of every quality spread over the whole range there, so theirs never fire
    "max_edge_leak": {"prostate": 1.0, "bladder": 0.54, "rectum": 1.0},
}

# --- Device profiles: applied before command-line overrides ---------------------------------
PROFILE = "auto"  # "auto" (gpu if CUDA else cpu), "cpu" or "gpu"
PROFILES = {
    # What the user asked for on a < 8 GB GPU: 128^3 at batch 1, base 8, AMP.
    "gpu": dict(TARGET_SPACING=(1.5, 1.5, 1.5), PATCH_SIZE=(128, 128, 128), BATCH_SIZE=1, DEPTH=5,
                EPOCHS=100, ITERS_PER_EPOCH=250, VAL_EVERY=5, SW_OVERLAP=0.5, SW_BATCH=2, AUGMENT=True,
                LOADER_WORKERS=2),
    # A 2-core CPU demo that finishes `--all` in <= 10 minutes: coarse voxels, small patches.
    # Measured on the phantom (700 steps, same seed): without augmentation mean test Dice 0.848, with it 0.607;
    # augmentation pays off over long runs, not in a 10-minute demo.
    # Spatial cross-decoder attention on (as in every profile): `python ablation.py --seeds 0 1 2 --EPOCHS=10`
    # gave mean Dice 0.552 +- 0.085 with it vs 0.466 +- 0.007 without on the test split, 0.396 vs 0.355 on the
    # held-out set (higher on every seed there); see README.
    # Validation once, after the last epoch: one full-volume pass over the val split costs about 1.5 epochs of
    # training (47 s on a 2-core AVX2 EPYC without native bf16, where `--all` took 10 min 16 s with a pass at
    # epoch 10 too); with VAL_EVERY=4 the last epoch was the best in 4 of 5 logged 20-epoch demo runs (the fifth:
    # epoch 16, score 0.634 vs 0.609); in the AVX2 run epoch 10 scored 0.608, epoch 20 0.740. Validation draws
    # no random numbers, so the weights are the same either way.
    # 24 epochs (20 until 2026-12-06): the time that the one femoral-head search per scan and the malloc setting
    # (inference.keep_freed_memory) saved went back into training (BENCHMARKS.md, "Demo time, 2026-12-06").
    # Loader workers off: on the 2 cores that also train, two workers made each demo epoch 6 % slower (6.9 vs
    # 6.5 s, `--all` 291 vs 282 s, same Dice; idle Xeon with AMX, 2026-12-02); cutting a 48^3 patch without
    # augmentation is ~1 % of a step, so there is nothing to take off the loop.
    "cpu": dict(TARGET_SPACING=(3.0, 3.0, 3.0), PATCH_SIZE=(48, 48, 48), BATCH_SIZE=2, DEPTH=4,
                EPOCHS=24, ITERS_PER_EPOCH=50, VAL_EVERY=24, SW_OVERLAP=0.25, SW_BATCH=4, AUGMENT=False,
                ATTENTION=True, LOADER_WORKERS=0),
}


class SettingError(ValueError):
    """A setting override that names no setting or has the wrong type."""


def settings():
    """All UPPER_CASE settings as a JSON-friendly dict (paths as str, tuples as lists)."""
    mod = sys.modules[__name__]
    out = {}
    for name in dir(mod):
        if name.isupper() and name not in ("PROFILES", "REPO"):
            value = getattr(mod, name)
            out[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def restore(values):
    """Set the settings from a settings() dict (e.g. in a spawned worker process, which starts from defaults)."""
    mod = sys.modules[__name__]
    for name, value in values.items():
        default = getattr(mod, name)
        setattr(mod, name, Path(value) if isinstance(default, Path) else
                tuple(value) if isinstance(default, tuple) else value)


def resolve_profile():
    """'cpu' or 'gpu' from PROFILE ('auto' looks for CUDA)."""
    if PROFILE != "auto":
        return PROFILE
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def apply_profile(name=None):
    """Set the device-dependent settings from PROFILES; returns the profile name."""
    name = name or resolve_profile()
    if name not in PROFILES:
        raise SettingError(f"PROFILE must be one of auto, {', '.join(PROFILES)}; got {name!r}")
    for key, value in PROFILES[name].items():
        setattr(sys.modules[__name__], key, value)
    return name


def _parse(name, text, default):
    """Parse `text` to the type of `default`; raise SettingError with a one-line reason."""
    try:
        if isinstance(default, bool):
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, Path):
            return Path(text).expanduser()
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            if kind is str:  # names or paths: any number of them, "" for none
                return tuple(p.strip() for p in text.split(",") if p.strip())
            parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
            values = tuple(kind(p) for p in parts)
            if default and len(values) != len(default):
                raise ValueError
            return values
        if isinstance(default, str):
            return text
    except ValueError:
        pass
    example = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
    raise SettingError(f"--{name}={text}: expected {type(default).__name__} like {example}")


def apply_overrides(pairs):
    """Apply ``["NAME=value", ...]`` to this module; returns {name: new value}.

    Unknown names and values of the wrong type raise SettingError (one line). Folder settings
    under OUTPUT_ROOT follow an OUTPUT_ROOT override unless they are overridden themselves.
    """
    mod = sys.modules[__name__]
    parsed = {}
    for pair in pairs:
        name, sep, text = pair.lstrip("-").partition("=")
        if not sep:
            raise SettingError(f"--{name}: expected --NAME=value")
        if not (name.isupper() and hasattr(mod, name)) or name in ("REPO", "PROFILES"):
            raise SettingError(f"--{name}: no such setting (see config.py)")
        parsed[name] = _parse(name, text, getattr(mod, name))
    if "OUTPUT_ROOT" in parsed:
        for key, sub in (("PROCESSED_DIR", "processed"), ("CHECKPOINT_DIR", "checkpoints"), ("LOG_DIR", "logs"),
                         ("EVAL_DIR", "evaluation_results"), ("ANALYSIS_DIR", "analysis"),
                         ("HELDOUT_DATA_ROOT", "data_heldout")):
            parsed.setdefault(key, parsed["OUTPUT_ROOT"] / sub)
    for name, value in parsed.items():
        setattr(mod, name, value)
    return parsed


def configure(pairs=()):
    """Validate overrides, apply the device profile, then the overrides on top; returns (profile, overrides)."""
    overrides = apply_overrides(pairs)  # validates every pair; PROFILE may be among them
    profile = apply_profile()
    for name, value in overrides.items():  # overrides win over the profile
        setattr(sys.modules[__name__], name, value)
    return profile, overrides


def run_record(device=None):
    """What a run needs to be reproduced: argv, git commit, torch version, device."""
    import platform
    import subprocess
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"argv": sys.argv, "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device) if device is not None else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
