"""The captioner: a transformer encoder-decoder over region features and box geometry.

Encoder input per region: ``Linear(features) + Linear(box geometry)`` (the geometry of
:func:`vlp.trainer.data.box_geometry`), LayerNorm, dropout; ``encoder_layers`` pre-norm
transformer layers. Decoder: WordPiece embeddings (the tokenizer's vocabulary; ``[CLS]``
starts a caption, ``[SEP]`` ends it) + learned positions, ``decoder_layers`` pre-norm layers
with causal self-attention and cross-attention to the regions, output tied to the input
embeddings. Defaults: d 512, 3 + 3 layers, 8 heads (the ``tiny`` preset is for tests).

Decoding (:func:`decode`): ``greedy``, ``beam`` (K beams, sum of log-probs, the best
``num_captions`` finished beams) and ``nucleus`` (top-p sampling, Holtzman et al.; every
row draws from its own uniforms, so a caption depends on its image and seed, not on the
batch). A caption's ``score`` is the mean log-probability, under the model's full softmax,
of its tokens including the end token. Special tokens other than ``[SEP]`` are never
generated.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

DECODINGS = ("greedy", "beam", "nucleus")

PRESETS = {
    "default": dict(hidden_size=512, encoder_layers=3, decoder_layers=3, heads=8, intermediate_size=2048),
    "tiny": dict(hidden_size=64, encoder_layers=1, decoder_layers=2, heads=4, intermediate_size=128),
}


@dataclasses.dataclass
class CaptionerModelConfig:
    feature_dim: int = 2048
    box_dims: int = 5
    hidden_size: int = 512
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 8
    intermediate_size: int = 2048
    dropout: float = 0.1
    max_regions: int = 100
    max_caption_len: int = 20  # WordPiece tokens, [CLS]/[SEP] not counted

    def __post_init__(self):
        for name in ("feature_dim", "hidden_size", "encoder_layers", "decoder_layers", "heads",
                     "intermediate_size", "max_regions", "max_caption_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.box_dims not in (4, 5, 7):
            raise ValueError(f"box_dims must be 4, 5 or 7, got {self.box_dims!r}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Tokens:
    """The tokenizer ids the captioner needs."""

    vocab_size: int
    bos: int
    eos: int
    pad: int
    banned: tuple  # never generated (specials other than eos)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Tokens":
        specials = set(tokenizer.all_special_ids)
        eos = tokenizer.sep_token_id
        return cls(len(tokenizer), tokenizer.cls_token_id, eos, tokenizer.pad_token_id,
                   tuple(sorted(i for i in specials if i != eos)))


class CaptionerNet(nn.Module):
    def __init__(self, config: CaptionerModelConfig, tokens: Tokens):
        super().__init__()
        self.config, self.tokens = config, tokens
        h = config.hidden_size
        self.hidden_size = h
        self.region_proj = nn.Linear(config.feature_dim, h)
        self.box_proj = nn.Linear(config.box_dims, h)
        self.region_norm = nn.LayerNorm(h)
        self.embed = nn.Embedding(tokens.vocab_size, h, padding_idx=tokens.pad)
        self.positions = nn.Embedding(config.max_caption_len + 2, h)
        self.embed_norm = nn.LayerNorm(h)
        self.dropout = nn.Dropout(config.dropout)
        enc = nn.TransformerEncoderLayer(h, config.heads, config.intermediate_size, config.dropout,
                                         activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, config.encoder_layers, enable_nested_tensor=False)
        dec = nn.TransformerDecoderLayer(h, config.heads, config.intermediate_size, config.dropout,
                                         activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(dec, config.decoder_layers)
        self.out_norm = nn.LayerNorm(h)
        self.out_bias = nn.Parameter(torch.zeros(tokens.vocab_size))
        self.apply(self._init_weights)
        banned = torch.zeros(tokens.vocab_size, dtype=torch.bool)
        banned[list(tokens.banned)] = True
        self.register_buffer("banned", banned, persistent=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    # -- forward pieces --------------------------------------------------------------
    def encode(self, features, boxes, mask):
        """``(memory [B,N,h], memory padding mask [B,N] True = padding)``."""
        x = self.region_proj(features) + self.box_proj(boxes)
        x = self.dropout(self.region_norm(x))
        pad = ~mask.bool()
        return self.encoder(x, src_key_padding_mask=pad), pad

    def logits(self, memory, memory_pad, tokens, token_pad: Optional[torch.Tensor] = None):
        """Next-token logits [B,T,V] for every prefix of ``tokens`` [B,T] (causal)."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.embed_norm(self.embed(tokens) + self.positions(positions)[None]))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), 1)
        x = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=token_pad,
                         memory_key_padding_mask=memory_pad, tgt_is_causal=True)
        logits = self.out_norm(x) @ self.embed.weight.t() + self.out_bias
        return logits.masked_fill(self.banned, float("-inf"))

    def batch_inputs(self, batch: dict):
        return batch["region_features"], batch["region_boxes"], batch["region_mask"]

    def token_log_probs(self, memory, memory_pad, sequences):
        """Per-token log-probs of ``sequences`` [B,L] (``[CLS] w1 .. [SEP] pad ..``):
        ``(log p(w_t | w_<t) [B,L-1], mask [B,L-1])``; the mask keeps tokens up to and
        including the first [SEP]."""
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        keep = _until_eos(targets, self.tokens.eos, self.tokens.pad)
        logits = self.logits(memory, memory_pad, inputs, token_pad=None)
        log_probs = F.log_softmax(logits.float(), -1)
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(~keep, 0.0), keep


