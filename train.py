"""Train the multi-decoder 3D U-Net on preprocessed cases (processed/ -> checkpoints/ + logs/).

Usage:
    python train.py [--resume] [--EPOCHS=5 ...]            # one process (GPU if present, else CPU)
    torchrun --nproc_per_node=2 train.py [--EPOCHS=5 ...]  # several processes (NCCL on GPU, gloo on CPU)

Patches of PATCH_SIZE voxels [x, y, z] are cut from memory-mapped arrays; FOREGROUND_FRACTION of them are
centred on an organ voxel (organs drawn in turn, so the small prostate is as frequent as the bladder), the
rest anywhere in the body so the net also learns absence. Every random draw comes from one torch.Generator
whose state is checkpointed, so `--resume` continues exactly where the run stopped.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
from fileio import write_atomic, write_text_atomic
import inference
import multi_decoder_model
import preprocessing


# --------------------------------------------------------------------------------------------
# Data: patches from memory-mapped cases
# --------------------------------------------------------------------------------------------
class PatchSampler:
    """Draws (image, label) batches of PATCH_SIZE from processed cases.

    image: float32 (B, 1, X, Y, Z) normalised HU; label: int64 (B, X, Y, Z), 0 = background,
    k = ORGANS.index(organ) + 1. Cases smaller than the patch are padded with air / background.
    """

    def __init__(self, case_ids, processed_dir, patch_size, generator):
        self.patch = tuple(int(p) for p in patch_size)
        self.gen = generator
        self.cases = []
        self.organ_voxels = {k: [] for k in range(1, len(config.ORGANS) + 1)}  # class -> [(case idx, coords)]
        for cid in case_ids:
            folder = Path(processed_dir) / "cases" / cid
            ct = np.load(folder / "ct.npy", mmap_mode="r")
            label = np.load(folder / "label.npy")  # small (uint8 at target spacing): keep in memory
            idx = len(self.cases)
            self.cases.append((ct, label))
            for k in self.organ_voxels:
                coords = np.argwhere(label == k)
                if len(coords):
                    self.organ_voxels[k].append((idx, coords.astype(np.int32)))
        if not self.cases:
            raise ValueError(f"no training cases in {processed_dir}: run preprocessing first")
        self.present_classes = [k for k, v in self.organ_voxels.items() if v]

    def _randint(self, high):
        return int(torch.randint(high, (1,), generator=self.gen))

    def _centre(self):
        """Pick (case index, centre voxel) for one patch."""
        if self.present_classes and torch.rand(1, generator=self.gen).item() < config.FOREGROUND_FRACTION:
            k = self.present_classes[self._randint(len(self.present_classes))]
            case_idx, coords = self.organ_voxels[k][self._randint(len(self.organ_voxels[k]))]
            return case_idx, coords[self._randint(len(coords))]
        case_idx = self._randint(len(self.cases))
        shape = self.cases[case_idx][1].shape
        return case_idx, np.array([self._randint(s) for s in shape])

    def _cut(self, case_idx, centre):
        ct, label = self.cases[case_idx]
        shape = np.array(label.shape)
        start = np.asarray(centre) - np.array(self.patch) // 2
        start = np.clip(start, 0, np.maximum(shape - self.patch, 0))  # stay inside when the case is big enough
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        img = np.asarray(ct[sl], dtype=np.float32)
        lab = np.asarray(label[sl])
        pad = [(0, p - s) for p, s in zip(self.patch, img.shape)]
        if any(after for _, after in pad):
            img = np.pad(img, pad, constant_values=-1024.0)  # air
            lab = np.pad(lab, pad, constant_values=0)
        return img, lab

    def batch(self, batch_size):
        imgs, labs = zip(*(self._cut(*self._centre()) for _ in range(batch_size)))
        img = preprocessing.normalize_hu(torch.from_numpy(np.stack(imgs))[:, None])  # (B, 1, X, Y, Z)
        return img, torch.from_numpy(np.stack(labs).astype(np.int64))  # (B, X, Y, Z)


# --------------------------------------------------------------------------------------------
# Augmentation: torch ops on the whole batch, cheap next to the train step
# --------------------------------------------------------------------------------------------
def _uniform(gen, lo, hi, n=1):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment(img, lab, gen):
    """Spatial (rotation, scaling, left-right mirror) and intensity (scale/shift, noise, blur, low resolution)
    augmentation. img (B, 1, X, Y, Z) float, lab (B, X, Y, Z) int64."""
    b = img.shape[0]
    # Rotation about z (the patient axis, where real variation is largest) and small tilts, plus scaling.
    # One affine grid per sample: image trilinear, label nearest.
    if torch.rand(1, generator=gen).item() < 0.5:
        mats = []
        for _ in range(b):
            az, ax, ay = _uniform(gen, -0.35, 0.35), _uniform(gen, -0.1, 0.1), _uniform(gen, -0.1, 0.1)
            s = _uniform(gen, 0.85, 1.15)
            rz = torch.tensor([[torch.cos(az), -torch.sin(az), 0], [torch.sin(az), torch.cos(az), 0], [0, 0, 1]])
            rx = torch.tensor([[1, 0, 0], [0, torch.cos(ax), -torch.sin(ax)], [0, torch.sin(ax), torch.cos(ax)]])
            ry = torch.tensor([[torch.cos(ay), 0, torch.sin(ay)], [0, 1, 0], [-torch.sin(ay), 0, torch.cos(ay)]])
            mats.append(torch.cat([(rz @ rx @ ry) * s, torch.zeros(3, 1)], dim=1))
        theta = torch.stack(mats).float()  # (B, 3, 4) in our (X, Y, Z) order
        theta[:, :, :3] = theta[:, :, :3].flip(1, 2)  # grid_sample's (x, y, z) are our (Z, Y, X) axes
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        air = preprocessing.normalize_hu(torch.tensor(-1024.0))
        img = F.grid_sample(img - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
        lab = F.grid_sample(lab[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()
    # Left-right mirror (axis x): the three organs are midline structures.
    flip = torch.rand(b, generator=gen) < 0.5
    img[flip] = img[flip].flip(2)
    lab[flip] = lab[flip].flip(1)
    # Intensity: mild contrast/brightness (HU are calibrated: +-5 %, +-9 HU; the MRI-style gamma of up to 1.5
    # turned urine into fat-level intensity and cost the bladder its Dice on the phantom), noise, blur and
    # simulated low resolution.
    img = img * _uniform(gen, 0.95, 1.05, b).view(b, 1, 1, 1, 1) + _uniform(gen, -0.03, 0.03, b).view(b, 1, 1, 1, 1)
    if torch.rand(1, generator=gen).item() < 0.3:
        img = img + torch.randn(img.shape, generator=gen) * _uniform(gen, 0.0, 0.05).item()
    if torch.rand(1, generator=gen).item() < 0.2:
        sigma = _uniform(gen, 0.5, 1.0).item()
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 5
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 2
            img = F.conv3d(F.pad(img, pad, mode="replicate"), k.view(shape))
    if torch.rand(1, generator=gen).item() < 0.2:
        size = img.shape[2:]
        factor = _uniform(gen, 0.5, 0.85).item()
        small = F.interpolate(img, scale_factor=factor, mode="nearest")
        img = F.interpolate(small, size=size, mode="trilinear", align_corners=False)
    return img.contiguous(), lab.contiguous()


# --------------------------------------------------------------------------------------------
# Loss: cross-entropy + batch Dice over mutually exclusive classes
# --------------------------------------------------------------------------------------------
def with_background(logits):
    """(B, n, X, Y, Z) organ logits -> (B, n + 1, ...) with the implicit background logit 0 first."""
    return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)


def dice_ce_loss(logits, target):
    """Cross-entropy over background + organs plus soft Dice over the organs.

    Batch Dice: intersections and sums are pooled over the whole batch, and an organ that appears in no
    patch of the batch is left out of the Dice mean. Per-patch Dice would give a patch without an organ a
    perfect score for predicting nothing (the bug this project exists to avoid) and a noisy gradient from
    tiny partial organs; false positives on organ-free patches are still punished by the cross-entropy.
    """
    full = with_background(logits.float())
    ce = F.cross_entropy(full, target)
    probs = full.softmax(1)[:, 1:]  # (B, n, X, Y, Z)
    onehot = F.one_hot(target, full.shape[1]).movedim(-1, 1)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    if present.any():
        dice = (2 * inter[present] + 1e-5) / (denom[present] + 1e-5)
        return ce + (1 - dice.mean())
    return ce


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------
def make_optimizer(model):
    if config.OPTIMIZER == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.LR, momentum=0.99, nesterov=True,
                               weight_decay=config.WEIGHT_DECAY)
    if config.OPTIMIZER == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.LR, weight_decay=config.WEIGHT_DECAY)
    raise ValueError(f"OPTIMIZER must be 'adamw' or 'sgd', got {config.OPTIMIZER!r}")


def make_scheduler(optimizer):
    """Per-step LR factor: linear warm-up, then cosine (adamw) or poly 0.9 (sgd) to the last step."""
    total = max(1, config.EPOCHS * config.ITERS_PER_EPOCH)
    warm = config.WARMUP_EPOCHS * config.ITERS_PER_EPOCH

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if config.OPTIMIZER == "adamw" else (1 - t) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Device, AMP, distributed
# --------------------------------------------------------------------------------------------
def setup_distributed():
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a checkpoint is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Load a checkpoint dict with a one-line error for a missing, truncated or foreign file."""
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
    try:
        model = multi_decoder_model.MultiDecoderUNet(**ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as exc:
        lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
        first = lines[1 if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else 0][:200]  # the cause
        raise ValueError(f"{path}: weights do not fit this architecture; a checkpoint from another version of "
                         f"multi_decoder_model.py has to be retrained ({first})") from None
    return model


# --------------------------------------------------------------------------------------------
# Train and validate
# --------------------------------------------------------------------------------------------
def train_one_epoch(model, sampler, optimizer, scheduler, scaler, device, gen, show_progress):
    model.train()
    dtype = inference.amp_dtype(device)
    losses = []
    steps = tqdm(range(config.ITERS_PER_EPOCH), disable=not show_progress, leave=False, desc="train")
    for _ in steps:
        img, lab = sampler.batch(config.BATCH_SIZE)
        if config.AUGMENT:
            img, lab = augment(img, lab, gen)
        img = img.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)
        lab = lab.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(img)
        loss = dice_ce_loss(logits, lab)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
        steps.set_postfix(loss=f"{losses[-1]:.3f}")
    return float(np.mean(losses))


