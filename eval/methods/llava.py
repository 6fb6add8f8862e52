"""Plain LLaVA-1.5, unpruned: the reference every pruning method is compared with.

Runs from third_party/LLaVA (populated, at its pin) or from the installed llava-torch 1.2.2.post1 (same
LLaVA-1.5 inference path on transformers 4.37.2). ``--method-arg source=auto|third_party|installed``; auto prefers
third_party/LLaVA. There is no ranking site, so the debias mode cannot change its answers.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util

from ..common import EvalError, populate_hint, populated
from .base import Adapter

SOURCES = ("auto", "third_party", "installed")


class LlavaAdapter(Adapter):
    name = "llava"
    needs_upstream = False

    def _source(self) -> str:
        src = self.args.get("source", "auto")  # a method built on plain LLaVA may declare no source
        if src not in SOURCES:
            raise EvalError(f"llava source {src!r} is unknown; use one of {', '.join(SOURCES)}")
        if src == "auto":
            return "third_party" if populated(self.upstream) else "installed"
        return src

    def check_environment(self) -> None:
        src = self._source()
        if src == "third_party" and not populated(self.upstream):
            raise EvalError(f"{self.upstream_dir()} is not populated; run {populate_hint(self.upstream)} "
                            f"or use --method-arg source=installed (llava-torch)")
        if src == "installed" and importlib.util.find_spec("llava") is None:
            raise EvalError("no llava package is installed and third_party/LLaVA is not populated; "
                            "pip install --no-deps llava-torch==1.2.2.post1, or run " + populate_hint(self.upstream))

    def _use_upstream_tree(self) -> bool:
        return self._source() == "third_party"

    def upstream_state(self) -> str:
        if self._source() == "third_party":
            return super().upstream_state()
        try:
            version = md.version("llava-torch")
        except md.PackageNotFoundError:
            version = "unknown version"
        where = self.llava.package_dir if self.llava else "not imported yet"
        return f"installed llava-torch {version} ({where})"
