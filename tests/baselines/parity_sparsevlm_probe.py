"""Probe for tests/baselines/test_parity_sparsevlm.py: sparsevlm_probe.py's tiny model through either tree.

    python parity_sparsevlm_probe.py official MODEL --sizes JSON --weight-file F   # the pin + the official patch
    python parity_sparsevlm_probe.py ours MODEL --sizes JSON --trend T             # the pin + our series

``official`` does what the official eval scripts do: its patched ``process_images`` returns the image and its
padding mask, ``weights = np.load(F) * mask`` is passed to ``generate(weights=...)`` (used at layer 2 only).
``ours`` runs sparsevlm_probe's ``run`` in DEBIAS=full (DEBIAS_GEOMETRY from the environment). JSON:
{"name": "WxH"}. Prints one JSON line: {"name": {"stages": [per pruning layer: kept original positions, ...]}}.
The CPU stand-ins, model loading and observation are sparsevlm_probe's.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import sparsevlm_probe as probe  # this folder: first on sys.path


def official_run(model_dir: str, image_size: str, weight_file: str) -> dict:
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images

    torch.set_num_threads(1)
    mod, model = probe._load(model_dir, False)
    probe._install_cpu_stand_ins(mod)
    calls = probe._observe(mod)
    w, h = (int(v) for v in image_size.split("x"))
    rng = np.random.default_rng(probe.SEED)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    images, pad_masks = process_images([image], model.get_vision_tower().image_processor, model.config)
    weights = torch.from_numpy(np.load(weight_file)).float() * pad_masks[0]   # the eval scripts' rm_padding path
    g = torch.Generator().manual_seed(probe.SEED)
    ids = torch.cat([torch.tensor([1]), torch.randint(3, probe.VOCAB, (probe.PREFIX - 1,), generator=g),
                     torch.tensor([IMAGE_TOKEN_INDEX]), torch.randint(3, probe.VOCAB, (probe.TEXT,), generator=g)])[None]
    torch.manual_seed(probe.SEED)
    with torch.inference_mode():
        model.generate(ids, images=images, image_sizes=[image.size], weights=weights, retained_tokens=probe.RETAINED,
                       do_sample=False, num_beams=1, max_new_tokens=1, use_cache=True, output_scores=True,
                       return_dict_in_generate=True)
    return {"stages": probe._stages(calls), "pad_mask": pad_masks[0].int().tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["official", "ours"])
    p.add_argument("model")
    p.add_argument("--sizes", required=True)
    p.add_argument("--weight-file", default=None)
    p.add_argument("--trend", default=None)
    args = p.parse_args()
    out = {}
    for name, image in json.loads(args.sizes).items():
        if args.command == "official":
            out[name] = official_run(args.model, image, args.weight_file)
        else:
            r = probe.run(argparse.Namespace(model=args.model, mode="full", trend=args.trend, image=image, flat=False,
                                             new_tokens=1))
            out[name] = {"stages": r["stages"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
