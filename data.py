"""Training patches: sampling from memory-mapped processed cases, and augmentation.

Usage (a look at what the sampler draws from processed/):
    python data.py [--n 8] [--PATCH_SIZE=96,96,96 ...]

Patches of PATCH_SIZE voxels [x, y, z] are cut from memory-mapped arrays; FOREGROUND_FRACTION of them are
centred on an organ voxel (organs drawn in turn, so the small prostate is as frequent as the bladder),
ABSENCE_FRACTION where an organ would be in a case that lacks it (an organ drawn in turn, then a case without
it and a voxel of that case's other organs: a woman's pelvis for the prostate), the rest anywhere in the body
so the net also learns absence. Every random draw comes from a torch.Generator the
caller owns, so a seeded run is reproducible. Shapes: image (B, 1, X, Y, Z) float32, label (B, X, Y, Z) int64.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import config
import preprocessing


# --------------------------------------------------------------------------------------------
# Data: patches from memory-mapped cases
# --------------------------------------------------------------------------------------------
class PatchSampler:
    """Draws (image, label) batches of PATCH_SIZE from processed cases.

    image: float32 (B, 1, X, Y, Z) normalised HU; label: int64 (B, X, Y, Z), 0 = background,
    k = ORGANS.index(organ) + 1. Cases smaller than the patch are padded with air / background.
    """

    def __init__(self, case_ids, processed_dir, patch_size, generator=None):
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
        # Where an organ would be in a case that lacks it (a woman's prostate): that case's other organs.
        self.absence_context = {k: [] for k in self.organ_voxels}  # class -> [(case idx, coords of the others)]
        by_case = {}
        for k, entries in self.organ_voxels.items():
            for idx, coords in entries:
                by_case.setdefault(idx, {})[k] = coords
        for idx, organs in sorted(by_case.items()):
            for k in self.absence_context:
                if k not in organs:
                    self.absence_context[k].append((idx, np.concatenate(list(organs.values()))))
        self.absent_classes = [k for k, v in self.absence_context.items() if v]

    def _randint(self, high):
        return int(torch.randint(high, (1,), generator=self.gen))

    def _centre(self):
        """Pick (case index, centre voxel) for one patch."""
        u = torch.rand(1, generator=self.gen).item()
        if self.present_classes and u < config.FOREGROUND_FRACTION:
            k = self.present_classes[self._randint(len(self.present_classes))]
            case_idx, coords = self.organ_voxels[k][self._randint(len(self.organ_voxels[k]))]
            return case_idx, coords[self._randint(len(coords))]
        if self.absent_classes and u < config.FOREGROUND_FRACTION + config.ABSENCE_FRACTION:
            k = self.absent_classes[self._randint(len(self.absent_classes))]
            case_idx, coords = self.absence_context[k][self._randint(len(self.absence_context[k]))]
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

    def batch(self, batch_size, gen=None):
        """batch_size patches; gen (optional) becomes the generator of this and later draws."""
        if gen is not None:
            self.gen = gen
        imgs, labs = zip(*(self._cut(*self._centre()) for _ in range(batch_size)))
        img = preprocessing.normalize_hu(torch.from_numpy(np.stack(imgs))[:, None])  # (B, 1, X, Y, Z)
        return img, torch.from_numpy(np.stack(labs).astype(np.int64))  # (B, X, Y, Z)


# --------------------------------------------------------------------------------------------
# Augmentation: torch ops on the whole batch, cheap next to the train step
# --------------------------------------------------------------------------------------------
def _uniform(gen, lo, hi, n=1):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _randn_like(img, gen):
    """Gaussian noise of img's shape drawn on img's device, from a generator seeded by one draw of `gen`:
    every random number of augment() comes from gen (a CPU generator) and big tensors are never made on the
    CPU to be copied to a GPU."""
    seed = int(torch.randint(2 ** 62, (1,), generator=gen))
    return torch.randn(img.shape, generator=torch.Generator(img.device).manual_seed(seed), device=img.device)


def augment(img, lab, gen):
    """Spatial (rotation, scaling, left-right mirror) and intensity (scale/shift, noise, blur, low resolution)
    augmentation. img (B, 1, X, Y, Z) float, lab (B, X, Y, Z) int64, on any device (the CPU in a loader
    worker, the GPU after the copy); gen is a CPU torch.Generator and alone decides every random choice."""
    b, dev = img.shape[0], img.device
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
        theta = torch.stack(mats).float().to(dev)  # (B, 3, 4) in our (X, Y, Z) order
        theta[:, :, :3] = theta[:, :, :3].flip(1, 2)  # grid_sample's (x, y, z) are our (Z, Y, X) axes
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        air = preprocessing.normalize_hu(torch.tensor(-1024.0))
        img = F.grid_sample(img - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
        lab = F.grid_sample(lab[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()
    # Left-right mirror (axis x): the three organs are midline structures.
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    img[flip] = img[flip].flip(2)
    lab[flip] = lab[flip].flip(1)
    # Intensity: mild contrast/brightness (HU are calibrated: +-5 %, +-9 HU; the MRI-style gamma of up to 1.5
    # turned urine into fat-level intensity and cost the bladder its Dice on the phantom), noise, blur and
    # simulated low resolution.
    scale, shift = _uniform(gen, 0.95, 1.05, b).to(dev), _uniform(gen, -0.03, 0.03, b).to(dev)
    img = img * scale.view(b, 1, 1, 1, 1) + shift.view(b, 1, 1, 1, 1)
    if torch.rand(1, generator=gen).item() < 0.3:
        img = img + _randn_like(img, gen) * _uniform(gen, 0.0, 0.05).item()
    if torch.rand(1, generator=gen).item() < 0.2:
        sigma = _uniform(gen, 0.5, 1.0).item()
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).to(dev)
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
# Loader: batches made in background processes, copied to the training device
# --------------------------------------------------------------------------------------------
WORKER_TIMEOUT_S = 600  # a worker that delivers no batch for this long is taken as stuck (a batch takes ~1 s)
SAMPLE, AUGMENT = 0, 1  # the two random streams of a step: where the patches are cut, how they are augmented


class LoaderError(RuntimeError):
    """A patch worker died, hung or failed; the message is one line."""


def step_generator(seed, rank, epoch, step, stream):
    """A CPU generator for one training step, seeded from (seed, rank, epoch, step, stream) alone.

    A batch therefore depends neither on which worker makes it nor on how many workers there are nor on what
    was drawn before it: the same seed gives the same run for any LOADER_WORKERS, and `--resume` at an epoch
    boundary only has to know the epoch.
    """
    words = np.random.SeedSequence([seed, rank, epoch, step, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def augment_on_device(device):
    """Does augmentation run on the training device after the copy (True) or in the loader workers (False)?
    AUGMENT_ON "auto": on CUDA the device (a GPU runs these ops in milliseconds, a CPU worker in ~0.2 s per
    128^3 patch); on the CPU the workers, where it overlaps the train step (bench.py measures both)."""
    place = config.AUGMENT_ON
    if place not in ("auto", "device", "worker"):
        raise ValueError(f"AUGMENT_ON must be 'auto', 'device' or 'worker', got {place!r}")
    return place == "device" or (place == "auto" and torch.device(device).type == "cuda")


class PatchStream(torch.utils.data.IterableDataset):
    """The batches of epochs [first_epoch, last_epoch) in step order; worker w of n makes steps w, w + n, ...
    and the DataLoader takes them from the workers in turn, so they arrive in order.

    Yields (epoch, step, image (B, 1, X, Y, Z) float32, label (B, X, Y, Z) uint8: 8x less to copy than int64).
    """

    def __init__(self, sampler, batch_size, iters_per_epoch, first_epoch, last_epoch, seed, rank, augment):
        self.sampler, self.batch_size, self.iters = sampler, int(batch_size), int(iters_per_epoch)
        self.first, self.last, self.seed, self.rank, self.augment = first_epoch, last_epoch, seed, rank, augment

    def __len__(self):
        return (self.last - self.first) * self.iters

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in range(self.first * self.iters + worker, self.last * self.iters, workers):
            epoch, step = divmod(k, self.iters)
            img, lab = self.sampler.batch(self.batch_size, step_generator(self.seed, self.rank, epoch, step, SAMPLE))
            if self.augment:
                img, lab = augment(img, lab, step_generator(self.seed, self.rank, epoch, step, AUGMENT))
            yield epoch, step, img, lab.to(torch.uint8)


def _start_method(workers):
    """Workers are forked: they share the memory-mapped cases and the label arrays with this process (a spawned
    worker would get a pickled copy of every label array, and config.py's defaults instead of this run's)."""
    import multiprocessing
    if workers and "fork" not in multiprocessing.get_all_start_methods():
        print("data: no fork on this system; training patches are made in the training process")
        return 0, None
    return workers, ("fork" if workers else None)


def worker_failure(exc, workers=1):
    """One line for an exception that means a patch worker failed or died, None for any other exception.

    The DataLoader re-raises a worker's exception with the worker's traceback in the message (its last line
    names the original error). A killed worker shows up as a RuntimeError, or as a broken connection when it
    died while handing over a batch; torch's SIGCHLD handler may also raise that RuntimeError anywhere in the
    training process, outside batches(), which is why train.main asks this function too.
    """
    if isinstance(exc, LoaderError):
        return str(exc)
    text = str(exc).strip()
    died = isinstance(exc, (ConnectionError, EOFError)) or "exited unexpectedly" in text or "killed by signal" in text
    if isinstance(exc, RuntimeError) and "DataLoader" not in text and not died:
        return None
    lines = [l.strip() for l in text.splitlines() if l.strip()] or [type(exc).__name__]
    cause = lines[-1] if "Original Traceback" in text else f"{type(exc).__name__}: {lines[0]}"
    if died:
        hint = " (a worker process died, e.g. killed for lack of memory: try fewer LOADER_WORKERS)"
    else:
        hint = " (--LOADER_WORKERS=0 shows the full traceback)" if workers else ""
    return f"{'training patch worker failed' if workers else 'training patches failed'}: {cause}{hint}"


def batches(sampler, first_epoch, last_epoch, rank, device, workers=None):
    """Training batches of epochs [first_epoch, last_epoch) on `device`, in step order: an iterator of
    (image (B, 1, X, Y, Z) float32 channels-last, label (B, X, Y, Z) int64).

    workers background processes (default LOADER_WORKERS; 0 = in this process) cut and, unless augmentation
    runs on the device (augment_on_device), augment the patches; batches go through pinned memory on CUDA and
    are copied without blocking. A worker that dies, fails or hangs raises LoaderError (one line).
    """
    device = torch.device(device)
    workers, context = _start_method(int(config.LOADER_WORKERS if workers is None else workers))
    on_device = config.AUGMENT and augment_on_device(device)
    stream = PatchStream(sampler, config.BATCH_SIZE, config.ITERS_PER_EPOCH, first_epoch, last_epoch, config.SEED,
                         rank, config.AUGMENT and not on_device)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                         multiprocessing_context=context, timeout=WORKER_TIMEOUT_S if workers else 0)
    items = iter(loader)
    expected = first_epoch * stream.iters
    try:
        while True:
            failure = None
            try:
                epoch, step, img, lab = next(items)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001  (a worker's error arrives re-raised as its own type)
                failure = worker_failure(exc, workers) or f"training patches failed: {type(exc).__name__}: {exc}"
            if failure:  # raised here, not inside `except`: the DataLoader's error must not keep it alive
                raise LoaderError(failure)
            if epoch * stream.iters + step != expected:  # cannot happen with in-order loading; cheap to check
                raise LoaderError(f"training batches out of order: got epoch {epoch} step {step}")
            expected += 1
            img = img.to(device, non_blocking=True)
            lab = lab.to(device, non_blocking=True).long()
            if on_device:
                img, lab = augment(img, lab, step_generator(config.SEED, rank, epoch, step, AUGMENT))
            yield img.contiguous(memory_format=torch.channels_last_3d), lab
    finally:
        # Stop the workers now: a dead one left registered would make torch's SIGCHLD handler raise later,
        # anywhere in this process.
        getattr(items, "_shutdown_workers", lambda: None)()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="patches to draw")
    args, rest = parser.parse_known_args(argv)
    try:
        config.configure(rest)
    except config.SettingError as exc:
        parser.exit(2, f"error: {exc}\n")
    splits_path = Path(config.PROCESSED_DIR) / "splits.json"
    if not splits_path.is_file():
        parser.exit(1, f"data: {splits_path}: no splits (run preprocessing first)\n")
    gen = torch.Generator().manual_seed(config.SEED)
    sampler = PatchSampler(json.loads(splits_path.read_text())["train"], config.PROCESSED_DIR,
                           config.PATCH_SIZE, gen)
    img, lab = sampler.batch(args.n)
    if config.AUGMENT:
        img, lab = augment(img, lab, gen)
    counts = {o: int((lab == k).flatten(1).any(1).sum()) for k, o in enumerate(config.ORGANS, start=1)}
    print(f"{args.n} patches {tuple(img.shape[2:])}: image {img.min():.2f}..{img.max():.2f}, "
          f"patches containing each organ {counts}")


if __name__ == "__main__":
    main()