def _until_eos(targets, eos: int, pad: int):
    """True for each target position up to and including the first eos (and not padding)."""
    is_eos = targets == eos
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # eos seen strictly before
    return (before == 0) & (targets != pad)


def _expand(x, k: int):
    return x.repeat_interleave(k, 0)


@torch.no_grad()
def sample(net: CaptionerNet, memory, memory_pad, uniforms, *, top_p: float = 1.0, max_len: Optional[int] = None):
    """Sample one caption per row with inverse-CDF draws from ``uniforms`` [B, max_len+1]
    (top-p truncated, renormalised distribution). Returns sequences [B, L] starting with
    [CLS] and padded after [SEP]."""
    max_len = max_len or net.config.max_caption_len
    batch = memory.shape[0]
    t = net.tokens
    seqs = torch.full((batch, 1), t.bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
    for step in range(max_len + 1):
        logits = net.logits(memory, memory_pad, seqs)[:, -1].float()
        if step == max_len:  # out of room: end here
            choice = torch.full((batch,), t.eos, dtype=torch.long, device=memory.device)
        else:
            probs = F.softmax(logits, -1)
            if top_p < 1.0:
                probs = _nucleus(probs, top_p)
            cdf = probs.cumsum(-1)
            u = uniforms[:, step].to(memory.device, cdf.dtype) * cdf[:, -1]
            choice = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
        choice = torch.where(done, torch.full_like(choice, t.pad), choice)
        seqs = torch.cat([seqs, choice[:, None]], 1)
        done |= choice == t.eos
        if bool(done.all()):
            break
    return seqs


def _nucleus(probs, top_p: float):
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


@torch.no_grad()
def greedy(net: CaptionerNet, memory, memory_pad, *, max_len: Optional[int] = None):
    max_len = max_len or net.config.max_caption_len
    batch = memory.shape[0]
    t = net.tokens
    seqs = torch.full((batch, 1), t.bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
    for step in range(max_len + 1):
        logits = net.logits(memory, memory_pad, seqs)[:, -1]
        choice = logits.argmax(-1) if step < max_len else torch.full_like(done, t.eos, dtype=torch.long)
        choice = torch.where(done, torch.full_like(choice, t.pad), choice)
        seqs = torch.cat([seqs, choice[:, None]], 1)
        done |= choice == t.eos
        if bool(done.all()):
            break
    return seqs


@torch.no_grad()
def beam_search(net: CaptionerNet, memory, memory_pad, *, beam_size: int = 3, num_captions: int = 1,
                max_len: Optional[int] = None):
    """Beam search; returns sequences [B * num_captions, L] (the best finished beams of each
    row by summed log-probability, best first)."""
    max_len = max_len or net.config.max_caption_len
    t = net.tokens
    batch, k = memory.shape[0], beam_size
    if not 1 <= num_captions <= k:
        raise ValueError(f"beam search returns at most beam_size ({k}) captions per image, asked {num_captions}")
    mem, pad = _expand(memory, k), _expand(memory_pad, k)
    seqs = torch.full((batch * k, 1), t.bos, dtype=torch.long, device=memory.device)
    scores = torch.zeros(batch, k, device=memory.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    done = torch.zeros(batch * k, dtype=torch.bool, device=memory.device)
    vocab = t.vocab_size
    for step in range(max_len + 1):
        log_probs = F.log_softmax(net.logits(mem, pad, seqs)[:, -1].float(), -1)
        if step == max_len:
            forced = torch.full_like(log_probs, float("-inf"))
            forced[:, t.eos] = log_probs[:, t.eos]
            log_probs = forced
        # finished beams extend only with pad at no cost
        ended = torch.full_like(log_probs, float("-inf"))
        ended[:, t.pad] = 0.0
        log_probs = torch.where(done[:, None], ended, log_probs)
        total = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        scores, flat = total.topk(k, -1)
        origin = flat // vocab + torch.arange(batch, device=memory.device)[:, None] * k
        token = flat % vocab
        seqs = torch.cat([seqs[origin.view(-1)], token.view(-1, 1)], 1)
        done = done[origin.view(-1)] | (token.view(-1) == t.eos)
        if bool(done.all()):
            break
    # topk keeps beams sorted by score: the first num_captions of each row
    keep = (torch.arange(batch, device=memory.device)[:, None] * k
            + torch.arange(num_captions, device=memory.device)[None]).view(-1)
    return seqs[keep]


def sequence_scores(net: CaptionerNet, memory, memory_pad, seqs):
    """Mean token log-prob (end token included) of each sequence [B,L] given its regions."""
    with torch.no_grad():
        log_probs, keep = net.token_log_probs(memory, memory_pad, seqs)
        return (log_probs.sum(1) / keep.sum(1).clamp(min=1)).float()


def decode(net: CaptionerNet, features, boxes, mask, *, decoding: str = "nucleus", top_p: float = 0.8,
           beam_size: int = 3, num_captions: int = 1, uniforms=None, max_len: Optional[int] = None):
    """Captions of a batch of images: ``(sequences [B*num_captions, L], scores [B*num_captions])``,
    the captions of image b at rows ``b*num_captions .. b*num_captions + num_captions - 1``.

    ``uniforms`` (nucleus): [B*num_captions, max_len+1] draws in [0, 1)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    memory, pad = net.encode(features, boxes, mask)
    if decoding == "beam":
        seqs = beam_search(net, memory, pad, beam_size=beam_size, num_captions=num_captions, max_len=max_len)
        memory, pad = _expand(memory, num_captions), _expand(pad, num_captions)
    else:
        if decoding == "greedy" and num_captions != 1:
            raise ValueError("greedy decoding gives one caption per image (use nucleus or beam for more)")
        memory, pad = _expand(memory, num_captions), _expand(pad, num_captions)
        if decoding == "greedy":
            seqs = greedy(net, memory, pad, max_len=max_len)
        else:
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
            if uniforms is None:
                uniforms = torch.rand(memory.shape[0], (max_len or net.config.max_caption_len) + 1)
            seqs = sample(net, memory, pad, uniforms, top_p=top_p, max_len=max_len)
    return seqs, sequence_scores(net, memory, pad, seqs)


def texts(tokenizer, seqs) -> list[str]:
    """Captions of decoded sequences (WordPiece pieces joined, specials dropped)."""
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in seqs.tolist()]


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
