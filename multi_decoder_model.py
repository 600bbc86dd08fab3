"""Shared-encoder 3D U-Net with one decoder per organ and cross-decoder attention.

Usage:
    python multi_decoder_model.py        # smoke check: parameter counts and output shapes, base 8 and 32
    from multi_decoder_model import MultiDecoderUNet, build_model_from_config

Shape legend: B batch, C channels, X Y Z spatial axes in canonical RAS order [x, y, z], K organs
(config.ORGANS order), H attention heads, D channels per head, M attention tokens (positions) per organ.

Output: raw logits (B, K, X, Y, Z). Background has an implicit logit 0 (see CONTRACT: softmax over
[0, l_1..l_K]), so organs are mutually exclusive downstream without a background head.

Design notes (measured on the 2-core AMD EPYC AVX2 dev box, fp32, see bench.py):
- channels-last-3D fp32 Conv3d runs ~1.7x faster than contiguous; bf16 autocast Conv3d on this CPU
  (no AVX512-BF16/AMX) runs at ~0.2 GFLOP/s, i.e. 100x SLOWER, so bf16 is supported but not the fast path here.
- GroupNorm in channels-last is ~3x faster than BatchNorm3d and ~5x faster than InstanceNorm on contiguous
  tensors; batch-size-1 safe.
- PyTorch sends batch-1 fp32 convs with B*C*X*Y <= 20480 (every level below full resolution) to a slow
  native conv3d instead of oneDNN. Grouped convs always go to oneDNN, so the K decoders run as ONE grouped
  conv per layer (groups=K, weights concatenated from the per-organ modules at call time), and the encoder's
  Conv3d uses an exact groups=2 identity to get there (2-3x faster at 16^3-32^3). At 64^3 with 8 channels,
  where both paths use oneDNN, three separate convs were a bit faster than one grouped (0.25 s vs 0.32 s).
- Upsampling = 1x1x1 conv at the coarse level (cheap: 1/8 of the voxels) + nearest x2; ConvTranspose3d
  was 10x slower than nearest, trilinear 3x slower.
- Decoders add the skip (after projecting the upsampled path to the skip width) instead of concatenating.
  Full resolution holds 7/8 of the voxels, so that is where FLOPs are saved: the finest decoder level is
  pointwise (FineLevel: no 3x3x3 conv), level 1 has one 3x3x3 conv, coarser levels a residual pair (cheap,
  most parameters). Cross-decoder attention runs at the coarsest decoder level only (CrossOrganAttention).
  Train step at 64^3, base 8, depth 5, 2 threads (`python bench.py`): 0.72 s with a 3x3x3 conv + norm in every
  organ's finest level, a residual encoder stem and attention at levels 1..3 (~0.05 s of it the benchmark's own
  target argmax, since removed) -> 0.415 s with this layout, 5.5x the reference.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import config

NEG_SLOPE = 0.01  # LeakyReLU slope
GROUP_SIZE = 4  # channels per GroupNorm group (8 channels -> 2 groups)
SINGLE_CONV_LEVELS = 2  # decoder level 1 uses one 3x3x3 conv, coarser ones a residual pair (level 0: FineLevel)
ATTENTION_LEVELS = 1  # spatial cross-decoder attention at the coarsest decoder level (depth-2; never level 0)
HEAD_DIM = 16  # channels per attention head
POOL = 2  # attention tokens: the attention level average-pooled by this per axis (= the bottleneck grid)
ROPE_WAVELENGTHS = (3.0, 16.0)  # rotary position encoding per axis, in pooled voxels; the first HEAD_DIM // 6 used


ONEDNN_MAX_BCXY = 20480  # PyTorch's CPU heuristic: batch-1 fp32 convs with B*C*X*Y <= this use native conv3d
ONEDNN_MIN_VOXELS = 4096  # below 16^3 voxels the native conv is as fast (measured), so leave those alone


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters, same state_dict) that sends batch-1 CPU inputs which PyTorch's heuristic
    would give to the slow native conv3d (B*C*X*Y <= 20480: every coarse level) to oneDNN instead, via the
    identity conv(x, W) == conv(cat[x, x], W, groups=2) (each group makes half of the output channels).
    Measured forward+backward, 2 threads: 16 ch @ 32^3 493 -> 215 ms, 32 ch @ 16^3 70 -> 23 ms."""

    def forward(self, x):
        b, c, sx, sy, sz = x.shape
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.groups == 1 and b == 1
                and self.out_channels % 2 == 0 and c * sx * sy <= ONEDNN_MAX_BCXY and sx * sy * sz >= ONEDNN_MIN_VOXELS):
            return F.conv3d(torch.cat([x, x], 1), self.weight, self.bias, self.stride, self.padding,
                            self.dilation, groups=2)
        return super().forward(x)


