"""Two-stream encoder (ViLBERT-style): a text stream, a visual stream and co-attention blocks.

The architecture is configuration, as VOLTA expresses it (``model.architecture:
two_stream`` with a ``model.two_stream`` section, :class:`TwoStreamConfig`):

* text stream: BERT's embeddings and ``t_layers`` BERT layers (a BERT checkpoint directory,
  ``text_checkpoint``, initializes all of them; default ``t_layers``: the checkpoint's);
* visual stream: regions ``LN(Linear(features)) + LN(Linear(geometry))`` in its own width
  ``v_hidden``, then ``v_layers`` transformer layers (``v_heads``, ``v_intermediate``);
  optionally led by a whole-image token (``visual.image_token``: ViLBERT's ``IMG``, the
  given ``image_feature`` or the mean of the real regions that are not masked, box = the
  whole image). The single-stream VL-BERT options (``visual_clue``, ``mask_embedding``,
  ``geometry: sinusoidal``) are refused: ViLBERT has none of them;
* co-attention blocks, one per entry of ``t_biattention_id`` / ``v_biattention_id``
  (ViLBERT's names and meaning): block k runs once the text stream has run its layers
  ``0 .. t_biattention_id[k]-1`` and the visual stream its layers ``0 ..
  v_biattention_id[k]-1``. A block is ViLBERT's Co-TRM: cross-attention both ways at the
  same time (text queries over regions, region queries over text, in width ``co_hidden``
  with ``co_heads`` heads; residual + LayerNorm in each stream), then each stream's FFN.
  The streams' own layers that follow are the TRM (self-attention + FFN) after it.

ViLBERT base: 12 text layers, 6 visual layers (1024 wide, 8 heads, FFN 1024), co-attention
1024 wide with 8 heads, ``t_biattention_id = [6..11]``, ``v_biattention_id = [0..5]``: six
text layers, then six times [co-attention, one text layer, one visual layer]. Without a
layout the default is that pattern for any sizes: the co-attention blocks sit before the
last ``v_layers`` text layers and before each visual layer.

Outputs (the interface of :class:`~vlp.trainer.model.SingleStreamEncoder`, so every
pretraining and finetuning task runs on it): ``text`` [B, T, H] and ``regions`` [B, N, H]
with H the text width (``hidden_size``); when ``v_hidden`` differs, the visual stream's
outputs pass a linear map to H (task heads are built for ``hidden_size``; ViLBERT's
region head reads the 1024-wide outputs through its own transform instead). ``pooled``
is ViLBERT's ``mul`` fusion: ``ReLU(Linear(text [CLS])) * ReLU(Linear(v))``, v the image
token's output (or, without one, the mean of the real regions' outputs), in width H
rather than ViLBERT's 1024 (``fusion: sum`` adds them). Padded text tokens and padded
regions are masked in every attention, so they cannot change the real outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.trainer.model import BertStyleInit, EncoderOutput, VisualConfig, visible_region_mean, whole_image_box

FUSIONS = ("mul", "sum")
# added to attention scores of padded keys: exp(-10000) is 0 in float32, and the value
# stays finite in bf16 (a row of padding only then averages instead of giving NaN)
_MASKED = -10000.0


def _whole(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    return value


@dataclasses.dataclass
class TwoStreamConfig:
    """``model.two_stream``: the visual stream, the co-attention blocks and their layout.
    Defaults are ViLBERT base's (``t_layers``: the text BERT's own layer count)."""

    t_layers: Optional[int] = None
    v_layers: int = 6
    v_hidden: int = 1024
    v_heads: int = 8
    v_intermediate: int = 1024
    co_hidden: int = 1024
    co_heads: int = 8
    t_biattention_id: Optional[list] = None
    v_biattention_id: Optional[list] = None
    fusion: str = "mul"

    def __post_init__(self):
        if self.t_layers is not None:
            _whole("t_layers", self.t_layers, 1)
        _whole("v_layers", self.v_layers, 0)
        for name in ("v_hidden", "v_heads", "v_intermediate", "co_hidden", "co_heads"):
            _whole(name, getattr(self, name), 1)
        for width, heads in (("v_hidden", "v_heads"), ("co_hidden", "co_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} ({getattr(self, width)}) must be a multiple of {heads} "
                                 f"({getattr(self, heads)})")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be mul or sum, got {self.fusion!r}")
        given = [self.t_biattention_id is None, self.v_biattention_id is None]
        if any(given) and not all(given):
            raise ValueError("give both t_biattention_id and v_biattention_id (or neither: ViLBERT's pattern)")
        for name in ("t_biattention_id", "v_biattention_id"):
            ids = getattr(self, name)
            if ids is None:
                continue
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"{name} must be a non-empty list of layer indices, got {ids!r}")
            for i in ids:
                _whole(f"{name} entries", i, 0)
            if list(ids) != sorted(ids):
                raise ValueError(f"{name} must not decrease, got {list(ids)}")
            setattr(self, name, list(ids))
        if self.v_biattention_id is not None:
            if len(self.t_biattention_id) != len(self.v_biattention_id):
                raise ValueError(f"t_biattention_id and v_biattention_id must be as long (one entry per "
                                 f"co-attention block), got {len(self.t_biattention_id)} and "
                                 f"{len(self.v_biattention_id)}")
            if max(self.v_biattention_id) > self.v_layers:
                raise ValueError(f"v_biattention_id {self.v_biattention_id} names visual layers past "
                                 f"v_layers ({self.v_layers})")
            if self.t_layers is not None and max(self.t_biattention_id) > self.t_layers:
                raise ValueError(f"t_biattention_id {self.t_biattention_id} names text layers past "
                                 f"t_layers ({self.t_layers})")

    @classmethod
    def from_dict(cls, options) -> "TwoStreamConfig":
        options = dict(options or {})
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s): {', '.join(map(str, unknown))} "
                             f"(known: {', '.join(f.name for f in dataclasses.fields(cls))})")
        return cls(**options)

    def layout(self, t_layers: int) -> tuple[list, list]:
        """``(t_biattention_id, v_biattention_id)`` for a text stream of ``t_layers`` layers."""
        if self.t_biattention_id is not None:
            if max(self.t_biattention_id) > t_layers:
                raise ValueError(f"t_biattention_id {self.t_biattention_id} names text layers past the text "
                                 f"stream's {t_layers}")
            return list(self.t_biattention_id), list(self.v_biattention_id)
        blocks = max(self.v_layers, 1)
        if blocks > t_layers:
            raise ValueError(f"the default layout puts a co-attention block before each of the last v_layers "
                             f"({self.v_layers}) text layers, but the text stream has {t_layers}: give "
                             "t_biattention_id and v_biattention_id")
        return list(range(t_layers - blocks, t_layers)), list(range(blocks))


class CrossAttention(nn.Module):
    """One direction of a co-attention block: queries of one stream over the keys and values
    of the other, in the co-attention width; then back to the stream's width, residual and
    LayerNorm (ViLBERT's BertBiAttention + BertBiOutput, one side)."""

    def __init__(self, query_size: int, key_size: int, width: int, heads: int, *, dropout: float,
                 attention_dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(query_size, width)
        self.key = nn.Linear(key_size, width)
        self.value = nn.Linear(key_size, width)
        self.out = nn.Linear(width, query_size)
        self.norm = nn.LayerNorm(query_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(other)), self._split(self.value(other))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=other_mask.to(q.dtype),
                                                 dropout_p=self.attention_dropout if self.training else 0.0)
        context = context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.norm(x + self.dropout(self.out(context)))


class CoAttentionBlock(nn.Module):
    """ViLBERT's Co-TRM: cross-attention both ways (each stream attends to the other's input
    states), then each stream's FFN."""

    def __init__(self, text_config, visual_config, width: int, heads: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        common = dict(width=width, heads=heads, dropout=text_config.hidden_dropout_prob,
                      attention_dropout=text_config.attention_probs_dropout_prob, eps=text_config.layer_norm_eps)
        self.text_cross = CrossAttention(text_config.hidden_size, visual_config.hidden_size, **common)
        self.visual_cross = CrossAttention(visual_config.hidden_size, text_config.hidden_size, **common)
        self.text_intermediate, self.text_output = BertIntermediate(text_config), BertOutput(text_config)
        self.visual_intermediate, self.visual_output = BertIntermediate(visual_config), BertOutput(visual_config)

    def forward(self, text, regions, text_mask, region_mask):
        text_attended = self.text_cross(text, regions, region_mask)
        regions_attended = self.visual_cross(regions, text, text_mask)
        return (self.text_output(self.text_intermediate(text_attended), text_attended),
                self.visual_output(self.visual_intermediate(regions_attended), regions_attended))


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] (True = real) -> [B, 1, 1, L] scores to add (0 real, large negative padded)."""
    return ((~mask.bool()).to(torch.float32) * _MASKED)[:, None, None, :]


def _run(layer, hidden, mask):
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


#: VisualConfig options of the single-stream (VL-BERT) encoder that this one does not have,
#: with the value that means "off" (read with getattr: older VisualConfigs lack them)
_SINGLE_STREAM_ONLY = {"visual_clue": False, "mask_embedding": False, "geometry": "linear",
                       "normalize_features": False}


def check_visual(visual: VisualConfig) -> None:
    """ValueError for visual options the two-stream encoder has no use for."""
    if visual.region_positions != "shared":
        raise ValueError("the two-stream encoder's regions have no positions (box geometry only); "
                         "set visual.region_positions: shared")
    for name, off in _SINGLE_STREAM_ONLY.items():
        if getattr(visual, name, off) != off:
            raise ValueError(f"visual.{name} is a single-stream (VL-BERT) option; the two-stream encoder "
                             f"(ViLBERT) has none: leave it {str(off).lower()}")


class TwoStreamEncoder(BertStyleInit, nn.Module):
    def __init__(self, bert_config, visual: Optional[VisualConfig] = None,
                 options: Optional[TwoStreamConfig] = None, *, bert=None):
        super().__init__()
        from transformers import BertConfig, BertModel
        from transformers.models.bert.modeling_bert import BertLayer

        self.visual = visual or VisualConfig()
        check_visual(self.visual)
        self.options = options or TwoStreamConfig()
        self.config = bert_config
        self.bert = bert if bert is not None else BertModel(bert_config, add_pooling_layer=False)
        self.bert.pooler = None  # the two-stream pooler below replaces BERT's
        self.t_biattention_id, self.v_biattention_id = self.options.layout(bert_config.num_hidden_layers)
        opts, hidden, eps = self.options, bert_config.hidden_size, bert_config.layer_norm_eps
        self.visual_config = BertConfig(
            hidden_size=opts.v_hidden, num_hidden_layers=opts.v_layers, num_attention_heads=opts.v_heads,
            intermediate_size=opts.v_intermediate, hidden_act=bert_config.hidden_act,
            hidden_dropout_prob=bert_config.hidden_dropout_prob,
            attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
            layer_norm_eps=eps, initializer_range=bert_config.initializer_range)
        self.visual_config._attn_implementation = self.bert.config._attn_implementation
        # bias-free feature projection, as in the single-stream encoder (a zeroed, masked
        # region reaches the LayerNorm as exact zeros). Named apart from the single-stream
        # feature_proj / box_proj: those map into the text width, which code may rely on
        # (retrieval's --shortlist without labels; the NLVR2 triplet hook)
        self.visual_feature_proj = nn.Sequential(nn.Linear(self.visual.feature_dim, opts.v_hidden, bias=False),
                                                 nn.LayerNorm(opts.v_hidden, eps=eps))
        self.visual_box_proj = nn.Sequential(nn.Linear(self.visual.box_dims, opts.v_hidden),
                                             nn.LayerNorm(opts.v_hidden, eps=eps))
        self.visual_dropout = nn.Dropout(bert_config.hidden_dropout_prob)
        self.visual_layers = nn.ModuleList(BertLayer(self.visual_config, layer_idx=i) for i in range(opts.v_layers))
        self.co_layers = nn.ModuleList(CoAttentionBlock(bert_config, self.visual_config, opts.co_hidden,
                                                        opts.co_heads) for _ in self.t_biattention_id)
        # LAMP label tokens: their region's geometry, in the text stream's width
        self.label_box_proj = (nn.Sequential(nn.Linear(self.visual.box_dims, hidden), nn.LayerNorm(hidden, eps=eps))
                               if self.visual.label_spatial else None)
        self.region_out = nn.Linear(opts.v_hidden, hidden) if opts.v_hidden != hidden else nn.Identity()
        self.text_pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.visual_pooler = nn.Sequential(nn.Linear(opts.v_hidden, hidden), nn.ReLU())
        for name, module in self.named_children():
            if name != "bert":
                module.apply(self._init_weights)

    # -- building ------------------------------------------------------------------
    @classmethod
    def build(cls, model_cfg: dict, visual: VisualConfig, tokenizer) -> "TwoStreamEncoder":
        """From a schedule's ``model`` section: ``two_stream`` options, the text stream from
        ``text_checkpoint`` (its first ``t_layers`` layers) or a new small BERT (``bert``)."""
        from transformers import BertConfig, BertModel

        from vlp.trainer.model import tiny_bert_config

        options = TwoStreamConfig.from_dict(model_cfg.get("two_stream"))
        overrides = dict(model_cfg.get("bert") or {})
        checkpoint = model_cfg.get("text_checkpoint")
        if options.t_layers is not None:
            overrides.pop("layers", None)
            overrides["num_hidden_layers"] = options.t_layers
        config = (BertConfig.from_pretrained(Path(checkpoint), **overrides) if checkpoint
                  else tiny_bert_config(len(tokenizer), **overrides))
        try:  # before loading weights: a layout that does not fit the text stream
            options.layout(config.num_hidden_layers)
        except ValueError as error:
            raise ValueError(f"model.two_stream: {error}") from None
        if checkpoint:
            # with its pooler, so loading reports no unused weights; the two-stream pooler replaces it
            bert = BertModel.from_pretrained(Path(checkpoint), config=config, add_pooling_layer=True)
            return cls(config, visual, options, bert=bert)
        return cls(config, visual, options)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def text_layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    # -- forward -------------------------------------------------------------------
    def region_embeddings(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.visual_feature_proj(features) + self.visual_box_proj(boxes)

    def forward(self, input_ids, text_mask, region_features, region_boxes, region_mask,
                token_regions=None, image_feature=None, region_masked=None, **_) -> EncoderOutput:
        batch, text_len = input_ids.shape
        device = input_ids.device
        if text_len > self.config.max_position_embeddings:
            raise ValueError(f"the text has {text_len} tokens, the model {self.config.max_position_embeddings} "
                             "positions; use a shorter max_text_len")
        embeds = self.word_embeddings(input_ids)
        if self.label_box_proj is not None and token_regions is not None and (token_regions >= 0).any():
            gather = token_regions.clamp(min=0).unsqueeze(-1).expand(-1, -1, region_boxes.shape[-1])
            spatial = self.label_box_proj(torch.gather(region_boxes, 1, gather))
            embeds = embeds + spatial * (token_regions >= 0).unsqueeze(-1).to(embeds.dtype)
        text = self.bert.embeddings(inputs_embeds=embeds, token_type_ids=torch.zeros_like(input_ids),
                                    position_ids=torch.arange(text_len, device=device).expand(batch, -1))
        regions = self.region_embeddings(region_features, region_boxes)
        region_mask = region_mask.bool()
        if self.visual.image_token:
            if image_feature is None:  # ViLBERT's IMG: the mean region
                image_feature = visible_region_mean(region_features, region_mask, region_masked)
            whole = whole_image_box(batch, self.visual.box_dims, device, region_boxes.dtype)
            regions = torch.cat([self.region_embeddings(image_feature.to(region_features.dtype), whole)
                                 .unsqueeze(1), regions], 1)
            region_mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), region_mask], 1)
        regions = self.visual_dropout(regions)
        t_mask, v_mask = _additive_mask(text_mask), _additive_mask(region_mask)
        t_done = v_done = 0
        for block, t_id, v_id in zip(self.co_layers, self.t_biattention_id, self.v_biattention_id):
            while t_done < t_id:
                text, t_done = _run(self.text_layers[t_done], text, t_mask), t_done + 1
            while v_done < v_id:
                regions, v_done = _run(self.visual_layers[v_done], regions, v_mask), v_done + 1
            text, regions = block(text, regions, t_mask, v_mask)
        for layer in self.text_layers[t_done:]:
            text = _run(layer, text, t_mask)
        for layer in self.visual_layers[v_done:]:
            regions = _run(layer, regions, v_mask)
        if self.visual.image_token:
            summary, image_out, regions = regions[:, 0], self.region_out(regions[:, 0]), regions[:, 1:]
        else:
            weights = region_mask.unsqueeze(-1).to(regions.dtype)
            summary, image_out = (regions * weights).sum(1) / weights.sum(1).clamp(min=1), None
        pooled_text, pooled_visual = self.text_pooler(text[:, 0]), self.visual_pooler(summary)
        pooled = pooled_text * pooled_visual if self.options.fusion == "mul" else pooled_text + pooled_visual
        return EncoderOutput(text=text, regions=self.region_out(regions), pooled=pooled, image=image_out)