def validate(model, case_ids, device):
    """Sliding-window inference over each whole validation case, in model space.

    Dice per organ is averaged over cases where the organ is present in the reference; a case where the
    organ is absent scores nothing but counts as a false organ when anything is predicted. The selection
    score is the mean over organs of the Dice over cases where the organ is in the reference OR the
    prediction (a false organ scores 0), so empty-vs-empty can never raise it.
    """
    model.eval()
    dice = {o: [] for o in config.ORGANS}
    scored = {o: [] for o in config.ORGANS}
    scored_lcc = {o: [] for o in config.ORGANS}  # the same with only the largest component per organ
    false_organs = {o: 0 for o in config.ORGANS}
    overlap = {False: {o: [] for o in config.ORGANS}, True: {o: [] for o in config.ORGANS}}  # (ref, pred, both)
    losses = []
    for cid in case_ids:
        folder = Path(config.PROCESSED_DIR) / "cases" / cid
        hu = np.load(folder / "ct.npy")
        ref = torch.from_numpy(np.load(folder / "label.npy").astype(np.int64))
        logits = inference.predict_logits(model, preprocessing.normalize_hu(hu.astype(np.float32)),
                                          config.PATCH_SIZE, config.SW_OVERLAP, config.SW_BATCH,
                                          False, device)  # (n, X, Y, Z) on CPU
        losses.append(dice_ce_loss(logits[None], ref[None]).item())
        labels = np.asarray(inference.logits_to_labels(logits))
        pred = torch.as_tensor(labels)
        pred_lcc = torch.as_tensor(inference.largest_component(labels, len(config.ORGANS)))
        for k, organ in enumerate(config.ORGANS, start=1):
            r, p, p_lcc = ref == k, pred == k, pred_lcc == k
            for lcc, q in ((False, p), (True, p_lcc)):
                overlap[lcc][organ].append((r.sum().item(), q.sum().item(), (r & q).sum().item()))
            if r.any():
                d = 2 * (r & p).sum().item() / (r.sum().item() + p.sum().item())
                dice[organ].append(d)
                scored[organ].append(d)
                scored_lcc[organ].append(2 * (r & p_lcc).sum().item() / (r.sum().item() + p_lcc.sum().item()))
            elif p.any():
                false_organs[organ] += 1
                scored[organ].append(0.0)
                scored_lcc[organ].append(0.0)
    mean = {o: (float(np.mean(v)) if v else None) for o, v in dice.items()}

    def overall(per_organ):
        means = [float(np.mean(v)) for v in per_organ.values() if v]
        return float(np.mean(means)) if means else None

    score, score_lcc = overall(scored), overall(scored_lcc)
    return {"val_loss": float(np.mean(losses)) if losses else None, "val_dice": mean,
            "val_dice_mean": (float(np.mean([v for v in mean.values() if v is not None]))
                              if any(v is not None for v in mean.values()) else None),
            "val_false_organs": false_organs, "score": score, "score_largest_component": score_lcc,
            "overlap": overlap}


