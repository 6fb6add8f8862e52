"""Merge chunk answer files: ``python -m eval.merge --run-dir DIR`` -> DIR/merge.jsonl (question order).

Like LLaVA's scripts (cat <N>_0 .. <N>_{N-1} > merge.jsonl), but checked: every question of the run's question
file (``--limit`` respected) is answered exactly once, or the error says which chunk to resume.

Exit status: 0 merged (merge.jsonl written atomically); 2 bad input — not a run folder, a missing chunk, a
malformed answers file, a question answered twice or not at all — as one ``error: ...`` line on stderr, with
no merge.jsonl written; 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys
from pathlib import Path

from debias_core.cli import OneLineParser
from debias_core.config import check_env
from debias_core.errors import DebiasError

from .answers import merge
from .benchmarks import get_benchmark
from .common import EvalError
from .questions import load_samples
from . import runinfo


def merge_run(run_dir, data_dir=None) -> Path:
    run_dir = Path(run_dir)
    info = runinfo.read(run_dir / "run.json")
    missing = [k for k in ("benchmark", "data_dir", "num_chunks") if k not in info]
    if missing:
        raise EvalError(f"{run_dir / 'run.json'} lacks {', '.join(missing)}; it was not written by eval.run")
    bench = get_benchmark(info["benchmark"])
    samples = load_samples(bench, data_dir or info["data_dir"], info.get("limit"))
    return merge(run_dir, [s.question_id for s in samples], info["num_chunks"])


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m eval.merge", description=__doc__.split("\n")[0],
                      epilog=__doc__[__doc__.index("Exit status"):])
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--data-dir", default=None, help="default: the one recorded in run.json")
    args = p.parse_args(argv)
    try:
        check_env()  # a typo in DEBIAS* is reported by every tool, not only where it is read
        print(merge_run(args.run_dir, args.data_dir))
    except (EvalError, DebiasError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.run_dir}: {e.strerror or e}; merge.jsonl was not written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); merge.jsonl was not written, rerun the merge", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
