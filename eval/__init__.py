"""Evaluation path: one driver for every baseline, benchmarks as registry entries, LLaVA's own scorers.

    python -m eval.run     --method fastv --benchmark pope --model-path CKPT --data-dir DATA_DIR --mode full
    python -m eval.merge   --run-dir outputs/answers/<model>/<bench>/<method>-<budget>/<mode>
    python -m eval.score   --run-dir ...                        (writes score.json next to merge.jsonl)
    python -m eval.report  --answers-dir outputs/answers        (results.md, results.csv, radar.png)
    bash scripts/demo.sh                                        (the whole path on CPU with a tiny random LLaVA)

Modules (one concept each):
  methods/      per-method adapters (how to load, configure and call each baseline); the method registry
                (debias_core/data/methods.json, eval.registry) holds the paper's settings. methods/base.py documents the interface for the baselines' adapters.
  benchmarks    the registry: question file, image folder, prompt suffix, LLaVA eval module, scorer kind
  questions     reading LLaVA-format question files (jsonl, ScienceQA json, MMBench tsv) into samples
  answers       answer jsonl: one write per answer, resume after SIGKILL, LLaVA's chunk split, checked merge
  run           the driver (`python -m eval.run`); merge / score: the CLIs of the next two steps
  runinfo       run identity (run.json) and the log header (method, mode, budget, trend, git shas)
  scoring       LLaVA's scorers and converters, called rather than rewritten
  report        results table (Markdown + CSV) and the radar chart
  tiny_llava    a tiny random LLaVA-1.5 saved locally, loadable by load_pretrained_model (tests, demo)
  synthetic, overlay, demo   the embedded CPU demo (`bash scripts/demo.sh`)
  common        EvalError, repository paths, git state
"""
