"""Tests for multi_decoder_model.py: shapes, parameter counts, gradients, ablation switch, errors, AMP,
checkpointing, config round trip, what the spatial cross-decoder attention mixes. Tiny widths and
odd-but-legal sizes; CPU, 2 threads."""
import pytest
import torch

from multi_decoder_model import CrossOrganAttention, MultiDecoderUNet, count_parameters

torch.set_num_threads(2)
ORGANS = ("prostate", "bladder", "rectum")


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(organs=ORGANS, base_channels=4, depth=4)
    args.update(kw)
    return MultiDecoderUNet(**args)


def trained_attention(model, std=0.1):
    """Give the zero-initialised attention output projections random weights, as after some training."""
    torch.manual_seed(1)
    for att in model.cross_attention.values():
        torch.nn.init.normal_(att.out, std=std)
    return model


@pytest.mark.parametrize("depth, size", [(4, (16, 32, 48)), (4, (48, 16, 32)), (4, (8, 8, 8)), (4, (8, 24, 40)),
                                         (5, (16, 48, 80)), (5, (16, 16, 16)), (3, (4, 12, 20)), (2, (2, 6, 10))])
def test_output_shape_odd_sizes(depth, size):
    """Every dim an odd multiple of 2**(depth-1) (the smallest legal sizes included), attention on."""
    model = trained_attention(tiny(depth=depth)).eval()
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
    assert n8 == 2_991_147
    assert n32 == 47_811_747
    assert 2e6 <= n8 <= 4e6 and 30e6 <= n32 <= 60e6
    # the attention: per organ (C, 3C) + (C, C) at the coarsest decoder level only (C = 64 at base 8, depth 5)
    model = MultiDecoderUNet(organs=ORGANS, base_channels=8, depth=5)
    assert count_parameters(model.cross_attention) == 3 * 4 * 64 * 64
    assert count_parameters(MultiDecoderUNet(organs=ORGANS, base_channels=8, depth=4)) == 707_627  # CPU demo net


def test_every_decoder_and_attention_gets_gradients():
    model = trained_attention(tiny())
    out = model(torch.randn(1, 1, 16, 16, 24))
    out.square().mean().backward()
    for organ in ORGANS:
        grads = [p.grad for p in model.decoders[organ].parameters()]
        assert all(g is not None for g in grads), organ
        assert sum(g.abs().sum() for g in grads) > 0, organ
    for name, p in model.cross_attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_zero_initialised_attention_equals_attention_off_and_can_grow():
    """At initialisation the output projection is zero: attention on gives exactly the attention-off net, and
    the projection gets a gradient (the q/k/v weights only once it is nonzero)."""
    model = tiny()
    x = torch.randn(1, 1, 16, 16, 24)
    out = model(x)
    model.attention = False
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.square().mean().backward()
    for att in model.cross_attention.values():
        assert att.out.grad.abs().sum() > 0
        assert att.qkv.grad is not None


def test_attention_off_uses_no_attention_parameters():
    """With the switch off no attention weight is in the graph (train.py freezes them so DDP does not wait)."""
    model = trained_attention(tiny(attention=False))
    model(torch.randn(1, 1, 16, 16, 16)).square().mean().backward()
    assert all(p.grad is None for p in model.cross_attention.parameters())
    assert all(p.grad is not None for p in model.decoders.parameters())


def test_attention_off_changes_output_same_weights():
    model = trained_attention(tiny()).eval()
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


@pytest.mark.parametrize("depth, levels", [(5, {"3"}), (4, {"2"}), (3, {"1"}), (2, set())])
def test_attention_at_the_coarsest_decoder_level(depth, levels):
    model = tiny(depth=depth)
    assert set(model.cross_attention) == levels
    for level in levels:
        assert model.cross_attention[level].c == 4 * 2 ** int(level)  # width of that level


def test_attention_is_called_once_per_forward_at_that_level():
    model = trained_attention(tiny(depth=5))
    seen = []
    model.cross_attention["3"].register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 16, 48))
    assert seen == [(1, 3 * 4 * 8, 4, 2, 6)]  # decoder level 3: K*C channels, 1/8 of the input size


def attention_module(c=16, seed=0):
    torch.manual_seed(seed)
    att = CrossOrganAttention(3, c).eval()
    torch.nn.init.normal_(att.out, std=0.3)
    return att


def test_attention_mixes_across_positions_and_organs_not_within_an_organ():
    """Perturb organ A's features at one voxel: organs B and C change at every position, far ones included
    (across organs and positions); organ A's own output only in that voxel's pooling block, never elsewhere."""
    att, c = attention_module(), 16
    feats = torch.randn(1, 3 * c, 8, 8, 8)
    bumped = feats.clone()
    bumped[0, :c, 0, 0, 0] += 3.0 * torch.randn(c)  # organ 0 (prostate), one voxel in a corner (not a constant
    # shift over channels: the per-token LayerNorm removes that)
    with torch.no_grad():
        change = (att(bumped) - att(feats)).abs().view(3, c, 8, 8, 8).sum(1)  # (K, X, Y, Z)
    assert change[1, 7, 7, 7] > 1e-4 and change[2, 7, 7, 7] > 1e-4  # the opposite corner, other organs
    assert (change[1] > 1e-6).all() and (change[2] > 1e-6).all()  # every position of organs 1 and 2
    own = change[0] > 1e-6  # organ 0 does not attend to itself: only its query there (the voxel's 2x2x2
    assert own[:2, :2, :2].all() and own.sum() == 8  # pooling block) and its residual change


