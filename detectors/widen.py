"""Grow a trained detector without changing what it computes: wider bottlenecks
(Net2WiderNet), more anchor sizes.

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

``add_anchor_sizes`` gives the RPN anchors of further sizes (e.g. 512 beside 32..256, for
objects that fill a larger input). Each new anchor starts as a copy of the old anchor of the
nearest size with the same ratio: the same objectness weights, its logit lowered by
``objectness_offset``, and box deltas rescaled to its size (centre terms times the size ratio,
width/height terms shifted by its log), so it proposes the box its source proposes, less
confidently. The old anchors keep their rows. Train the result with
``--set anchor_sizes=[...]``:

    python -c "from vlp.detectors.widen import add_anchor_sizes_checkpoint; \\
               add_anchor_sizes_checkpoint('in.pt', 'out.pt', [32, 64, 128, 256, 512])"
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import torch

from vlp.detectors.checkpoint import read_checkpoint, write_state_dict
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
    ``out_path`` as a float32 state dict (atomically, in the layout of its suffix, as
    :func:`~vlp.detectors.checkpoint.write_state_dict`); returns ``out_path``."""
    state = read_checkpoint(path)
    with _naming(path):
        widened = widen_bottlenecks(state, bottleneck_channels, seed=seed)
    write_state_dict(out_path, widened)
    return os.fspath(out_path)


@contextlib.contextmanager
def _naming(path):
    """A CheckpointError about a file's contents names the file."""
    try:
        yield
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


_CELL_ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
_OBJECTNESS = "proposal_generator.rpn_head.objectness_logits"
_DELTAS = "proposal_generator.rpn_head.anchor_deltas"


def _anchor_layout(cell_anchors: torch.Tensor) -> tuple[list[float], list[float]]:
    """(sizes, ratios) of a size-major, ratio-minor anchor buffer, as the model builds it."""
    from vlp.detectors.model import generate_cell_anchors

    cells = cell_anchors.float()
    if cells.ndim != 2 or cells.shape[1] != 4 or len(cells) == 0:
        raise CheckpointError(f"{_CELL_ANCHORS} must be [A, 4], got {list(cells.shape)}")
    widths, heights = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    if not bool((widths > 0).all() and (heights > 0).all()):
        raise CheckpointError(f"{_CELL_ANCHORS} holds an anchor without area")
    sizes, ratios = [], []
    for size, ratio in zip((widths * heights).sqrt().tolist(), (heights / widths).tolist()):
        if not any(math.isclose(size, s, rel_tol=1e-3) for s in sizes):
            sizes.append(size)
        if not any(math.isclose(ratio, r, rel_tol=1e-3) for r in ratios):
            ratios.append(ratio)
    rebuilt = generate_cell_anchors(sizes, ratios)
    if rebuilt.shape != cells.shape or not torch.allclose(rebuilt, cells, rtol=1e-3, atol=1e-2):
        raise CheckpointError(f"{_CELL_ANCHORS} is not a size-major grid of sizes x ratios")
    return sizes, ratios


def add_anchor_sizes(state: dict, anchor_sizes, *, objectness_offset: float = -2.0) -> dict:
    """A float32 copy of ``state`` whose RPN has the anchors of ``anchor_sizes`` (every old size
    included, in any order) times the old ratios; see the module docstring.

    objectness_offset: added to a new anchor's objectness logit (its source anchor's); 0 makes
        it an exact duplicate, a negative value lets the old anchors win where both fire.
    """
    from vlp.detectors.model import generate_cell_anchors

    missing = [key for key in (_CELL_ANCHORS, *(f"{p}.{f}" for p in (_OBJECTNESS, _DELTAS) for f in ("weight", "bias")))
               if key not in state]
    if missing:
        raise CheckpointError(f"not a detector with an RPN: missing {', '.join(missing)}")
    old_sizes, ratios = _anchor_layout(state[_CELL_ANCHORS])
    new_sizes = [float(size) for size in anchor_sizes]
    if any(not math.isfinite(size) or size <= 0 for size in new_sizes):
        raise ValueError(f"anchor sizes must be positive, got {list(anchor_sizes)}")
    kept = [next((i for i, size in enumerate(new_sizes) if math.isclose(size, old, rel_tol=1e-3)), None)
            for old in old_sizes]
    if None in kept:
        raise ValueError(f"anchor_sizes must keep every size of the checkpoint "
                         f"({', '.join(f'{s:g}' for s in old_sizes)}), got {list(anchor_sizes)}")
    if len({round(s, 3) for s in new_sizes}) != len(new_sizes):
        raise ValueError(f"anchor sizes repeat: {list(anchor_sizes)}")
    num_ratios = len(ratios)
    num_old = len(old_sizes) * num_ratios
    if state[f"{_OBJECTNESS}.weight"].shape[0] != num_old or state[f"{_DELTAS}.weight"].shape[0] != 4 * num_old:
        raise CheckpointError(f"the RPN head's outputs do not match the {num_old} anchors of {_CELL_ANCHORS}")
    out = {name: (value.float().clone() if value.is_floating_point() else value.clone())
           for name, value in state.items()}
    cells = generate_cell_anchors(new_sizes, ratios)
    source, log_scale = [], []
    for size in new_sizes:
        old = min(range(len(old_sizes)), key=lambda i: abs(math.log(size / old_sizes[i])))
        for r in range(num_ratios):
            source.append(old * num_ratios + r)
            log_scale.append(math.log(old_sizes[old] / size))
    old_cells = out[_CELL_ANCHORS]
    for old, position in enumerate(kept):  # the old anchors' exact values
        cells[position * num_ratios:(position + 1) * num_ratios] = old_cells[old * num_ratios:(old + 1) * num_ratios]
    out[_CELL_ANCHORS] = cells
    index = torch.tensor(source)
    is_new = torch.tensor([anchor // num_ratios not in kept for anchor in range(len(source))])
    out[f"{_OBJECTNESS}.weight"] = out[f"{_OBJECTNESS}.weight"][index]
    out[f"{_OBJECTNESS}.bias"] = out[f"{_OBJECTNESS}.bias"][index] + is_new.float() * float(objectness_offset)
    delta_index = (index.view(-1, 1) * 4 + torch.arange(4)).reshape(-1)
    # A delta is relative to its anchor's size: the centre shift dx * new must equal dx' * old,
    # and exp(dw + log(old / new)) * new == exp(dw) * old, so the copy decodes to the same box.
    log_scale = torch.tensor(log_scale).view(-1, 1)
    weight = out[f"{_DELTAS}.weight"][delta_index]  # [4A, C, 1, 1], a new tensor
    bias = out[f"{_DELTAS}.bias"][delta_index]
    weight.view(len(source), 4, -1)[:, :2] *= log_scale.exp().view(-1, 1, 1)
    bias.view(-1, 4)[:, :2] *= log_scale.exp()
    bias.view(-1, 4)[:, 2:] += log_scale
    out[f"{_DELTAS}.weight"], out[f"{_DELTAS}.bias"] = weight, bias
    return out


def add_anchor_sizes_checkpoint(path, out_path, anchor_sizes, *, objectness_offset: float = -2.0) -> str:
    """Read a detector checkpoint, add anchor sizes (:func:`add_anchor_sizes`) and write it to
    ``out_path`` as a float32 state dict, as :func:`widen_checkpoint` does; returns ``out_path``."""
    state = read_checkpoint(path)
    with _naming(path):
        grown = add_anchor_sizes(state, anchor_sizes, objectness_offset=objectness_offset)
    write_state_dict(out_path, grown)
    return os.fspath(out_path)
