"""Kept visual tokens drawn on the model's input image, off vs debiased (like the paper's Figure 3).

``draw_kept`` draws a grid: one row per image (question), one column per kept set (e.g. "FastV off", "FastV full").
Each panel is the 336×336 input LLaVA sees (after expand2square), kept tokens bright and dropped ones darkened; the
dashed line bounds the real image content; when an entry gives the evidence boxes (the objects that decide the
answer, in original-image pixels), they are drawn in red and the panel counts the evidence patches kept.

``fastv_style_selection`` reproduces a last-token-attention ranking outside any baseline (FastV's, and the iLLaVA
port's): one prefill with ``output_attentions=True``, the head-mean attention of decoder layer K−1 from the last
prompt token over the visual span [s0, s0 + 576), then ``debias_core.debias`` / ``keep_cap`` and top-k — exactly
the call a patched ranking site makes. The demo uses it as a stand-in when no patched baseline can run; which
method it imitates comes from the registry (``stand_in_method``).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

EVIDENCE_COLOR = "#ff2d2d"
KEPT_COLOR = "#ffd400"
IMAGE_COLOR = "#00e5ff"


def stand_in_method() -> str:
    """The registry method the stand-in imitates: the first one that ranks (has a trend family) and runs on the
    reference model's own upstream (the iLLaVA port on LLaVA), so its ranking needs nothing but plain LLaVA."""
    from . import registry

    every = registry.methods()
    base = every[registry.reference_method()]["upstream"]
    found = [k for k, m in every.items() if m["upstream"] == base and m["trend_method"] is not None]
    if not found:
        raise registry.RegistryError(f"no registry method ranks on the reference model's upstream {base}; the "
                                     f"stand-in has nothing to imitate")
    return found[0]


def fastv_style_selection(adapter, loaded, image, question: str, *, layer: int = 2, keep: int = 128,
                          modes=("off", "full"), trend: str | None = None, trend_method: str | None = None) -> dict:
    """{"pixels": [3, R, R] tensor, "size": (W, H), "span_start": s0, "grid", "resolution",
    "kept": {mode: sorted list of visual raster indices}} for one image and question.

    ``trend`` / ``trend_method``: the debiasing trend and debias_core method family (default: those of
    ``stand_in_method``, its paper preset)."""
    import debias_core
    import torch

    from . import registry

    if trend_method is None:
        trend_method = registry.method(stand_in_method())["trend_method"]
    if trend is None:
        trend = registry.paper_trend_name(stand_in_method(), None)
    pixels = adapter.image_tensor(loaded, image, "pad")
    ids = adapter.input_ids(loaded, question, has_image=True)
    s0 = adapter.span_start(ids)
    grid, resolution = adapter.geometry(loaded)
    with torch.inference_mode():
        out = loaded.model(ids.to(loaded.device), images=pixels[None].to(loaded.device, loaded.dtype),
                           image_sizes=[image.size], output_attentions=True, use_cache=False)
    scores = out.attentions[layer - 1][0].mean(0)[-1, s0:s0 + grid * grid].float()
    kept = {}
    try:
        for mode in modes:
            debias_core.configure(mode=mode, trend=trend if mode in ("pos", "full") else None, method=trend_method)
            with debias_core.sample(image_size=image.size, preprocess="pad", span_start=s0, grid=grid,
                                    resolution=resolution):
                ranked = debias_core.debias(scores)
                k = debias_core.keep_cap(keep)
                kept[mode] = sorted(torch.topk(ranked, k).indices.tolist())
    finally:
        debias_core.reset()
    return {"pixels": pixels, "size": image.size, "span_start": s0, "grid": grid, "resolution": resolution,
            "kept": kept}


def _input_image(pixels, mean, std):
    import numpy as np

    x = pixels.float().cpu().numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return np.clip(x, 0, 1)


def padded_box(box, size, resolution: int) -> tuple[float, float, float, float]:
    """(x, y, width, height) in the R×R input of a box (x0, y0, x1, y1) in original pixels (expand2square:
    the image pasted centred in a max(W, H) square, then resized to R)."""
    from study.data import pad_offset

    dx, dy = pad_offset(tuple(size))
    scale = resolution / max(size)
    x0, y0, x1, y1 = box
    return (x0 + dx) * scale, (y0 + dy) * scale, (x1 - x0) * scale, (y1 - y0) * scale


