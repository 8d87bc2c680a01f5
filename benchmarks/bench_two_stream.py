"""Two-stream (ViLBERT base, ``singh_vilbert.yaml``'s model) against the single-stream
encoder of the same text size: parameters and one pretraining step (MLM + MOC_KL,
AdamW, clipping at 1.0) on the same in-memory batches.

Text BERT-base (12 layers, 768, vocabulary 30,522), 2048-d features, 36 regions, 20-token
texts, random weights (the speed does not depend on them). Batches are built once with
the trainer's ``prepare_batch`` masking; one untimed warm-up step, then the median of the
timed steps. Prints figures and the ratio; asserts nothing. On a shared machine keep
``--threads 1`` (the default).

    python benchmarks/bench_two_stream.py                    # CPU, batch 8, 3 timed steps
    python benchmarks/bench_two_stream.py --device cuda --batch 64 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_batch(batch: int, regions: int, text_len: int, vocab: int, seed: int) -> dict:
    from vlp.schemas.record import NUM_CLS_PROB

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "text_mask": torch.ones(batch, text_len, dtype=torch.bool),
            "token_regions": torch.full((batch, text_len), -1), "image_id": [f"i{i}" for i in range(batch)],
            "pair_id": [str(i) for i in range(batch)], "text": [""] * batch, "index": torch.arange(batch),
            "region_features": torch.randn(batch, regions, 2048, generator=g).relu(),
            "region_boxes": torch.rand(batch, regions, 5, generator=g),
            "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "objects_id": torch.randint(0, 1600, (batch, regions), generator=g),
            "attrs_id": torch.randint(0, 400, (batch, regions), generator=g),
            "objects_conf": torch.ones(batch, regions), "attrs_conf": torch.ones(batch, regions),
            "cls_prob": torch.softmax(torch.randn(batch, regions, NUM_CLS_PROB, generator=g) * 3, -1)}


class Ctx:
    vocab_size, mask_id, pad_id, special_ids, tokenizer = 30522, 103, 0, (0, 100, 101, 102, 103), None


def build(kind: str):
    from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config
    from vlp.trainer.two_stream import TwoStreamConfig, TwoStreamEncoder

    text = tiny_bert_config(30522, hidden=768, layers=12, heads=12, intermediate_size=3072,
                            max_position_embeddings=512)
    if kind == "two-stream":
        return TwoStreamEncoder(text, VisualConfig(feature_dim=2048, box_dims=5, image_token=True), TwoStreamConfig())
    return SingleStreamEncoder(text, VisualConfig(feature_dim=2048, box_dims=5))


def run(kind: str, args) -> dict:
    from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks, prepare_batch

    torch.manual_seed(0)
    ctx = TaskContext(**{k: getattr(Ctx, k) for k in ("vocab_size", "mask_id", "pad_id", "special_ids")})
    model = PretrainModel(build(kind), make_tasks({"MLM": 1.0, "MOC_KL": 1.0}), ctx).to(args.device)
    params = sum(p.numel() for p in model.encoder.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    batches = []
    for k in range(args.steps + 1):
        b = prepare_batch(make_batch(args.batch, 36, 20, 30522, k), model.tasks, g, ctx)
        batches.append({key: v.to(args.device) if isinstance(v, torch.Tensor) else v for key, v in b.items()})
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    times = []
    for k, batch in enumerate(batches):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
            total, _, _ = model(batch, g, prepared=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"kind": kind, "params_M": params / 1e6, "step_s": step, "samples_s": args.batch / step,
            "mean_step_s": statistics.mean(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, batch {args.batch}, {args.precision}, {args.threads} thread(s), "
          f"{args.steps} timed steps; 36 regions, 20 tokens, MLM + MOC_KL")
    rows = [run(kind, args) for kind in ("single-stream", "two-stream")]
    for r in rows:
        print(f"{r['kind']:>14}: {r['params_M']:7.1f}M encoder parameters, step {r['step_s']:.3f} s "
              f"(mean {r['mean_step_s']:.3f}), {r['samples_s']:.2f} samples/s")
    print(f"two-stream / single-stream: parameters {rows[1]['params_M'] / rows[0]['params_M']:.2f}x, "
          f"step time {rows[1]['step_s'] / rows[0]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
