"""Method adapters: ``get_adapter(name, overrides)``. See base.py for the interface and how to add one.

Paper defaults live in defaults.json; every method listed there has an adapter here (a test checks).
"""
from __future__ import annotations

from .base import Adapter, Loaded, all_specs, import_adapter, method_spec, parse_method_args

# method key -> "module:Class" (imported only when used, so that each baseline's code loads in its own env).
ADAPTERS = {
    "llava": "eval.methods.llava:LlavaAdapter",
    "fastv": "eval.methods.fastv:FastVAdapter",
    "pdrop": "eval.methods.pdrop:PDropAdapter",
    "sparsevlm": "eval.methods.sparsevlm:SparseVLMAdapter",
    "himap": "eval.methods.himap:HiMAPAdapter",
    "tokencarve": "eval.methods.tokencarve:TokenCarveAdapter",
    "illava": "eval.methods.illava:ILLaVAPortAdapter",  # iLLaVA's LLM stage on LLaVA-1.5 (patches/LLaVA)
}


def method_names() -> list[str]:
    return list(all_specs())


def get_adapter(name: str, overrides: dict | None = None) -> Adapter:
    method_spec(name)  # unknown names fail here, listing the known ones
    return import_adapter(ADAPTERS[name])(overrides)


__all__ = ["ADAPTERS", "Adapter", "Loaded", "get_adapter", "method_names", "method_spec", "parse_method_args"]
