"""What the two LLaVA 1.1.3 forks (FastV, HiMAP) share: generate without ``image_sizes``, the check that the image
starts where the method's window starts, the method switched off for text-only samples, and a guard against
running a debias mode on an unpatched tree.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from ..common import TREE_ENV, EvalError
from .base import Adapter, Loaded


class Llava113Adapter(Adapter):
    """Shared by the LLaVA 1.1.3 forks (FastV, HiMAP). Subclasses set the class attributes below and
    implement ``_enable(model)`` / ``_set_active(model, on)`` / ``_check_args(n_layers, span)``."""

    passes_image_sizes = False          # LLaVA 1.1.3's generate (transformers 4.31) rejects image_sizes
    sys_length_key: ClassVar[str]       # self.args key: where the method's image window starts
    image_length_key: ClassVar[str]     # self.args key: the window's length (576 for LLaVA-1.5)
    site_module: ClassVar[str]          # module holding the ranking site (patched to call debias_core)
    _patched: bool | None = None

    # ---------------------------------------------------------------- environment
    def upstream_state(self) -> str:
        patched = "patched" if self._site_is_patched() else "NOT patched"
        if not (self.upstream_dir() / ".git").exists():
            return f"{self.upstream_dir()} ({TREE_ENV}: an exported tree, {patched})"
        return f"{super().upstream_state()} ({patched})"

    def _site_is_patched(self) -> bool:
        """Whether the imported ranking site calls debias_core (read once from its source, not per forward)."""
        if self._patched is None:
            import importlib
            self.activate()
            path = Path(importlib.import_module(self.site_module).__file__)
            self._patched = "debias_core.debias(" in path.read_text()
        return self._patched

    # ---------------------------------------------------------------- model
    def configure(self, loaded: Loaded) -> None:
        grid, _ = self.geometry(loaded)
        span = self.args[self.image_length_key]
        if span != grid * grid:
            raise EvalError(f"{self.name}: {self.image_length_key}={span} but the vision tower gives {grid}×{grid} "
                            f"= {grid * grid} visual tokens; pass --method-arg {self.image_length_key}={grid * grid}")
        self._check_args(loaded.model.config.num_hidden_layers, span)
        self._enable(loaded.model)

    def _enable(self, model) -> None:
        raise NotImplementedError

    def _set_active(self, model, on: bool) -> None:
        raise NotImplementedError

    def _check_args(self, n_layers: int, span: int) -> None:
        raise NotImplementedError

    @contextmanager
    def _switched_off(self, model):
        self._set_active(model, False)
        try:
            yield
        finally:
            self._set_active(model, True)

    # ---------------------------------------------------------------- per sample
    def check_span_start(self, input_ids) -> int:
        """s0, the index of IMAGE_TOKEN_INDEX in input_ids [1, T]; it must be where the method's window starts."""
        s0 = self.span_start(input_ids)
        sys_length = self.args[self.sys_length_key]
        if s0 != sys_length:
            raise EvalError(f"{self.name}: the image starts at token s0={s0} of the prompt but "
                            f"{self.sys_length_key}={sys_length}, so {self.name} would rank the wrong tokens; pass "
                            f"--method-arg {self.sys_length_key}={s0} (35 for LLaVA-1.5's tokenizer with vicuna_v1)")
        return s0

    def generate(self, loaded: Loaded, input_ids, image_tensor, image_size, *, max_new_tokens: int) -> str:
        """As Adapter.generate. Text-only samples run with the method off: upstream would rank text tokens as
        if they were the image window (or crash when the prompt is shorter than the window)."""
        if image_tensor is None:
            with self._switched_off(loaded.model):
                return super().generate(loaded, input_ids, None, None, max_new_tokens=max_new_tokens)
        self.check_span_start(input_ids)
        if not self._site_is_patched():
            import debias_core
            mode = debias_core.settings().mode
            if mode != "off":
                raise EvalError(f"DEBIAS mode {mode} needs the patched {self.name} ({self.site_module} does not "
                                f"call debias_core); run bash scripts/apply_patches.sh {self.upstream}")
        return super().generate(loaded, input_ids, image_tensor, image_size, max_new_tokens=max_new_tokens)
