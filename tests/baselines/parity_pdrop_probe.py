"""Probe for tests/baselines/test_parity_pdrop.py: pdrop_probe.py's tiny model and run, through either tree.

    python parity_pdrop_probe.py official --weights W --sizes JSON --weight-file F
        # PYTHONPATH: the pin with the official patch; sets tag "after", the weight file and
        # _cached_image_size as the official eval scripts do (DEBIAS=off: the official code never calls us)
    python parity_pdrop_probe.py ours --weights W --sizes JSON --trend T
        # PYTHONPATH: the pin with our series; DEBIAS=full, DEBIAS_METHOD=pdrop, DEBIAS_GEOMETRY=official

JSON: {"name": [W, H], ...}. Prints one JSON line: {"name": pdrop_probe's result ("kept": per stage, the
original positions kept; "k": the keep counts)}.
"""
from __future__ import annotations

import argparse
import json

import pdrop_probe as probe  # this folder: first on sys.path


def official_builder(build, weight_file: str, size: tuple):
    def official_model():
        """pdrop_probe's model; once its weights are loaded (strictly), the official eval's settings."""
        model = build()
        load = model.load_state_dict

        def load_then_configure(state, strict=True):
            result = load(state, strict=strict)
            model.model.set_attention_score_frequency_file("after", weight_file)
            model.model._cached_image_size = size
            return result
        model.load_state_dict = load_then_configure
        return model
    return official_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["official", "ours"])
    p.add_argument("--weights", required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--weight-file", default=None)
    p.add_argument("--trend", default=None)
    args = p.parse_args()
    build, configure = probe.build_model, probe.configure_debias
    if args.command == "ours":
        probe.configure_debias = lambda mode, trend, **extra: configure(mode, trend, **extra, DEBIAS_GEOMETRY="official")
    out = {}
    for name, size in json.loads(args.sizes).items():
        if args.command == "official":
            probe.build_model = official_builder(build, args.weight_file, tuple(size))
        out[name] = probe.run(argparse.Namespace(
            weights=args.weights, image_size=list(size), flat=False,
            debias="off" if args.command == "official" else "full", trend=args.trend))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
