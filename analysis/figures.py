"""The paper's analysis figures as PNG files (matplotlib, Agg backend), from recorded runs.

    plot_position_trend   mean score per position, exponential fit and the naive per-position average (Fig. 5)
    plot_heatmaps         grid × grid mean score before / after debiasing (Fig. 2)
    plot_selection_by_aspect  selection frequency per position, square / portrait / landscape images (Fig. 4)
    plot_kept_overlays    kept tokens over the padded canvas (or the image itself), before / after (Fig. 3)
    plot_needle           the SmolLM2 study: needle survival and answer accuracy by needle position
    figures_from_recording  all of Figs. 2–5 plus bias_metrics.json from a recording (``python -m analysis figures``)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

BEFORE, AFTER, FIT, NAIVE = "#555555", "#1f77b4", "#d62728", "#2ca02c"


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    ok = np.isfinite(y)
    kern = np.ones(w)
    num = np.convolve(np.where(ok, y, 0.0), kern, mode="same")
    den = np.convolve(ok.astype(float), kern, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def plot_position_trend(mean, trend, out, *, title="", after=None, held_out=None, xlabel="visual token position i",
                        ylabel="mean score", log=False) -> Path:
    """Fig. 5. mean float [n]: per-position average (the naive table trend; NaN = unobserved).
    trend: the fitted ExponentialTrend, or {label: trend} to compare fits. ``held_out`` [n]: mean of rows
    the fit did not see (smoothed line). ``after``: mean after debiasing [n], or {label: [n]} (second panel)."""
    mean = np.asarray(mean, dtype=np.float64)
    n = mean.size
    x = np.arange(n)
    trends = trend if isinstance(trend, dict) else {"exponential fit": trend}
    afters = after if isinstance(after, dict) or after is None else {"": after}
    panels = 2 if afters else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(x, mean, s=5, color=BEFORE, alpha=0.5, label="naive: per-position average (table trend)")
    smooth = max(3, n // 48)
    ax.plot(x, _moving_average(mean, smooth), color=NAIVE, lw=1.2, label=f"per-position average, {smooth}-pt smoothing")
    if held_out is not None:
        ax.plot(x, _moving_average(np.asarray(held_out, float), smooth), color="#9467bd", lw=1.2, ls="--",
                label="held-out rows (smoothed)")
    fit_colors = [FIT, "#ff7f0e", "#17becf"]
    for (lab, t), col in zip(trends.items(), fit_colors):
        r2 = f", r²={t.r2:.2f}" if getattr(t, "r2", None) is not None else ""
        ax.plot(x, t.values(x), color=col, lw=2.2,
                label=f"{lab}: b={t.b:.3g}{r2}, end/start={np.exp(t.b * (n - 1)):.3g}")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="before debiasing" if afters else (title or "mean score"))
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7.5, loc="best")
    ax.grid(alpha=0.25)
    if afters:
        ax2 = axes[0, 1]
        for (lab, a), col in zip(afters.items(), [AFTER, "#ff7f0e", "#17becf"]):
            a = np.asarray(a, dtype=np.float64)
            a = a / np.nanmean(a)
            ax2.scatter(x, a, s=4, color=col, alpha=0.35)
            ax2.plot(x, _moving_average(a, smooth), color=col, lw=1.6, label=f"{lab} ({smooth}-pt smoothing)".strip())
        ax2.axhline(1.0, color="k", lw=0.8, ls=":", label="flat (no positional bias)")
        ax2.set(xlabel=xlabel, ylabel="mean score × w_i ÷ its average", title="after positional debiasing")
        if log:
            ax2.set_yscale("log")
        ax2.legend(fontsize=7.5)
        ax2.grid(alpha=0.25)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def _relative(mean: np.ndarray) -> np.ndarray:
    return mean / np.nanmean(mean)


def plot_heatmaps(mean_before, mean_after, out, *, grid=24, title="", labels=("before debiasing", "after debiasing")) -> Path:
    """Fig. 2: grid × grid maps of the mean score (÷ its own average, one shared colour scale)."""
    b = _relative(np.asarray(mean_before, float)).reshape(grid, grid)
    a = _relative(np.asarray(mean_after, float)).reshape(grid, grid)
    hi = float(np.nanpercentile(np.concatenate([b.ravel(), a.ravel()]), 99))
    lo = float(np.nanpercentile(np.concatenate([b.ravel(), a.ravel()]), 1))
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4))
    for ax, m, lab in zip(axes, (b, a), labels):
        im = ax.imshow(m, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set(title=lab, xlabel="column", ylabel="row")
    fig.colorbar(im, ax=axes, shrink=0.85, label="mean score ÷ average (shared scale)")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def aspect_of(ctx) -> str | None:
    if not ctx or not ctx.get("image_size"):
        return None
    w, h = ctx["image_size"]
    return "square" if w == h else "portrait" if h > w else "landscape"


def plot_selection_by_aspect(kept_before, kept_after, contexts, out, *, grid=24, title="", keep=None) -> Path:
    """Fig. 4: share of samples whose top-k keeps each position, per aspect ratio, before (top) / after (bottom)."""
    groups = ("square", "portrait", "landscape")
    aspects = [aspect_of(c) for c in contexts]
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.4))
    im = None
    for j, g in enumerate(groups):
        rows = np.array([a == g for a in aspects], dtype=bool)
        for i, (kept, lab) in enumerate(((kept_before, "before"), (kept_after, "after"))):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if not rows.any():
                ax.text(0.5, 0.5, f"no {g} images", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{g}, {lab}")
                continue
            freq = np.asarray(kept)[rows].mean(0).reshape(grid, grid)
            im = ax.imshow(freq, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{g} (n={int(rows.sum())}), {lab}")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="selection frequency" + (f" (top-{keep})" if keep else ""))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def _canvas(ctx, resolution=336):
    """RGB float [R, R, 3]: the expand2square canvas (the real image when ctx names a readable one)."""
    from debias_core.geometry import pad_fractions

    res = ctx.get("resolution", resolution) if ctx else resolution
    path = ctx.get("image") if ctx else None
    if path and Path(path).is_file():
        try:
            from PIL import Image
            im = Image.open(path).convert("RGB")
            w, h = im.size
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), (122, 116, 104))
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            return np.asarray(canvas.resize((res, res)), dtype=np.float64) / 255
        except Exception:  # an unreadable image falls back to the schematic canvas
            pass
    grid = ctx.get("grid", 24) if ctx else 24
    img = np.full((res, res, 3), 0.93)
    if ctx and ctx.get("image_size"):
        fr = pad_fractions(tuple(ctx["image_size"]), grid=grid, resolution=res)
        patch = res // grid
        pad = np.kron(fr, np.ones((patch, patch)))[..., None]
        img = img * (1 - pad) + np.array([122, 116, 104]) / 255 * pad
    return img


def plot_kept_overlays(kept_before, kept_after, contexts, out, *, rows=None, grid=24, title="") -> Path:
    """Fig. 3: kept tokens (bright) over the padded canvas for a few samples, before / after debiasing.
    Padding (LLaVA's grey fill) is darker; a sample's image is drawn when its context names one."""
    kept_before, kept_after = np.asarray(kept_before), np.asarray(kept_after)
    if rows is None:  # one of each aspect when available
        rows, seen = [], set()
        for r, c in enumerate(contexts):
            a = aspect_of(c)
            if a not in seen:
                seen.add(a)
                rows.append(r)
            if len(rows) == 3:
                break
    rows = list(rows)[:4] or [0]
    fig, axes = plt.subplots(len(rows), 2, figsize=(7.2, 3.6 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        ctx = contexts[r] if r < len(contexts) else None
        base = _canvas(ctx)
        res = base.shape[0]
        patch = res / grid
        for j, (kept, lab) in enumerate(((kept_before, "before"), (kept_after, "after"))):
            ax = axes[i, j]
            ax.imshow(base * 0.45, interpolation="nearest")
            for t in np.flatnonzero(kept[r]):
                y, x = divmod(int(t), grid)
                ax.add_patch(Rectangle((x * patch, y * patch), patch, patch, facecolor="#ffd23f", alpha=0.75,
                                       edgecolor="none"))
            size = ctx.get("image_size") if ctx else None
            name = f"{size[0]}×{size[1]}" if size else f"row {r}"
            ax.set_title(f"{name}: {lab}, {int(kept[r].sum())} kept", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def plot_needle(positions, survival: dict, accuracy: dict, out, *, title="", keep=128, span=576,
                runs=None, tokens_kept: dict | None = None, ref_runs=None) -> Path:
    """Study figure: share of runs whose answer token survives pruning (left; dotted: mean share of the
    needle's tokens kept) and answer accuracy (right) per needle position.
    survival / accuracy / tokens_kept: {label: [value per position]}; accuracy may hold "unpruned"."""
    palette = iter([AFTER, "#ff7f0e", "#17becf", "#9467bd"])
    colors = {"off": BEFORE, "unpruned": "#2ca02c"}
    for lab in list(survival) + list(accuracy):
        if lab not in colors:
            colors[lab] = next(palette)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for lab, vals in survival.items():
        axes[0].plot(positions, vals, "o-", color=colors[lab], label=f"{lab}: answer token kept")
        if tokens_kept and lab in tokens_kept:
            axes[0].plot(positions, tokens_kept[lab], ":", color=colors[lab], lw=1.5,
                         label=f"{lab}: share of needle tokens kept")
    axes[0].set(xlabel=f"needle position in the {span}-token span", ylabel="share of runs",
                ylim=(-0.03, 1.03), title=f"needle survival (prune span to {keep})")
    for lab, vals in accuracy.items():
        if lab == "unpruned":
            axes[1].plot(positions, vals, "s--", color=colors[lab],
                         label="unpruned" + (f" ({ref_runs} run{'s' if ref_runs != 1 else ''} per position)"
                                              if ref_runs else ""))
        else:
            axes[1].plot(positions, vals, "o-", color=colors[lab], label=f"prune to {keep}, {lab}")
    axes[1].set(xlabel=f"needle position in the {span}-token span", ylabel="answer accuracy (greedy next token)",
                ylim=(-0.03, 1.03), title="answer accuracy")
    for ax in axes:
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7.5)
    if title:
        fig.suptitle(title + (f" ({runs} runs per position)" if runs else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


# ------------------------------------------------------------------------------------ from recordings

def figures_from_recording(source, out_dir, *, mode="full", trend=None, keep=192, stage=0, method=None,
                           threshold=None, exclude_padding=True) -> dict:
    """Figs. 2–5 and bias_metrics.json for one stage of a recording (paths, Recording or Recorder).

    ``trend`` None: the exponential is fitted on the same rows (in-sample; said so in the report)."""
    from debias_core.bias_metrics import analyze
    from debias_core.calibrate import _finite_or_none, _method_threshold, as_recording, calibrate, default_length

    rec = as_recording(source)
    thr = _method_threshold(method or "", threshold)
    length = default_length(rec)
    in_sample = trend is None and mode in ("pos", "full")
    fitted = calibrate(rec, model="(figures)", method=method or "(unknown)", stages=[stage], length=length,
                       exclude_padding=exclude_padding, pad_threshold=thr)
    use = fitted if trend is None else trend          # a name stays a name in the report
    contexts = rec.contexts(stage)
    scores = rec.recorder.matrix(stage, length)
    res = analyze(scores, contexts, mode=mode, trend=use if mode in ("pos", "full") else None, keep=keep,
                  stage=stage, threshold=thr)
    report = res.report
    report["fit_on_this_recording"] = {"a": fitted.a, "b": fitted.b, "r2": fitted.r2}
    report["trend_is_in_sample"] = in_sample
    out = Path(out_dir)
    grid = int(round(length ** 0.5))
    tag = f"{method or 'method'} stage {stage}, {len(contexts)} rows"
    paths = {"fig5": plot_position_trend(res.mean_before, fitted, out / "fig5_trend.png", title=tag,
                                         after=res.mean_after if mode in ("pos", "full") else None)}
    if grid * grid == length:
        paths["fig2"] = plot_heatmaps(res.mean_before, res.mean_after, out / "fig2_heatmap.png", grid=grid,
                                      title=f"{tag}; after = mode {mode}")
        paths["fig4"] = plot_selection_by_aspect(res.kept_before, res.kept_after, contexts,
                                                 out / "fig4_selection_by_aspect.png", grid=grid, keep=keep,
                                                 title=f"{tag}; top-{keep}, after = mode {mode}")
        paths["fig3"] = plot_kept_overlays(res.kept_before, res.kept_after, contexts, out / "fig3_overlays.png",
                                           grid=grid, title=f"top-{keep}, after = mode {mode}")
    report["figures"] = {k: str(v) for k, v in paths.items()}
    (out / "bias_metrics.json").write_text(json.dumps(_finite_or_none(report), indent=1, default=_json_default) + "\n")
    return report


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")
