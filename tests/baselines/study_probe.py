"""Probe for the off-vs-upstream comparisons through the eval driver (tests/baselines/upstream_compare.py, used by
test_study_model_off.py and test_sparsevlm_eval.py; run in a subprocess, never imported by pytest):
``python -m eval.run`` with what each ranking selected and every logit observed.

    python study_probe.py OUT_JSON -- DRIVER_ARGS...

Runs ``eval.run.main(DRIVER_ARGS)`` in this interpreter (the baseline's own environment; its exported tree reaches
the adapter through EVAL_THIRD_PARTY, so the adapter loads the model through that tree's
``load_pretrained_model``) and writes OUT_JSON:

    {"exit": driver exit code, "questions": [{"span_start", "image_size",
      "selections": [[indices...], ...],   # every topk / sort / argsort during generate, in call order
      "logits_sha256": sha256 of every lm_head output (fp32 bytes, in order), "logit_shapes": [[B, L, V], ...]}],
     "modules": {"llava": where llava was imported from}}

Observation only, identical for every tree: wrappers around ``torch.topk`` / ``torch.sort`` / ``torch.argsort``
and the Tensor methods of the same names (the kept indices of every ranking: every baseline selects its kept
tokens with one of them; greedy decoding itself uses argmax), a forward hook on the output embeddings installed
when the adapter has loaded the model, and ``debias_core.sample`` (one context per question). Nothing the
baseline computes is changed, and nothing is stood in for: each tree runs on the CPU as it is.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch

SELECTORS = ("topk", "sort", "argsort")


class Observer:
    """Per question (one ``debias_core.sample`` context): the indices every selector returned and the logits."""

    def __init__(self):
        self.questions: list[dict] = []
        self._digest = None

    def begin(self, ctx) -> None:
        self._digest = hashlib.sha256()
        self.questions.append({"span_start": ctx.span_start, "image_size": ctx.image_size, "selections": [],
                               "logit_shapes": []})

    def end(self) -> None:
        self.questions[-1]["logits_sha256"] = self._digest.hexdigest()
        self._digest = None

    @property
    def active(self) -> bool:
        return self._digest is not None

    def selected(self, result) -> None:
        indices = result if isinstance(result, torch.Tensor) else result[1]   # argsort: a tensor; else (values, idx)
        self.questions[-1]["selections"].append(indices.detach().cpu().reshape(-1).tolist())

    def logits(self, output) -> None:
        t = output.detach().float().cpu().contiguous()
        self._digest.update(t.numpy().tobytes())
        self.questions[-1]["logit_shapes"].append(list(t.shape))


def _wrap_selectors(obs: Observer) -> None:
    def wrap(fn):
        def selector(*args, **kwargs):
            out = fn(*args, **kwargs)
            if obs.active:
                obs.selected(out)
            return out
        return selector

    for name in SELECTORS:
        setattr(torch, name, wrap(getattr(torch, name)))
        setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name)))


def _wrap_sample(obs: Observer) -> None:
    import debias_core

    open_sample = debias_core.sample

    @contextlib.contextmanager
    def sample(*args, **kwargs):
        with open_sample(*args, **kwargs) as ctx:
            obs.begin(ctx)
            try:
                yield ctx
            finally:
                obs.end()

    debias_core.sample = sample


def _hook_logits(obs: Observer) -> None:
    """A forward hook on the output embeddings of the model the adapter loads (Adapter.load, which every
    adapter's load reaches through super())."""
    from eval.methods import base

    load = base.Adapter.load

    def observed_load(self, *args, **kwargs):
        loaded = load(self, *args, **kwargs)
        loaded.model.get_output_embeddings().register_forward_hook(lambda m, i, o: obs.active and obs.logits(o))
        return loaded

    base.Adapter.load = observed_load


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        sys.exit("usage: study_probe.py OUT_JSON -- DRIVER_ARGS...")
    out, driver_args = Path(argv[0]), argv[2:]
    torch.manual_seed(0)   # SparseVLMs' cluster_and_merge draws torch.rand noise
    obs = Observer()
    _wrap_selectors(obs)
    _wrap_sample(obs)
    _hook_logits(obs)
    from eval import run

    code = run.main(driver_args)
    llava = sys.modules.get("llava")
    out.write_text(json.dumps({"exit": code, "questions": obs.questions,
                               "modules": {"llava": getattr(llava, "__file__", None)}}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