def norm(channels):
    """GroupNorm with GROUP_SIZE channels per group; works at batch size 1."""
    return nn.GroupNorm(max(1, channels // GROUP_SIZE), channels)


class ConvNormAct(nn.Module):
    """3x3x3 conv -> GroupNorm -> LeakyReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = norm(cout)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), NEG_SLOPE, inplace=True)


class ResBlock(nn.Module):
    """Two 3x3x3 convs with an identity (or 1x1x1 strided) shortcut, as in residual U-Nets."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, stride)
        self.conv2 = Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = norm(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(Conv3d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x):
        res = x if self.skip is None else self.skip(x)
        y = self.norm2(self.conv2(self.conv1(x)))
        return F.leaky_relu(y + res, NEG_SLOPE, inplace=True)


def level_widths(base_channels, depth):
    """Channels per resolution level, finest first: base * 2**level."""
    return [base_channels * 2 ** level for level in range(depth)]


def encoder_blocks(level):
    """Residual blocks at an encoder level: one at the two finest levels, two below (cheap there)."""
    return 1 if level < 2 else 2


class Encoder(nn.Module):
    """Residual encoder; level 0 is full resolution, each further level halves X, Y, Z. Level 0 is a plain
    stem of two conv-norm-act (a residual shortcut from the 1-channel CT would need its own 1x1x1 conv and norm
    at full resolution, ~5 % of a train step); each coarser level starts with a strided ResBlock."""

    def __init__(self, in_channels, widths):
        super().__init__()
        self.levels = nn.ModuleList([nn.Sequential(ConvNormAct(in_channels, widths[0]), ConvNormAct(widths[0], widths[0]))])
        for level in range(1, len(widths)):
            cin, c = widths[level - 1], widths[level]
            blocks = [ResBlock(cin, c, 2)] + [ResBlock(c, c) for _ in range(encoder_blocks(level) - 1)]
            self.levels.append(nn.Sequential(*blocks))

    def forward(self, x):
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)  # level l: (B, C_l, X/2^l, Y/2^l, Z/2^l)
        return feats


class DecoderLevel(nn.Module):
    """Project the coarser path to this level's width (1x1x1 at coarse res), upsample x2, add skip, conv(s)."""

    def __init__(self, c_coarse, c, level):
        super().__init__()
        self.up = nn.Conv3d(c_coarse, c, 1, bias=False)
        self.block = ConvNormAct(c, c) if level < SINGLE_CONV_LEVELS else ResBlock(c, c)

    def forward(self, coarse, skip):
        """One organ alone (reference path, used by tests): (B, C_coarse, ...) , (B, C, X_l, Y_l, Z_l)."""
        up = F.interpolate(self.up(coarse), scale_factor=2, mode="nearest")  # (B, C_l, X_l, Y_l, Z_l)
        return self.block(up + skip)


class FineLevel(nn.Module):
    """The full-resolution decoder level, pointwise only: LeakyReLU(upsampled coarse path + 1x1x1 projection of
    the encoder's full-resolution features). No 3x3x3 conv here: full resolution holds 7/8 of the voxels, and
    there a per-organ 3x3x3 conv (plus its norm) was ~40 % of the train step; the encoder's full-resolution
    block already supplies the local edges, the decoder path the organ context."""

    def __init__(self, c_coarse, c):
        super().__init__()
        self.up = nn.Conv3d(c_coarse, c, 1, bias=False)
        self.skip = nn.Conv3d(c, c, 1)

    def forward(self, coarse, skip):
        """One organ alone (reference path, used by tests)."""
        up = F.interpolate(self.up(coarse), scale_factor=2, mode="nearest")  # (B, C_0, X, Y, Z)
        return F.leaky_relu(up + self.skip(skip), NEG_SLOPE)


def grouped_conv(convs, x):
    """K same-shaped per-organ convs applied to x = cat of the K organ inputs, as ONE conv with groups=K.
    Besides one kernel call instead of K, groups > 1 routes small inputs to oneDNN: PyTorch's CPU heuristic
    sends batch-1 convs with B*C*X*Y <= 20480 (every coarse level) to the slow native conv3d otherwise."""
    first = convs[0]
    weight = torch.cat([c.weight for c in convs])  # (K*C_out, C_in, k, k, k)
    bias = None if first.bias is None else torch.cat([c.bias for c in convs])
    return F.conv3d(x, weight, bias, first.stride, first.padding, first.dilation, groups=len(convs))


def grouped_norm(norms, x):
    """K per-organ GroupNorms on the channel-concatenated tensor (organ blocks of channels stay separate)."""
    return F.group_norm(x, sum(n.num_groups for n in norms), torch.cat([n.weight for n in norms]),
                        torch.cat([n.bias for n in norms]), norms[0].eps)


def grouped_decoder_level(levels, coarse, skip):
    """K organs' DecoderLevel at once. coarse (B, K*C_coarse, ...), skip (B, C, X_l, Y_l, Z_l) shared
    -> (B, K*C, X_l, Y_l, Z_l); equal to running each organ's DecoderLevel.forward and concatenating."""
    k = len(levels)
    up = F.interpolate(grouped_conv([l.up for l in levels], coarse), scale_factor=2, mode="nearest")  # (B, K*C, ...)
    if isinstance(levels[0], FineLevel):  # the shared skip goes through K projections: one dense 1x1x1 conv
        s = F.conv3d(skip, torch.cat([l.skip.weight for l in levels]), torch.cat([l.skip.bias for l in levels]))
        return F.leaky_relu(up + s, NEG_SLOPE, inplace=True)  # (B, K*C_0, X, Y, Z)
    y = up + torch.cat([skip] * k, 1)  # (B, K*C, X_l, Y_l, Z_l)
    blocks = [l.block for l in levels]
    if isinstance(blocks[0], ConvNormAct):
        h = grouped_norm([b.norm for b in blocks], grouped_conv([b.conv for b in blocks], y))
        return F.leaky_relu(h, NEG_SLOPE, inplace=True)
    h = grouped_norm([b.conv1.norm for b in blocks], grouped_conv([b.conv1.conv for b in blocks], y))
    h = F.leaky_relu(h, NEG_SLOPE, inplace=True)
    h = grouped_norm([b.norm2 for b in blocks], grouped_conv([b.conv2 for b in blocks], h))
    return F.leaky_relu(h + y, NEG_SLOPE, inplace=True)  # identity shortcut (C -> C)


class OrganDecoder(nn.Module):
    """One organ's decoder: levels depth-2 .. 0 (coarse to fine) and a 1x1x1 logit head."""

    def __init__(self, widths):
        super().__init__()
        # levels[l] produces decoder features at resolution level l (l = 0 .. depth-2)
        self.levels = nn.ModuleList([FineLevel(widths[1], widths[0])] +
                                    [DecoderLevel(widths[l + 1], widths[l], l) for l in range(1, len(widths) - 1)])
        self.head = nn.Conv3d(widths[0], 1, 1)


def rope_tables(shape, head_dim, heads, device):
    """cos, sin (X*Y*Z, H*D) of 3D rotary position encoding (RoPE) on a grid of `shape`, positions in its
    voxels, and the (H*D, H*D) matrix R with t @ R = "rotate half" of every head's first 6P channels, so that
    RoPE(t) = t * cos + (t @ R) * sin. Per head, P = D // 6 frequencies per axis (ROPE_WAVELENGTHS[:P]):
    channels [a_i | b_i] (i < 3P, axis-major: x's P, then y's, z's) rotate by the angle of pair i; the
    remaining D - 6P channels have cos 1, sin 0 (content only). Only relative offsets survive q . k, so nothing
    depends on the absolute grid size."""
    p = min(head_dim // 6, len(ROPE_WAVELENGTHS))
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (N, 3) voxel positions
    freqs = 2 * math.pi / torch.tensor(ROPE_WAVELENGTHS[:p], device=device, dtype=torch.float32)  # (P,)
    angles = (grid[:, :, None] * freqs).reshape(-1, 3 * p)  # (N, 3P)
    rest = head_dim - 6 * p
    ones, zeros = angles.new_ones(len(angles), rest), angles.new_zeros(len(angles), rest)
    cos = torch.cat([angles.cos(), angles.cos(), ones], 1).repeat(1, heads)  # (N, H*D)
    sin = torch.cat([angles.sin(), angles.sin(), zeros], 1).repeat(1, heads)  # (N, H*D)
    half = torch.zeros(head_dim, head_dim, device=device)
    i = torch.arange(3 * p, device=device)
    half[i + 3 * p, i] = -1.0  # output a_i takes -b_i
    half[i, i + 3 * p] = 1.0  # output b_i takes a_i
    return cos, sin, torch.block_diag(*[half] * heads)


class CrossOrganAttention(nn.Module):
    """Spatial cross-decoder attention at the coarsest decoder level (ATTENTION_LEVELS): every organ's tokens
    attend over the OTHER organs' tokens at all positions of the window, so the prostate decoder can ask where
    bladder and rectum are, and whether they are there at all.

    Tokens: each organ's features 2x2x2 average-pooled (POOL; the level's dims are always even, see check_size),
    i.e. on the bottleneck's grid, M = X*Y*Z/8 per organ, C channels, H = C / HEAD_DIM heads. Organ k's M queries
    attend over the (K-1)*M keys of the other organs (full attention, torch's scaled_dot_product_attention over
    B*K query organs x H heads). Positions enter through 3D rotary encoding (RoPE) on q and k in units of the
    pooled voxels (24 mm in both profiles: 3 mm x 8 at depth 4, 1.5 mm x 16 at depth 5), so the scores depend on
    relative offsets only and no weight depends on the grid size. Per-organ projections (weights (K, C, 3C) and
    (K, C, C), one batched matmul over organs); pre-norm (LayerNorm per token, no affine: the projections
    absorb it). The result is upsampled x2 (nearest) and added: out_k = x_k + up(W_o,k attn(q_k, others)).
    W_o starts at ZERO, so at initialisation the net equals the attention-off net and the attention grows in
    only where it lowers the loss. With attention off the module is skipped (identity).

    Context at inference: one sliding window = config.PATCH_SIZE, the same extent as a training patch (both
    come from that one setting), so the tokens see as far at inference as in training, and never beyond the
    window.

    Cost (K organs, C channels, M pooled positions), forward: pooling, norm, upsampling and the residual add
    O(K*C) per level voxel; projections 2*K*M*C*6C (q, k, v, their RoPE halves, out); scores + mixing
    4*K*M*(K-1)*M*C. 48^3 patch, depth 4 (level 2: 12^3 -> M 216, C 32), batch 2: 0.09 GFLOP, 1.8 % of the
    conv forward (4.9 GFLOP); 128^3, depth 5 (level 3: 16^3 -> M 512, C 64), batch 1: 0.48 GFLOP, 0.9 % of
    53 GFLOP. Memory kept for backward (measured with saved-tensor hooks, fp32): the pooled tokens, q/k/v,
    the SDPA output and log-sum-exp (no M x M score matrix: the fused kernel recomputes it) and the
    upsampled result: 0.86 MB per patch at 48^3/depth 4, 4.5 MB at 128^3/depth 5.
    Measured train step, attention on vs off: see the README's model section.
    """

    def __init__(self, n_organs, channels):
        super().__init__()
        self.k, self.c = n_organs, channels
        self.heads = channels // HEAD_DIM if channels % HEAD_DIM == 0 else 1
        self.qkv = nn.Parameter(torch.empty(n_organs, channels, 3 * channels))  # per organ (C, 3C): q | k | v
        self.out = nn.Parameter(torch.zeros(n_organs, channels, channels))  # per organ (C, C), zero at init
        for k in range(n_organs):
            nn.init.kaiming_uniform_(self.qkv.data[k].T, a=math.sqrt(5))  # nn.Linear's default, fan_in C
        self._rope = {}  # (grid, device, dtype) -> RoPE tables; constants, so not in the state_dict

    def rope(self, grid, device, dtype):
        """cos, sin (M, 2C) and rotation (2C, 2C) for q | k side by side, cached per grid, device and dtype
        (autocast makes the projection bf16 while the weights stay fp32); None when a head is narrower than 6."""
        key = (tuple(grid), str(device), dtype)
        if key not in self._rope:
            d = self.c // self.heads
            tables = rope_tables(grid, d, 2 * self.heads, device) if d >= 6 else None  # q's heads, then k's
            self._rope[key] = tuple(t.to(dtype) for t in tables) if tables else None
        return self._rope[key]

    def forward(self, feats):
        """feats (B, K*C, X, Y, Z), organ blocks of C channels in organ order, X, Y, Z even -> same shape."""
        k, c, h = self.k, self.c, self.heads
        if k < 2:
            return feats
        b = feats.shape[0]
        pooled = F.avg_pool3d(feats, POOL)  # (B, K*C, X', Y', Z') = the bottleneck grid
        grid = pooled.shape[2:]
        tokens = F.layer_norm(pooled.permute(0, 2, 3, 4, 1).reshape(b, -1, k, c), (c,))  # (B, M, K, C)
        weight, rope = self.qkv, self.rope(grid, feats.device, self.qkv.dtype) is not None
        if rope:  # rotary position encoding qk * cos + rotate_half(qk) * sin; rotate_half is folded into the
            rot = self.rope(grid, feats.device, weight.dtype)[2]  # projection (W_qk @ rot): one matmul for all
            weight = torch.cat([weight, weight[..., :2 * c] @ rot], -1)  # (K, C, 5C)
        qkv = torch.einsum("bmkc,kcd->bkmd", tokens, weight)  # (B, K, M, 3C or 5C)
        qk, v = qkv[..., :2 * c], qkv[..., 2 * c:3 * c]  # (B, K, M, 2C), (B, K, M, C)
        if rope:
            cos, sin, _ = self.rope(grid, feats.device, qkv.dtype)  # (M, 2C) each
            qk = qk * cos + qkv[..., 3 * c:] * sin  # (B, K, M, 2C)
        kv = torch.cat([qk[..., c:], v], -1)  # (B, K, M, 2C)
        # organ j's keys/values: the other organs', concatenated along the token axis (j+1, j+2, ... mod K)
        kv = torch.cat([kv.roll(-s, 1) for s in range(1, k)], 2)  # (B, K, (K-1)*M, 2C)
        heads = lambda t: t.reshape(b * k, t.shape[2], h, c // h).transpose(1, 2)  # (B*K, H, tokens, D)
        mixed = F.scaled_dot_product_attention(heads(qk[..., :c]), heads(kv[..., :c]), heads(kv[..., c:]))
        mixed = mixed.transpose(1, 2).reshape(b, k, -1, c)  # (B, K, M, C) from (B*K, H, M, D)
        delta = torch.einsum("bkmc,kcd->bmkd", mixed, self.out)  # (B, M, K, C)
        delta = delta.reshape(b, *grid, k * c).permute(0, 4, 1, 2, 3)  # (B, K*C, X', Y', Z')
        up = F.interpolate(delta.to(feats.dtype), scale_factor=POOL, mode="nearest")  # (B, K*C, X, Y, Z)
        return feats + up  # residual


class MultiDecoderUNet(nn.Module):
    """Shared residual encoder -> K organ decoders (ModuleDict by organ) with spatial cross-organ attention at
    the ATTENTION_LEVELS coarsest decoder level(s) -> K logit maps. Input (B, in_channels, X, Y, Z), each of X, Y, Z
    divisible by 2**(depth-1)."""

    def __init__(self, organs=None, in_channels=1, base_channels=8, depth=5, attention=True, checkpointing=False):
        super().__init__()
        organs = tuple(config.ORGANS if organs is None else organs)
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.config = dict(organs=list(organs), in_channels=in_channels, base_channels=base_channels,
                           depth=depth, attention=attention, checkpointing=checkpointing)
        self.organs, self.depth = organs, depth
        self.attention, self.checkpointing = attention, checkpointing
        widths = level_widths(base_channels, depth)
        self.encoder = Encoder(in_channels, widths)
        self.decoders = nn.ModuleDict({organ: OrganDecoder(widths) for organ in organs})
        # attention modules keyed by decoder level (as str, ModuleDict needs str keys); built even when
        # attention=False so that the flag can be toggled on the same weights for ablation
        self.cross_attention = nn.ModuleDict(
            {str(l): CrossOrganAttention(len(organs), widths[l])
             for l in range(max(1, depth - 1 - ATTENTION_LEVELS), depth - 1)})

    def check_size(self, shape):
        """Raise ValueError unless every spatial dim is divisible by 2**(depth-1)."""
        f = 2 ** (self.depth - 1)
        if len(shape) != 5:
            raise ValueError(f"expected input (B, C, X, Y, Z), got shape {tuple(shape)}")
        bad = [s for s in shape[2:] if s % f]
        if bad:
            raise ValueError(f"input size {'x'.join(map(str, shape[2:]))}: every spatial dim must be divisible "
                             f"by 2**(depth-1) = {f} (depth {self.depth}); {bad} is not")

    def _run(self, fn, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x):
        self.check_size(x.shape)
        skips = self.encoder(x)  # level l: (B, C_l, X/2^l, Y/2^l, Z/2^l)
        k = len(self.organs)
        feats = torch.cat([skips[-1]] * k, 1)  # every decoder starts from the shared bottleneck, (B, K*C, ...)
        for level in range(self.depth - 2, -1, -1):
            # the K organ decoders run as one grouped conv per layer; parameters stay in self.decoders[organ]
            levels = [self.decoders[o].levels[level] for o in self.organs]
            feats = self._run(partial(grouped_decoder_level, levels), feats, skips[level])  # (B, K*C_l, X_l, Y_l, Z_l)
            if self.attention and str(level) in self.cross_attention:
                feats = self._run(self.cross_attention[str(level)], feats)  # (B, K*C_l, X_l, Y_l, Z_l)
        # the K heads (1x1x1, C_0 -> 1) as one dense conv with a block-diagonal weight: 1.4x faster than groups=K
        heads = [self.decoders[o].head for o in self.organs]
        weight = torch.block_diag(*[h.weight.reshape(1, -1) for h in heads])  # (K, K*C_0)
        return F.conv3d(feats, weight[..., None, None, None], torch.cat([h.bias for h in heads]))  # (B, K, X, Y, Z)


def build_model_from_config():
    """MultiDecoderUNet from config.ORGANS, BASE_CHANNELS, DEPTH, ATTENTION, ACTIVATION_CHECKPOINTING."""
    return MultiDecoderUNet(organs=config.ORGANS, in_channels=1, base_channels=config.BASE_CHANNELS,
                            depth=config.DEPTH, attention=config.ATTENTION,
                            checkpointing=config.ACTIVATION_CHECKPOINTING)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def main():
    torch.set_num_threads(2)
    for base in (8, 32):
        model = MultiDecoderUNet(base_channels=base, depth=config.DEPTH).eval()
        parts = {"encoder": count_parameters(model.encoder),
                 "decoders": count_parameters(model.decoders),
                 "attention": count_parameters(model.cross_attention)}
        x = torch.randn(1, 1, 32, 32, 48).to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            y = model.to(memory_format=torch.channels_last_3d)(x)
        print(f"base {base:2d} depth {model.depth}: {count_parameters(model):,} parameters "
              f"({', '.join(f'{k} {v:,}' for k, v in parts.items())}); input {tuple(x.shape)} -> logits {tuple(y.shape)}")


if __name__ == "__main__":
    main()
