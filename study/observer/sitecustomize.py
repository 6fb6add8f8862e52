"""Imported at start-up by a driver process that has this folder first on PYTHONPATH (``study.run`` puts it there
for control runs only). With STUDY_CONTROL=random:<seed> or grid, the scores a ranking site hands to
``debias_core.debias`` are replaced by the control's scores (study/controls.py); the site then ranks and keeps as
it always does (run these in mode off). Without STUDY_CONTROL it does nothing."""
import os

if os.environ.get("STUDY_CONTROL"):
    import contextlib

    import debias_core
    import debias_core.context
    import torch

    from study.controls import grid_priority, parse, random_scores

    _name, _seed = parse(os.environ["STUDY_CONTROL"])
    _sample, _debias = debias_core.context.sample, debias_core.debias
    _state = {"sample": -1}

    @contextlib.contextmanager
    def sample(*args, **kwargs):
        _state["sample"] += 1
        with _sample(*args, **kwargs) as ctx:
            yield ctx

    def debias(scores, positions=None, *, stage=0, mean_dim=None, start=None, **kwargs):
        ranked = scores if mean_dim is None else torch.mean(scores, dim=mean_dim)
        n = ranked.shape[-1]
        if positions is None:
            raster = torch.arange(n)
        elif isinstance(positions, torch.Tensor):
            raster = positions.detach().long().cpu() - (start or 0)
        else:
            raise RuntimeError("controls support sites that pass raster or sequence positions, not tracked ones")
        table = (torch.from_numpy(grid_priority()) if _name == "grid"
                 else torch.from_numpy(random_scores(576, _seed, _state["sample"])))
        control = table[raster.clamp(0, 575)].to(device=ranked.device, dtype=torch.float32).expand(ranked.shape)
        return _debias(control.contiguous(), positions, stage=stage, start=start, **kwargs)

    # the driver opens samples through debias_core.sample, or (recording) through debias_core.context.sample
    debias_core.sample = debias_core.context.sample = sample
    debias_core.debias = debias
