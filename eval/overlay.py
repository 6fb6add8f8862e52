"""Kept visual tokens drawn on the model's input image, off vs debiased (like the paper's Figure 3).

``fastv_style_selection`` reproduces FastV's ranking outside any baseline: one prefill with
``output_attentions=True``, the head-mean attention of decoder layer K−1 from the last prompt token over the
visual span [s0, s0 + 576), then ``debias_core.debias`` / ``keep_cap`` and top-k — exactly the call a patched
ranking site makes. It is a stand-in used while no patched baseline runs in the demo; a patched baseline's
own kept indices (recorded by its ranking site) can be drawn with ``draw_kept`` the same way.

Figure: one row per image, one column per mode. Each panel is the 336×336 input LLaVA sees (after
expand2square), kept tokens bright and dropped ones darkened; the dashed line bounds the real image content.
"""
from __future__ import annotations

from pathlib import Path


def fastv_style_selection(adapter, loaded, image, question: str, *, layer: int = 2, keep: int = 128,
                          modes=("off", "full"), trend: str = "paper:fastv") -> dict:
    """{"pixels": [3, R, R] tensor, "size": (W, H), "span_start": s0, "grid", "resolution",
    "kept": {mode: sorted list of visual raster indices}} for one image and question."""
    import debias_core
    import torch

    pixels = adapter.image_tensor(loaded, image, "pad")
    ids = adapter.input_ids(loaded, question, has_image=True)
    s0 = adapter.span_start(ids)
    grid, resolution = adapter.geometry(loaded)
    with torch.inference_mode():
        out = loaded.model(ids.to(loaded.device), images=pixels[None].to(loaded.device, loaded.dtype),
                           image_sizes=[image.size], output_attentions=True, use_cache=False)
    scores = out.attentions[layer - 1][0].mean(0)[-1, s0:s0 + grid * grid].float()
    kept = {}
    for mode in modes:  # note: leaves debias_core configured with the last mode
        debias_core.configure(mode=mode, trend=trend if mode in ("pos", "full") else None, method="fastv")
        with debias_core.sample(image_size=image.size, preprocess="pad", span_start=s0, grid=grid,
                                resolution=resolution):
            ranked = debias_core.debias(scores)
            k = debias_core.keep_cap(keep)
            kept[mode] = sorted(torch.topk(ranked, k).indices.tolist())
    return {"pixels": pixels, "size": image.size, "span_start": s0, "grid": grid, "resolution": resolution,
            "kept": kept}


def _input_image(pixels, mean, std):
    import numpy as np

    x = pixels.float().cpu().numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return np.clip(x, 0, 1)


def draw_kept(entries: list[dict], path, *, mean, std, title: str, threshold: float = 0.5) -> Path:
    """entries: outputs of ``fastv_style_selection`` (with "name"); writes a PNG grid rows=images, cols=modes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    from debias_core import pad_fractions

    modes = list(entries[0]["kept"])
    fig, axes = plt.subplots(len(entries), len(modes), figsize=(4.2 * len(modes), 4.2 * len(entries) + 1.0),
                             dpi=100, squeeze=False, layout="constrained")
    for r, e in enumerate(entries):
        g, res = e["grid"], e["resolution"]
        cell = res / g
        pad = pad_fractions(e["size"], grid=g, resolution=res).reshape(-1)
        img = _input_image(e["pixels"], mean, std)
        for c, mode in enumerate(modes):
            ax = axes[r][c]
            kept = np.zeros(g * g, bool)
            kept[e["kept"][mode]] = True
            shade = np.where(kept.reshape(g, g), 0.0, 0.72)
            ax.imshow(img, extent=(0, res, res, 0))
            ax.imshow(np.dstack([np.zeros((g, g, 3)), shade]), extent=(0, res, res, 0), interpolation="nearest")
            for t in np.flatnonzero(kept):
                ax.add_patch(Rectangle(((t % g) * cell, (t // g) * cell), cell, cell, fill=False, lw=0.4,
                                       ec="#ffd400"))
            w, h = e["size"]
            s = max(w, h)
            off = (s - min(w, h)) // 2 * res / s
            band = (0, off, res, min(w, h) * res / s) if w >= h else (off, 0, min(w, h) * res / s, res)
            ax.add_patch(Rectangle(band[:2], band[2], band[3], fill=False, ls="--", lw=1.4, ec="#00e5ff"))
            on_pad = int((pad[kept] > threshold).sum())
            ax.set_title(f"{mode}: {int(kept.sum())} kept, {on_pad} on padding", fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{e.get('name', '')}\n{w}×{h}", fontsize=11)
    fig.suptitle(title + "\nbright = kept token, dark = dropped; dashed box = the real image (outside: padding)",
                 fontsize=11.5)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
