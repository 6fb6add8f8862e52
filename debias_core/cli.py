"""``python -m debias_core`` — weights, padmask, fit, show.

Exit status: 0 done; 2 bad input (an argument, a preset name, a trend or scores file, an environment value such
as DEBIAS_CHECK, an unwritable --out), reported as one ``error: ...`` line on stderr that names the value and
the fix, with nothing written; 130 interrupted (Ctrl-C). Output files are written atomically, only once
everything they depend on was checked.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from .errors import DebiasError
from .geometry import check_threshold, pad_fractions, valid_mask
from .presets import preset_names, resolve_trend
from .trend import ExponentialTrend, fit_exponential, save_trend


EXIT_CODES = """exit status:
  0    done
  2    bad input: one line "error: ..." on stderr naming the value and the fix; nothing written
  130  interrupted (Ctrl-C)"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one ``error: ...`` line (exit 2), like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (usage: {self.prog} --help)\n")


def run_main(body, argv_parser, argv=None, *, catch=(DebiasError,)) -> int:
    """Parse, run ``body(args)``; a bad input (``catch``) or Ctrl-C becomes one ``error:`` line and exit 2 / 130."""
    from .config import check_env

    args = argv_parser.parse_args(argv)
    try:
        check_env()  # a typo in DEBIAS* is reported here too, not only where a library call reads it
        return body(args)
    except catch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); no output was completed, rerun the command", file=sys.stderr)
        return 130


def _save_npy(path, array) -> None:
    """``np.save`` via a temporary file and a rename; an unwritable path is a DebiasError naming it."""
    path = Path(path)
    if path.suffix != ".npy":
        raise DebiasError(f"--out {str(path)!r} must end in .npy (np.save would append it)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DebiasError(f"cannot write {str(path)!r}: {e.strerror or e}; pick a writable --out") from None


def _load_scores(path) -> np.ndarray:
    try:
        scores = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DebiasError(f"--scores {path!r} does not exist; save the recorded scores with np.save "
                          f"(float [n] or [rows, n])") from None
    except (OSError, ValueError, EOFError) as e:
        raise DebiasError(f"--scores {path!r} is not a .npy array of numbers ({e}); save it with np.save, "
                          f"without pickle") from None
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise DebiasError(f"--scores {path!r} holds {scores.dtype} values; it must hold real numbers")
    return scores


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
    _save_npy(args.out, w.astype(np.float64))
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
    scores = _load_scores(args.scores)
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
    p = OneLineParser(prog="python -m debias_core", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return run_main(lambda args: args.func(args), build_parser(), argv)
