"""Method adapters: ``get_adapter(name, overrides)``. See base.py for the interface.

Which methods exist, their adapters and their paper defaults come from the method registry (eval.registry over
debias_core/data/methods.json); adding one: docs/adding_a_method.md.
"""
from __future__ import annotations

from .. import registry
from .base import Adapter, Loaded, import_adapter, method_spec, parse_method_args


def method_names() -> list[str]:
    """Keys of the methods ``python -m eval.run`` runs: built-in, then any from EVAL_METHODS. A malformed plugin
    file leaves its methods out here; naming one of them then fails with the plugin's error (get_adapter)."""
    try:
        return list(registry.methods())
    except registry.RegistryError:
        return list(registry.methods(plugins=False))


def adapters() -> dict:
    """method key -> its adapter, ``module:Class`` (imported only when used, so that each baseline's code loads in
    its own environment)."""
    return {key: entry["adapter"] for key, entry in registry.methods().items()}


def get_adapter(name: str, overrides: dict | None = None) -> Adapter:
    method_spec(name)  # unknown names fail here (EvalError), listing the known ones
    return registry.adapter_class(name)(overrides)


def __getattr__(name):
    if name == "ADAPTERS":  # method key -> "module:Class", read when asked for (EVAL_METHODS may change)
        return adapters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTERS", "Adapter", "Loaded", "adapters", "get_adapter", "method_names", "method_spec",
           "parse_method_args"]
