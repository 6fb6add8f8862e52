"""Which visual tokens a pruning run kept, per question and stage, and how much of the evidence that was.

Input: the run's recording (``python -m eval.run --record``: at every ranking-site call, the raw scores and the
original raster positions of the ranked tokens, with the sample each row belongs to). Per question, the first
row of each stage is the prefill call. The tokens a stage keeps are:
- the positions of the next stage's row, when there is one (the site ranked exactly those survivors: exact);
- for the last stage, the top-k of the debiased scores, recomputed with the run's own mode, trend and sample
  context (``debias_core.debias`` is a pure function of them), k = the method's final budget capped to the real
  tokens (``keep_cap``). For FastV, HiMAP, PyramidDrop and the iLLaVA port this is the set the site kept; for
  TokenCarve (which fuses the attention rank with an SVD score) and SparseVLMs (which recycles pruned tokens)
  it is the set their attention ranking chose, which the study reports as such.

Evidence recall of a question at a stage = |kept ∩ evidence patches| / |evidence patches| (study.data's boxes
mapped through LLaVA-1.5's pad geometry); questions without evidence patches are left out of its mean.
Padding share = the share of the last stage's kept tokens whose patch is more than half padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Kept:
    question_id: str
    stages: list[list[int]]      # kept raster positions per recorded stage


def final_budget(method: str, args: dict) -> int:
    """Visual tokens the method's last ranking stage keeps, from its arguments (before the padding cap): its
    adapter's ``final_kept``."""
    from eval.common import EvalError
    from eval.methods.base import adapter_class

    try:
        return adapter_class(method).final_kept(args)
    except (EvalError, NotImplementedError) as e:
        raise ValueError(f"no final budget rule for method {method!r}: {e}") from None


def kept_sets(recording, *, mode: str, trend, method_key: str, trend_method, final_k: int) -> dict[str, Kept]:
    """{question_id: Kept} for every question of a recording (see the module docstring)."""
    import debias_core
    import torch

    by_question: dict[str, dict[int, tuple]] = {}
    for stage in recording.recorder.stages:
        for (pos, raw), ctx in zip(recording.recorder.rows[stage], recording.contexts(stage)):
            if ctx is None or "question_id" not in ctx:
                continue
            per = by_question.setdefault(str(ctx["question_id"]), {})
            per.setdefault(stage, (pos, raw, ctx))   # the first row of a stage = prefill
    debias_core.configure(mode=mode, trend=trend if mode in ("pos", "full") else None, method=trend_method)
    out = {}
    for qid, per in by_question.items():
        stages = sorted(per)
        kept = []
        for i, st in enumerate(stages):
            pos, raw, ctx = per[st]
            if i + 1 < len(stages):
                nxt = per[stages[i + 1]][0]
                kept.append(sorted(int(p) for p in nxt if 0 <= p))
                continue
            with debias_core.sample(image_size=tuple(ctx["image_size"]), preprocess=ctx["preprocess"],
                                    grid=ctx["grid"], resolution=ctx["resolution"], span_start=ctx["span_start"]):
                scores = debias_core.debias(torch.as_tensor(raw, dtype=torch.float32),
                                            torch.as_tensor(pos, dtype=torch.long))
                k = min(debias_core.keep_cap(final_k), len(pos))
            top = torch.topk(scores, k).indices.numpy()
            kept.append(sorted(int(p) for p in np.asarray(pos)[top] if p >= 0))
        out[qid] = Kept(qid, kept)
    debias_core.reset()
    return out


def evidence_recall(kept: list[int], evidence: list[int]) -> float | None:
    if not evidence:
        return None
    return len(set(kept) & set(evidence)) / len(evidence)


def padding_share(kept: list[int], image_size, *, grid: int = 24, resolution: int = 336,
                  threshold: float = 0.5) -> float | None:
    from debias_core import pad_fractions

    if not kept:
        return None
    frac = np.asarray(pad_fractions(tuple(image_size), grid=grid, resolution=resolution, preprocess="pad"))
    return float(np.mean(frac.reshape(-1)[kept] > threshold))


def per_question(kept: dict[str, Kept], items: dict[str, dict]) -> dict[str, dict]:
    """{question_id: {"recall": [per stage], "padding_share", "kept": [sizes per stage]}} of each question's kept
    sets against its evidence patches (``items``: question_id -> items.jsonl record); questions without an item
    are left out."""
    from .data import evidence_patches

    out = {}
    for qid, k in kept.items():
        item = items.get(qid)
        if item is None:
            continue
        ev = evidence_patches([tuple(b) for b in item["evidence"]], tuple(item["image_size"]))
        out[qid] = {"recall": [evidence_recall(s, ev) for s in k.stages],
                    "padding_share": padding_share(k.stages[-1], item["image_size"]),
                    "kept": [len(s) for s in k.stages]}
    return out
