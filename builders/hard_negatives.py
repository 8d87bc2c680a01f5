"""``hard_negatives`` pairs (ITM with hard negatives): per image, its most similar other images.

Similarity = cosine of mean-pooled region features (fp32 means of the stored fp16
features). Search is exact and blocked: a block of query rows times all images with a
torch matmul (CPU or GPU), the image itself and excluded images set to -inf, ``topk``.

``precision="fp32"`` computes every score in fp32. ``precision="bf16"`` (fast on CPUs
with AVX512-BF16/AMX) finds ``candidates`` per row with a bf16 matmul, rescores them in
fp32, and *certifies* each row with a rigorous error bound: for unit vectors a, b with
bf16 roundings ã, b̃ and residual norms r_a = |a - ã|, r_b = |b - b̃|,
|a·b - ã·b̃| <= r_b + r_a (1 + r_b); fp32 accumulation adds at most D 2^-24 (1+r_a)(1+r_b)
and rounding the product to bf16 2^-8 |score|. Every image outside the candidates then
scores at most (weakest candidate's bf16 score + that bound, with r_b the largest
residual); when this is below the M-th rescored score the fp32 top-M is provably among
the candidates. Rows that fail are recomputed fully in fp32, so both precisions give the
same result; stats say how many rows needed the fallback (many on random data, whose
similarities are all alike; few on real features).

Memory: N x D x 4 bytes for the normalized means (8 GB for 1M x 2048), plus half that
for bf16.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from vlp.builders.common import Build, BuildResult, SplitOf
from vlp.schemas import FeatureStore
from vlp.schemas.errors import StoreError
from vlp.schemas.pairs import PAIR_SHARD_SIZE


def mean_features(features_dir, progress=None) -> tuple[list[str], np.ndarray]:
    """(image_ids, [N, D] float32 means of each record's region features)."""
    store = FeatureStore(features_dir)
    ids, rows = [], np.zeros((len(store), store.feature_dim), np.float32)
    for k, record in enumerate(store):
        if k >= len(rows):
            raise StoreError(f"{features_dir}: holds more records than its manifest's num_records")
        ids.append(record.image_id)
        if record.num_boxes:
            rows[k] = record.features.astype(np.float32).mean(axis=0)
        if progress is not None:
            progress()
    store.close()
    return ids, rows[: len(ids)]


def caption_exclusions(pairs_dir, image_ids: list[str]) -> dict[int, np.ndarray]:
    """Row -> rows of other images that share an identical caption text with it
    (texts compared after collapsing whitespace and lower-casing)."""
    from vlp.schemas.pairs import PairStore

    index = {image_id: k for k, image_id in enumerate(image_ids)}
    by_text: dict[str, set] = defaultdict(set)
    store = PairStore(pairs_dir)
    for image_id, text in zip(store.column("image_id"), store.column("text")):
        row = index.get(image_id)
        key = " ".join(text.lower().split())
        if row is not None and key:
            by_text[key].add(row)
    excluded: dict[int, set] = defaultdict(set)
    for rows in by_text.values():
        if len(rows) > 1:
            for row in rows:
                excluded[row] |= rows
    return {row: np.array(sorted(others - {row}), np.int64) for row, others in excluded.items() if others - {row}}


def bf16_outside_bound(weakest, r_query, r_max: float, dim: int):
    """Upper bound of the fp32 score of any image outside the candidates (see module doc)."""
    u = 2.0 ** -8
    acc = dim * 2.0 ** -24 * (1 + r_query) * (1 + r_max)
    return weakest + u * 1.01 * (weakest.abs() + r_query + r_max + acc) + r_max + r_query * (1 + r_max) + acc


def fast_bf16(device: str) -> bool:
    """Whether bf16 matrix products are native here (the certified bf16 path then pays off:
    ~4x the fp32 rate on AVX-512-BF16 / AMX CPUs; Ampere or newer GPUs)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def top_similar(vectors: np.ndarray, top_m: int, *, block: int = 1024, device: str = "auto",
                precision: str = "fp32", candidates: Optional[int] = None,
                exclude: Optional[dict] = None, progress=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """For every row, the ``top_m`` most cosine-similar other rows: (indices [N, M] int64,
    scores [N, M] float32, info). Rows with fewer than M candidates are padded with -1 / nan."""
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "bf16" if fast_bf16(device) else "fp32"
    n = len(vectors)
    m = min(top_m, max(n - 1, 0))
    x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device)
    norms = x.norm(dim=1, keepdim=True)
    x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    xb = x.to(torch.bfloat16) if precision == "bf16" else None
    k_cand = min(n - 1, candidates or max(6 * m, 64)) if precision == "bf16" else m
    if xb is not None:
        residual = (x - xb.float()).norm(dim=1)
        r_max = float(residual.max()) if n else 0.0
    out_idx = np.full((n, top_m), -1, np.int64)
    out_score = np.full((n, top_m), np.nan, np.float32)
    info = {"rows_recomputed_fp32": 0, "device": device, "precision": precision}
    exclude = exclude or {}
    ninf = float("-inf")
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = torch.arange(start, stop, device=device)
        masks = [(r - start, exclude[r]) for r in range(start, stop) if r in exclude]

        def masked(scores):
            scores[torch.arange(stop - start, device=device), rows] = ninf
            for local, others in masks:
                scores[local, torch.from_numpy(others).to(device)] = ninf
            return scores

        if m == 0:
            continue
        if precision == "fp32":
            scores = masked(x[start:stop] @ x.T)
            values, indices = torch.topk(scores, m, dim=1)
        else:
            approx = masked((xb[start:stop] @ xb.T).float())
            approx_values, cand = torch.topk(approx, k_cand, dim=1)
            exact = torch.cat([torch.einsum("bd,bkd->bk", x[s:min(s + 128, stop)],
                                            x[cand[s - start:min(s + 128, stop) - start]])
                               for s in range(start, stop, 128)])
            exact = torch.where(torch.isinf(approx_values), torch.full_like(exact, ninf), exact)
            values, order = torch.topk(exact, m, dim=1)
            indices = torch.gather(cand, 1, order)
            if k_cand < n - 1:
                weakest = approx_values[:, -1]
                bound = bf16_outside_bound(weakest, residual[start:stop], r_max, x.shape[1])
                ok = (bound < values[:, -1]) | torch.isinf(weakest)
                bad = torch.nonzero(~ok).flatten()
                if len(bad):
                    info["rows_recomputed_fp32"] += int(len(bad))
                    full = x[start:stop][bad] @ x.T
                    full[torch.arange(len(bad), device=device), rows[bad]] = ninf
                    for local, others in masks:
                        hit = torch.nonzero(bad == local).flatten()
                        if len(hit):
                            full[hit[0], torch.from_numpy(others).to(device)] = ninf
                    v2, i2 = torch.topk(full, m, dim=1)
                    values[bad], indices[bad] = v2, i2
        values, indices = values.cpu().numpy(), indices.cpu().numpy()
        valid = np.isfinite(values)
        out_idx[start:stop, :m] = np.where(valid, indices, -1)
        out_score[start:stop, :m] = np.where(valid, values, np.nan)
        if progress is not None:
            progress(stop - start)
    return out_idx, out_score, info


def build_hard_negatives(features_dir, out, *, top_m: int = 10, captions=None, block: int = 1024,
                         device: str = "auto", precision: str = "auto", overwrite: bool = False,
                         shard_size: int = PAIR_SHARD_SIZE, split: str = "", splits_from=None,
                         progress: str = "auto") -> BuildResult:
    """One ``hard_negatives`` pair per image of the feature store (text empty).

    Progress shows the two passes one after the other, each over the store's images:
    reading the mean features, then the similarity search. ``split`` / ``splits_from``:
    each pair's split, as :func:`vlp.builders.labels.build_objects_labels`.
    """
    if top_m < 1:
        raise ValueError("top_m must be at least 1")
    split_of = SplitOf(splits_from, split)
    sources = [features_dir] + ([captions] if captions else [])
    store_len = len(FeatureStore(features_dir, warn=False))
    with Build(out, "hard_negatives", overwrite=overwrite, sources=sources, shard_size=shard_size,
               total=store_len, desc="hard-negatives: read", unit="img", progress=progress) as build:
        ids, vectors = mean_features(features_dir, progress=build.progress.update)
        exclude = caption_exclusions(captions, ids) if captions else {}
        build.new_progress(len(ids), "hard-negatives: search", "img")
        indices, scores, info = top_similar(vectors, top_m, block=block, device=device, precision=precision,
                                            exclude=exclude, progress=build.progress.update)
        build.stats.update({"images": len(ids), "top_m": top_m, "images_with_caption_exclusions": len(exclude),
                            "zero_feature_images": int(np.sum(~np.any(vectors, axis=1))), **info})
        short = 0
        for k, image_id in enumerate(ids):
            keep = indices[k] >= 0
            short += int(not keep.all())
            build.add({"pair_id": f"{image_id}#hard_negatives", "image_id": image_id, "text": "", "source": "features",
                       "split": split_of(image_id), "negatives": [ids[j] for j in indices[k][keep]],
                       "negative_scores": [float(s) for s in scores[k][keep]]})
        build.stats["images_with_fewer_negatives"] = short
        build.stats.update(split_of.stats())
    return build.result
