"""Training: loss goes down, resume is exact, checkpoints are whole, torchrun with gloo works."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import data
import train

ROOT = Path(__file__).resolve().parents[1]


def make_processed(folder, n_cases=4, shape=(36, 34, 33), seed=0):
    """A tiny processed/ tree: soft-tissue body, three blob organs of distinct HU, meta.json, splits.json."""
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
        organs = {o: {"present": bool((label == k).any()), "ml": float((label == k).sum()) / 1000.0,
                      "touches_fov_edge": False} for k, o in enumerate(config.ORGANS, start=1)}  # 1 mm voxels
        geom = {"model_affine": np.diag([1.0, 1.0, 1.0, 1.0]).tolist()}  # 1 mm voxels from the origin
        (case / "meta.json").write_text(json.dumps({"organs": organs, "geom": geom}))  # as preprocessing writes it
    splits = {"seed": 0, "train": ids[:2], "val": ids[2:3], "test": ids[3:]}
    (Path(folder) / "splits.json").write_text(json.dumps(splits))
    return ids


def tiny_settings(monkeypatch, tmp_path, **extra):
    values = dict(DATA_ROOT=tmp_path / "data",  # no raw cases: the threshold fit after training skips them
                  PROCESSED_DIR=tmp_path / "processed", CHECKPOINT_DIR=tmp_path / "checkpoints",
                  LOG_DIR=tmp_path / "logs", PATCH_SIZE=(16, 16, 16), BASE_CHANNELS=4, DEPTH=3, BATCH_SIZE=2,
                  EPOCHS=4, ITERS_PER_EPOCH=3, VAL_EVERY=2, SW_BATCH=2, LR=3e-3)
    values.update(extra)
    for name, value in values.items():
        monkeypatch.setattr(config, name, value)


@pytest.fixture
def processed(tmp_path):
    make_processed(tmp_path / "processed")
    return tmp_path / "processed"


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
    sampler = data.PatchSampler(["BDMAP_00000001"], processed, (16, 16, 16), torch.Generator().manual_seed(0))
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


def test_femoral_heads_of_a_validation_case_searched_once_per_run(processed, monkeypatch, tmp_path):
    """Two validations in a run (VAL_EVERY=2 of 4 epochs): the landmarks of the one val case are searched
    once, and each validation uses what a fresh search gives."""
    tiny_settings(monkeypatch, tmp_path)
    real, calls = train.status.find_femoral_heads, []

    def counted(hu, affine):
        calls.append(hu.shape)
        return real(hu, affine)

    monkeypatch.setattr(train.status, "find_femoral_heads", counted)
    seen = []
    real_keep = train.status.keep_in_region
    monkeypatch.setattr(train.status, "keep_in_region",
                        lambda labels, pelvis, affine: seen.append(pelvis) or real_keep(labels, pelvis, affine))
    train.train(show_progress=False)
    logged = [json.loads(l) for l in (tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert sum(e["val_dice_mean"] is not None or e["val_false_organs"] is not None for e in logged) == 2
    assert calls == [(36, 34, 33)]  # one val case, two validations
    fresh = real(np.load(processed / "cases" / "BDMAP_00000003" / "ct.npy"), np.eye(4))
    assert len(seen) == 2 * len(train.candidate_offsets()) and all(p == fresh for p in seen)


def test_threshold_fit_gets_the_last_validations_logits(processed, monkeypatch, tmp_path):
    """The last epoch is the best (its validation is the only one): the fit after training receives that
    validation's logits, bit for bit those of the saved best checkpoint on the case, so it need not run them again."""
    tiny_settings(monkeypatch, tmp_path, VAL_EVERY=4)
    got = {}
    monkeypatch.setattr(train.status, "fit_thresholds_safely", lambda path, logits=None: got.update(logits=logits))
    best = train.train(show_progress=False)
    assert set(got["logits"]) == {"BDMAP_00000003"}
    import inference
    import preprocessing
    model, _, _ = inference.load_model(best, "cpu")
    hu = np.load(processed / "cases" / "BDMAP_00000003" / "ct.npy")
    again = inference.predict_logits(model, preprocessing.normalize_hu(hu), config.PATCH_SIZE, config.SW_OVERLAP,
                                     config.SW_BATCH, False, "cpu").numpy()
    assert np.array_equal(got["logits"]["BDMAP_00000003"], again)
    tiny_settings(monkeypatch, tmp_path, EPOCHS=2, VAL_EVERY=1, CHECKPOINT_DIR=tmp_path / "ck2", LOG_DIR=tmp_path / "l2")
    monkeypatch.setattr(train, "postprocess_decision", lambda val, bounds: (False, {}, {}, 0.5))  # epoch 1 stays best
    train.train(show_progress=False)
    assert got["logits"] is None  # the last validation's logits are not the best checkpoint's


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


