"""Probe for tests/baselines/test_parity_fastv.py: fastv_probe.py's tiny Llama through either FastV tree.

    python parity_fastv_probe.py DIR SPECS [--official-weight-file F]

DIR holds the weights ``fastv_probe.py init llama DIR`` saved; SPECS is fastv_probe's JSON {name: spec}. With
``--official-weight-file`` (PYTHONPATH: the pin with the official patch's modelling hunk) the model gets what
the official FastV eval scripts set: ``define_attention_map("after", F)`` and ``_cached_image_size`` (per spec);
debias_core is then left off. Prints one JSON line {name: fastv_probe's result ("kept": per forward)}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import fastv_probe as probe  # this folder: first on sys.path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=Path)
    p.add_argument("specs")
    p.add_argument("--official-weight-file", default=None)
    args = p.parse_args()
    model, processor = probe.load("llama", args.dir)
    model.eval()
    out = {}
    for name, spec in json.loads(args.specs).items():
        if args.official_weight_file:
            model.model.define_attention_map("after", args.official_weight_file)
            model.model._cached_image_size = tuple(spec["image"])
        out[name] = probe.run_one("llama", model, processor, spec)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
