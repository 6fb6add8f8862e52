"""Score runs: ``python -m eval.score --run-dir DIR`` or ``--answers-dir outputs/answers`` (every merged run).

Writes DIR/score.json (see eval.scoring for which LLaVA tool scores which benchmark). With --answers-dir,
runs that fail to score are listed at the end and the exit status is non-zero; the others are still scored.

Exit status: 0 every run scored; 2 bad input — a folder that is not a merged run, a malformed run.json or
answers file, missing benchmark data — as one ``error: ...`` line on stderr per run that could not be scored
(with --answers-dir, a last line counts them), and no score.json written for that run; 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys
from pathlib import Path

from debias_core.cli import OneLineParser
from debias_core.config import check_env
from debias_core.errors import DebiasError

from .common import EvalError
from .scoring import score_run


def _show(res: dict) -> str:
    v = res["value"]
    shown = f"{v:.2f}" if isinstance(v, (int, float)) else f"({res['scoring']}: see {res['metrics'].get('upload')})"
    return f"{res['title']:<14} {res['method']}-{res['budget']} {res['mode']:<5} {res['metric']} = {shown}"


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m eval.score", description=__doc__.split("\n")[0],
                      epilog=__doc__[__doc__.index("Exit status"):])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-dir", type=Path)
    g.add_argument("--answers-dir", type=Path)
    p.add_argument("--data-dir", default=None, help="default: the one recorded in each run.json")
    args = p.parse_args(argv)
    try:
        check_env()  # a typo in DEBIAS* is reported by every tool, not only where it is read
    except DebiasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [args.run_dir] if args.run_dir else sorted(m.parent for m in args.answers_dir.rglob("merge.jsonl"))
    if not runs:
        print(f"error: no merged run (merge.jsonl) under {args.answers_dir}", file=sys.stderr)
        return 2
    failed = []
    for rd in runs:
        try:
            print(_show(score_run(rd, args.data_dir)))
        except (EvalError, DebiasError, OSError) as e:  # OSError: e.g. a run folder that cannot be written
            failed.append(rd)
            msg = f"{e.filename or rd}: {e.strerror or e}; score.json was not written" if isinstance(e, OSError) else e
            print(f"error: {msg}" if args.run_dir else f"error: {rd}: {msg}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"error: interrupted (Ctrl-C) while scoring {rd}; rerun to score it", file=sys.stderr)
            return 130
    if failed and len(runs) > 1:
        print(f"{len(failed)} of {len(runs)} runs not scored (see errors above)", file=sys.stderr)
    if failed:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
