"""Trainer throughput and memory: our single-stream model (MLM + ITM) against
``transformers.VisualBertForPreTraining`` of the same size, and data loading alone.

For each size and precision, each configuration in its own process (so the peak memory
belongs to it: peak RSS increase over the process's RSS before the model was built on
CPU; ``torch.cuda.max_memory_allocated`` on GPU, which includes the up to 8 in-memory
batches held on the device):

* ``ours step``: one full training step on pre-built in-memory batches (the same
  collated batches the trainer's DataLoader gives, already on the device): the trainer's
  masking and negatives (``prepare_batch``, done in the loop, so it is counted here),
  autocast forward, backward, clipping at 1.0, AdamW (``make_optimizer``).
* ``VisualBERT step``: the same for ``VisualBertForPreTraining`` (MLM over text + regions,
  sentence-image matching) on the same batches, masked and negatived beforehand (its MLM
  labels and ``sentence_image_labels`` come from the same ``prepare_batch`` draw), same
  optimizer, clipping and precision.
* ``ours loop``: ``Pretrainer.train`` end to end (store-backed DataLoader, seeding, history
  and TensorBoard writes); time per step between two step callbacks.
* ``data``: the DataLoader the trainer builds (``Pretrainer._loader()``) iterated alone,
  with 0 and N workers, in examples/s; compared with the model's consumption (ours step
  and ours loop samples/s).

One or more untimed warm-up steps first; the median step time over the timed steps gives
samples/s (the mean is printed too). The stores are generated: 36 boxes of 2048-d fp16
features per image (LMDB), captions of 12-20 words from a vocabulary padded to BERT's
30,522 entries, text truncated to 20 tokens. Prints figures and ratios; asserts nothing.

On a shared machine, compare with ``--threads 1`` and use ``--rounds``: with more torch
threads than free cores, every parallel op waits at an OpenMP barrier for a preempted
thread, and steps (and the ``workers 0`` data path) slow down 5-40x, unevenly.

    python benchmarks/bench_train.py                               # CPU, small, fp32 + bf16
    python benchmarks/bench_train.py --size base                   # CPU, BERT-base, bf16, 3 steps
    python benchmarks/bench_train.py --size base --device cuda     # GPU: BERT-base, batch 64, bf16
    python benchmarks/bench_train.py --profile                     # + torch.profiler op tables
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from isolated import run_worker

SIZES = {
    # hidden, layers, heads, intermediate, batch, precisions
    "small": dict(hidden=256, layers=4, heads=4, intermediate=1024, batch=32, precisions="fp32,bf16"),
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch=64, precisions="bf16"),
}
TASKS = ["MLM", "ITM"]


# -- fixtures ------------------------------------------------------------------------

def make_stores(root: Path, *, images: int, captions_per_image: int, vocab_size: int, regions: int,
                feature_dim: int, seed: int = 0) -> dict:
    """Feature store (``regions`` boxes per image), caption pair store and a vocab.txt of
    ``vocab_size`` entries (specials + w0, w1, ...)."""
    from vlp.schemas import FeatureRecord, FeatureStoreWriter
    from vlp.schemas.pairs import PairStoreWriter
    from vlp.trainer.toydata import SPECIAL_TOKENS, write_vocab

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = write_vocab(root / "vocab.txt", words)
    writer = FeatureStoreWriter(root / "features", feature_dim=feature_dim, mode="overwrite")
    for k in range(images):
        width, height = int(rng.integers(400, 800)), int(rng.integers(300, 600))
        x1, y1 = rng.uniform(0, width - 20, regions), rng.uniform(0, height - 20, regions)
        x2, y2 = x1 + rng.uniform(8, width - x1), y1 + rng.uniform(8, height - y1)
        writer.add(FeatureRecord.from_arrays(
            f"img{k:06d}", width, height, boxes=np.stack([x1, y1, x2, y2], 1),
            features=np.abs(rng.standard_normal((regions, feature_dim), dtype=np.float32)),
            objects_id=rng.integers(0, 1600, regions), objects_conf=rng.uniform(0.2, 1, regions),
            attrs_id=rng.integers(0, 400, regions), attrs_conf=rng.uniform(0, 1, regions)))
    writer.close()
    with PairStoreWriter(root / "captions", "caption", mode="overwrite") as pairs:
        for k in range(images):
            for c in range(captions_per_image):
                n = int(rng.integers(12, 21))
                text = " ".join(words[i] for i in rng.integers(0, len(words), n))
                pairs.add({"pair_id": f"cap{k:06d}-{c}", "image_id": f"img{k:06d}", "text": text})
    return {"vocab": str(vocab), "features": str(root / "features"), "pairs": str(root / "captions")}


def open_dataset(spec: dict):
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import PairDataset, load_tokenizer

    tokenizer = load_tokenizer(spec["stores"]["vocab"])
    dataset = PairDataset(PairStore(spec["stores"]["pairs"]), FeatureStore(spec["stores"]["features"]),
                          tokenizer, max_text_len=spec["text_len"], max_regions=spec["regions"])
    return tokenizer, dataset


def in_memory_batches(spec: dict, dataset, pad_id: int, count: int) -> list[dict]:
    """``count`` batches as the trainer's sampler and collate make them (first epoch, seed 0)."""
    from vlp.trainer.data import LengthBucketBatchSampler, collate

    sampler = LengthBucketBatchSampler(dataset.text_lengths(), spec["batch"], seed=0)
    return [collate([dataset[i] for i in indices], pad_id) for indices in sampler.batches(0)[:count]]


