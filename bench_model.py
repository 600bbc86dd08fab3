"""The reference network and the timing closures behind bench.py's train-step rows (run `python bench.py`).

ReferenceNet is a straightforward fp32 implementation of the same design (BatchNorm + ReLU blocks, transposed
convs, three separate decoders, 1x1x1-conv cross attention at full resolution, sigmoid heads). train_step_fn /
forward_fn build closures that run one train step (forward + loss + backward + AdamW) or one inference forward
on random data; count_step_gflops and conv_ceiling_gflops give the FLOPs and the machine's conv peak.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from multi_decoder_model import level_widths

THREADS = 2  # CPU threads, as on the dev box and CI


# --- Reference: the straightforward fp32 implementation of the same design -------------------------
def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class RefDecoder(nn.Module):
    """ConvTranspose3d upsampling, concat skip, two conv-BN-ReLU per level."""

    def __init__(self, widths):
        super().__init__()
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[l + 1], widths[l], 2, stride=2)
                                 for l in range(len(widths) - 1))
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn_relu(2 * widths[l], widths[l]),
                                                  conv_bn_relu(widths[l], widths[l]))
                                    for l in range(len(widths) - 1))

    def forward(self, skips):
        x = skips[-1]
        for l in range(len(skips) - 2, -1, -1):
            x = self.blocks[l](torch.cat([self.ups[l](x), skips[l]], 1))
        return x


class RefCrossAttention(nn.Module):
    """Cross-decoder attention from 1x1x1 convs at full resolution: for each organ k and other organ j,
    a sigmoid gate from q_k(x_k) + k_j(x_j) weights the message v_j(x_j); x_k += out_k(sum of messages)."""

    def __init__(self, n, c):
        super().__init__()
        self.q = nn.ModuleList(nn.Conv3d(c, c, 1) for _ in range(n))
        self.k = nn.ModuleList(nn.Conv3d(c, c, 1) for _ in range(n))
        self.v = nn.ModuleList(nn.Conv3d(c, c, 1) for _ in range(n))
        self.o = nn.ModuleList(nn.Conv3d(c, c, 1) for _ in range(n))

    def forward(self, feats):
        out = []
        for i, f in enumerate(feats):
            msg = sum(torch.sigmoid(self.q[i](f) + self.k[j](g)) * self.v[j](g)
                      for j, g in enumerate(feats) if j != i)
            out.append(f + self.o[i](msg))
        return out


class ReferenceNet(nn.Module):
    """Plain encoder (two conv-BN-ReLU per level, strided first conv), three separate decoders,
    1x1x1-conv cross attention at full resolution, sigmoid heads."""

    def __init__(self, n_organs=3, in_channels=1, base_channels=8, depth=5):
        super().__init__()
        widths = level_widths(base_channels, depth)
        self.enc = nn.ModuleList()
        cin = in_channels
        for l, c in enumerate(widths):
            self.enc.append(nn.Sequential(conv_bn_relu(cin, c, 1 if l == 0 else 2), conv_bn_relu(c, c)))
            cin = c
        self.decs = nn.ModuleList(RefDecoder(widths) for _ in range(n_organs))
        self.attn = RefCrossAttention(n_organs, widths[0])
        self.heads = nn.ModuleList(nn.Conv3d(widths[0], 1, 1) for _ in range(n_organs))

    def forward(self, x):
        skips = []
        for level in self.enc:
            x = level(x)
            skips.append(x)
        feats = self.attn([d(skips) for d in self.decs])
        return torch.sigmoid(torch.cat([h(f) for h, f in zip(self.heads, feats)], 1))


# --- Timing helpers -------------------------------------------------------------------------------
def _loss(model, out, target):
    """Reference: BCE on sigmoid outputs vs one-hot target. Ours: cross-entropy over the implicit background
    logit 0 and the organ logits vs the label map, as train.py gets it from the patch sampler."""
    if isinstance(model, ReferenceNet):
        return F.binary_cross_entropy(out.float(), target)
    logits = torch.cat([torch.zeros_like(out[:, :1]), out], 1).float()
    return F.cross_entropy(logits, target)


def _batch(model, size, batch, channels_last):
    """Random input and target: a one-hot (B, 3, ...) float target for the reference, the same labels as a
    (B, ...) int64 label map (0 background, 1..K organs) for ours."""
    n = 3 if isinstance(model, ReferenceNet) else len(model.organs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *size, generator=g)
    target = (torch.rand(batch, n, *size, generator=g) > 0.7).float()
    if not isinstance(model, ReferenceNet):
        target = (target.argmax(1) + 1) * (target.amax(1) > 0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    return x, target


def train_step_fn(model, size, batch=1, amp=False, channels_last=True):
    """A closure running one train step (forward, loss, backward, AdamW step) on random data."""
    if isinstance(size, int):
        size = (size,) * 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, target = _batch(model, size, batch, channels_last)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = _loss(model, out, target)
        loss.backward()
        opt.step()
        return loss
    return step


def forward_fn(model, size, batch=1, amp=False, channels_last=True):
    """A closure running one inference forward (eval mode, no autograd) on random data."""
    if isinstance(size, int):
        size = (size,) * 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    x, _ = _batch(model, size, batch, channels_last)

    def forward():
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(x)
    return forward


def count_step_gflops(model, size, batch=1):
    """GFLOPs of one train step = 3 x forward FLOPs (backward ~ 2 x forward), forward counted by
    torch.utils.flop_counter (convs, matmuls; norms and elementwise ops not counted). The counter's own
    backward formulas over-count grouped convs, hence forward x 3."""
    if isinstance(size, int):
        size = (size,) * 3
    model.train()
    x, _ = _batch(model, size, batch, False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops() / 1e9


def conv_ceiling_gflops(size=32, cin=32, cout=32, amp=False, channels_last=True, repeats=3):
    """Measured GFLOP/s of one representative Conv3d (3x3x3, cin->cout, batch 1, size^3) forward."""
    torch.set_num_threads(THREADS)
    conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
    x = torch.randn(1, cin, size, size, size)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
    flops = 2 * cin * cout * 27 * size ** 3
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        conv(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - t0)
    return flops / min(times) / 1e9
