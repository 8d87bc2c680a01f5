"""Classifier heads of downstream tasks, by name (``task.head`` in a finetune config).

=======  ===================================================================  =====================
name     layers                                                                as in
=======  ===================================================================  =====================
mlp      Linear(h, 2h) - GELU - LayerNorm(2h, eps 1e-12) - Linear(2h, n)       UNITER / LXMERT VQA
mmf      Linear(h, h) - GELU - LayerNorm(h, eps 1e-12) - Linear(h, n)          MMF (Singh et al.)
linear   Linear(h, n)                                                          a linear probe
=======  ===================================================================  =====================

``h`` is the head's input width: the encoder's hidden size, or twice it for NLVR2's pair
setting (two pooled outputs concatenated). Weights start as BERT's (normal(0, 0.02),
zero biases, unit LayerNorms): the model applies the encoder's ``_init_weights``.
"""

from __future__ import annotations

from torch import nn

LAYER_NORM_EPS = 1e-12


def _mlp(hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=LAYER_NORM_EPS),
                         nn.Linear(2 * hidden, outputs))


def _mmf(hidden: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LAYER_NORM_EPS),
                         nn.Linear(hidden, outputs))


def _linear(hidden: int, outputs: int) -> nn.Module:
    return nn.Linear(hidden, outputs)


HEADS = {"mlp": _mlp, "mmf": _mmf, "linear": _linear}


def build_head(name: str, hidden: int, outputs: int) -> nn.Module:
    """The head ``name`` from ``hidden`` inputs to ``outputs`` logits."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    if hidden < 1 or outputs < 1:
        raise ValueError(f"a head needs positive sizes, got hidden {hidden}, outputs {outputs}")
    return HEADS[name](hidden, outputs)
