"""Score runs: ``python -m eval.score --run-dir DIR`` or ``--answers-dir outputs/answers`` (every merged run).

Writes DIR/score.json (see eval.scoring for which LLaVA tool scores which benchmark). With --answers-dir,
runs that fail to score are listed at the end and the exit status is non-zero; the others are still scored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EvalError
from .scoring import score_run


def _show(res: dict) -> str:
    v = res["value"]
    shown = f"{v:.2f}" if isinstance(v, (int, float)) else f"({res['scoring']}: see {res['metrics'].get('upload')})"
    return f"{res['title']:<14} {res['method']}-{res['budget']} {res['mode']:<5} {res['metric']} = {shown}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-dir", type=Path)
    g.add_argument("--answers-dir", type=Path)
    p.add_argument("--data-dir", default=None, help="default: the one recorded in each run.json")
    args = p.parse_args(argv)
    runs = [args.run_dir] if args.run_dir else sorted(m.parent for m in args.answers_dir.rglob("merge.jsonl"))
    if not runs:
        print(f"error: no merged run (merge.jsonl) under {args.answers_dir}", file=sys.stderr)
        return 2
    failed = []
    for rd in runs:
        try:
            print(_show(score_run(rd, args.data_dir)))
        except EvalError as e:
            failed.append(rd)
            print(f"error: {rd}: {e}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs not scored (see errors above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