# -- models --------------------------------------------------------------------------

def build_ours(spec: dict, tokenizer, size: dict):
    from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config
    from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks

    config = tiny_bert_config(len(tokenizer), hidden=size["hidden"], layers=size["layers"], heads=size["heads"],
                              intermediate_size=size["intermediate"], max_position_embeddings=512)
    encoder = SingleStreamEncoder(config, VisualConfig(feature_dim=spec["feature_dim"], box_dims=5))
    return PretrainModel(encoder, make_tasks(TASKS), TaskContext.from_tokenizer(tokenizer))


def build_visualbert(spec: dict, vocab_size: int, size: dict):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    config = VisualBertConfig(vocab_size=vocab_size, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                              num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
                              visual_embedding_dim=spec["feature_dim"], max_position_embeddings=512)
    return VisualBertForPreTraining(config)


def visualbert_inputs(batch: dict, tokenizer, seed: int) -> dict:
    """VisualBERT's inputs for a collated batch: our masking and ITM negatives (one draw)."""
    import torch

    from vlp.trainer.data import IGNORE
    from vlp.trainer.tasks import TaskContext, make_tasks, prepare_batch

    generator = torch.Generator().manual_seed(seed)
    p = prepare_batch(batch, make_tasks(TASKS), generator, TaskContext.from_tokenizer(tokenizer))
    text_labels = p["mlm_labels"].masked_fill(~p["matched"].unsqueeze(1), IGNORE)  # conditional masking
    b, n = p["region_mask"].shape
    return {
        "input_ids": p["input_ids"], "attention_mask": p["text_mask"].long(),
        "token_type_ids": torch.zeros_like(p["input_ids"]),
        "visual_embeds": p["region_features"], "visual_attention_mask": p["region_mask"].long(),
        "visual_token_type_ids": torch.ones(b, n, dtype=torch.long),
        "labels": torch.cat([text_labels, torch.full((b, n), IGNORE, dtype=torch.long)], 1),
        "sentence_image_labels": (~p["matched"]).long(),  # 0: matching pair, as VisualBERT has it
    }


# -- worker --------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(spec: dict) -> dict:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    tokenizer, dataset = open_dataset(spec)
    size = SIZES[spec["size"]]
    if spec["kind"] == "data":
        return data_worker(spec, tokenizer, dataset, device)
    batches = []
    if spec["kind"] in ("ours", "visualbert"):
        from vlp.trainer.data import stable_seed
        from vlp.trainer.data import to_device

        batches = in_memory_batches(spec, dataset, tokenizer.pad_token_id, spec["distinct_batches"])
        if spec["kind"] == "visualbert":  # masked beforehand, as a VisualBERT collator would
            batches = [visualbert_inputs(b, tokenizer, stable_seed(0, k)) for k, b in enumerate(batches)]
        batches = [to_device(b, device) for b in batches]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = rss_bytes()
    out = {"threads": torch.get_num_threads(), "device": str(device), "load_before": os.getloadavg()}
    if spec["kind"] == "loop":
        out.update(loop_worker(spec, tokenizer, dataset, device, size))
    else:
        out.update(step_worker(spec, tokenizer, batches, device, size))
    out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes() - base_rss
    out["load_after"] = os.getloadavg()
    return out


