"""Training: loss goes down, resume is exact, checkpoints are whole, torchrun with gloo works."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import train

ROOT = Path(__file__).resolve().parents[1]


def make_processed(folder, n_cases=4, shape=(36, 34, 33), seed=0):
    """A tiny processed/ tree: soft-tissue body, three blob organs of distinct HU, splits.json."""
    rng = np.random.default_rng(seed)
    ids = [f"BDMAP_{i:08d}" for i in range(1, n_cases + 1)]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for i, cid in enumerate(ids):
        case = Path(folder) / "cases" / cid
        case.mkdir(parents=True)
        ct = np.full(shape, -100, np.int16)  # fat
        label = np.zeros(shape, np.uint8)
        for k, hu in ((1, 45), (2, 5), (3, -600)):
            if k == 1 and i == 1:  # a "female" case: no prostate
                continue
            centre = np.array(shape) * [0.3 + 0.2 * (k - 1), 0.5, 0.5] + rng.integers(-2, 3, 3)
            inside = np.linalg.norm(grid - centre, axis=-1) < 5 + k
            ct[inside], label[inside] = hu, k
        ct += rng.normal(0, 15, shape).astype(np.int16)
        np.save(case / "ct.npy", ct)
        np.save(case / "label.npy", label)
    splits = {"seed": 0, "train": ids[:2], "val": ids[2:3], "test": ids[3:]}
    (Path(folder) / "splits.json").write_text(json.dumps(splits))
    return ids


def tiny_settings(monkeypatch, tmp_path, **extra):
    values = dict(PROCESSED_DIR=tmp_path / "processed", CHECKPOINT_DIR=tmp_path / "checkpoints",
                  LOG_DIR=tmp_path / "logs", PATCH_SIZE=(16, 16, 16), BASE_CHANNELS=4, DEPTH=3, BATCH_SIZE=2,
                  EPOCHS=4, ITERS_PER_EPOCH=3, VAL_EVERY=2, SW_BATCH=2, LR=3e-3)
    values.update(extra)
    for name, value in values.items():
        monkeypatch.setattr(config, name, value)


@pytest.fixture
def processed(tmp_path):
    make_processed(tmp_path / "processed")
    return tmp_path / "processed"


def test_sampler_balances_organs_and_pads(processed, monkeypatch):
    monkeypatch.setattr(config, "FOREGROUND_FRACTION", 1.0)
    cases = ["BDMAP_00000001", "BDMAP_00000002"]
    sampler = train.PatchSampler(cases, processed, (16, 16, 16), torch.Generator().manual_seed(0))
    img, lab = sampler.batch(60)
    assert img.shape == (60, 1, 16, 16, 16) and lab.shape == (60, 16, 16, 16)
    centre = lab[:, 8, 8, 8]  # the patch is centred on the drawn organ voxel
    counts = [(centre == k).sum().item() for k in (1, 2, 3)]
    assert min(counts) >= 12, counts  # organs drawn in turn: the small prostate as often as the others
    wide = train.PatchSampler(cases, processed, (40, 16, 16), torch.Generator().manual_seed(0))
    img, lab = wide.batch(4)
    assert img.shape == (4, 1, 40, 16, 16)
    assert img[:, 0, 36:].max() <= -0.99 and lab[:, 36:].max() == 0  # cases are 36 wide: padded with air


def test_loss_does_not_reward_empty_prediction():
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5, 2:5] = 2
    empty = torch.full((1, 3, 8, 8, 8), -10.0)
    good = empty.clone()
    good[:, 1][target == 2] = 10.0
    assert train.dice_ce_loss(good, target) < 0.05 < 0.9 < train.dice_ce_loss(empty, target)


def test_few_steps_lower_the_loss(processed, monkeypatch, tmp_path):
    tiny_settings(monkeypatch, tmp_path)
    torch.manual_seed(0)
    model = train.multi_decoder_model.build_model_from_config()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = train.PatchSampler(["BDMAP_00000001"], processed, (16, 16, 16), torch.Generator().manual_seed(0))
    img, lab = sampler.batch(2)
    losses = []
    for _ in range(25):
        loss = train.dice_ce_loss(model(img), lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_is_exact(processed, monkeypatch, tmp_path):
    tiny_settings(monkeypatch, tmp_path)
    train.train(show_progress=False)
    straight = _weights(tmp_path / "checkpoints" / "checkpoint_last.pth")
    straight_log = (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()

    tiny_settings(monkeypatch, tmp_path, CHECKPOINT_DIR=tmp_path / "ck2", LOG_DIR=tmp_path / "logs2")
    train.train(show_progress=False, stop_after=2)
    assert len((tmp_path / "logs2" / "train_log.jsonl").read_text().splitlines()) == 2
    train.train(resume=True, show_progress=False)
    resumed = _weights(tmp_path / "ck2" / "checkpoint_last.pth")
    resumed_log = (tmp_path / "logs2" / "train_log.jsonl").read_text().splitlines()

    assert [json.loads(l)["train_loss"] for l in straight_log] == [json.loads(l)["train_loss"] for l in resumed_log]
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert not list((tmp_path / "ck2").glob("*.tmp"))
    best = torch.load(tmp_path / "ck2" / "best_model.pth", weights_only=False)
    assert best["settings"]["PATCH_SIZE"] == [16, 16, 16] and best["model_config"]["base_channels"] == 4
    entry = json.loads(resumed_log[-1])
    assert entry["epoch"] == 4 and set(entry["val_dice"]) == set(config.ORGANS) and entry["patches_per_s"] > 0


def test_same_seed_same_weights(processed, monkeypatch, tmp_path):
    tiny_settings(monkeypatch, tmp_path, EPOCHS=1)
    train.train(show_progress=False)
    first = _weights(tmp_path / "checkpoints" / "checkpoint_last.pth")
    tiny_settings(monkeypatch, tmp_path, EPOCHS=1, CHECKPOINT_DIR=tmp_path / "again")
    train.train(show_progress=False)
    again = _weights(tmp_path / "again" / "checkpoint_last.pth")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_resume_refuses_truncated_checkpoint(processed, monkeypatch, tmp_path):
    tiny_settings(monkeypatch, tmp_path, EPOCHS=1)
    train.train(show_progress=False)
    last = tmp_path / "checkpoints" / "checkpoint_last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint_last.pth: not a readable checkpoint"):
        train.train(resume=True, show_progress=False)


def test_torchrun_two_processes_gloo(processed, tmp_path):
    env = dict(os.environ, PELVIS_OUTPUT_ROOT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train.py"), "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4", "--DEPTH=3", "--EPOCHS=1",
           "--ITERS_PER_EPOCH=2", "--BATCH_SIZE=1", "--VAL_EVERY=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best_model.pth", "checkpoint_last.pth"]
    assert len((tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()) == 1


def test_presence_rule_removes_false_organs_smaller_than_true_ones():
    import train
    # (reference voxels, predicted voxels, overlap): two true organs, two small false ones, one large false one
    overlaps = [(100, 90, 80), (50, 60, 45), (0, 5, 0), (0, 12, 0), (0, 0, 0)]
    ml, score = train.presence_decision(overlaps, voxel_ml=1.0)
    assert 12 < ml < 60 and ml == pytest.approx((12 * 60) ** 0.5)  # between the largest false and smallest true
    assert score == pytest.approx(np.mean([160 / 190, 90 / 110]))
    assert train._organ_score(overlaps, 0) < score  # keeping them scored worse (false organs count 0)
    # nothing to remove: the cut stays 0 (keep every voxel)
    assert train.presence_decision([(100, 90, 80), (0, 0, 0)], 1.0)[0] == 0.0
    # a cut that would delete a true organ is never taken when it lowers the score
    assert train.presence_decision([(100, 4, 4), (0, 30, 0)], 1.0)[0] == 0.0
    # organ in no reference: removing its false predictions wins
    assert train.presence_decision([(0, 7, 0), (0, 0, 0)], 0.5)[0] > 3.5


def test_drop_small_organs_applies_the_rule():
    import inference
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2, :2, :2] = 1  # 8 voxels of prostate
    labels[5:, 5:, 5:] = 2  # 125 voxels of bladder
    out = inference.drop_small_organs(labels, {"prostate": 10.0, "bladder": 10.0}, voxel_ml=1.0)
    assert (out == 1).sum() == 0 and (out == 2).sum() == 125
    assert np.array_equal(inference.drop_small_organs(labels, {}, 1.0), labels)
