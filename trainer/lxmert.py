"""LXMERT-S: a cross-modal encoder on transformers' LxmertModel with no single-modality layers.

``l_layers = r_layers = 0``: text embeddings and projected regions meet directly in
``x_layers`` cross-modality layers (each: cross-attention both ways, then self-attention
and FFN per stream). Same interface as :class:`~vlp.trainer.model.SingleStreamEncoder`
(``forward(**batch) -> EncoderOutput``), so every task works with it (IFRS moves features
between boxes, which the box embedding reveals without region positions).

Regions: LxmertModel's visual encoder, ``(LN(Linear(features)) + LN(Linear(geometry))) / 2``,
geometry of ``box_dims`` (4, 5 or 7). With ``label_spatial``, label tokens (LAMP) get the
box branch of their region added to their word embedding.

``text_checkpoint``: a BERT directory initializes the word/position/segment embeddings
and their LayerNorm (and the pooler); the cross layers are new (their structure has no
BERT counterpart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vlp.trainer.model import BertStyleInit, EncoderOutput, VisualConfig


class CrossModalEncoder(BertStyleInit, nn.Module):
    def __init__(self, lxmert_config, visual: VisualConfig):
        super().__init__()
        from transformers import LxmertModel

        if visual.image_token:
            raise ValueError("LXMERT-S has no whole-image token; set visual.image_token: false")
        if visual.region_positions != "shared":
            raise ValueError("LXMERT-S regions have no positions; set visual.region_positions: shared")
        if visual.visual_clue or visual.mask_embedding or visual.geometry != "linear" or visual.normalize_features:
            raise ValueError("visual_clue, mask_embedding, geometry: sinusoidal and normalize_features are "
                             "single-stream options; LXMERT-S takes none of them")
        if lxmert_config.l_layers or lxmert_config.r_layers:
            raise ValueError("LXMERT-S means l_layers = r_layers = 0")
        self.visual = visual
        self.config = lxmert_config
        self.lxmert = LxmertModel(lxmert_config)
        # a bias-free feature projection, as in the single-stream encoder: zeroed (masked)
        # regions then reach the LayerNorm as exact zeros instead of a near-constant vector
        visn = self.lxmert.encoder.visn_fc
        visn.visn_fc = nn.Linear(lxmert_config.visual_feat_dim, lxmert_config.hidden_size, bias=False)
        self._init_weights(visn.visn_fc)

    @staticmethod
    def make_config(vocab_size: int, visual: VisualConfig, *, hidden: int = 768, heads: int = 12,
                    x_layers: int = 5, intermediate: Optional[int] = None, **kwargs):
        from transformers import LxmertConfig

        return LxmertConfig(vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=heads,
                            intermediate_size=intermediate or 4 * hidden, l_layers=0, x_layers=x_layers,
                            r_layers=0, visual_feat_dim=visual.feature_dim, visual_pos_dim=visual.box_dims,
                            **kwargs)

    @classmethod
    def build(cls, model_cfg: dict, visual: VisualConfig, tokenizer) -> "CrossModalEncoder":
        """From a schedule's ``model`` section: ``lxmert: {hidden, heads, x_layers, ...}`` and
        optionally ``text_checkpoint``."""
        options = dict(model_cfg.get("lxmert") or {})
        checkpoint = model_cfg.get("text_checkpoint")
        if checkpoint:
            from transformers import BertConfig

            bert = BertConfig.from_pretrained(checkpoint)
            options.setdefault("hidden", bert.hidden_size)
            options.setdefault("heads", bert.num_attention_heads)
            options.setdefault("intermediate", bert.intermediate_size)
            options.setdefault("max_position_embeddings", bert.max_position_embeddings)
            encoder = cls(cls.make_config(bert.vocab_size, visual, **options), visual)
            encoder.load_text_embeddings(checkpoint)
            return encoder
        return cls(cls.make_config(len(tokenizer), visual, **options), visual)

    def load_text_embeddings(self, path) -> list[str]:
        """Copy a BERT checkpoint's embeddings and pooler; returns the names copied."""
        from transformers import BertModel

        bert = BertModel.from_pretrained(Path(path), add_pooling_layer=True)
        source = bert.state_dict()
        own = self.lxmert.state_dict()
        copied = {}
        for key, value in source.items():
            if key.startswith(("embeddings.", "pooler.")) and key in own and key != "embeddings.position_ids":
                if own[key].shape != value.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}")
                copied[key] = value
        self.lxmert.load_state_dict(copied, strict=False)
        return sorted(copied)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.lxmert.embeddings.word_embeddings

    def forward(self, input_ids, text_mask, region_features, region_boxes, region_mask,
                token_regions=None, image_feature=None, **_) -> EncoderOutput:
        embeds = self.word_embeddings(input_ids)
        if self.visual.label_spatial and token_regions is not None and (token_regions >= 0).any():
            visn = self.lxmert.encoder.visn_fc
            gather = token_regions.clamp(min=0).unsqueeze(-1).expand(-1, -1, region_boxes.shape[-1])
            spatial = visn.box_layer_norm(visn.box_fc(torch.gather(region_boxes, 1, gather)))
            # the region's spatial embedding takes the place of the text position the
            # embedding layer adds (LAMP)
            text_pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            position = self.lxmert.embeddings.position_embeddings(text_pos)
            embeds = embeds + (spatial - position) * (token_regions >= 0).unsqueeze(-1).to(embeds.dtype)
        out = self.lxmert(inputs_embeds=embeds, visual_feats=region_features, visual_pos=region_boxes,
                          attention_mask=text_mask.float(), visual_attention_mask=region_mask.float(),
                          token_type_ids=torch.zeros_like(input_ids))
        return EncoderOutput(text=out.language_output, regions=out.vision_output, pooled=out.pooled_output)