def _organ_score(overlaps, min_voxels):
    """Mean Dice of one organ over val cases where it is in the reference or in the prediction, with
    predictions smaller than `min_voxels` removed (a false organ and a missed organ score 0)."""
    scores = []
    for ref, pred, both in overlaps:
        pred, both = (0, 0) if pred < min_voxels else (pred, both)
        if ref or pred:
            scores.append(2 * both / (ref + pred))
    return float(np.mean(scores)) if scores else None


def presence_decision(overlaps, voxel_ml):
    """Minimum predicted volume (mL) below which an organ counts as absent, for one organ, decided on the
    validation split: the smallest cut that maximises _organ_score, placed at the geometric middle between the
    predicted volumes it separates (0 = remove nothing). An organ in no validation reference scores None, and
    removing its false predictions then beats keeping them. Returns (mL, score)."""
    vols = sorted({pred for _, pred, _ in overlaps if pred})
    rank = lambda s: 1.0 if s is None else s  # noqa: E731 (nothing left to score: no false organ)
    best = (_organ_score(overlaps, 0), 0.0)
    for lo, hi in zip(vols, vols[1:] + [None]):  # remove every prediction of <= lo voxels
        score = _organ_score(overlaps, lo + 1)
        cut = (lo * hi) ** 0.5 if hi else 2.0 * lo
        if rank(score) > rank(best[0]) + 1e-9:
            best = (score, cut)
    return best[1] * voxel_ml, best[0]