def test_presence_bounds_from_the_training_split(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(config, "PROCESSED_DIR", tmp_path)
    for cid, ml, edge in (("a", 40.0, False), ("b", 12.0, False), ("c", 2.0, True)):  # c is cut by the edge
        (tmp_path / "cases" / cid).mkdir(parents=True)
        organs = {"bladder": {"present": True, "ml": ml, "touches_fov_edge": edge},
                  "prostate": {"present": False, "ml": 0.0}}
        (tmp_path / "cases" / cid / "meta.json").write_text(json.dumps({"organs": organs}))
    bounds = train.organ_volume_bounds(["a", "b", "c"])
    lo, hi = config.PRESENCE_BOUNDS
    assert bounds == {"prostate": (0.0, math.inf), "bladder": (pytest.approx(lo * 12), pytest.approx(hi * 12)),
                      "rectum": (0.0, math.inf)}
    # the floor wins over a smaller validation cut (here 0: nothing false to remove); the true bladder stays
    val = {"overlap": {0.0: {False: {"prostate": [], "bladder": [(50, 50, 45), (0, 0, 0)], "rectum": []}}},
           "score": None}
    monkeypatch.setattr(config, "LARGEST_COMPONENT", "off")
    monkeypatch.setattr(config, "TARGET_SPACING", (10.0, 10.0, 10.0))  # 1 voxel = 1 mL
    keep, offsets, min_ml, score = train.postprocess_decision(val, {"bladder": (1.2, 6.0)})
    assert keep is False and min_ml["bladder"] == 1.2 and score == pytest.approx(0.9)
    assert offsets == {"prostate": 0.0, "bladder": 0.0, "rectum": 0.0}
    # ... and the cap wins over a larger one: a 30-voxel false bladder would be cut at ~39 mL, capped at 6 mL
    val["overlap"][0.0][False]["bladder"] = [(50, 50, 45), (0, 30, 0)]
    assert train.postprocess_decision(val, {"bladder": (1.2, 6.0)})[2]["bladder"] == 6.0


def test_logit_offset_chosen_per_organ_on_the_validation_overlaps(monkeypatch):
    import train
    monkeypatch.setattr(config, "LARGEST_COMPONENT", "off")
    monkeypatch.setattr(config, "TARGET_SPACING", (10.0, 10.0, 10.0))  # 1 voxel = 1 mL
    # the bladder is under-segmented at offset 0 and right at +1; the prostate is best at 0 (at +1 it grows a
    # false organ too big for the presence rule's cap); the rectum is the same at every offset: the tie keeps 0
    per = {0.0: {"prostate": [(40, 38, 36), (0, 0, 0)], "bladder": [(100, 60, 60)], "rectum": [(30, 30, 27)]},
           1.0: {"prostate": [(40, 44, 38), (0, 20, 0)], "bladder": [(100, 100, 95)], "rectum": [(30, 30, 27)]},
           -0.5: {"prostate": [(40, 30, 30), (0, 0, 0)], "bladder": [(100, 40, 40)], "rectum": [(30, 30, 27)]}}
    val = {"overlap": {g: {False: per[g]} for g in (0.0, -0.5, 1.0)}, "score": None}
    keep, offsets, min_ml, score = train.postprocess_decision(val, {"prostate": (4.0, 10.0)})
    assert offsets == {"prostate": 0.0, "bladder": 1.0, "rectum": 0.0}
    assert score == pytest.approx(np.mean([72 / 78, 190 / 200, 54 / 60]))
    assert train.candidate_offsets()[0] == 0.0 and sorted(train.candidate_offsets(), key=abs) == train.candidate_offsets()
    monkeypatch.setattr(config, "LOGIT_OFFSET", "off")
    assert train.candidate_offsets() == [0.0]
    monkeypatch.setattr(config, "LOGIT_OFFSET", "of")
    with pytest.raises(ValueError, match="LOGIT_OFFSET"):
        train.candidate_offsets()


def test_largest_component_decided_together_with_the_offset(monkeypatch):
    import train
    monkeypatch.setattr(config, "TARGET_SPACING", (10.0, 10.0, 10.0))
    # at offset 0 keeping the largest piece loses (0.80 vs 0.87); at +1 the offset grows stray pieces that it
    # removes, and that pair is best (0.95): deciding the rule at offset 0 first would have missed it
    none = {"prostate": [], "rectum": []}
    val = {"overlap": {0.0: {False: {"bladder": [(100, 80, 78)], **none}, True: {"bladder": [(100, 70, 68)], **none}},
                       1.0: {False: {"bladder": [(100, 130, 95)], **none}, True: {"bladder": [(100, 100, 95)], **none}}},
           "score": None}
    monkeypatch.setattr(config, "LARGEST_COMPONENT", "auto")
    keep, offsets, _, score = train.postprocess_decision(val)
    assert keep is True and offsets["bladder"] == 1.0 and score == pytest.approx(0.95)
    monkeypatch.setattr(config, "LARGEST_COMPONENT", "off")  # forced: the best offset without it
    keep, offsets, _, score = train.postprocess_decision(val)
    assert keep is False and offsets["bladder"] == 0.0 and score == pytest.approx(156 / 180)


def test_offset_logits_shifts_each_organ_and_grows_it(monkeypatch):
    import inference
    logits = np.array([[-0.5, 0.2], [-0.3, -2.0], [-3.0, -3.0]], np.float32)[:, :, None, None]  # (3, 2, 1, 1)
    assert np.array_equal(inference.logits_to_labels(logits)[:, 0, 0], [0, 1])
    monkeypatch.setattr(config, "ORGAN_LOGIT_OFFSET", {"bladder": 1.0})
    out = inference.offset_logits(logits)
    assert np.allclose(out[1], logits[1] + 1.0) and np.array_equal(out[[0, 2]], logits[[0, 2]])
    assert np.array_equal(inference.logits_to_labels(out)[:, 0, 0], [2, 1])  # the bladder took the unsure voxel
    t = inference.offset_logits(torch.from_numpy(logits), {"prostate": -1.0})
    assert torch.is_tensor(t) and torch.allclose(t[0], torch.from_numpy(logits[0]) - 1.0)
    monkeypatch.setattr(config, "ORGAN_LOGIT_OFFSET", {})  # an older checkpoint: nothing changes
    assert inference.offset_logits(logits) is logits


def test_checkpoint_carries_the_logit_offsets(monkeypatch):
    import inference
    for name in ("ORGAN_LOGIT_OFFSET", "LOGIT_OFFSET", "LARGEST_COMPONENT", "MIN_ORGAN_ML"):
        monkeypatch.setattr(config, name, getattr(config, name))  # restored afterwards
    ckpt = {"settings": {}, "logit_offset": {"bladder": 1.5}}
    inference.use_checkpoint_settings(ckpt, quiet=True)
    assert config.ORGAN_LOGIT_OFFSET == {"bladder": 1.5}
    inference.use_checkpoint_settings({"settings": {}}, quiet=True)  # a checkpoint from before: no offsets
    assert config.ORGAN_LOGIT_OFFSET == {}
    monkeypatch.setattr(config, "LOGIT_OFFSET", "off")  # predict without the checkpoint's offsets
    inference.use_checkpoint_settings(ckpt, quiet=True)
    assert config.ORGAN_LOGIT_OFFSET == {}
