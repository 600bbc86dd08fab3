"""Train the multi-decoder 3D U-Net on preprocessed cases (processed/ -> checkpoints/ + logs/).

Usage:
    python train.py [--resume] [--EPOCHS=5 ...]            # one process (GPU if present, else CPU)
    torchrun --nproc_per_node=2 train.py [--EPOCHS=5 ...]  # several processes (NCCL on GPU, gloo on CPU)

Patches come from data.py (sampling from memory-mapped cases and augmentation, in LOADER_WORKERS background
processes). Each step's random draws come from a generator seeded by (SEED, rank, epoch, step) alone, so a
seeded run is the same for any number of workers and `--resume` continues exactly where the run stopped.
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
import data
import multi_decoder_model
import preprocessing
import status


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


# --------------------------------------------------------------------------------------------
# Train and validate
# --------------------------------------------------------------------------------------------
def train_one_epoch(model, batches, optimizer, scheduler, scaler, device, show_progress):
    """ITERS_PER_EPOCH steps on the next batches of `batches` (data.batches: already on the device)."""
    model.train()
    dtype = inference.amp_dtype(device)
    losses = []
    steps = tqdm(range(config.ITERS_PER_EPOCH), disable=not show_progress, leave=False, desc="train")
    for _ in steps:
        img, lab = next(batches)
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


def candidate_offsets():
    """config.LOGIT_OFFSETS with 0 added, smallest |offset| first (a tie keeps the smaller offset); [0.0] when
    LOGIT_OFFSET is "off"."""
    if config.LOGIT_OFFSET not in ("auto", "off"):
        raise ValueError(f'LOGIT_OFFSET must be "auto" or "off", got {config.LOGIT_OFFSET!r}')
    grid = config.LOGIT_OFFSETS if config.LOGIT_OFFSET == "auto" else ()
    return sorted({float(g) for g in grid} | {0.0}, key=lambda g: (abs(g), g))


def validate(model, case_ids, device, landmarks=None, logits_out=None):
    """Sliding-window inference over each whole validation case, in model space.

    Dice per organ is averaged over cases where the organ is present in the reference; a case where the
    organ is absent scores nothing but counts as a false organ when anything is predicted. The selection
    score is the mean over organs of the Dice over cases where the organ is in the reference OR the
    prediction (a false organ scores 0), so empty-vs-empty can never raise it. These are of the plain
    argmax; "overlap" holds (reference, predicted, both) voxels per case for every candidate logit offset
    (added to all organs alike), after the region clean-up (status.keep_in_region, as in inference.segment),
    without and with the largest-component clean-up, for postprocess_decision.
    landmarks: {case id: (model affine, femoral heads)}, filled on first sight and reused by later calls (train()
    keeps one for the run): a case never changes, and the search costs ~0.8 s a case at every validation.
    logits_out: a dict that receives each case's logits (n, X, Y, Z) float32 (train() hands the last validation's to
    the threshold fit, which would otherwise compute the same pass again).
    """
    model.eval()
    landmarks = {} if landmarks is None else landmarks
    n = len(config.ORGANS)
    overlap = {g: {keep: {o: [] for o in config.ORGANS} for keep in (False, True)} for g in candidate_offsets()}
    losses = []
    for cid in case_ids:
        folder = Path(config.PROCESSED_DIR) / "cases" / cid
        hu = np.load(folder / "ct.npy")
        ref = np.load(folder / "label.npy")
        logits = inference.predict_logits(model, preprocessing.normalize_hu(hu.astype(np.float32)),
                                          config.PATCH_SIZE, config.SW_OVERLAP, config.SW_BATCH,
                                          False, device)  # (n, X, Y, Z) on CPU
        losses.append(dice_ce_loss(logits[None], torch.from_numpy(ref.astype(np.int64))[None]).item())
        logits = logits.numpy()
        if logits_out is not None:
            logits_out[cid] = logits
        refs = [(ref == k, int((ref == k).sum())) for k in range(1, n + 1)]
        if cid not in landmarks:
            affine = json.loads((folder / "meta.json").read_text())["geom"]["model_affine"]
            landmarks[cid] = (affine, status.find_femoral_heads(hu, np.asarray(affine)))
        affine, pelvis = landmarks[cid]
        for g in overlap:
            shifted = inference.offset_logits(logits, dict.fromkeys(config.ORGANS, g))  # every organ alike
            labels = status.keep_in_region(np.asarray(inference.logits_to_labels(shifted)), pelvis, affine)
            for keep, pred in ((False, labels), (True, inference.largest_component(labels, n))):
                for k, (organ, (r, r_sum)) in enumerate(zip(config.ORGANS, refs), start=1):
                    q = pred == k
                    overlap[g][keep][organ].append((r_sum, int(q.sum()), int((r & q).sum())))

    def dice_of(present_only):  # of the plain argmax
        return {o: [2 * both / (r + p) for r, p, both in overlap[0.0][False][o] if r or (p and not present_only)]
                for o in config.ORGANS}

    def overall(per_organ):
        means = [float(np.mean(v)) for v in per_organ.values() if v]
        return float(np.mean(means)) if means else None

    mean = {o: (float(np.mean(v)) if v else None) for o, v in dice_of(True).items()}
    return {"val_loss": float(np.mean(losses)) if losses else None, "val_dice": mean,
            "val_dice_mean": (float(np.mean([v for v in mean.values() if v is not None]))
                              if any(v is not None for v in mean.values()) else None),
            "val_false_organs": {o: sum(1 for r, p, _ in overlap[0.0][False][o] if p and not r) for o in config.ORGANS},
            "score": overall(dice_of(False)), "overlap": overlap}


def _organ_score(overlaps, min_voxels):
    """Mean Dice of one organ over val cases where it is in the reference or in the prediction, with
    predictions smaller than `min_voxels` removed (a false organ and a missed organ score 0)."""
    scores = []
    for ref, pred, both in overlaps:
        pred, both = (0, 0) if pred < min_voxels else (pred, both)
        if ref or pred:
            scores.append(2 * both / (ref + pred))
    return float(np.mean(scores)) if scores else None


def _comparable(score):
    """A score to compare: None (nothing left to score: no organ, no false organ) ranks as a perfect 1."""
    return 1.0 if score is None else score


def presence_decision(overlaps, voxel_ml):
    """Minimum predicted volume (mL) below which an organ counts as absent, for one organ, decided on the
    validation split: the smallest cut that maximises _organ_score, placed at the geometric middle between the
    predicted volumes it separates (0 = remove nothing). An organ in no validation reference scores None, and
    removing its false predictions then beats keeping them. Returns (mL, score)."""
    vols = sorted({pred for _, pred, _ in overlaps if pred})
    best = (_organ_score(overlaps, 0), 0.0)
    for lo, hi in zip(vols, vols[1:] + [None]):  # remove every prediction of <= lo voxels
        score = _organ_score(overlaps, lo + 1)
        cut = (lo * hi) ** 0.5 if hi else 2.0 * lo
        if _comparable(score) > _comparable(best[0]) + 1e-9:
            best = (score, cut)
    return best[1] * voxel_ml, best[0]


def organ_volume_bounds(case_ids):
    """{organ: (PRESENCE_BOUNDS[0], PRESENCE_BOUNDS[1]) x the smallest volume (mL) of that organ in these
    cases, organs cut by the scan edge left out}: the presence rule's minimum stays inside these bounds, so it
    always removes what no real organ is (that small) and never removes what a real organ can be ((0, inf)
    when the organ is not seen)."""
    bounds = {}
    for organ in config.ORGANS:
        vols = []
        for cid in case_ids:
            path = Path(config.PROCESSED_DIR) / "cases" / cid / "meta.json"
            meta = json.loads(path.read_text()) if path.is_file() else {}  # hand-made arrays: no evidence
            entry = (meta.get("organs") or {}).get(organ) or {}
            if entry.get("present") and not entry.get("touches_fov_edge"):
                vols.append(float(entry["ml"]))
        lo, hi = config.PRESENCE_BOUNDS
        bounds[organ] = (round(lo * min(vols), 3), round(hi * min(vols), 3)) if vols else (0.0, math.inf)
    return bounds


def postprocess_decision(val, bounds_ml=None):
    """Clean-up decided on the validation split: (keep largest component, {organ: logit offset},
    {organ: minimum mL}, score).

    Per organ, the logit offset (of candidate_offsets) and the presence minimum that together maximise its
    validation score; the minimum is clipped to bounds_ml[organ] (organ_volume_bounds of the training split).
    Keeping only the largest component is decided with them (LARGEST_COMPONENT "auto": only when it raises the
    score; "on"/"off" force it): an offset that grows the organ also grows stray pieces. Each offset was tried on
    all organs at once, so the score of two organs given different offsets is that of their shared boundary
    unmoved (close: organs meet the background far more than each other). The score is the selection score
    after the rules, so the best checkpoint is the one that is best once cleaned up, and a false organ the rules
    remove no longer costs it anything."""
    options = ((False, True) if config.LARGEST_COMPONENT == "auto"
               else (inference.keep_largest_on(config.LARGEST_COMPONENT),))
    best = None
    for keep in options:
        offsets, min_ml, score = _organ_decisions(val, keep, bounds_ml or {})
        if best is None or (score is not None and (best[3] is None or score > best[3] + 1e-9)):
            best = (keep, offsets, min_ml, score)
    return best


def _organ_decisions(val, keep, bounds_ml):
    """({organ: logit offset}, {organ: minimum mL}, mean score) for one choice of the largest-component rule."""
    voxel_ml = float(np.prod(config.TARGET_SPACING)) / 1000.0
    offsets, min_ml, scores = {}, {}, []
    for organ in config.ORGANS:
        best = None
        for g, per_keep in val["overlap"].items():  # smallest |offset| first: a tie keeps it
            overlaps = per_keep[keep][organ]
            ml, score = presence_decision(overlaps, voxel_ml) if config.PRESENCE_RULE == "auto" else (
                0.0, _organ_score(overlaps, 0))
            if config.PRESENCE_RULE == "auto" and organ in bounds_ml:
                clipped = float(np.clip(ml, *bounds_ml[organ]))
                if clipped != ml:
                    ml, score = clipped, _organ_score(overlaps, clipped / voxel_ml)
            if best is None or _comparable(score) > _comparable(best[2]) + 1e-9:
                best = (g, ml, score)
        offsets[organ], min_ml[organ] = best[0], round(best[1], 3)
        if best[2] is not None:
            scores.append(best[2])
    return offsets, min_ml, (float(np.mean(scores)) if scores else None)


def _rng_state():
    """The global RNG states (patches and augmentation have none to keep: data.step_generator)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
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
    inference.keep_freed_memory()
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
    sampler = data.PatchSampler(splits["train"], config.PROCESSED_DIR, config.PATCH_SIZE)  # rank's own: see batches
    bounds_ml = organ_volume_bounds(splits["train"])

    model = multi_decoder_model.build_model_from_config().to(device).to(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=inference.amp_dtype(device) == torch.float16)
    ckpt_dir, log_dir = Path(config.CHECKPOINT_DIR), Path(config.LOG_DIR)
    last_path, best_path = ckpt_dir / "checkpoint_last.pth", ckpt_dir / "best_model.pth"
    log_path = log_dir / "train_log.jsonl"
    start_epoch, best = 0, {"score": None, "epoch": None}
    if resume:
        ckpt = inference.load_checkpoint(last_path)
        if ckpt["model_config"] != model.config:
            raise ValueError(f"{last_path}: built with {ckpt['model_config']}, current settings give {model.config}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
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
    # One loader for the whole run: its workers start once and keep making batches while we validate.
    batches = data.batches(sampler, start_epoch, config.EPOCHS, rank, device)
    val_landmarks = {}  # validate(): femoral heads of each validation case, searched once per run
    last_logits = {}  # the last epoch's validation logits: the threshold fit reuses them when that epoch is the best
    for epoch in range(start_epoch + 1, config.EPOCHS + 1):
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_loss = train_one_epoch(net, batches, optimizer, scheduler, scaler, device, show_progress)
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
                val = validate(model, splits.get("val") or splits["train"][:2], device, val_landmarks,
                               last_logits if epoch == config.EPOCHS else None)
                keep, offsets, min_ml, score = postprocess_decision(val, bounds_ml)
                val.pop("overlap")
                entry.update(val, score_cleaned=score, logit_offset=offsets, min_organ_ml=min_ml)
                if score is not None and (best["score"] is None or score > best["score"]):
                    best = {"score": score, "epoch": epoch, "largest_component": keep, "logit_offset": offsets,
                            "min_organ_ml": min_ml}
                    entry["best"] = True
            entry["epoch_time_s"] = time.time() - t0
            ckpt = {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "rng": _gather_rng(world), "best": best, "settings": config.settings(),
                    "largest_component": best.get("largest_component", False),
                    "logit_offset": best.get("logit_offset", {}), "min_organ_ml": best.get("min_organ_ml", {}),
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
            _gather_rng(world)
        if world > 1:
            torch.distributed.barrier()
        if stop_after is not None and epoch >= stop_after:
            break
    batches.close()  # stops the loader's workers
    if main_rank:
        record = json.loads((log_dir / "run.json").read_text())
        record.update({"end_time": time.strftime("%Y-%m-%d %H:%M:%S"), "train_seconds": time.time() - t_start,
                       "best_epoch": best["epoch"], "best_score": best["score"]})
        write_text_atomic(log_dir / "run.json", json.dumps(record, indent=2))
    if world > 1:
        torch.distributed.destroy_process_group()
    if main_rank and best_path.is_file():  # status flags: thresholds fitted on the val split, kept in the checkpoint
        status.fit_thresholds_safely(best_path, logits=last_logits if best["epoch"] == config.EPOCHS else None)
    return best_path


def _gather_rng(world):
    """Every rank's RNG state (rank 0 gets the list; others just take part in the gather)."""
    state = _rng_state()
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
    except (FileNotFoundError, ValueError, data.LoaderError) as exc:  # no processed/, bad checkpoint, dead worker
        sys.exit(f"train: {exc}")
    except (RuntimeError, ConnectionError, EOFError) as exc:  # a worker's death can surface anywhere (SIGCHLD)
        line = data.worker_failure(exc)
        if line is None:
            raise
        sys.exit(f"train: {line}")


if __name__ == "__main__":
    main()