def step_worker(spec: dict, tokenizer, batches: list[dict], device, size: dict) -> dict:
    import torch

    from vlp.trainer.data import stable_seed
    from vlp.trainer.pretrain import PRECISIONS, StageConfig, make_optimizer
    from vlp.trainer.tasks import prepare_batch

    cuda = device.type == "cuda"
    generator = torch.Generator()
    inputs = batches  # on the device already
    if spec["kind"] == "visualbert":
        model = build_visualbert(spec, len(tokenizer), size).to(device)
        attention = getattr(model.config, "_attn_implementation", "?")
    else:
        model = build_ours(spec, tokenizer, size).to(device)
        attention = getattr(model.encoder.config, "_attn_implementation", "?")
    model.train()
    stage = StageConfig(tasks=TASKS, steps=1, batch_size=spec["batch"], lr=1e-4, precision=spec["precision"])
    optimizer = make_optimizer(model, stage)
    dtype = PRECISIONS[spec["precision"]]
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler("cuda") if spec["precision"] == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step(k: int) -> dict:
        """One optimizer step on batch k; seconds per phase."""
        times = {}
        start = time.perf_counter()
        seed = stable_seed(0, k)
        torch.manual_seed(seed)  # dropout, as the trainer seeds it
        batch = inputs[k % len(inputs)]
        if spec["kind"] == "visualbert":
            with torch.autocast(**autocast):
                loss = model(**batch).loss
        else:
            generator.manual_seed(seed)
            prepared = prepare_batch(batch, model.tasks, generator, model.ctx)
            times["prepare"] = time.perf_counter() - start
            with torch.autocast(**autocast):
                loss, _, _ = model(prepared, generator, prepared=True)
        float(loss.detach())  # the loop reads the loss every step (on GPU: the prepare work lands here)
        sync()
        times["forward"] = time.perf_counter() - start - times.get("prepare", 0.0)
        mark = time.perf_counter()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        sync()
        times["backward"] = time.perf_counter() - mark
        mark = time.perf_counter()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times["optimizer"] = time.perf_counter() - mark
        times["total"] = time.perf_counter() - start
        return times

    for k in range(spec["warmup"]):
        step(k)
    timed = [step(spec["warmup"] + k) for k in range(spec["steps"])]
    profile = None
    if spec["profile"]:
        profile = profile_steps(step, spec, cuda)
    phases = {name: statistics.median(t.get(name, 0.0) for t in timed)
              for name in ("prepare", "forward", "backward", "optimizer")}
    totals = [t["total"] for t in timed]
    text_len = statistics.mean(int(b["input_ids"].shape[1]) for b in inputs)
    return {"median_s": statistics.median(totals), "mean_s": statistics.mean(totals), "steps": len(totals),
            "phases": phases, "params": sum(p.numel() for p in params), "attention": attention,
            "text_len": text_len, "profile": profile}


def profile_steps(step, spec: dict, cuda: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for k in range(spec["profile_steps"]):
            step(10_000 + k)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=spec["profile_rows"], max_name_column_width=36, max_shapes_column_width=64)


def loop_worker(spec: dict, tokenizer, dataset, device, size: dict) -> dict:
    from vlp.trainer.pretrain import Pretrainer, StageConfig

    model = build_ours(spec, tokenizer, size)
    stage = StageConfig(tasks=TASKS, steps=1_000_000, batch_size=spec["batch"], lr=1e-4, log_every=0,
                        num_workers=spec["workers"], precision=spec["precision"])
    marks: list[float] = []
    out_dir = Path(spec["out"]) / f"loop-{spec['size']}-{spec['precision']}"
    trainer = Pretrainer(model, dataset, stage, out_dir, device=str(device))
    marks.append(time.perf_counter())
    history = trainer.train(max_steps=spec["warmup"] + spec["steps"],
                            callback=lambda _trainer, _entry: marks.append(time.perf_counter()))
    trainer.close()
    gaps = np.diff(marks)[spec["warmup"]:]  # step k: from the end of step k-1 to the end of step k
    own = [e["samples_per_s"] for e in history[spec["warmup"]:]]
    return {"median_s": float(np.median(gaps)), "mean_s": float(np.mean(gaps)), "steps": len(gaps),
            "trainer_samples_per_s": statistics.median(own),
            "samples": statistics.median(e["samples"] for e in history[spec["warmup"]:])}


