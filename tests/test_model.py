"""Tests for multi_decoder_model.py: shapes, parameter counts, gradients, ablation switch, errors, AMP,
checkpointing, config round trip. Tiny widths and odd-but-legal sizes; CPU, 2 threads."""
import pytest
import torch

from multi_decoder_model import MultiDecoderUNet, count_parameters

torch.set_num_threads(2)
ORGANS = ("prostate", "bladder", "rectum")


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(organs=ORGANS, base_channels=4, depth=4)
    args.update(kw)
    return MultiDecoderUNet(**args)


@pytest.mark.parametrize("size", [(16, 32, 48), (48, 16, 32), (8, 8, 8)])
def test_output_shape_odd_sizes(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_output_shape_channels_last():
    model = tiny().to(memory_format=torch.channels_last_3d).eval()
    x = torch.randn(1, 1, 16, 24, 32).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        ref = tiny().eval()(x.contiguous())
        out = model(x)
    assert out.shape == (1, 3, 16, 24, 32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_parameter_counts_default_depth():
    n8 = count_parameters(MultiDecoderUNet(organs=ORGANS, base_channels=8, depth=5))
    n32 = count_parameters(MultiDecoderUNet(organs=ORGANS, base_channels=32, depth=5))
    assert n8 == 3_003_435
    assert n32 == 48_008_355
    assert 2e6 <= n8 <= 4e6 and 30e6 <= n32 <= 60e6


def test_every_decoder_and_attention_gets_gradients():
    model = tiny()
    out = model(torch.randn(1, 1, 16, 16, 24))
    out.square().mean().backward()
    for organ in ORGANS:
        grads = [p.grad for p in model.decoders[organ].parameters()]
        assert all(g is not None for g in grads), organ
        assert sum(g.abs().sum() for g in grads) > 0, organ
    for name, p in model.cross_attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_attention_off_changes_output_same_weights():
    model = tiny().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        on = model(x)
        model.attention = False
        off = model(x)
    assert on.shape == off.shape == (1, 3, 16, 16, 16)
    assert not torch.allclose(on, off, atol=1e-5)
    # the switch is an ablation: a model built with attention=False loads the same weights
    other = tiny(attention=False).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(x), off)


@pytest.mark.parametrize("size", [(16, 16, 20), (12, 16, 16), (16, 33, 16)])
def test_illegal_size_raises(size):
    model = tiny()
    with pytest.raises(ValueError, match="x".join(map(str, size))):
        model(torch.randn(1, 1, *size))


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="shape"):
        tiny()(torch.randn(1, 16, 16, 16))


def test_bf16_autocast_forward_cpu():
    model = tiny(base_channels=2, depth=3).eval()
    x = torch.randn(1, 1, 8, 8, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (1, 3, 8, 8, 12) and torch.isfinite(out.float()).all()
    with torch.no_grad():
        ref = model(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_checkpointing_matches():
    x = torch.randn(1, 1, 16, 16, 16)
    results = []
    for ckpt in (False, True):
        model = tiny(checkpointing=ckpt)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out0, out1)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_config_round_trip():
    model = tiny(attention=False, checkpointing=True)
    again = MultiDecoderUNet(**model.config)
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.config == model.config
    assert list(again.decoders) == list(ORGANS)


def test_build_model_from_config(monkeypatch):
    import config
    import multi_decoder_model
    monkeypatch.setattr(config, "BASE_CHANNELS", 4)
    monkeypatch.setattr(config, "DEPTH", 3)
    monkeypatch.setattr(config, "ATTENTION", False)
    model = multi_decoder_model.build_model_from_config()
    assert model.config["base_channels"] == 4 and model.config["depth"] == 3 and not model.attention
    assert tuple(model.config["organs"]) == tuple(config.ORGANS)


def test_grouped_decoders_match_per_organ_modules():
    """The fused (groups=K) decoder path equals running each organ's own DecoderLevel modules."""
    from multi_decoder_model import grouped_decoder_level
    model = tiny(attention=False).eval()
    skips = model.encoder(torch.randn(1, 1, 16, 16, 24))
    with torch.no_grad():
        for level in range(model.depth - 2, -1, -1):
            coarse = [torch.randn_like(skips[level + 1]) for _ in ORGANS]
            levels = [model.decoders[o].levels[level] for o in ORGANS]
            fused = grouped_decoder_level(levels, torch.cat(coarse, 1), skips[level])
            single = torch.cat([lv(c, skips[level]) for lv, c in zip(levels, coarse)], 1)
            torch.testing.assert_close(fused, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 16, 16, 16), (1, 1, 16, 16, 16), (2, 4, 16, 16, 16), (1, 4, 4, 4, 4)])
def test_onednn_conv_routing_is_exact(shape):
    """Conv3d's cat[x, x] / groups=2 route gives nn.Conv3d's result and gradients."""
    from multi_decoder_model import Conv3d
    torch.manual_seed(0)
    fast = Conv3d(shape[1], 8, 3, stride=2, padding=1, bias=False)
    plain = torch.nn.Conv3d(shape[1], 8, 3, stride=2, padding=1, bias=False)
    plain.load_state_dict(fast.state_dict())
    x1 = torch.randn(shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    torch.testing.assert_close(fast(x1), plain(x2), rtol=1e-4, atol=1e-5)
    fast(x1).sum().backward()
    plain(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth, levels", [(5, {"2", "3"}), (4, {"1", "2"}), (3, {"1"})])
def test_attention_at_the_two_coarsest_decoder_levels(depth, levels):
    model = tiny(depth=depth)
    assert set(model.cross_attention) == levels
    assert model.cross_attention[max(levels)].c == 4 * 2 ** int(max(levels))  # width of that level


def test_fine_level_is_pointwise_and_uses_the_skip():
    """The full-resolution decoder level has no spatial kernel: changing one voxel of its inputs changes
    the output at that voxel's 2x2x2 block (coarse) or at that voxel only (skip)."""
    from multi_decoder_model import FineLevel
    torch.manual_seed(0)
    fine = FineLevel(8, 4).eval()
    coarse, skip = torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        base = fine(coarse, skip)
        skip2 = skip.clone()
        skip2[0, :, 3, 3, 3] += 5
        changed = (fine(coarse, skip2) - base).abs().sum(1)[0] > 0
    assert changed[3, 3, 3] and changed.sum() == 1
