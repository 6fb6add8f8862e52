"""The method registry: every method and upstream submodule, declared once in debias_core/data/methods.json.

Everything that lists methods derives from here: eval.methods (adapters, paper defaults), the report's labels,
the GPU benchmark (bench.latency, bench.carry, scripts/bench.sh), scripts/test.sh (which tests run in which
environment), the repository-layout test (pins and URLs) and debias_core's method names (its pad threshold and
trend family; debias_core reads the same file). How to add a method: docs/adding_a_method.md.

Methods of your own (a plugin) live outside the repository: a JSON file ``{"methods": {"<key>": {...}}}`` beside
its adapter module, named in ``EVAL_METHODS`` (several: separated by ``os.pathsep``). A plugin's ``adapter`` may
be ``file.py:Class`` relative to its JSON file. Plugins add keys; they never replace a built-in one.

Shell scripts query it (exit 2 with ``error: ...`` on a bad name):

    python -m eval.registry methods [--driver eval.run] [--supports bench]   # keys, one per line
    python -m eval.registry tests                                            # "<Upstream> <test prefix>" lines
    python -m eval.registry show KEY                                         # the entry, as JSON
    python -m eval.registry get KEY FIELD                                    # one field (JSON for lists/dicts)
    python -m eval.registry explicit-args KEY                                # "--method-arg k=v" the run scripts pass

Imports nothing beyond the standard library (shell scripts run it with any Python).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

from .common import EvalError

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_FILE = ROOT / "debias_core" / "data" / "methods.json"
PLUGIN_ENV = "EVAL_METHODS"
DRIVER = "eval.run"
PREPROCESS = ("pad", "crop")
MODULES = ("loader", "vqa", "science", "mmbench")

# fields of a method entry; the optional ones with their defaults (applied when the registry is read)
REQUIRED = ("display", "upstream", "env", "adapter", "trend_method", "args", "budget_keys", "preprocess")
OPTIONAL = {"driver": DRIVER, "sys_path": [""], "aliases": [], "reference": False, "supports": {"bench": False},
            "explicit_args": [], "official_padding_rule": "box"}
UPSTREAM_FIELDS = ("url", "pin", "transformers", "tests")


class RegistryError(EvalError):
    """A registry entry or a plugin file is malformed, or a key is unknown (one line: what and how to fix)."""


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RegistryError(f"{PLUGIN_ENV} names {path}, which does not exist") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path} is not valid JSON ({e})") from None


def _complete(key: str, entry: dict, source: Path, upstreams: dict) -> dict:
    """The entry with its optional fields filled in; raises RegistryError naming the first problem."""
    driver = entry.get("driver", DRIVER)
    needed = REQUIRED if driver == DRIVER else ("display", "upstream", "env", "trend_method")
    missing = [f for f in needed if f not in entry]
    if missing:
        raise RegistryError(f"method {key!r} in {source} lacks {', '.join(missing)} (docs/adding_a_method.md lists "
                            f"every field)")
    unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise RegistryError(f"method {key!r} in {source} has unknown field(s) {', '.join(unknown)}; the fields are "
                            f"{', '.join((*REQUIRED, *OPTIONAL))}")
    if entry["upstream"] not in upstreams:
        raise RegistryError(f"method {key!r} in {source} names upstream {entry['upstream']!r}, which is not a "
                            f"submodule here; use one of {', '.join(upstreams)}")
    if driver == DRIVER:
        bad = {m: p for m, p in entry["preprocess"].items() if m not in MODULES or p not in PREPROCESS}
        if bad or set(entry["preprocess"]) != set(MODULES):
            raise RegistryError(f"method {key!r} in {source}: preprocess must map each of {', '.join(MODULES)} to "
                                f"one of {', '.join(PREPROCESS)} (got {entry['preprocess']})")
        for field in ("budget_keys", "explicit_args"):
            absent = [b for b in entry.get(field, []) if b not in entry["args"]]
            if absent:
                raise RegistryError(f"method {key!r} in {source}: {field} {', '.join(absent)} are not among its "
                                    f"args {', '.join(entry['args']) or '(none)'}")
    out = {**{k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
              for k, v in OPTIONAL.items()}, **entry}
    adapter = out.get("adapter")
    if adapter and ".py:" in adapter and not Path(adapter.partition(":")[0]).is_absolute():
        out["adapter"] = str(Path(source).resolve().parent / adapter)  # plugin file next to its JSON
    out["key"] = key
    return out


@lru_cache(maxsize=None)
def _load(plugins: str) -> tuple[dict, dict]:
    data = _read(REGISTRY_FILE)
    upstreams = {name: dict(u) for name, u in data["upstreams"].items()}
    for name, u in upstreams.items():
        missing = [f for f in UPSTREAM_FIELDS if f not in u]
        if missing:
            raise RegistryError(f"upstream {name!r} in {REGISTRY_FILE} lacks {', '.join(missing)}")
    methods = {k: _complete(k, e, REGISTRY_FILE, upstreams) for k, e in data["methods"].items()}
    for path in filter(None, plugins.split(os.pathsep)):
        plugin = _read(Path(path))
        if set(plugin) - {"methods", "_doc"} or not isinstance(plugin.get("methods"), dict):
            raise RegistryError(f"{path} must hold {{\"methods\": {{\"<key>\": {{...}}}}}} (a plugin adds methods, "
                                f"not upstreams: a new submodule is a built-in entry)")
        for key, entry in plugin["methods"].items():
            if key in methods:
                raise RegistryError(f"{path} declares method {key!r}, which is already registered "
                                    f"({methods[key].get('adapter') or methods[key]['driver']}); pick another key")
            methods[key] = _complete(key, entry, Path(path), upstreams)
    names = [n for m in methods.values() for n in (m["key"], *m["aliases"])]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise RegistryError(f"method name(s) {', '.join(clash)} are declared twice (as keys or aliases)")
    return methods, upstreams


def _registry(plugins: bool = True) -> tuple[dict, dict]:
    return _load(os.environ.get(PLUGIN_ENV, "") if plugins else "")


def methods(*, driver: str | None = DRIVER, supports: str | None = None, plugins: bool = True) -> dict:
    """key -> entry, in declaration order (built-ins, then plugins). ``driver``: only methods that module runs
    (None: all); ``supports``: only those whose ``supports`` says so (e.g. "bench"); ``plugins``: False leaves
    out the EVAL_METHODS files."""
    return {k: m for k, m in _registry(plugins)[0].items()
            if (driver is None or m["driver"] == driver) and (supports is None or m["supports"].get(supports))}


def method(key: str, *, driver: str | None = DRIVER) -> dict:
    """The entry of ``key`` (a method ``driver`` runs; None: any driver); RegistryError listing the known keys
    otherwise."""
    every = _registry()[0]
    if driver is not None and key in every and every[key]["driver"] != driver:
        raise RegistryError(f"method {key!r} runs with python -m {every[key]['driver']}, not python -m {driver}")
    if key not in every:
        raise RegistryError(f"method {key!r} is unknown; use one of {', '.join(methods(driver=driver))} (registry: "
                            f"{REGISTRY_FILE.relative_to(ROOT)}; your own: docs/adding_a_method.md)")
    return every[key]


def driven_by(module: str) -> dict:
    """The entry of the one method ``module`` runs instead of eval.run (its registry ``driver``), e.g. the video
    method of eval.video_qa; RegistryError unless exactly one built-in method names it."""
    found = list(methods(driver=module, plugins=False).values())
    if len(found) != 1:
        raise RegistryError(f"the registry must declare exactly one method with driver {module!r} (found "
                            f"{', '.join(m['key'] for m in found) or 'none'}); see {REGISTRY_FILE.relative_to(ROOT)}")
    return found[0]


def upstreams() -> dict:
    """Submodule name -> {url, pin, branch?, transformers, tests, bench_tree?}."""
    return _registry()[1]


def reference_method() -> str:
    """The unpruned model every speedup is measured against (the entry with ``reference: true``)."""
    refs = [k for k, m in methods().items() if m["reference"]]
    if len(refs) != 1:
        raise RegistryError(f"the registry must mark exactly one method reference: true (found {refs})")
    return refs[0]


def display_name(key: str) -> str:
    """The label of a method in tables and figures (its key when it is not registered here)."""
    entry = _registry()[0].get(key)
    return entry["display"] if entry else key


def adapter_class(key: str):
    """Import the adapter class of ``key``: ``module:Class`` or, for plugins, ``/path/file.py:Class``."""
    target = method(key)["adapter"]
    module, _, cls = target.partition(":")
    if module.endswith(".py"):
        name = f"eval_plugin_{key}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, module)
            if spec is None or not Path(module).is_file():
                raise RegistryError(f"method {key!r}: adapter file {module} does not exist")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        mod = sys.modules[name]
    else:
        mod = importlib.import_module(module)
    if not hasattr(mod, cls):
        raise RegistryError(f"method {key!r}: {module} has no class {cls!r} (registry adapter field {target!r})")
    return getattr(mod, cls)


def paper_trend_name(key: str, benchmark_preset: str | None) -> str | None:
    """The paper preset a method uses on a benchmark: ``paper:<family>/<benchmark>``, ``paper:<family>`` for a
    family with one trend for every benchmark (FastV's), None when the method ranks nothing (no family) or the
    paper has no trend for that benchmark."""
    family = method(key)["trend_method"]
    if family is None:
        return None
    from debias_core.presets import single_trend_families  # the paper's data, read by debias_core

    if family in single_trend_families():
        return f"paper:{family}"
    return None if benchmark_preset is None else f"paper:{family}/{benchmark_preset}"


# ------------------------------------------------------------------------------------------------ CLI
def _cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.registry", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("methods", help="method keys, one per line")
    m.add_argument("--driver", default=DRIVER, help=f"only methods this module runs (default {DRIVER}; 'any': all)")
    m.add_argument("--supports", default=None, help="only methods that support this (e.g. bench)")
    sub.add_parser("tests", help="'<Upstream> <prefix>' per upstream with baseline tests "
                                 "(tests/baselines/test_<prefix>*.py, run in .venv-<Upstream>)")
    s = sub.add_parser("show", help="a method's entry as JSON")
    s.add_argument("key")
    g = sub.add_parser("get", help="one field of a method's entry (strings plain, others JSON)")
    g.add_argument("key")
    g.add_argument("field")
    x = sub.add_parser("explicit-args", help="'--method-arg k=v' for each arg the run scripts always pass")
    x.add_argument("key")
    a = p.parse_args(argv)
    try:
        if a.cmd == "methods":
            print("\n".join(methods(driver=None if a.driver == "any" else a.driver, supports=a.supports)))
        elif a.cmd == "tests":
            print("\n".join(f"{n} {u['tests']}" for n, u in upstreams().items() if u["tests"]))
        elif a.cmd == "explicit-args":
            entry = method(a.key)
            print(" ".join(f"--method-arg {k}={json.dumps(entry['args'][k])}" for k in entry["explicit_args"]))
        else:
            entry = _registry()[0].get(a.key) or method(a.key)
            if a.cmd == "show":
                print(json.dumps(entry, indent=1))
            elif a.field not in entry:
                raise RegistryError(f"method {a.key!r} has no field {a.field!r}; its fields are {', '.join(entry)}")
            else:
                value = entry[a.field]
                print(value if isinstance(value, str) else json.dumps(value))
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
