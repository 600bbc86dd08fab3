"""inference.py: tiling logic with trivial predictors (exact), MONAI agreement, label rule, mirror TTA."""
import subprocess
import sys
from pathlib import Path
import types

import nibabel as nib
import numpy as np
import pytest
import torch

import config
import inference
from test_preprocessing import _sphere_logits, world_grid

torch.set_num_threads(2)


@pytest.mark.parametrize("size,window,overlap", [(33, 16, 0.5), (35, 16, 0.25), (17, 17, 0.5), (17, 20, 0.0),
                                                 (40, 16, 0.75), (35, 8, 0.0)])
def test_window_starts_cover_and_end_aligned(size, window, overlap):
    starts = inference.window_starts(size, window, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] == max(size - window, 0)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()
    if overlap == 0 and size % window == 0:
        assert len(starts) == size // window


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("gaussian", [True, False])
@pytest.mark.parametrize("sw_batch", [1, 3])
def test_identity_predictor_is_reproduced(overlap, gaussian, sw_batch):
    image = torch.randn(2, 1, 33, 35, 17)
    out = inference.sliding_window(lambda x: x, image, (16, 20, 9), overlap, sw_batch, gaussian=gaussian)
    assert out.shape == image.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [(40, 40, 40), (20, 48, 17), (33, 35, 17)])
@pytest.mark.parametrize("gaussian", [True, False])
def test_window_larger_than_image_pads_and_crops(window, gaussian):
    image = torch.randn(1, 2, 33, 35, 17)
    seen = []

    def doubling(x):
        seen.append(tuple(x.shape))
        return torch.cat([2 * x, -x], dim=1)  # out_C != C

    out = inference.sliding_window(doubling, image, window, 0.5, 3, gaussian=gaussian)
    assert all(s[2:] == window for s in seen)
    torch.testing.assert_close(out, torch.cat([2 * image, -image], 1), rtol=1e-5, atol=1e-5)


def test_padding_value_is_the_image_minimum():
    image = torch.rand(1, 1, 5, 6, 7) + 3.0  # minimum > 3
    seen = []
    inference.sliding_window(lambda x: seen.append(x.clone()) or x, image, (9, 9, 9), 0.5, 1)
    window = seen[0][0, 0]
    assert window[0, 0, 0] == image.min()  # a padded corner
    assert torch.equal(window[2:7, 1:7, 1:8], image[0, 0])  # centred: pad 4 -> 2 before, 3 -> 1 before


def test_position_dependent_predictor_blends_overlaps():
    """A predictor that adds its window's start offset shows the blend is a weighted average: every voxel
    lies between the smallest and largest offset of the windows covering it."""
    image = torch.zeros(1, 1, 33, 8, 8)
    out = inference.sliding_window(lambda x: x + torch.arange(x.shape[0]).view(-1, 1, 1, 1, 1).float(),
                                   image, (16, 8, 8), 0.5, 8, gaussian=True)
    starts = inference.window_starts(33, 16, 0.5)  # 0, 8, 16, 17: numbered 0..3 in one call
    assert starts == [0, 8, 16, 17]
    assert out.min() >= 0 and out.max() <= len(starts) - 1
    assert out[0, 0, 0].abs().max() == 0  # only window 0 covers x = 0
    assert out[0, 0, -1].min() >= 2 and out[0, 0, -1].max() <= 3  # only windows 2 and 3 cover x = 32
    assert out[0, 0, 16].min() > 0  # x = 16 is covered by windows 1 and 2 too


def test_bad_arguments():
    image = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        inference.sliding_window(lambda x: x, image, (4, 4, 4), 1.0, 1)
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        inference.sliding_window(lambda x: x, image[0], (4, 4, 4), 0.5, 1)
    with pytest.raises(ValueError, match="predict_fn returned"):
        inference.sliding_window(lambda x: x[..., :2], image, (4, 4, 4), 0.5, 1)


def small_net(seed=0, out_channels=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, out_channels, 3, padding=1)).eval()


@pytest.mark.parametrize("shape,window,overlap", [((1, 1, 33, 35, 17), (16, 16, 16), 0.5),
                                                  ((2, 1, 35, 17, 33), (16, 12, 20), 0.25),
                                                  ((1, 1, 17, 35, 20), (24, 16, 16), 0.5)])
@pytest.mark.parametrize("gaussian", [True, False])
def test_matches_monai_sliding_window(shape, window, overlap, gaussian):
    """Same window placement, same Gaussian (sigma = 0.125 * window, clipped at 1e-3) and the same centred
    padding (MONAI given cval = our pad value, the image minimum), so the two agree to float rounding."""
    from monai.inferers import sliding_window_inference

    net = small_net()
    image = torch.randn(shape)
    with torch.inference_mode():
        mine = inference.sliding_window(net, image, window, overlap, 3, gaussian=gaussian)
        theirs = sliding_window_inference(image, window, 3, net, overlap=overlap,
                                          mode="gaussian" if gaussian else "constant", sigma_scale=0.125,
                                          cval=float(image.min()))
    torch.testing.assert_close(mine, torch.as_tensor(theirs), rtol=1e-4, atol=1e-5)


