"""Training patches: sampling from memory-mapped processed cases, and augmentation.

Usage (a look at what the sampler draws from processed/):
    python data.py [--n 8] [--PATCH_SIZE=96,96,96 ...]

Patches of PATCH_SIZE voxels [x, y, z] are cut from memory-mapped arrays; FOREGROUND_FRACTION of them are
centred on an organ voxel (organs drawn in turn, so the small prostate is as frequent as the bladder), the
rest anywhere in the body so the net also learns absence. Every random draw comes from a torch.Generator the
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