def data_worker(spec: dict, tokenizer, dataset, device) -> dict:
    """The trainer's DataLoader alone (tiny model: only its pad id and the plan are used)."""
    import torch

    from vlp.trainer.pretrain import Pretrainer, StageConfig

    size = dict(hidden=32, layers=1, heads=2, intermediate=64)
    stage = StageConfig(tasks=TASKS, steps=1_000_000, batch_size=spec["batch"], log_every=0,
                        num_workers=spec["workers"])
    trainer = Pretrainer(build_ours(spec, tokenizer, size), dataset, stage,
                         Path(spec["out"]) / f"data-{spec['workers']}", device=str(device))
    batches = trainer._loader()
    load_before = os.getloadavg()
    started = time.perf_counter()
    for _ in range(spec["data_warmup"]):
        next(batches)
    first = time.perf_counter() - started
    count, started, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(spec["data_batches"]):
        count += len(next(batches)["pair_id"])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    del batches
    trainer.close()
    return {"examples": count, "seconds": seconds, "main_cpu_s": cpu, "warmup_s": first,
            "threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg()}


def run_config(spec: dict) -> dict:
    return run_worker(os.path.abspath(__file__), spec, f"{spec['kind']} {spec['size']} {spec.get('precision')}")


# -- driver --------------------------------------------------------------------------

def print_row(precision: str, kind: str, r: dict, batch: int, workers: int, cuda: bool) -> None:
    label = {"ours": "ours step", "visualbert": "VisualBERT step", "loop": f"ours loop (w={workers})"}[kind]
    params = f"{r['params'] / 1e6:7.1f}M" if "params" in r else ""
    ph = r.get("phases")
    breakdown = (f"{ph['prepare']:.3f} / {ph['forward']:.3f} / {ph['backward']:.3f} / {ph['optimizer']:.3f}"
                 if ph else f"trainer's own samples/s {r['trainer_samples_per_s']:.1f}")
    print(f"{precision:9s} {label:16s} {params:>8s} {r['median_s']:10.3f} {r['mean_s']:7.3f} "
          f"{batch / r['median_s']:9.1f} {fmt_mem(r['peak_bytes'], cuda):>14s}  {breakdown:44s}  "
          f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}", flush=True)


def fmt_mem(value: float, cuda: bool) -> str:
    return f"{value / 2 ** 30:6.2f} GiB" + (" gpu" if cuda else " rss")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="small, base or small,base (default: small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp16 (default: small "
                        "fp32,bf16; base bf16)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: small 32, base 64")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: cpu small 20, cpu base 3, cuda 50)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps first (default: cpu 2 / 1 for base, cuda 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (0: torch's choice)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--text-len", type=int, default=20)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--loop-workers", type=int, default=-1,
                        help="DataLoader workers of the ours-loop run (default: cpu 0, cuda min(8, cpus))")
    parser.add_argument("--data-workers", default=None, help="comma list for the data-loading runs "
                        "(default: 0 and min(4, cpus); cuda also min(8, cpus))")
    parser.add_argument("--data-batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, "
                        "alternating, and keep each one's shortest median (for a shared machine)")
    parser.add_argument("--skip", choices=["ours", "visualbert", "loop", "data"], action="append", default=[])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of the step runs")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-rows", type=int, default=18)
    parser.add_argument("--keep", default=None, help="folder for the generated stores (kept; default: temporary)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    sizes = [s.strip() for s in args.size.split(",")]
    for name in sizes:
        if name not in SIZES:
            raise SystemExit(f"unknown size {name!r}; known: {', '.join(SIZES)}")
    cpus = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{args.threads or 'default'} torch threads; load average {os.getloadavg()}")
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        started = time.perf_counter()
        stores = make_stores(tmp / "stores", images=args.images, captions_per_image=args.captions_per_image,
                             vocab_size=args.vocab_size, regions=args.regions, feature_dim=2048)
        print(f"stores: {args.images} images x {args.regions} boxes x 2048 (fp16, lmdb), "
              f"{args.images * args.captions_per_image} captions of 12-20 words, vocab {args.vocab_size} "
              f"({time.perf_counter() - started:.0f} s to write)", flush=True)
        for name in sizes:
            run_size(args, name, stores, tmp, cuda, cpus)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run_size(args, name: str, stores: dict, tmp: Path, cuda: bool, cpus: int) -> None:
    size = SIZES[name]
    batch = args.batch_size or size["batch"]
    precisions = (args.precisions or size["precisions"]).split(",")
    steps = args.steps or (50 if cuda else (3 if name == "base" else 20))
    warmup = args.warmup or (10 if cuda else (1 if name == "base" else 2))
    base = dict(size=name, batch=batch, device=args.device, threads=args.threads, stores=stores,
                text_len=args.text_len, regions=args.regions, feature_dim=2048, steps=steps, warmup=warmup,
                distinct_batches=min(8, steps + warmup), profile=args.profile, profile_steps=args.profile_steps,
                profile_rows=args.profile_rows, out=str(tmp / "runs"),
                workers=args.loop_workers if args.loop_workers >= 0 else (min(8, cpus) if cuda else 0))
    print(f"\n== {name}: hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, "
          f"intermediate {size['intermediate']}, batch {batch}, text <= {args.text_len} tokens + "
          f"{args.regions} regions, tasks {'+'.join(TASKS)}; {warmup} warm-up + {steps} timed steps")
    print(f"{'precision':9s} {'run':16s} {'params':>8s} {'s/step med':>10s} {'mean':>7s} {'samples/s':>9s} "
          f"{'peak mem':>14s}  breakdown (median s: prep / fwd / bwd / opt)  load", flush=True)
    results: dict = {}  # (precision, kind) -> the run with the shortest median step over the rounds
    for round_no in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {round_no + 1} of {args.rounds}")
        for precision in precisions:
            for kind in ("ours", "visualbert", "loop"):
                if kind in args.skip:
                    continue
                r = run_config(dict(base, kind=kind, precision=precision, profile=args.profile and round_no == 0))
                if (precision, kind) not in results or r["median_s"] < results[(precision, kind)]["median_s"]:
                    results[(precision, kind)] = r
                print_row(precision, kind, r, batch, base["workers"], cuda)
                if r.get("profile"):
                    print(f"\n-- profile: {kind}, {precision} ({args.profile_steps} steps)\n{r['profile']}", flush=True)
    if args.rounds > 1:
        print(f"-- best of {args.rounds} rounds (shortest median step)")
        for (precision, kind), r in results.items():
            print_row(precision, kind, r, batch, base["workers"], cuda)
    extra = next((r for r in results.values() if "attention" in r), None)
    if extra is not None:
        notes = {k: (r["attention"], r["text_len"]) for (p, k), r in results.items() if "attention" in r}
        print("attention: " + ", ".join(f"{k} {a}" for k, (a, _) in notes.items())
              + f"; mean padded text length {extra['text_len']:.1f}")
    print()
    for precision in precisions:
        ours, vb, loop = (results.get((precision, k)) for k in ("ours", "visualbert", "loop"))
        if ours and vb:
            print(f"{precision}: ours step / VisualBERT step = {vb['median_s'] / ours['median_s']:.2f}x samples/s"
                  f" (peak memory {ours['peak_bytes'] / vb['peak_bytes']:.2f}x of VisualBERT's)")
        if loop and vb:
            print(f"{precision}: ours loop / VisualBERT step = {vb['median_s'] / loop['median_s']:.2f}x")
        if loop and ours:
            print(f"{precision}: loop overhead over the in-memory step: "
                  f"{100 * (loop['median_s'] / ours['median_s'] - 1):+.1f}% per step")
    if "data" in args.skip:
        return
    workers = ([int(w) for w in args.data_workers.split(",")] if args.data_workers
               else sorted({0, min(4, cpus)} | ({min(8, cpus)} if cuda else set())))
    print(f"\ndata loading alone (the trainer's DataLoader, batch {batch}, {args.data_batches} batches after "
          f"3 warm-up batches):")
    for w in workers:
        r = run_config(dict(base, kind="data", workers=w, data_warmup=3, data_batches=args.data_batches))
        rate = r["examples"] / r["seconds"]
        parts = [f"workers {w}: {rate:9.0f} examples/s ({r['examples']} in {r['seconds']:.2f} s; "
                 f"main process {r['main_cpu_s']:.2f} CPU-s; first 3 batches {r['warmup_s']:.2f} s; "
                 f"load {r['load_before'][0]:.2f}->{r['load_after'][0]:.2f})"]
        for precision in precisions:
            for kind in ("ours", "loop"):
                if (precision, kind) in results:
                    use = batch / results[(precision, kind)]["median_s"]
                    parts.append(f"{rate / use:.0f}x ours {'step' if kind == 'ours' else 'loop'} {precision}")
        print("  " + "; ".join(parts[:1]) + "\n    vs consumption: " + ", ".join(parts[1:]), flush=True)


if __name__ == "__main__":
    main()
