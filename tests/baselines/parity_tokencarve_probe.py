"""Probe for tests/baselines/test_parity_tokencarve.py: tokencarve_probe.py's tiny model and run, for many sizes.

    python parity_tokencarve_probe.py DIR --tree T --sizes JSON [--official-weight-file F]

DIR holds the weights saved by ``tokencarve_probe.py init``; ``--tree`` is an exported TokenCarve tree. With
``--official-weight-file`` (the tree is the pin with the official patch) the model gets what the official
TokenCarve_model_vqa_loader.py sets: ``define_attention_map("after", F)`` and ``_cached_image_size``; the mode
(DEBIAS=off there, full for ours) comes from the environment. JSON: {"name": [W, H]}. Prints one JSON line:
{"name": tokencarve_probe's result (topk: AV, SV, fused top-k over the image window; keep: kept indices)}.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
from pathlib import Path

import tokencarve_probe as probe  # this folder: first on sys.path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("--tree", type=Path, required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--official-weight-file", default=None)
    args = p.parse_args()
    probe.install_tokencarve = functools.lru_cache(maxsize=None)(probe.install_tokencarve)  # once per process
    configure = probe.set_token_carve
    out = {}
    for name, size in json.loads(args.sizes).items():
        def set_token_carve(model, *a, size=tuple(size)):
            configure(model, *a)
            if args.official_weight_file:
                model.model.define_attention_map("after", args.official_weight_file)
                model.model._cached_image_size = size
        probe.set_token_carve = set_token_carve
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            probe.run(argparse.Namespace(dir=args.dir, tree=args.tree, entry="lm", size=tuple(size), sys_length=35,
                                         nums=64, sv_av_mode=0, sv_av_weight=0.5, ramp=0.0, new_tokens=1, seed=0))
        out[name] = json.loads(printed.getvalue().strip().splitlines()[-1])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