def test_logits_to_labels_rule():
    # voxels: all negative -> background; organ 2 largest and positive; tie with background (0) -> background;
    # tie between organs -> lower label; organ 3 positive while 1 and 2 negative
    l = torch.tensor([[-1.0, 0.5, 0.0, 0.7, -2.0],
                      [-2.0, 0.9, -1.0, 0.7, -1.0],
                      [-0.5, 0.1, 0.0, 0.2, 0.3]]).view(3, 5, 1, 1)
    expected = torch.tensor([0, 2, 0, 1, 3], dtype=torch.uint8).view(5, 1, 1)
    labels = inference.logits_to_labels(l)
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected)
    batched = inference.logits_to_labels(l[None].numpy())  # numpy in, numpy out, leading batch kept
    assert isinstance(batched, np.ndarray) and batched.dtype == np.uint8
    np.testing.assert_array_equal(batched[0], expected.numpy())


def mirror_symmetric_net():
    """Kernels symmetric along x, so net(flip_x(v)) == flip_x(net(v)): mirror TTA must change nothing."""
    net = small_net(seed=3)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv3d):
                m.weight.copy_((m.weight + m.weight.flip(2)) / 2)
    return net


def test_mirror_tta_with_equivariant_predictor_changes_nothing():
    config.AMP = False  # exact comparison; the conftest fixture restores config
    image = np.random.default_rng(0).standard_normal((33, 17, 20)).astype(np.float32)
    net = mirror_symmetric_net()
    plain = inference.predict_logits(net, image, (16, 16, 16), 0.5, 2, False, "cpu")
    mirrored = inference.predict_logits(net, image, (16, 16, 16), 0.5, 2, True, "cpu")
    assert plain.shape == (3, 33, 17, 20) and plain.dtype == torch.float32 and plain.device.type == "cpu"
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-5)
    # and a net without the symmetry does change, so the test above can fail
    other = small_net(seed=4)
    assert not torch.allclose(inference.predict_logits(other, image, (16, 16, 16), 0.5, 2, True, "cpu"),
                              inference.predict_logits(other, image, (16, 16, 16), 0.5, 2, False, "cpu"), atol=1e-4)


def test_predict_logits_amp_close_to_fp32(monkeypatch):
    image = np.random.default_rng(1).standard_normal((20, 17, 18)).astype(np.float32)
    net = small_net()
    config.AMP = False
    assert inference.amp_dtype(torch.device("cpu")) is None
    ref = inference.predict_logits(net, image, (16, 16, 16), 0.5, 4, False, "cpu")
    config.AMP = True
    monkeypatch.setattr(inference, "cpu_bf16_fast", lambda: True)  # force the bf16 path even on an AVX2 CPU
    assert inference.amp_dtype(torch.device("cpu")) == torch.bfloat16
    amp = inference.predict_logits(net, image, (16, 16, 16), 0.5, 4, False, "cpu")
    assert amp.dtype == torch.float32 and not torch.equal(amp, ref)  # really ran in bf16
    torch.testing.assert_close(amp, ref, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits


def test_predict_logits_channels_last_on_cpu_same_logits_and_model_restored():
    """The CPU path runs windows in channels-last; the logits equal a plain contiguous forward and the model
    comes back in the memory format it had (training keeps it in channels-last)."""
    config.AMP = False
    image = np.random.default_rng(2).standard_normal((16, 16, 16)).astype(np.float32)
    net = small_net(seed=5)
    seen = []
    net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last_3d)))
    out = inference.predict_logits(net, image, (16, 16, 16), 0.5, 1, False, "cpu")
    assert seen and all(seen)  # really ran channels-last
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(image)[None, None])[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in net.parameters())
    net.to(memory_format=torch.channels_last_3d)
    before = [p.stride() for p in net.parameters()]
    inference.predict_logits(net, image, (16, 16, 16), 0.5, 1, False, "cpu")
    assert [p.stride() for p in net.parameters()] == before


