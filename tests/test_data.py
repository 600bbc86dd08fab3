"""Training patches: balanced sampling, augmentation, and the loader (workers, order, seeds, dead workers)."""
import os
import signal

import pytest
import torch

import config
import data
from test_train import make_processed


@pytest.fixture
def processed(tmp_path):
    make_processed(tmp_path / "processed")
    return tmp_path / "processed"


CASES = ["BDMAP_00000001", "BDMAP_00000002"]


def loader_settings(monkeypatch, **extra):
    values = dict(BATCH_SIZE=2, ITERS_PER_EPOCH=3, SEED=7, AUGMENT=True, AUGMENT_ON="worker")
    values.update(extra)
    for name, value in values.items():
        monkeypatch.setattr(config, name, value)


def collect(sampler, first, last, workers, rank=0):
    return [(img.clone(), lab.clone()) for img, lab in data.batches(sampler, first, last, rank, "cpu", workers)]


def same(a, b, exact=True):
    """Same batches; exact=False allows float rounding (a worker computes on 1 thread, this process on more,
    and a conv may then sum in another order: 1 ulp seen in the blur)."""
    close = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-5)
    return len(a) == len(b) and all(close(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_sampler_balances_organs_and_pads(processed, monkeypatch):
    monkeypatch.setattr(config, "FOREGROUND_FRACTION", 1.0)
    sampler = data.PatchSampler(CASES, processed, (16, 16, 16), torch.Generator().manual_seed(0))
    img, lab = sampler.batch(60)
    assert img.shape == (60, 1, 16, 16, 16) and lab.shape == (60, 16, 16, 16)
    centre = lab[:, 8, 8, 8]  # the patch is centred on the drawn organ voxel
    counts = [(centre == k).sum().item() for k in (1, 2, 3)]
    assert min(counts) >= 12, counts  # organs drawn in turn: the small prostate as often as the others
    wide = data.PatchSampler(CASES, processed, (40, 16, 16), torch.Generator().manual_seed(0))
    img, lab = wide.batch(4)
    assert img.shape == (4, 1, 40, 16, 16)
    assert img[:, 0, 36:].max() <= -0.99 and lab[:, 36:].max() == 0  # cases are 36 wide: padded with air


def test_absence_patches_show_where_a_missing_organ_would_be(processed, monkeypatch):
    # Case 2 has no prostate (class 1): absence patches come from it, centred on its bladder or rectum.
    monkeypatch.setattr(config, "FOREGROUND_FRACTION", 0.0)
    monkeypatch.setattr(config, "ABSENCE_FRACTION", 1.0)
    sampler = data.PatchSampler(CASES, processed, (16, 16, 16), torch.Generator().manual_seed(0))
    assert sampler.absent_classes == [1] and [i for i, _ in sampler.absence_context[1]] == [1]
    _, lab = sampler.batch(40)
    assert set(lab[:, 8, 8, 8].tolist()) == {2, 3} and not (lab == 1).any()
    monkeypatch.setattr(config, "ABSENCE_FRACTION", 0.0)  # off: patches anywhere, from both cases
    _, lab = sampler.batch(40)
    assert (lab[:, 8, 8, 8] == 0).any() and (lab == 1).any()


def test_augment_keeps_image_and_label_aligned():
    # A label that is a threshold of the image must still be (nearly) that threshold after the spatial
    # transforms: image and label go through the same grid. Intensity transforms are mild (+-5 %).
    gen = torch.Generator().manual_seed(3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    ball = ((grid - torch.tensor([7.0, 11.0, 13.0]).view(3, 1, 1, 1)) ** 2).sum(0) < 30  # off-centre in x
    img = torch.where(ball, 0.8, -0.8)[None, None].repeat(4, 1, 1, 1, 1)
    lab = ball.long()[None].repeat(4, 1, 1, 1)
    changed = 0
    for _ in range(6):
        out_img, out_lab = data.augment(img.clone(), lab.clone(), gen)
        assert out_img.shape == img.shape and out_lab.dtype == torch.int64
        bright, inside = out_img > 0, out_lab == 1
        dice = 2 * (bright & inside).sum().item() / (bright.sum().item() + inside.sum().item())
        assert dice > 0.85, dice  # a mirror or rotation applied to one and not the other gives ~0
        changed += int(not torch.equal(out_lab, lab))
    assert changed  # something did move


def test_batches_do_not_depend_on_workers_and_resume_at_an_epoch(processed, monkeypatch):
    loader_settings(monkeypatch)
    sampler = data.PatchSampler(CASES, processed, (16, 16, 16))
    inline = collect(sampler, 0, 2, workers=0)
    assert len(inline) == 6 and inline[0][0].shape == (2, 1, 16, 16, 16) and inline[0][1].dtype == torch.int64
    assert inline[0][0].is_contiguous(memory_format=torch.channels_last_3d)
    two = collect(sampler, 0, 2, workers=2)
    assert same(inline, two, exact=False)  # step order kept, seeds per step not per worker
    assert same(two[3:], collect(sampler, 1, 2, workers=2))  # resume after epoch 1: the same last epoch, exactly
    assert same(two, collect(sampler, 0, 2, workers=2))  # and a rerun the same run
    assert not torch.equal(inline[0][0], inline[1][0])
    assert not torch.equal(inline[0][0], collect(sampler, 0, 1, workers=0, rank=1)[0][0])  # ranks differ
    monkeypatch.setattr(config, "SEED", 8)
    assert not torch.equal(inline[0][0], collect(sampler, 0, 1, workers=0)[0][0])


def test_augmentation_on_the_device_matches_the_workers(processed, monkeypatch):
    loader_settings(monkeypatch)
    sampler = data.PatchSampler(CASES, processed, (16, 16, 16))
    in_workers = collect(sampler, 0, 1, workers=2)
    monkeypatch.setattr(config, "AUGMENT_ON", "device")  # on the CPU: in this process after the "copy"
    assert same(in_workers, collect(sampler, 0, 1, workers=2), exact=False)
    monkeypatch.setattr(config, "AUGMENT", False)
    assert not same(in_workers, collect(sampler, 0, 1, workers=0))
    monkeypatch.setattr(config, "AUGMENT_ON", "gpu")
    with pytest.raises(ValueError, match="AUGMENT_ON"):
        data.augment_on_device("cpu")


class DyingSampler(data.PatchSampler):
    """Worker 0 kills its own process (as the kernel's OOM killer would) at its second batch."""
    made = 0

    def batch(self, batch_size, gen=None):
        info = torch.utils.data.get_worker_info()
        DyingSampler.made += 1  # per process: each forked worker counts its own
        if info is not None and info.id == 0 and DyingSampler.made == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batch(batch_size, gen)


class FailingSampler(data.PatchSampler):
    def batch(self, batch_size, gen=None):
        raise ValueError("ct.npy: truncated array")


@pytest.mark.parametrize("kind, message", [(DyingSampler, "died"), (FailingSampler, "ValueError: ct.npy: truncated")])
def test_a_dead_or_failing_worker_is_one_clear_error(processed, monkeypatch, kind, message):
    loader_settings(monkeypatch, ITERS_PER_EPOCH=20)
    sampler = kind(CASES, processed, (16, 16, 16))
    # A death is reported by batches() (LoaderError) or, when torch's SIGCHLD handler gets there first, as a
    # RuntimeError anywhere in this process; train.main turns either into the same one line.
    with pytest.raises((data.LoaderError, RuntimeError)) as err:
        collect(sampler, 0, 1, workers=2)
    line = data.worker_failure(err.value)
    assert line.startswith("training patch worker failed") and message in line and "\n" not in line
    assert data.worker_failure(RuntimeError("CUDA error: device-side assert")) is None  # not ours to rename


def test_train_reports_a_failing_worker_in_one_line(processed, monkeypatch, tmp_path, capsys):
    import train
    monkeypatch.setattr(data, "PatchSampler", FailingSampler)
    monkeypatch.setattr(config, "LOADER_WORKERS", 1)
    with pytest.raises(SystemExit) as exit_:
        train.main([f"--OUTPUT_ROOT={tmp_path}", "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4", "--DEPTH=3",
                    "--EPOCHS=1", "--ITERS_PER_EPOCH=2", "--LOADER_WORKERS=1"])
    assert str(exit_.value).startswith("train: training patch worker failed: ValueError: ct.npy: truncated")
