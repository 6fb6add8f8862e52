"""Probe for tests/baselines/test_parity_himap.py: HiMAP's first-stage kept set under the authors' official code.

    python parity_himap_probe.py official ROOT CASES_JSON   # PYTHONPATH: an official tree's src/LLaVA first

Loads a tiny model saved by himap_probe.py ``init`` (ROOT/llava-tiny-<model>), sets what the official eval
script would (``set_attention_score_frequency_file("after", weight_file)`` — called here with the two arguments
it takes; the official eval passes four — and ``_cached_image_size``), runs the prefill and prints, per case,
the image positions (0..575) kept by stage 1. Observed from outside, with himap_probe's hooks.
Case: {"name", "model", "image_size", "weight_file"}. Prints one JSON line last.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import himap_probe as probe  # this folder: first on sys.path
from probe_support import require_tree_module


def official(root: Path, cases: list) -> dict:
    import llava.model.language_model.himap as himap
    require_tree_module(himap, "the official HiMAP tree")
    models, out = {}, {}
    for case in cases:
        if case["model"] not in models:
            models[case["model"]] = probe._load_fp32(root / f"llava-tiny-{case['model']}")
        model, tok, processor = models[case["model"]]
        inner = model.get_model()
        inner.set_attention_score_frequency_file("after", case["weight_file"])
        inner._cached_image_size = tuple(case["image_size"])
        from llava.mm_utils import process_images
        pixels = process_images([probe._image(case["image_size"], 0)], processor, model.config)
        ids, s0 = probe._input_ids(tok, "what is the color of the dog?")
        obs = probe._Observer(model)
        try:
            with torch.inference_mode():
                model.generate(ids, images=pixels.float(), do_sample=False, max_new_tokens=1, min_new_tokens=1,
                               use_cache=False, output_attentions=True)
        finally:
            obs.close()
        stage1 = obs.forwards[0]["stage1"]
        out[case["name"]] = {"stage1": sorted(p - s0 for p in stage1 if s0 <= p < s0 + 576),
                             "rank": model.config.hmap_v_attn_txt_rank}
    return out


def main(argv):
    if argv[0] != "official":
        raise SystemExit(f"unknown command {argv[0]!r}; use official")
    print(json.dumps(official(Path(argv[1]), json.loads(Path(argv[2]).read_text()))))


if __name__ == "__main__":
    main(sys.argv[1:])
