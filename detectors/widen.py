"""Widen a trained detector's bottlenecks without changing what it computes (Net2WiderNet).

A ResNet bottleneck is conv1 (1x1, in -> b) -> frozen norm -> ReLU -> conv2 (3x3, b -> b)
-> norm -> ReLU -> conv3 (1x1, b -> out) -> norm. Its width ``b`` is internal: giving it
more channels changes neither the block's input nor its output. Each new channel copies an
old one (its incoming weights and norm), so it computes the same activation; a channel and
its copy share the channel's outgoing weights, with random shares that sum to one,
so the block's output is unchanged (up to float rounding) while the copies receive
different gradients and can grow apart when training continues (Chen, Goodfellow and
Shlens, "Net2Net", ICLR 2016).

``widen_bottlenecks`` does this for every bottleneck of res2-res5 at once, for
``ArchitectureConfig.bottleneck_channels`` (res2's width; each later stage doubles it):

    python -c "from vlp.detectors.widen import widen_checkpoint; \\
               widen_checkpoint('narrow.pt', 'wide.pt', bottleneck_channels=32)"

then train the result with ``vlp train-detector --init-weights wide.pt --set
bottleneck_channels=32 ...`` (the ``--set`` where the width differs from the preset's).
The shipped demo detector was widened from 16 to 24 this way (``detectors/weights/README.md``).
"""

from __future__ import annotations

import os
import re

import torch

from vlp.core.durable import atomic_write
from vlp.detectors.checkpoint import read_checkpoint
from vlp.detectors.errors import CheckpointError

_CONV2 = re.compile(r"^(.*\.res(\d)\.\d+)\.conv2\.weight$")
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def widen_bottlenecks(state: dict, bottleneck_channels: int, *, seed: int = 0,
                      share_jitter: float = 0.1) -> dict:
    """A float32 copy of ``state`` with every bottleneck widened; see the module docstring.

    state: a detector state dict (detectron2 names, as ``read_checkpoint`` returns).
    bottleneck_channels: the new res2 width; stage ``s`` (res2 = 0) gets ``width * 2**s``,
        as the model builds it. From the current width to at most twice it (one copy per
        old channel at most; widen again to go further).
    share_jitter: an old channel and its copy take shares 0.5 + d and 0.5 - d of its
        outgoing weights, d uniform in [-jitter, jitter].

    Blocks are widened in the sorted order of their names; per block, the channels to copy
    are the first ``new - old`` of a random permutation, then one ``d`` per copied channel,
    all from one ``torch.Generator`` seeded with ``seed``.
    """
    blocks = sorted({(m.group(1), int(m.group(2))) for m in map(_CONV2.match, state) if m})
    if not blocks:
        raise CheckpointError("no bottleneck blocks (...res<N>.<i>.conv2.weight) in this state dict")
    res2 = [name for name, stage in blocks if stage == 2]
    if not res2:
        raise CheckpointError("no res2 bottleneck to read the current width from")
    old_base = int(state[f"{res2[0]}.conv2.weight"].shape[0])
    if not old_base <= int(bottleneck_channels) <= 2 * old_base:
        raise ValueError(f"bottleneck_channels must lie between the checkpoint's {old_base} and twice it, "
                         f"got {bottleneck_channels}")
    generator = torch.Generator().manual_seed(int(seed))
    out = {name: (value.float().clone() if value.is_floating_point() else value.clone())
           for name, value in state.items()}
    for block, stage in blocks:
        old = int(state[f"{block}.conv2.weight"].shape[0])
        if old != old_base * 2 ** (stage - 2):
            raise CheckpointError(f"{block}: bottleneck width {old}, expected {old_base * 2 ** (stage - 2)}")
        new = int(bottleneck_channels) * 2 ** (stage - 2)
        if new == old:
            continue
        copied = torch.randperm(old, generator=generator)[: new - old]
        source = torch.cat([torch.arange(old), copied])  # new channel -> the old one it copies
        share = torch.ones(new)
        for position, channel in enumerate(copied.tolist()):
            d = (torch.rand(1, generator=generator).item() - 0.5) * 2 * share_jitter
            share[channel], share[old + position] = 0.5 + d, 0.5 - d
        for conv in ("conv1", "conv2"):
            out[f"{block}.{conv}.weight"] = out[f"{block}.{conv}.weight"][source]
            for field in _NORM_FIELDS:
                key = f"{block}.{conv}.norm.{field}"
                out[key] = out[key][source]
        for conv in ("conv2", "conv3"):
            weight = out[f"{block}.{conv}.weight"]
            out[f"{block}.{conv}.weight"] = weight[:, source] * share.view(1, -1, 1, 1)
    return out


def widen_checkpoint(path, out_path, bottleneck_channels: int, *, seed: int = 0) -> str:
    """Read a detector checkpoint, widen it (:func:`widen_bottlenecks`) and write it to
    ``out_path`` as a float32 state dict (atomically); returns ``out_path``."""
    widened = widen_bottlenecks(read_checkpoint(path), bottleneck_channels, seed=seed)
    atomic_write(out_path, lambda handle: torch.save(widened, handle))
    return os.fspath(out_path)
