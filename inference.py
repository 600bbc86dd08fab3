"""Whole-volume inference: Gaussian-weighted sliding window, mirror TTA, labels from logits.

Usage (library; train.py, evaluate.py and predict.py call it):
    logits = predict_logits(model, normalize_hu(hu), config.PATCH_SIZE, 0.5, 2, False, device)  # (n, X, Y, Z)
    labels = segment(model, hu)  # uint8 label map in model space
    python inference.py          # smoke check: timing of a small net on a (1, 1, 128, 128, 96) volume

Shapes: B batch, C channels, X, Y, Z spatial (canonical RAS order); windows are (X, Y, Z) voxels.
The stitched output lives on the CPU in float32 whatever the device, so device memory holds only
`sw_batch` windows at a time and a whole CT never has to fit on the GPU.
"""
import itertools
import math
import time

import numpy as np
import torch
from scipy import ndimage

import config

GAUSSIAN_SIGMA_SCALE = 1 / 8  # sigma = window / 8 per axis
GAUSSIAN_MIN_WEIGHT = 1e-3  # clip the Gaussian away from zero so that every voxel gets a defined average


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------
def window_starts(size, window, overlap):
    """Start indices along one axis: a step of int(window * (1 - overlap)) (at least 1), last window
    moved back so that it ends at the end of the axis. `size` >= `window` here.

    This is the placement MONAI uses, which lets the tests compare the two exactly; spreading the same
    number of windows evenly (nnU-Net) would overlap more uniformly but is not worth losing that check.
    """
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def gaussian_weight(window):
    """(X, Y, Z) importance map: a separable Gaussian centred in the window, sigma = window / 8."""
    weight = torch.ones(())
    for size in window:
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-0.5 * (x / (size * GAUSSIAN_SIGMA_SCALE)) ** 2)
        weight = weight[..., None] * g
    return weight.clamp_min(GAUSSIAN_MIN_WEIGHT).float()