def panel_counts(kept, entry: dict, threshold: float) -> dict:
    """{"kept", "on_pad", "evidence": (kept, total) or None} of one kept set of ``entry``."""
    from debias_core import pad_fractions

    g, res = entry["grid"], entry["resolution"]
    pad = pad_fractions(entry["size"], grid=g, resolution=res).reshape(-1)
    counts = {"kept": len(kept), "on_pad": int(sum(pad[t] > threshold for t in kept)), "evidence": None}
    if entry.get("evidence") is not None:
        from study.data import evidence_patches

        patches = set(evidence_patches([tuple(b) for b in entry["evidence"]], tuple(entry["size"]), grid=g,
                                       resolution=res))
        counts["evidence"] = (len(patches & set(kept)), len(patches))
    return counts


def _panel_title(column: str, counts: dict, answer) -> str:
    line = f"{counts['kept']} kept, {counts['on_pad']} on padding"
    if counts["evidence"] is not None:
        line += f", evidence {counts['evidence'][0]}/{counts['evidence'][1]}"
    title = f"{column}\n{line}"
    if answer is not None:
        text, correct = answer
        title += f"\nanswer \u201c{text.strip()[:20]}\u201d {'right' if correct else 'wrong'}"
    return title


def draw_kept(entries: list[dict], path, *, mean, std, title: str, threshold: float = 0.5) -> Path:
    """Write a PNG grid, rows = entries, columns = the keys of ``entries[0]["kept"]``.

    Entry: "pixels" [3, R, R], "size" (W, H), "grid", "resolution", "kept" {column: raster indices}, optional
    "name" (row label), "evidence" (boxes x0, y0, x1, y1 in original pixels) and "answers" {column: (text, correct)}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    columns = list(entries[0]["kept"])
    panel = 4.2 if len(columns) <= 4 else 2.9
    fig, axes = plt.subplots(len(entries), len(columns), dpi=100, squeeze=False, layout="constrained",
                             figsize=(panel * len(columns) + 0.8, (panel + 0.5) * len(entries) + 1.2))
    fontsize = 11 if panel > 3 else 8.5
    for r, e in enumerate(entries):
        g, res = e["grid"], e["resolution"]
        cell = res / g
        img = _input_image(e["pixels"], mean, std)
        for c, column in enumerate(columns):
            ax = axes[r][c]
            kept_mask = np.zeros(g * g, bool)
            kept_mask[e["kept"][column]] = True
            shade = np.where(kept_mask.reshape(g, g), 0.0, 0.72)
            ax.imshow(img, extent=(0, res, res, 0))
            ax.imshow(np.dstack([np.zeros((g, g, 3)), shade]), extent=(0, res, res, 0), interpolation="nearest")
            for t in np.flatnonzero(kept_mask):
                ax.add_patch(Rectangle(((t % g) * cell, (t // g) * cell), cell, cell, fill=False, lw=0.4,
                                       ec=KEPT_COLOR))
            w, h = e["size"]
            x, y, bw, bh = padded_box((0, 0, w, h), e["size"], res)
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, ls="--", lw=1.4, ec=IMAGE_COLOR))
            for box in e.get("evidence") or []:
                x, y, bw, bh = padded_box(box, e["size"], res)
                ax.add_patch(Rectangle((x, y), bw, bh, fill=False, lw=1.6, ec=EVIDENCE_COLOR))
            counts = panel_counts(e["kept"][column], e, threshold)
            ax.set_title(_panel_title(column, counts, (e.get("answers") or {}).get(column)), fontsize=fontsize)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                label = "\n".join(textwrap.fill(part, 34) for part in e.get("name", "").split("\n"))
                ax.set_ylabel(f"{label}\n{w}×{h}", fontsize=fontsize)
    width_in = fig.get_size_inches()[0]
    wrapped = textwrap.fill(title, max(60, int(11 * width_in)))  # about 11 characters of 11.5 pt per inch
    fig.suptitle(wrapped + "\nbright = kept token, dark = dropped; dashed box = the real image (outside: padding)",
                 fontsize=11.5)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