@pytest.fixture
def normalize_stand_in(monkeypatch):
    """Use preprocessing.normalize_hu when it exists; otherwise a stand-in with the contract's formula."""
    try:
        import preprocessing  # noqa: F401
    except ImportError:
        def normalize_hu(hu):
            lo, hi = config.HU_CLIP
            return ((np.clip(hu, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)).astype(np.float32)
        monkeypatch.setitem(sys.modules, "preprocessing", types.SimpleNamespace(normalize_hu=normalize_hu))


class Threshold(torch.nn.Module):
    """Organ k where the normalised intensity lies in band k (a predictor with known output)."""

    def forward(self, x):  # (B, 1, X, Y, Z) -> (B, 3, X, Y, Z)
        bands = torch.tensor([-0.5, 0.0, 0.5]).view(1, 3, 1, 1, 1)
        return 0.2 - (x - bands).abs()


def test_segment_labels_and_largest_component(normalize_stand_in):
    config.AMP = False
    hu = np.full((21, 19, 17), -1000, np.int16)  # air
    hu[2:8, 2:8, 2:8] = 100  # normalised (100 - 100) / 300 = 0 -> label 2
    hu[12:14, 12:14, 12:14] = 100  # a second, smaller label-2 component
    hu[10:18, 2:6, 2:6] = 250  # 0.5 -> label 3
    labels = inference.segment(Threshold(), hu, patch_size=(16, 16, 16), overlap=0.5, sw_batch=2, mirror=False,
                               keep_largest=False, device="cpu")
    assert labels.dtype == np.uint8 and labels.shape == hu.shape
    assert (labels == 2).sum() == 6 ** 3 + 2 ** 3 and (labels == 3).sum() == 8 * 4 * 4 and (labels == 1).sum() == 0
    kept = inference.segment(Threshold(), hu, settings={"PATCH_SIZE": [16, 16, 16], "LARGEST_COMPONENT": True},
                             device="cpu")
    assert (kept == 2).sum() == 6 ** 3 and (kept == 3).sum() == 8 * 4 * 4


def test_cuda_out_of_memory_halves_sw_batch_then_falls_back_to_cpu(monkeypatch):
    """Simulated: every CUDA attempt runs out of memory; the CPU one works (no GPU needed)."""
    calls = []
    real = inference.sliding_window

    def fake_sliding_window(fn, image, window, overlap, sw_batch, gaussian=True, device=None):
        calls.append((torch.device(device).type, sw_batch))
        if torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(fn, image, window, overlap, sw_batch, gaussian=gaussian, device=device)

    monkeypatch.setattr(inference, "sliding_window", fake_sliding_window)
    config.AMP = False
    image = np.zeros((17, 16, 16), np.float32)
    out = inference.predict_logits(Threshold(), image, (16, 16, 16), 0.5, 4, False, "cuda")
    assert calls == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert out.shape == (3, 17, 16, 16) and out.device.type == "cpu"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_large_allocations():
    script = """
import resource, sys, numpy as np
sys.path.insert(0, {repo!r})
import inference
if sys.argv[1] == "keep":
    assert inference.keep_freed_memory()
def step():  # as a train step: 80 MB of activations alive at once, then all freed
    live = [np.ones(10 << 20 >> 2, np.float32) for _ in range(8)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""".format(repo=str(Path(__file__).resolve().parents[1]))
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 10 * 2560 and faults["keep"] < 2560, faults  # 2560 = one 10 MB block in 4 kB pages


def test_predict_case_draws_the_boundary_from_the_offset_logits():
    """A 1.2 mm CT, a 3 mm model grid, a bladder logit of 0.5 * (12 mm - distance to a point) with a +2 offset:
    the bladder predict_case returns on the CT's grid is the 16 mm ball, to within a fraction of a fine voxel
    (the 3 mm label map restored label-wise is off by up to half a model voxel: Dice ~0.95)."""
    config.TARGET_SPACING, config.PRESENCE_RULE, config.ORGAN_LOGIT_OFFSET = (3.0, 3.0, 3.0), "off", {"bladder": 2.0}
    shape, spacing = (100, 90, 60), 1.2
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    x, y, z = world_grid(shape, affine)
    hu = np.where((x / 55) ** 2 + (y / 50) ** 2 <= 1, 40, -1000).astype(np.int16)  # a body, no femoral heads
    img = nib.Nifti1Image(hu, affine)
    prepared = inference.prepare_case(img)
    geom = prepared["geom"]
    centre = (3.1, -4.4, 2.3)
    bladder_logit = _sphere_logits(geom, [centre], 12.0)  # 0.5 * (12 mm - distance)
    other = np.full_like(bladder_logit, -5.0)
    logits = np.concatenate([other, bladder_logit, other])
    labels = inference.predict_case(None, img, "cpu", prepared, logits)
    truth = np.sqrt(sum((g - c) ** 2 for g, c in zip((x, y, z), centre))) < 16.0
    bladder = labels == config.ORGANS.index("bladder") + 1
    assert set(np.unique(labels)) == {0, config.ORGANS.index("bladder") + 1}
    assert 2 * (bladder & truth).sum() / (bladder.sum() + truth.sum()) >= 0.97