def _check_window(window, overlap, sw_batch, ndim):
    window = tuple(int(w) for w in window)
    if len(window) != ndim or min(window) < 1:
        raise ValueError(f"window must be {ndim} positive sizes, got {window}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if int(sw_batch) < 1:
        raise ValueError(f"sw_batch must be >= 1, got {sw_batch}")
    return window


def sliding_window(predict_fn, image, window, overlap=0.5, sw_batch=1, gaussian=True, device=None, pad_value=None):
    """Run `predict_fn` on overlapping windows of `image` and stitch the outputs.

    predict_fn: maps a (n, C, *window) float tensor on `device` to (n, out_C, *window).
    image: (B, C, X, Y, Z) tensor (any device; read window by window).
    window: (X, Y, Z) voxels; overlap: fraction of the window shared by neighbours, 0 <= overlap < 1.
    sw_batch: windows per call of predict_fn (windows of all batch items are pooled).
    gaussian: weight each window by a Gaussian (sigma = window / 8, clipped at 1e-3) instead of
        uniformly; either way the sum is divided by the accumulated weights.
    device: where predict_fn runs (default: the image's device).
    pad_value: an axis shorter than the window is padded on both sides (centred) with this constant and
        cropped back afterwards; None = the image minimum, i.e. air (-1) for a normalised CT, so the
        padding looks like the outside of the body rather than like tissue.
    Returns (B, out_C, X, Y, Z) float32 on the CPU.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, X, Y, Z), got shape {tuple(image.shape)}")
    window = _check_window(window, overlap, sw_batch, 3)
    device = torch.device(device) if device is not None else image.device
    size = tuple(image.shape[2:])

    pad = [max(w - s, 0) for w, s in zip(window, size)]
    if any(pad):
        value = float(image.min()) if pad_value is None else float(pad_value)
        torch_pad = []
        for p in reversed(pad):  # F.pad lists the last axis first
            torch_pad += [p // 2, p - p // 2]
        image = torch.nn.functional.pad(image, torch_pad, mode="constant", value=value)
    padded = tuple(image.shape[2:])

    weight = gaussian_weight(window) if gaussian else torch.ones(window)
    starts = [window_starts(n, w, overlap) for n, w in zip(padded, window)]
    boxes = [tuple(slice(s, s + w) for s, w in zip(corner, window)) for corner in itertools.product(*starts)]
    jobs = [(b, box) for b in range(image.shape[0]) for box in boxes]

    out = None  # (B, out_C, *padded) float32, CPU; allocated once the first output tells out_C
    norm = torch.zeros(padded)
    for box in boxes:
        norm[box] += weight
    for first in range(0, len(jobs), int(sw_batch)):
        chunk = jobs[first:first + int(sw_batch)]
        batch = torch.stack([image[b, :, box[0], box[1], box[2]] for b, box in chunk]).to(device)  # (n, C, *window)
        pred = predict_fn(batch)  # (n, out_C, *window)
        if pred.ndim != 5 or tuple(pred.shape[2:]) != window or pred.shape[0] != len(chunk):
            raise ValueError(f"predict_fn returned shape {tuple(pred.shape)} for windows {tuple(batch.shape)}")
        pred = pred.detach().to("cpu", torch.float32)
        if out is None:
            out = torch.zeros((image.shape[0], pred.shape[1]) + padded)  # (B, out_C, *padded)
        for (b, box), p in zip(chunk, pred):
            out[(b, slice(None)) + box].addcmul_(p, weight)  # += p * weight, no temporary
    out /= norm
    crop = tuple(slice(p // 2, p // 2 + n) for p, n in zip(pad, size))
    return out[(slice(None), slice(None)) + crop].contiguous()


# --------------------------------------------------------------------------------------------
# Model inference
# --------------------------------------------------------------------------------------------
def cpu_bf16_fast():
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 / AMX class).

    Without them bf16 autocast is emulated and slow: on the 2-core AVX2 dev machine one Conv3d went from
    0.11 s to 14 s and a MultiDecoderUNet 64^3 forward from 5 s to 36 s, so it is off there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


MALLOC_KEEP_BYTES = 32 << 20  # freed blocks up to this size stay with the process (glibc's largest mmap threshold)
MALLOC_TRIM_BYTES = 1 << 30  # free memory at the top of the heap is returned to the OS beyond this


def keep_freed_memory():
    """Have glibc's malloc keep freed memory (blocks up to 32 MB, and up to 1 GB free at the top of its heap) for
    reuse instead of giving it back to the OS (Linux; elsewhere nothing happens). A train step allocates and frees
    its activations every time; by default glibc trims them away and the next step page-faults fresh zeroed pages
    in. Measured on a 2-core AVX2 EPYC, demo epochs (50 steps, 48^3, batch 2): 0.36-0.72 M page faults and
    1.1-2.0 s of system time each by default, ~0 and 0.0-0.2 s with this; median epoch 13.6 -> 11.8 s over five
    interleaved pairs of runs (BENCHMARKS.md, "Demo time"). Returns True when set."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)) and bool(mallopt(m_trim_threshold, MALLOC_TRIM_BYTES))


def amp_dtype(device):
    """Autocast dtype, None = float32: config.AMP on CUDA -> bf16 where supported, else fp16; on the CPU
    bf16 only where the CPU has native bf16 (see cpu_bf16_fast)."""
    if not config.AMP:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_fast() else None


def _model_fn(model, device, mirror):
    """predict_fn for sliding_window: autocast forward, float32 logits; mirror = average with the
    x-flipped window (flipped back). On the CPU windows go in channels-last (predict_logits puts the model in
    that format): oneDNN's 3D convolutions run about twice as fast so (128^3 windows, base 8, bf16 and fp32,
    BENCHMARKS.md); CUDA keeps the default format until bench.py --gpu has measured both there."""
    dtype = amp_dtype(device)

    def run(x):
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
            if mirror:
                logits = (logits + model(x.flip(2)).float().flip(2)) / 2  # dim 2 = x
        return logits

    return run


def _is_oom(exc):
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def predict_logits(model, norm_image, patch_size, overlap, sw_batch, mirror, device):
    """Logits (n_organs, X, Y, Z) float32 on the CPU for one normalised volume.

    norm_image: (X, Y, Z) float32 array (or tensor), already through preprocessing.normalize_hu.
    The model is put in eval mode and run on `device` (moved back to where it was afterwards). On a CUDA
    out-of-memory error the window batch is halved and the volume retried; at sw_batch 1 the run falls back
    to the CPU (with a note).
    """
    device = torch.device(device)
    if torch.is_tensor(norm_image):
        image = norm_image.detach().to("cpu", torch.float32)
    else:
        image = torch.from_numpy(np.ascontiguousarray(norm_image, dtype=np.float32))
    if image.ndim != 3:
        raise ValueError(f"norm_image must be (X, Y, Z), got shape {tuple(image.shape)}")
    image = image[None, None]  # (1, 1, X, Y, Z)
    sw_batch = int(sw_batch)
    home = next(model.parameters(), torch.empty(0)).device  # where and in which layout the caller keeps the
    home_format = (torch.channels_last_3d  # model (training keeps it in channels-last), restored afterwards
                   if any(p.dim() == 5 and not p.is_contiguous() for p in model.parameters())
                   else torch.contiguous_format)
    model.eval()
    try:
        while True:
            model.to(device, memory_format=torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format)
            try:
                with torch.inference_mode():
                    return sliding_window(_model_fn(model, device, mirror), image, patch_size, overlap, sw_batch,
                                          gaussian=True, device=device)[0]
            except RuntimeError as exc:
                if device.type != "cuda" or not _is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                if sw_batch > 1:
                    sw_batch //= 2
                    print(f"inference: CUDA out of memory, retrying with sw_batch={sw_batch}")
                else:
                    device = torch.device("cpu")
                    print("inference: CUDA out of memory at sw_batch=1, falling back to the CPU")
    finally:
        model.to(home, memory_format=home_format)  # a CPU fallback must not leave a training model on the CPU


def logits_to_labels(logits):
    """Label map from logits (..., n_organs, X, Y, Z): argmax over [0, l_1, ..., l_n].

    Background has the implicit logit 0, so a voxel is labelled k (= organ index + 1) only where l_k is
    the largest logit AND positive; ties go to the lower label (background first). Returns uint8 of the
    input's kind: a numpy array for an array, a tensor (same device) for a tensor.
    """
    is_tensor = torch.is_tensor(logits)
    t = torch.as_tensor(logits)
    if t.ndim < 4:
        raise ValueError(f"logits must be (..., n_organs, X, Y, Z), got shape {tuple(t.shape)}")
    best, idx = t.max(dim=-4)  # first maximum on ties
    labels = torch.where(best > 0, idx + 1, torch.zeros_like(idx)).to(torch.uint8)
    return labels if is_tensor else labels.numpy()


def offset_logits(logits, offsets=None, organs=None):
    """logits (n_organs, X, Y, Z) plus each organ's logit offset (default config.ORGAN_LOGIT_OFFSET, the one
    decided on the validation split; an organ without one gets 0). A positive offset grows that organ at the
    expense of the background, where the net is less sure than it should be. Same kind as the input."""
    offsets = config.ORGAN_LOGIT_OFFSET if offsets is None else offsets
    organs = tuple(organs or config.ORGANS)[:logits.shape[0]]
    shift = [float(offsets.get(o, 0.0)) for o in organs]
    if not any(shift):
        return logits
    shape = (len(shift),) + (1,) * (logits.ndim - 1)
    if torch.is_tensor(logits):
        return logits + torch.tensor(shift, dtype=logits.dtype, device=logits.device).view(shape)
    return logits + np.asarray(shift, dtype=logits.dtype).reshape(shape)


def largest_component(labels, n_organs):
    """Keep, per label 1..n_organs, only its largest 26-connected component (in place on a copy)."""
    labels = labels.copy()
    for k in range(1, n_organs + 1):
        comps, n = ndimage.label(labels == k, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            labels[(comps != 0) & (comps != sizes.argmax())] = 0
    return labels


def keep_largest_on(value):
    """LARGEST_COMPONENT as a bool: True/"on" keep the largest component; False/"off"/"auto" (undecided) not."""
    return value is True or str(value).lower() in ("on", "true")


def segment(model, hu, settings=None, device=None, patch_size=None, overlap=None, sw_batch=None, mirror=None,
            keep_largest=None, affine=None, pelvis=None, logits=None):
    """uint8 label map (X, Y, Z) in model space for an int16 HU volume in model space.

    settings: optional dict (e.g. a checkpoint's "settings") whose PATCH_SIZE / SW_OVERLAP / SW_BATCH /
    TTA_MIRROR / LARGEST_COMPONENT win over config; explicit keyword arguments win over both.
    HU normalisation uses preprocessing.normalize_hu, i.e. config.HU_CLIP (evaluate/predict set it from
    the checkpoint). Then what training decided on the validation split (use_checkpoint_settings sets it):
    the organs' logit offsets (config.ORGAN_LOGIT_OFFSET), the region clean-up (status.keep_in_region: pieces far
    from where the organ lies relative to the femoral heads go), largest component, presence rule
    (config.MIN_ORGAN_ML).
    affine: the volume's voxel -> world mm (geom["model_affine"]; default: TARGET_SPACING from voxel 0), the frame
    of `pelvis`, the femoral heads found in it (status.find_femoral_heads; searched here when not given).
    logits: the net's organ logits (n, X, Y, Z) of this very volume when the caller has them already (training's
    last validation pass, for the threshold fit); the sliding window is then skipped.
    Device: CUDA when available unless given.
    """
    import status

    settings = settings or {}

    def pick(value, name):
        return value if value is not None else settings.get(name, getattr(config, name))

    if logits is None:
        logits = net_logits(model, hu, device, pick(patch_size, "PATCH_SIZE"), pick(overlap, "SW_OVERLAP"),
                            pick(sw_batch, "SW_BATCH"), pick(mirror, "TTA_MIRROR"))
    elif tuple(logits.shape[1:]) != tuple(np.shape(hu)):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for a volume of shape {tuple(np.shape(hu))}")
    spacing = pick(None, "TARGET_SPACING")
    affine = np.diag([*map(float, spacing), 1.0]) if affine is None else np.asarray(affine, float)
    if pelvis is None:
        pelvis = status.find_femoral_heads(hu, affine)
    logits = np.asarray(logits)
    return clean_up(logits_to_labels(offset_logits(logits)), logits.shape[0], affine, pelvis,
                    keep_largest_on(pick(keep_largest, "LARGEST_COMPONENT")))


def net_logits(model, hu, device=None, patch_size=None, overlap=None, sw_batch=None, mirror=None):
    """The net's organ logits (n, X, Y, Z) float32 numpy of an int16 HU volume in model space: sliding window
    with config's PATCH_SIZE / SW_OVERLAP / SW_BATCH / TTA_MIRROR unless given; CUDA when available unless given."""
    import preprocessing  # here, not at import time: preprocessing imports heavier things

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    norm = preprocessing.normalize_hu(np.asarray(hu))  # float32 in [-1, 1]
    return predict_logits(model, norm, tuple(patch_size or config.PATCH_SIZE),
                          float(config.SW_OVERLAP if overlap is None else overlap),
                          int(sw_batch or config.SW_BATCH), bool(config.TTA_MIRROR if mirror is None else mirror),
                          device).numpy()


def clean_up(labels, n_organs, affine, pelvis, keep_largest):
    """What training decided, applied to a model-space label map (the argmax of the offset logits): the region
    clean-up (status.keep_in_region), the largest component per organ when keep_largest, and the presence rule
    (config.MIN_ORGAN_ML, unless PRESENCE_RULE is "off"). affine: voxel -> world mm, the frame of `pelvis`.
    segment() and the mirrored pass of status.model_evidence both use it, so the two agree."""
    import status

    labels = status.keep_in_region(labels, pelvis, affine)
    if keep_largest:
        labels = largest_component(labels, n_organs)
    if config.PRESENCE_RULE != "off":
        voxel_ml = float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
        labels = drop_small_organs(labels, config.MIN_ORGAN_ML, voxel_ml)
    return labels


def drop_small_organs(labels, min_ml, voxel_ml):
    """The presence rule: an organ whose predicted volume is below min_ml[organ] (mL) is absent (its voxels
    become background). min_ml is decided on the validation split and stored in the checkpoint."""
    labels = labels.copy()
    for k, organ in enumerate(config.ORGANS, start=1):
        mask = labels == k
        if min_ml.get(organ) and 0 < mask.sum() * voxel_ml < min_ml[organ]:
            labels[mask] = 0
    return labels


# --------------------------------------------------------------------------------------------
# Smoke check
# --------------------------------------------------------------------------------------------
def main():
    """Time the sliding window of a small conv net on a (1, 1, 128, 128, 96) volume (CPU)."""
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
    image = torch.randn(1, 1, 128, 128, 96)
    with torch.inference_mode():
        t = time.perf_counter()
        out = sliding_window(net, image, (64, 64, 64), 0.5, 4)
        print(f"sliding_window: {tuple(out.shape)} in {time.perf_counter() - t:.2f} s "
              f"({math.prod(len(window_starts(n, 64, 0.5)) for n in image.shape[2:])} windows)")



# --------------------------------------------------------------------------------------------
# Checkpoint -> model, CT image -> labels (the one home train.py, evaluate.py and predict.py share)
# --------------------------------------------------------------------------------------------
CHECKPOINT_SETTINGS = ("TARGET_SPACING", "PATCH_SIZE", "HU_CLIP")  # taken from the checkpoint, not today's config


def default_checkpoint():
    from pathlib import Path

    return Path(config.CHECKPOINT_DIR) / "best_model.pth"


def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(path):
    """Load a checkpoint dict with a one-line error for a missing, truncated or foreign file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train first: python run_pipeline.py --train)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        detail = str(exc).strip().split(". ")[0][:160]  # torch appends a paragraph of advice; the cause is enough
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (no model/model_config)")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the net from the checkpoint's own model_config and load its weights."""
    import multi_decoder_model

    try:
        model = multi_decoder_model.MultiDecoderUNet(**ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as exc:
        lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
        first = lines[1 if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else 0][:200]  # the cause
        raise ValueError(f"{path}: weights do not fit this architecture; a checkpoint from another version of "
                         f"multi_decoder_model.py has to be retrained ({first})") from None
    return model


def use_checkpoint_settings(ckpt, quiet=False):
    """Set config.TARGET_SPACING / PATCH_SIZE / HU_CLIP from the checkpoint (the model was trained with them);
    prints a note for each that differs from the current config. Returns {name: (current, checkpoint)}."""
    saved = ckpt.get("settings") or {}
    changed = {}
    for name in CHECKPOINT_SETTINGS:
        if name not in saved:
            if not quiet:
                print(f"note: checkpoint records no {name}; using the current {getattr(config, name)}")
            continue
        value = tuple(saved[name])
        current = tuple(getattr(config, name))
        if not np.allclose(np.asarray(value, float), np.asarray(current, float)):
            changed[name] = (current, value)
            if not quiet:
                print(f"note: {name} from the checkpoint {value} (current config has {current})")
        setattr(config, name, value)
    if config.LARGEST_COMPONENT == "auto":  # decided on the validation split when the model was trained
        config.LARGEST_COMPONENT = "on" if ckpt.get("largest_component") else "off"
        if not quiet:
            print(f"largest-component cleanup {config.LARGEST_COMPONENT} (decided on the validation split in training)")
    # an older checkpoint has none (0); --LOGIT_OFFSET=off predicts without them
    config.ORGAN_LOGIT_OFFSET = dict(ckpt.get("logit_offset") or {}) if config.LOGIT_OFFSET == "auto" else {}
    if not quiet and any(config.ORGAN_LOGIT_OFFSET.values()):
        print("logit offsets (decided on the validation split): "
              + ", ".join(f"{o} {v:+g}" for o, v in config.ORGAN_LOGIT_OFFSET.items()))
    if config.PRESENCE_RULE == "auto":
        config.MIN_ORGAN_ML = dict(ckpt.get("min_organ_ml") or {})  # an older checkpoint has none: keep every voxel
        if not quiet and config.MIN_ORGAN_ML:
            print("presence rule (decided on the validation split): organ absent below "
                  + ", ".join(f"{o} {v:g} mL" for o, v in config.MIN_ORGAN_ML.items()))
    return changed


def load_model(checkpoint=None, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict, path) for `checkpoint` (default
    CHECKPOINT_DIR/best_model.pth); one-line errors for missing, truncated or foreign checkpoints.
    Call use_checkpoint_settings(ckpt) before predicting: the net expects the settings it was trained with."""
    from pathlib import Path

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return model.to(device).eval(), ckpt, path


def prepare_case(ct_img):
    """What predict_case and status.assess both need of a CT, computed once: dict(hu=model-space int16 HU,
    geom=its geometry (preprocessing.prepare_ct), pelvis=the femoral heads found in it, world mm)."""
    import preprocessing
    import status

    hu, geom = preprocessing.prepare_ct(ct_img)
    return {"hu": hu, "geom": geom, "pelvis": status.find_femoral_heads(hu, np.asarray(geom["model_affine"]))}


def predict_case(model, ct_img, device, prepared=None, logits=None):
    """uint8 label map (k = ORGANS.index + 1) on the original grid of the NIfTI image `ct_img`
    (RAS, resample and crop as in preprocessing, segment, then all of it undone; the organs' boundaries from their
    offset logits, preprocessing.restore_labels). prepared: prepare_case(ct_img), when the caller has it already;
    logits: the net's logits of prepared["hu"], when the caller has them (segment)."""
    import preprocessing

    prepared = prepared or prepare_case(ct_img)
    geom = prepared["geom"]
    if logits is None:
        logits = net_logits(model, prepared["hu"], device)
    labels = segment(model, prepared["hu"], device=device, affine=geom["model_affine"], pelvis=prepared["pelvis"],
                     logits=logits)
    return preprocessing.restore_labels(labels, geom, offset_logits(np.asarray(logits)))


if __name__ == "__main__":
    main()
