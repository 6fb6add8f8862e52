"""``python -m debias_core`` — weights, padmask, fit, show."""
from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

from .errors import DebiasError
from .geometry import check_threshold, pad_fractions, valid_mask
from .presets import preset_names, resolve_trend
from .trend import ExponentialTrend, fit_exponential, save_trend


def _image_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX×]\s*(-?\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not WxH, e.g. 640x480")
    return int(m.group(1)), int(m.group(2))


def cmd_weights(args) -> int:
    if not args.preset.startswith("paper:"):
        raise DebiasError(f"--preset {args.preset!r} is not a paper preset; names look like paper:himap/gqa")
    if args.n < 1:
        raise DebiasError(f"--n {args.n} must be ≥ 1 (number of visual positions; LLaVA-1.5: 576)")
    w = resolve_trend(args.preset).weights(args.n)
    np.save(args.out, w.astype(np.float64), allow_pickle=False)
    print(f"wrote {args.out}: {w.size} float64 weights, w[0]={w[0]:.6g}, w[-1]={w[-1]:.6g}")
    return 0


def cmd_padmask(args) -> int:
    fr = pad_fractions(args.image_size, grid=args.grid, resolution=args.resolution,
                       exact=args.geometry == "exact")
    valid = valid_mask(fr, check_threshold(args.threshold))
    if args.json:
        print(json.dumps({"grid": args.grid, "pad_fraction": np.round(fr, 12).tolist(), "keep_cap": int(valid.sum())}))
        return 0
    w, h = args.image_size
    print(f"{w}x{h} on a {args.grid}x{args.grid} grid at {args.resolution}px: "
          f"{int(valid.sum())} of {fr.size} patches kept (pad fraction ≤ {args.threshold})")
    for row in fr:
        print(" ".join(f"{v:4.2f}" for v in row))
    return 0


def cmd_fit(args) -> int:
    scores = np.load(args.scores, allow_pickle=False)
    trend = fit_exponential(scores)
    trend.provenance = {"scores": args.scores, "rows": int(scores.shape[0]) if scores.ndim == 2 else 1}
    save_trend(trend, args.out)
    print(f"wrote {args.out}: f(i) = {trend.a:.6g}·exp({trend.b:.6g}·i), n={trend.n}, r²={trend.r2:.4f}, "
          f"end/start = {np.exp(trend.b * (trend.n - 1)):.3f}")
    return 0


def cmd_show(args) -> int:
    if args.list or not args.trend:
        print("\n".join(preset_names()))
        return 0
    trend = resolve_trend(args.trend)
    print(json.dumps(trend.to_json() if not hasattr(trend, "table") else {"form": "table", "n": trend.n}))
    for st in sorted(getattr(trend, "stages", {0: trend})):
        t = trend.for_stage(st)
        w = t.weights()
        label = f"stage {st}: " if hasattr(trend, "stages") else ""
        form = (f"f(i) = {t.a:.6g}·exp({t.b:.6g}·i)" if isinstance(t, ExponentialTrend) else type(t).__name__)
        print(f"{label}{form} over {t.n} positions; weight w_i = f(0)/f(i) from {w.max():.4f} to {w.min():.4f} "
              f"(trend end/start {w[0] / w[-1]:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m debias_core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("weights", help="write a paper preset's per-position weight vector (float64 .npy)")
    w.add_argument("--preset", required=True, help="paper:<method>/<benchmark>, e.g. paper:himap/gqa")
    w.add_argument("--n", type=int, default=576, help="number of positions (default 576)")
    w.add_argument("--out", required=True)
    w.set_defaults(func=cmd_weights)

    m = sub.add_parser("padmask", help="per-patch padding fractions for LLaVA-1.5 pad preprocessing")
    m.add_argument("--image-size", required=True, type=_image_size, help="WxH of the original image")
    m.add_argument("--grid", type=int, default=24)
    m.add_argument("--resolution", type=int, default=336)
    m.add_argument("--threshold", type=float, default=0.5, help="pad fraction above which a patch is padding")
    m.add_argument("--geometry", choices=["exact", "official"], default="exact")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_padmask)

    f = sub.add_parser("fit", help="fit an exponential trend to recorded scores (.npy, [n] or [rows, n])")
    f.add_argument("--scores", required=True)
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("show", help="print a trend (preset or JSON file) and its weight range")
    s.add_argument("--trend", help="preset name or trend JSON file")
    s.add_argument("--list", action="store_true", help="list the preset names")
    s.set_defaults(func=cmd_show)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DebiasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