def largest_component_decision(val):
    """Keep only each organ's largest component? Forced by LARGEST_COMPONENT "on"/"off"; with "auto", only
    when it raises the validation score (recorded in the checkpoint, used by evaluate and predict)."""
    if config.LARGEST_COMPONENT != "auto":
        return inference.keep_largest_on(config.LARGEST_COMPONENT)
    return val["score_largest_component"] is not None and val["score_largest_component"] > val["score"]


def postprocess_decision(val):
    """Clean-up decided on the validation split: (keep largest component, {organ: minimum mL}, score).

    The score is the selection score after both rules, so the best checkpoint is the one that is best once
    cleaned up, and a false organ the rules remove no longer costs it anything."""
    keep = largest_component_decision(val)
    voxel_ml = float(np.prod(config.TARGET_SPACING)) / 1000.0
    min_ml, scores = {}, []
    for organ in config.ORGANS:
        overlaps = val["overlap"][keep][organ]
        ml, score = presence_decision(overlaps, voxel_ml) if config.PRESENCE_RULE == "auto" else (
            0.0, _organ_score(overlaps, 0))
        min_ml[organ] = round(ml, 3)
        if score is not None:
            scores.append(score)
    return keep, min_ml, (float(np.mean(scores)) if scores else None)


def _rng_state(gen):
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _logged_epoch(line):
    """The epoch of one train_log.jsonl line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _read_splits():
    path = Path(config.PROCESSED_DIR) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no splits (run preprocessing first: python run_pipeline.py --preprocess)")
    return json.loads(path.read_text())


def train(resume=False, show_progress=None, stop_after=None):
    """Train with the current config; returns the path of the best checkpoint.

    stop_after: end after this epoch as if interrupted (tests of --resume); the schedule still spans EPOCHS.
    """
    rank, world, device = setup_distributed()
    main_rank = rank == 0
    if show_progress is None:
        show_progress = main_rank and sys.stderr.isatty()
    torch.manual_seed(config.SEED)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    splits = _read_splits()
    if not splits.get("train"):
        raise ValueError(f"{Path(config.PROCESSED_DIR) / 'splits.json'}: the train split is empty")
    gen = torch.Generator().manual_seed(config.SEED + 1000 * rank)  # each rank draws its own patches
    sampler = PatchSampler(splits["train"], config.PROCESSED_DIR, config.PATCH_SIZE, gen)

    model = multi_decoder_model.build_model_from_config().to(device).to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=inference.amp_dtype(device) == torch.float16)
    ckpt_dir, log_dir = Path(config.CHECKPOINT_DIR), Path(config.LOG_DIR)
    last_path, best_path = ckpt_dir / "checkpoint_last.pth", ckpt_dir / "best_model.pth"
    log_path = log_dir / "train_log.jsonl"
    start_epoch, best = 0, {"score": None, "epoch": None}
    if resume:
        ckpt = load_checkpoint(last_path)
        if ckpt["model_config"] != model.config:
            raise ValueError(f"{last_path}: built with {ckpt['model_config']}, current settings give {model.config}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"], gen)
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        if main_rank:
            print(f"resuming from {last_path} after epoch {start_epoch}")
    if not model.attention:  # switched off: its weights get no gradient, which DDP would take for an error
        model.cross_attention.requires_grad_(False)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if main_rank:
        log_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume and log_path.is_file():  # drop epochs logged after the checkpoint we resume from
            kept = [l for l in log_path.read_text().splitlines()
                    if (_logged_epoch(l) or math.inf) <= start_epoch]
        write_text_atomic(log_path, "".join(l + "\n" for l in kept))
        record = {**config.run_record(device), "profile": config.resolve_profile(), "settings": config.settings(),
                  "world_size": world,
                  "start_time": time.strftime("%Y-%m-%d %H:%M:%S"), "model_config": model.config,
                  "parameters": sum(p.numel() for p in model.parameters())}
        write_text_atomic(log_dir / "run.json", json.dumps(record, indent=2))
    t_start = time.time()
    for epoch in range(start_epoch + 1, config.EPOCHS + 1):
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_loss = train_one_epoch(net, sampler, optimizer, scheduler, scaler, device, gen, show_progress)
        if world > 1:
            t = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(t)
            train_loss = t.item() / world
        train_time = time.time() - t0
        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": None, "lr": scheduler.get_last_lr()[0],
                 "epoch_time_s": None, "patches_per_s": config.ITERS_PER_EPOCH * config.BATCH_SIZE * world / train_time,
                 "peak_mem_mb": peak_memory_mb(device), "val_dice": {o: None for o in config.ORGANS},
                 "val_dice_mean": None, "val_false_organs": None, "best": False}
        if main_rank:
            if epoch % config.VAL_EVERY == 0 or epoch == config.EPOCHS:
                val = validate(model, splits.get("val") or splits["train"][:2], device)
                keep, min_ml, score = postprocess_decision(val)
                val.pop("overlap")
                entry.update(val, score_cleaned=score, min_organ_ml=min_ml)
                if score is not None and (best["score"] is None or score > best["score"]):
                    best = {"score": score, "epoch": epoch, "largest_component": keep, "min_organ_ml": min_ml}
                    entry["best"] = True
            entry["epoch_time_s"] = time.time() - t0
            ckpt = {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "rng": _gather_rng(gen, world), "best": best, "settings": config.settings(),
                    "largest_component": best.get("largest_component", False),
                    "min_organ_ml": best.get("min_organ_ml", {}),
                    "run": config.run_record(device)}
            # Order matters under kill -9: log line, best, then last. A resume restarts after the last whole
            # checkpoint_last.pth and drops later log lines, so every epoch is logged exactly once and
            # best_model.pth is never older than the best the resumed run believes it has.
            with open(log_path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            if entry["best"] or not best_path.is_file():
                save_atomic(ckpt, best_path)
            save_atomic(ckpt, last_path)
            dice_txt = " ".join(f"{o}={v:.3f}" for o, v in entry["val_dice"].items() if v is not None)
            print(f"epoch {epoch}/{config.EPOCHS} loss {train_loss:.4f} lr {entry['lr']:.2e} "
                  f"{entry['patches_per_s']:.1f} patches/s {entry['epoch_time_s']:.0f}s"
                  + (f" | val dice {dice_txt}" if dice_txt else "") + (" *best*" if entry["best"] else ""), flush=True)
        elif world > 1:
            _gather_rng(gen, world)
        if world > 1:
            torch.distributed.barrier()
        if stop_after is not None and epoch >= stop_after:
            break
    if main_rank:
        record = json.loads((log_dir / "run.json").read_text())
        record.update({"end_time": time.strftime("%Y-%m-%d %H:%M:%S"), "train_seconds": time.time() - t_start,
                       "best_epoch": best["epoch"], "best_score": best["score"]})
        write_text_atomic(log_dir / "run.json", json.dumps(record, indent=2))
    if world > 1:
        torch.distributed.destroy_process_group()
    return best_path


def _gather_rng(gen, world):
    """Every rank's RNG state (rank 0 gets the list; others just take part in the gather)."""
    state = _rng_state(gen)
    if world == 1:
        return state
    states = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/checkpoint_last.pth")
    args, rest = parser.parse_known_args(argv)
    try:
        profile, overrides = config.configure(rest)
    except config.SettingError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"profile {profile}; overrides {overrides or 'none'}")
    try:
        train(resume=args.resume)
    except (FileNotFoundError, ValueError) as exc:  # no processed/, bad checkpoint to resume: one line
        sys.exit(f"train: {exc}")


if __name__ == "__main__":
    main()
