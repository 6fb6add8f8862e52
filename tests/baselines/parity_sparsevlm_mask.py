"""Run SparseVLMs' official ``process_images`` (pinned mm_utils.py with the authors' patch applied) and print
its padding masks as one JSON line: {"WxH": [576 ints]}.

usage: python parity_sparsevlm_mask.py TREE SIZES_JSON
TREE holds llava/mm_utils.py and llava/constants.py (an export of the pin with the official patch); only those
two files are imported (a bare ``llava`` package is made around them), so no model code is loaded.
"""
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image


def load_mm_utils(tree: Path):
    package = Path(tempfile.mkdtemp()) / "llava"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("constants.py", "mm_utils.py"):
        (package / name).write_text((tree / "llava" / name).read_text())
    sys.path.insert(0, str(package.parent))
    spec = importlib.util.spec_from_file_location("llava.mm_utils", package / "mm_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ImageProcessorStub:
    """What process_images reads of a CLIP image processor; the pixels are not under test."""
    image_mean = (0.48145466, 0.4578275, 0.40821073)

    def preprocess(self, image, return_tensors):
        return {"pixel_values": [torch.zeros(1)]}


class ConfigStub:
    image_aspect_ratio = "pad"


def main():
    mm_utils = load_mm_utils(Path(sys.argv[1]))
    masks = {}
    for w, h in json.loads(sys.argv[2]):
        _, pad_masks = mm_utils.process_images([Image.new("RGB", (w, h))], ImageProcessorStub(), ConfigStub())
        masks[f"{w}x{h}"] = pad_masks[0].int().tolist()
    print(json.dumps(masks))


if __name__ == "__main__":
    main()
