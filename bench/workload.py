"""What the latency benchmark runs: each method loaded and fed one synthetic input, ready to generate.

A workload holds a loaded model and its input and offers three things, the same for every method:
``sample()`` (the debias_core sample context of that input), ``generate(new_tokens)`` (one generate call, not
timed) and the paper trend it ranks with (None: no ranking site, only mode off runs). Methods eval.run drives
load through their eval adapter (``adapter_workload``); a method another driver runs names the module that
builds its workload in DRIVER_WORKLOADS (Video-LLaVA: bench/video.py).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from eval import registry

# the registry's methods marked bench: true (eval.run's and those of another driver)
METHODS = tuple(registry.methods(driver=None, supports="bench", plugins=False))
REFERENCE = registry.reference_method()  # unpruned LLaVA: every speedup is measured against it
CALL = "_call"                           # the job that times the debias call alone
IMAGE_SIZE = (640, 480)
PREFIX, SUFFIX = 35, 40          # vicuna_v1 puts the image after 35 tokens; ~40 question tokens after it
BENCH_TREND_BENCHMARK = "gqa"    # which paper preset the exponential methods use (latency does not depend on it)
SITE_CALLS = ("debias", "mask_padding", "keep_cap", "positions")  # what the patches call in debias_core
# driver module -> the bench module whose workload(name, ckpt, device) builds its methods' workload
DRIVER_WORKLOADS = {"eval.video_qa": "bench.video"}


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(work, new_tokens: int) -> float:
    """Seconds of one generate of ``new_tokens`` in the sample's context, synchronised before and after."""
    import time

    with work.sample():
        sync(work.device)
        t0 = time.perf_counter()
        work.generate(new_tokens)
        sync(work.device)
        return time.perf_counter() - t0


def synthetic_ids(image_token_index: int, vocab: int = 32000, image_tokens: int = 1):
    """[1, PREFIX + image_tokens + SUFFIX - 1] token ids: BOS, PREFIX - 1 random text tokens, ``image_tokens``
    image placeholders, SUFFIX random text tokens (seeded: every run feeds the same ids)."""
    import torch
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab, (PREFIX - 1 + SUFFIX,), generator=g)
    images = torch.full((image_tokens,), image_token_index)
    ids = torch.cat([torch.tensor([1]), text[:PREFIX - 1], images, text[PREFIX - 1:]])
    return ids.unsqueeze(0)


class AdapterWorkload:
    """A method of eval.run loaded through its eval adapter (the baseline's own loader, the paper's settings):
    a 640×480 random image (pad preprocessing) after a 35-token prefix, then 40 question tokens."""

    def __init__(self, name: str, ckpt: Path, device: str):
        import numpy as np
        from PIL import Image

        from eval.methods import get_adapter

        self.name, self.device = name, device
        self.adapter = get_adapter(name)
        self.adapter.activate()
        self.loaded = self.adapter.load(str(ckpt), device=device)
        self.adapter.configure(self.loaded)
        self.model = self.loaded.model
        self.image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3),
                                                                       dtype=np.uint8))
        self.pixels = self.adapter.image_tensor(self.loaded, self.image, "pad")
        self.ids = synthetic_ids(self.adapter.llava.IMAGE_TOKEN_INDEX, self.model.config.vocab_size)
        self.grid, self.resolution = self.adapter.geometry(self.loaded)
        self.trend = registry.paper_trend_name(name, BENCH_TREND_BENCHMARK)
        self.trend_method = self.adapter.trend_method

    def upstream_state(self) -> str:
        return self.adapter.upstream_state()

    def sample(self):
        import debias_core
        return debias_core.sample(image_size=self.image.size, span_start=PREFIX, grid=self.grid,
                                  resolution=self.resolution)

    def generate(self, new_tokens: int) -> None:
        self.adapter.generate(self.loaded, self.ids, self.pixels, self.image.size, max_new_tokens=new_tokens)


def cpu_stand_ins() -> None:
    """For CPU smoke runs only: upstream code that times itself with CUDA events or moves tensors with .cuda()
    (SparseVLMs' generate) gets no-op events, a no-op synchronize and .cuda() as the identity."""
    import torch

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def elapsed_time(self, other):
            return 0.0

    torch.cuda.Event, torch.cuda.synchronize = Event, (lambda *args, **kwargs: None)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def prepare(name: str, ckpt: Path, device: str):
    """The workload of method ``name`` (the benchmark's LLaVA-1.5 checkpoint ``ckpt``), its model made to
    always generate the full length (random weights would stop at a random EOS)."""
    if not device.startswith("cuda"):
        cpu_stand_ins()
    driver = registry.method(name, driver=None)["driver"]
    if driver == registry.DRIVER:
        work = AdapterWorkload(name, ckpt, device)
    elif driver in DRIVER_WORKLOADS:
        work = importlib.import_module(DRIVER_WORKLOADS[driver]).workload(name, ckpt, device)
    else:
        raise registry.RegistryError(f"method {name!r} runs with {driver}, for which the benchmark has no "
                                     f"workload (bench.workload.DRIVER_WORKLOADS)")
    for cfg in (work.model.config, work.model.generation_config):
        cfg.eos_token_id = None
    return work
