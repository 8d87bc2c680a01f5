"""Zero-shot image-text retrieval from a ``vlp-train pretrain`` run's ITM head
(``vlp-train evaluate RUN --zero-shot``): the same N x M scoring and metrics as a finetuned
retrieval run (:mod:`vlp.trainer.retrieval`), with the ITM head's log-odds of "matched" as the
score. Lives apart from :mod:`~vlp.trainer.retrieval` because it reads run folders through
:mod:`~vlp.trainer.finetune`, which looks the retrieval task up (no import cycle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from vlp.trainer.retrieval import evaluate_retrieval, itm_score



def load_pretrain_itm(run_dir, *, device: str = "cpu"):
    """``(config, model)``: a ``vlp-train pretrain`` run folder's encoder and ITM (or ITM_HS)
    head from its last stage's last checkpoint, as a PretrainModel with one ITM head."""
    from vlp.trainer.config import CONFIG_FILE, load_config
    from vlp.trainer.finetune import init_checkpoint
    from vlp.trainer.schedule import build_encoder, build_tokenizer
    from vlp.trainer.tasks import ITM, PretrainModel, TaskContext

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{run_dir}: no {CONFIG_FILE}; not a vlp-train pretrain run folder")
    config = load_config(run_dir / CONFIG_FILE)
    path = init_checkpoint(run_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    head = next((name for name in ("ITM", "ITM_HS") if f"heads.{name}.weight" in state), None)
    if head is None:
        raise ValueError(f"{path}: no ITM or ITM_HS head: zero-shot retrieval needs a stage with ITM")
    tokenizer = build_tokenizer(config)
    model = PretrainModel(build_encoder(config, tokenizer), [ITM()], TaskContext.from_tokenizer(tokenizer))
    model.load_state_dict({**{k: v for k, v in state.items() if k.startswith("encoder.")},
                           **{f"heads.ITM.{k.split('.', 2)[2]}": v for k, v in state.items()
                              if k.startswith(f"heads.{head}.")}})
    model.tokenizer = tokenizer
    return config, model.to(device)


def zero_shot_evaluate(run_dir, pairs_dir, features_dir, *, split=("test",), device: str = "cpu",
                       batch_size: int = 64, max_images: Optional[int] = None, shortlist: Optional[int] = None,
                       num_workers: int = 1, progress: str = "off") -> dict:
    """Zero-shot retrieval metrics of a pretraining run's ITM head (:func:`itm_score`) on the
    ``split`` caption pairs of ``pairs_dir``: the same scoring and metrics as a finetuned run."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import PairDataset

    config, model = load_pretrain_itm(run_dir, device=device)
    pairs = PairStore(pairs_dir)
    if pairs.kind != "caption":
        raise ValueError(f"{pairs_dir}: holds {pairs.kind} pairs; retrieval needs caption pairs")
    split = [split] if isinstance(split, str) else (list(split) if split else None)
    dataset = PairDataset(pairs, FeatureStore(features_dir), model.tokenizer, max_text_len=config.data.max_text_len,
                          max_regions=config.data.max_regions, box_dims=config.model.visual_config().box_dims,
                          split=split)
    metrics, _, _ = evaluate_retrieval(model, dataset, batch_size=batch_size, max_images=max_images,
                                       shortlist=shortlist, num_workers=num_workers, progress=progress,
                                       score=itm_score)
    return metrics