def test_attention_context_depends_on_relative_position_only():
    """Rotary position encoding: organ 0's update depends on where organ 1 lies relative to it (a moved blob
    changes it, where position-blind attention would see the same set of keys), but moving both by the same
    offset only moves the update. Blobs on the 2x2x2 pooling blocks, zero features elsewhere."""
    att, c = attention_module(), 16
    torch.manual_seed(3)
    a, b = torch.randn(c, 1, 1, 1), torch.randn(c, 1, 1, 1)

    def scene(pa, pb):
        f = torch.zeros(1, 3 * c, 12, 12, 12)
        f[0, :c, pa[0]:pa[0] + 2, pa[1]:pa[1] + 2, pa[2]:pa[2] + 2] = a
        f[0, c:2 * c, pb[0]:pb[0] + 2, pb[1]:pb[1] + 2, pb[2]:pb[2] + 2] = b
        with torch.no_grad():
            return att(f) - f  # the attention's update

    near, far = scene((4, 4, 4), (6, 4, 4)), scene((4, 4, 4), (4, 4, 10))
    assert (near[0, :c, 4, 4, 4] - far[0, :c, 4, 4, 4]).abs().max() > 1e-3
    moved = scene((2, 4, 6), (4, 4, 6))  # the `near` pair, moved by (-2, 0, 2)
    torch.testing.assert_close(moved[0, :, 2:10, :, 6:], near[0, :, 4:12, :, 4:10], rtol=1e-4, atol=1e-5)


def test_attention_runs_on_any_even_grid():
    """Nothing in the attention is sized for one grid: the same weights run on any even grid (the coarsest
    decoder level of any legal input), down to a single pooled token per organ."""
    att, c = attention_module(), 16
    for shape in [(2, 2, 2), (4, 6, 10), (12, 8, 4)]:
        with torch.no_grad():
            out = att(torch.randn(2, 3 * c, *shape))
        assert out.shape == (2, 3 * c, *shape) and torch.isfinite(out).all()


def test_attention_channels_last_and_bf16():
    att, c = attention_module(), 16
    x = torch.randn(2, 3 * c, 8, 6, 4)
    with torch.no_grad():
        ref = att(x)
        cl = att(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = att(x.bfloat16())
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_attention_matches_a_plain_reference():
    """The fused path (batched per-organ projections, RoPE folded into the projection, rolled keys, SDPA)
    against a straightforward loop over organs with explicit softmax and element-pair rotation."""
    import math
    import torch.nn.functional as F
    from multi_decoder_model import HEAD_DIM, POOL, ROPE_WAVELENGTHS
    att, c = attention_module(c=32), 32
    x = torch.randn(1, 3 * c, 6, 4, 8)
    with torch.no_grad():
        fused = att(x)
        h, d = c // HEAD_DIM, HEAD_DIM
        p = d // 6
        pooled = F.avg_pool3d(x, POOL)[0]  # (K*C, 3, 2, 4)
        grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in pooled.shape[1:]], indexing="ij"), -1)
        grid = grid.reshape(-1, 3).float()  # (M, 3)
        angles = torch.cat([grid[:, a:a + 1] * 2 * math.pi / torch.tensor(ROPE_WAVELENGTHS[:p]) for a in range(3)], 1)

        def rope(t):  # t (M, D): channel i pairs with channel i + 3P for i < 3P
            t = t.clone()
            first, second = t[:, :3 * p].clone(), t[:, 3 * p:6 * p].clone()
            t[:, :3 * p] = first * angles.cos() - second * angles.sin()
            t[:, 3 * p:6 * p] = first * angles.sin() + second * angles.cos()
            return t

        tok = [F.layer_norm(pooled[k * c:(k + 1) * c].reshape(c, -1).T, (c,)) for k in range(3)]  # (M, C) each
        q = [tok[k] @ att.qkv[k, :, :c] for k in range(3)]
        key = [tok[k] @ att.qkv[k, :, c:2 * c] for k in range(3)]
        v = [tok[k] @ att.qkv[k, :, 2 * c:] for k in range(3)]
        ref = x.clone()
        for j in range(3):
            others = [l for l in range(3) if l != j]
            heads = []
            for hh in range(h):
                s = slice(hh * d, (hh + 1) * d)
                qj = rope(q[j][:, s])
                kk = torch.cat([rope(key[l][:, s]) for l in others])
                vv = torch.cat([v[l][:, s] for l in others])
                heads.append(torch.softmax(qj @ kk.T / math.sqrt(d), -1) @ vv)
            delta = (torch.cat(heads, 1) @ att.out[j]).T.reshape(c, *pooled.shape[1:])
            ref[0, j * c:(j + 1) * c] += delta.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)


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
