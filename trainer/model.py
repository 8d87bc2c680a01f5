"""Single-stream V&L encoder (VL-BERT / VisualBERT / ImageBERT / LAMP) on transformers' BertModel.

Input sequence: ``[CLS] text [SEP]`` followed by the regions (optionally led by a
whole-image token), padded text and padded regions each masked out::

    text token  = word + segment A + position              (+ visual(whole image) with visual_clue)
    label token = word + segment A + spatial(its region)   (LAMP; label_spatial: no text position)
    region      = LN(Linear(features)) + LN(Linear(geometry)) + segment B + position

Word, position and segment embeddings and the final embedding LayerNorm are BertModel's
own (so any BERT checkpoint directory initializes the text side); the visual projections
are new. We pass ``inputs_embeds`` with explicit ``position_ids`` / ``token_type_ids`` to
``BertModel.forward`` so its embedding layer adds position and segment and applies its
LayerNorm. Region positions: ``"shared"`` (VL-BERT: every region gets the position right
after ``[SEP]``) or ``"index"`` (region j gets ``text_len + j``; needed by tasks that
restore region order, e.g. IFRS).

VL-BERT options: ``visual_clue`` adds the visual feature embedding of the whole image (the
record's ``image_feature``, with the whole-image box) to every text token, as VL-BERT
attaches a visual feature to every input element; ``geometry: sinusoidal`` embeds the box
coordinates with sines and cosines of several wavelengths before the linear layer, as
VL-BERT (after Relation Networks) does; ``mask_embedding`` replaces the feature embedding of
every masked region by one learned [MASK] vector. Without a stored ``image_feature`` the
whole image is the mean of the regions that are not masked (a mean over masked ones would
hand their content back to the model).

``normalize_features`` standardizes every feature dimension with the mean and standard
deviation of the training feature store (:func:`vlp.trainer.data.feature_statistics`,
kept as buffers, so checkpoints carry them). Detector features are non-negative (ReLU
outputs) and share a large common component; a projection can then map every region to
nearly the same embedding, and a small model trained from scratch does exactly that: it
learns the language prior first and closes the visual path (measured on the synthetic
world: region embeddings' mean pairwise cosine 0.80 -> 0.99, VQA stuck at the text-only
level; with standardized features it reads the regions, see the README).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class VisualConfig:
    feature_dim: int = 2048
    box_dims: int = 5
    region_positions: str = "shared"  # or "index"
    image_token: bool = False  # prepend a whole-image token to the regions
    label_spatial: bool = True  # LAMP: label tokens get their region's spatial embedding
    visual_segment: int = 1  # token type id of region tokens
    visual_clue: bool = False  # VL-BERT: every text token also gets the whole image's visual embedding
    geometry: str = "linear"  # or "sinusoidal" (VL-BERT)
    mask_embedding: bool = False  # VL-BERT: a learned [MASK] feature embedding for masked regions
    normalize_features: bool = False  # standardize features per dimension with the store's mean / std

    def __post_init__(self):
        if self.region_positions not in ("shared", "index"):
            raise ValueError(f"region_positions must be shared or index, got {self.region_positions!r}")
        if self.box_dims not in (4, 5, 7):
            raise ValueError(f"box_dims must be 4, 5 or 7, got {self.box_dims}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be linear or sinusoidal, got {self.geometry!r}")


GEOMETRIES = ("linear", "sinusoidal")


class SinusoidalBoxes(nn.Module):
    """Each box coordinate (in [0, 1]) as sin/cos at ``frequencies`` wavelengths from 1 to
    1000 (relative to the image), concatenated: [.., dims] -> [.., dims * 2 * frequencies]."""

    def __init__(self, frequencies: int = 16):
        super().__init__()
        wavelengths = 1000.0 ** (torch.arange(frequencies, dtype=torch.float32) / frequencies)
        self.register_buffer("scale", 100.0 / wavelengths, persistent=False)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        angles = boxes.unsqueeze(-1) * self.scale.to(boxes.dtype)
        return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def geometry_projection(visual: "VisualConfig", hidden: int, eps: float) -> nn.Module:
    """LN(Linear(boxes)), or LN(Linear(sinusoids(boxes))) with ``geometry: sinusoidal``."""
    if visual.geometry == "sinusoidal":
        sinusoids = SinusoidalBoxes()
        width = visual.box_dims * 2 * len(sinusoids.scale)
        return nn.Sequential(sinusoids, nn.Linear(width, hidden), nn.LayerNorm(hidden, eps=eps))
    return nn.Sequential(nn.Linear(visual.box_dims, hidden), nn.LayerNorm(hidden, eps=eps))


@dataclasses.dataclass
class EncoderOutput:
    text: torch.Tensor  # [B, T, H]
    regions: torch.Tensor  # [B, N, H] (the image token, when used, is not included)
    pooled: torch.Tensor  # [B, H] BERT pooler on [CLS]
    image: Optional[torch.Tensor] = None  # [B, H] the whole-image token, when used
    sequence: Optional[torch.Tensor] = None  # [B, L, H]


def tiny_bert_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 2, **kwargs):
    """A small BertConfig (tests, smoke runs)."""
    from transformers import BertConfig

    defaults = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=hidden * 4,
                    max_position_embeddings=256, type_vocab_size=2)
    defaults.update(kwargs)
    return BertConfig(**defaults)


def visible_region_mean(region_features, region_mask, region_masked=None) -> torch.Tensor:
    """[B, D] mean of each row's real regions that are not masked: the whole-image feature
    when the store has none (a mean over masked regions would hand their content back)."""
    visible = region_mask.bool() if region_masked is None else region_mask.bool() & ~region_masked.bool()
    weights = visible.unsqueeze(-1).to(region_features.dtype)
    return (region_features * weights).sum(1) / weights.sum(1).clamp(min=1)


def whole_image_box(batch: int, box_dims: int, device, dtype) -> torch.Tensor:
    """The geometry of a box covering the image: (0, 0, 1, 1[, area 1[, w 1, h 1]])."""
    whole = torch.zeros(batch, box_dims, device=device, dtype=dtype)
    whole[:, 2:] = 1.0
    return whole


class BertStyleInit:
    """``_init_weights``: BERT's initialisation (normal(0, initializer_range) weights, zero
    biases, unit LayerNorms) for layers an encoder adds; task heads use it too."""

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class SingleStreamEncoder(BertStyleInit, nn.Module):
    def __init__(self, bert_config, visual: Optional[VisualConfig] = None, *, bert=None):
        super().__init__()
        from transformers import BertModel

        self.visual = visual or VisualConfig()
        if bert_config.type_vocab_size < 2:
            raise ValueError("the visual segment needs type_vocab_size >= 2 (got "
                             f"{bert_config.type_vocab_size}); pass a config with 2 token types")
        self.config = bert_config
        self.bert = bert if bert is not None else BertModel(bert_config, add_pooling_layer=True)
        hidden = bert_config.hidden_size
        eps = bert_config.layer_norm_eps
        # no bias: a masked (zeroed) region then enters the LayerNorm as exact zeros and
        # comes out as its learned shift, a [MASK] region embedding. With a bias, the
        # LayerNorm of a near-constant vector (eps 1e-12) sends gradients of ~1e5 into it,
        # and gradient clipping then freezes the rest of the model on those steps.
        self.feature_proj = nn.Sequential(nn.Linear(self.visual.feature_dim, hidden, bias=False),
                                          nn.LayerNorm(hidden, eps=eps))
        self.box_proj = geometry_projection(self.visual, hidden, eps)
        for module in (self.feature_proj, self.box_proj):
            module.apply(self._init_weights)
        if self.visual.mask_embedding:
            self.region_mask_embedding = nn.Parameter(torch.zeros(hidden).normal_(0.0, bert_config.initializer_range))
        if self.visual.normalize_features:
            self.register_buffer("feature_mean", torch.zeros(self.visual.feature_dim))
            self.register_buffer("feature_std", torch.ones(self.visual.feature_dim))

    def set_feature_statistics(self, mean, std) -> None:
        """Per-dimension mean and standard deviation of the features (``normalize_features``)."""
        if not self.visual.normalize_features:
            raise ValueError("the encoder was built without visual.normalize_features")
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @classmethod
    def from_pretrained_text(cls, path, visual: Optional[VisualConfig] = None, **config_overrides):
        """Text side (embeddings, encoder, pooler) from a BERT checkpoint directory; visual side new.

        A checkpoint with one token type (e.g. RoBERTa-style) gets a second, new segment
        embedding initialised from the first.
        """
        from transformers import BertConfig, BertModel

        path = Path(path)
        config = BertConfig.from_pretrained(path, **config_overrides)
        bert = BertModel.from_pretrained(path, config=config, add_pooling_layer=True)
        if config.type_vocab_size < 2:
            old = bert.embeddings.token_type_embeddings
            new = nn.Embedding(2, config.hidden_size)
            new.weight.data[:] = old.weight.data[0]
            bert.embeddings.token_type_embeddings = new
            bert.embeddings.register_buffer(
                "token_type_ids", torch.zeros_like(bert.embeddings.position_ids), persistent=False)
            config.type_vocab_size = 2
        return cls(config, visual, bert=bert)

    # -- forward -------------------------------------------------------------------
    def region_embeddings(self, features: torch.Tensor, boxes: torch.Tensor,
                          replaced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``replaced`` [B, N] bool: regions whose features masking replaced by zeros; with
        ``mask_embedding`` they get the learned [MASK] embedding instead."""
        if self.visual.normalize_features:
            features = (features - self.feature_mean.to(features.dtype)) / self.feature_std.to(features.dtype)
        appearance = self.feature_proj(features)
        if replaced is not None and self.visual.mask_embedding:
            appearance = torch.where(replaced.unsqueeze(-1), self.region_mask_embedding.to(appearance.dtype),
                                     appearance)
        return appearance + self.box_proj(boxes)

    def _whole_image(self, region_features, region_mask, region_masked, image_feature):
        """The whole image's visual embedding [B, H]: the stored image feature, else the
        mean of the regions that are not masked."""
        batch = region_features.shape[0]
        if image_feature is None:
            image_feature = visible_region_mean(region_features, region_mask, region_masked)
        whole = whole_image_box(batch, self.visual.box_dims, region_features.device, region_features.dtype)
        return self.region_embeddings(image_feature, whole)

    def forward(self, input_ids, text_mask, region_features, region_boxes, region_mask,
                token_regions=None, image_feature=None, region_masked=None, region_mask_how=None,
                **_) -> EncoderOutput:
        batch, text_len = input_ids.shape
        device = input_ids.device
        region_mask = region_mask.bool()
        text = self.word_embeddings(input_ids)
        text_pos = torch.arange(text_len, device=device).expand(batch, -1)
        if self.visual.label_spatial and token_regions is not None and (token_regions >= 0).any():
            # LAMP: a label token's position is its region's spatial (geometry) embedding:
            # add that and take away the text position the BERT embedding layer will add.
            labels = (token_regions >= 0).unsqueeze(-1).to(text.dtype)
            gather = token_regions.clamp(min=0).unsqueeze(-1).expand(-1, -1, region_boxes.shape[-1])
            spatial = self.box_proj(torch.gather(region_boxes, 1, gather))
            position = self.bert.embeddings.position_embeddings(text_pos)
            text = text + (spatial - position) * labels
        whole = None
        if self.visual.image_token or self.visual.visual_clue:
            whole = self._whole_image(region_features, region_mask, region_masked, image_feature)
        if self.visual.visual_clue:
            text = text + whole.unsqueeze(1)
        replaced = None
        if region_masked is not None and region_mask_how is not None:
            replaced = region_masked.bool() & (region_mask_how == 0)
        regions = self.region_embeddings(region_features, region_boxes, replaced)
        if self.visual.image_token:
            regions = torch.cat([whole.unsqueeze(1), regions], 1)
            region_mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), region_mask], 1)
        visual_len = regions.shape[1]
        text_lengths = text_mask.long().sum(1, keepdim=True)  # [B,1]
        if self.visual.region_positions == "shared":
            region_pos = text_lengths.expand(-1, visual_len)
        else:
            region_pos = text_lengths + torch.arange(visual_len, device=device)
        position_ids = torch.cat([text_pos, region_pos], 1)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"sequence needs position {int(position_ids.max())}, the model has "
                             f"{self.config.max_position_embeddings} positions; use fewer regions/tokens")
        token_type_ids = torch.cat([torch.zeros_like(input_ids),
                                    torch.full((batch, visual_len), self.visual.visual_segment,
                                               dtype=torch.long, device=device)], 1)
        embeds = torch.cat([text, regions], 1)
        mask = torch.cat([text_mask.bool(), region_mask], 1).long()
        out = self.bert(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                        token_type_ids=token_type_ids)
        sequence = out.last_hidden_state
        vis = sequence[:, text_len:]
        image = None
        if self.visual.image_token:
            image, vis = vis[:, 0], vis[:, 1:]
        return EncoderOutput(text=sequence[:, :text_len], regions=vis, pooled=out.pooler_output,
                             image=image, sequence=sequence)
