"""The study: ``python -m study run [--quick] [--out outputs/study]`` (or ``bash scripts/study.sh``).

For every baseline x debias mode x budget, with the paper preset trend and with a trend calibrated on the study's
calibration split (never the evaluation split), plus the control selections and the unpruned model, each run
through the common driver (``python -m eval.run``) in the baseline's own environment on the study model:

1. data: the calibration and evaluation splits (``study.data.generate_split``; reused when present);
2. unpruned: plain LLaVA (no ranking site) on the evaluation split;
3. calibration: every baseline in mode off on the calibration split with ``--record``, then
   ``python -m debias_core.calibrate`` fits its (per-stage) trend;
4. runs: every (method, budget, mode, trend) and control, each with ``--record``; each is scored (exact match
   after LLaVA's normalisation) and its kept tokens measured against the evidence patches (study.selection).
   Calibration and runs share one pool, costliest first (``run_all``); a method's calibrated runs join it as
   soon as its trend is fitted;
5. report: ``study.json`` (schema in docs/study.md), ``report.md``, figures (paper Figs. 2-5 from the recorded
   attention of each baseline's first stage).

A run is done when its folder holds ``done.json``; an unfinished run is removed and redone (its recording must be
complete), so an interrupted study resumes where it stopped and never mixes halves. Budgets are the paper's
settings scaled to keep about 128, 64 or 32 visual tokens (SparseVLMs supports only its 128 and 64 schedules).

Exit codes: 0 done; 1 a run failed (its log is named); 2 usage or input error.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import DEFAULT_OUT, ROOT



def study_methods() -> tuple[str, ...]:
    """Registry methods whose adapter defines study budgets (``budget_args``), in registry order."""
    from eval.methods.base import Adapter, adapter_class
    from eval.registry import methods

    return tuple(k for k in methods() if adapter_class(k).budget_args.__func__ is not Adapter.budget_args.__func__)


def control_method() -> str:
    """The method at whose ranking site the random and grid controls replace the scores (study/observer/): the
    registry's one method with ``supports.study_controls`` (a single ranking stage keeps the comparison plain)."""
    from eval.registry import methods

    hosts = list(methods(supports="study_controls"))
    if len(hosts) != 1:
        raise StudyError(f"the registry must mark exactly one method supports.study_controls; it marks {hosts}")
    return hosts[0]


MODES = ("off", "pad", "pos", "full")
BUDGETS = (128, 64, 32)
PAPER_BENCHMARK = "gqa"   # the paper preset used on the study model: its closest benchmark (short-answer VQA)
CONTROLS = ("random:0", "random:1", "random:2", "grid")


class StudyError(Exception):
    """A user-facing problem (one line)."""


METHODS = study_methods()
CONTROL_METHOD = control_method()


@dataclass(frozen=True)
class Job:
    name: str                      # folder under runs/, e.g. "fastv/64/full-paper"
    method: str                    # eval.run --method
    split: str                     # "eval" | "calib"
    mode: str
    trend: str | None              # eval.run --trend (None: no trend)
    trend_label: str               # "paper" | "calibrated" | "-"
    budget: int | None             # visual tokens kept (FastV-equivalent); None = unpruned
    method_args: tuple = ()        # "KEY=VALUE" strings
    control: str | None = None     # STUDY_CONTROL for control runs
    kind: str = "baseline"         # baseline | control | unpruned | calibration


# ------------------------------------------------------------------------------------------------ plan

def method_args(method: str, keep: int, image_start: int) -> list[str]:
    """The paper's settings for ``method`` scaled to keep ``keep`` visual tokens (its adapter's ``budget_args``)."""
    from eval.methods.base import adapter_class

    try:
        return adapter_class(method).budget_args(keep, image_start)
    except NotImplementedError as e:
        raise StudyError(f"{e}; choose from {', '.join(METHODS)}") from None


def supported(method: str, keep: int) -> bool:
    from eval.methods.base import adapter_class

    return adapter_class(method).supports_budget(keep)


def trend_method(method: str) -> str:
    from eval.registry import method as registry_method

    return registry_method(method)["trend_method"]


def paper_trend(method: str) -> str:
    from eval.registry import paper_trend_name

    return paper_trend_name(method, PAPER_BENCHMARK)


def trend_file(trends_dir: Path, method: str, fit: str = "lsq") -> Path:
    """Where a method's calibrated trend is written: ``<method>.json`` for the default least-squares fit,
    ``<method>.<fit>.json`` for another (``debias_core.calibrate --fit``)."""
    return Path(trends_dir) / (f"{method}.json" if fit == "lsq" else f"{method}.{fit}.json")


def calibrated_suffix(fit: str) -> str:
    """Run-name suffix of calibrated runs: none for the default fit, ``-<fit>`` otherwise (so a finished run of
    one fit is never taken for another's)."""
    return "" if fit == "lsq" else f"-{fit}"


def plan(methods, budgets, modes, controls, image_start: int, trends_dir: Path, calibrated: bool = True,
         fit: str = "lsq") -> list[Job]:
    jobs = [Job("unpruned", "llava", "eval", "off", None, "-", None, kind="unpruned")]
    for m in methods:
        for keep in budgets:
            if not supported(m, keep):
                continue
            args = tuple(method_args(m, keep, image_start))
            for mode in modes:
                trends = [("paper", paper_trend(m))]
                if calibrated and mode == "full":   # the calibrated trend is compared where it matters most: full
                    trends.append(("calibrated", f"calibrated:{trend_file(trends_dir, m, fit)}"))
                for label, spec in (trends if mode in ("pos", "full") else [("-", None)]):
                    suffix = calibrated_suffix(fit) if label == "calibrated" else ""
                    jobs.append(Job(f"{m}/{keep}/{mode}-{label}{suffix}", m, "eval", mode, spec, label, keep, args))
    for c in controls:
        for keep in budgets:
            jobs.append(Job(f"control-{c.replace(':', '')}/{keep}/off--", CONTROL_METHOD, "eval", "off", None, "-",
                            keep, tuple(method_args(CONTROL_METHOD, keep, image_start)), control=c, kind="control"))
    return jobs


def calibration_jobs(methods, image_start: int) -> list[Job]:
    return [Job(f"calibration/{m}", m, "calib", "off", None, "-", 128, tuple(method_args(m, 128, image_start)),
                kind="calibration") for m in methods]


# ------------------------------------------------------------------------------------------ environments

@dataclass
class Envs:
    """Where each method's driver runs: local CPU environments, or a carried bundle on a GPU machine."""
    carry: Path | None = None
    trees: Path | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    threads: int | None = None      # CPU threads per driver process (None: torch's default)

    def command(self, method: str) -> tuple[list[str], dict]:
        from eval.methods.base import method_spec

        base = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS") and k != "STUDY_CONTROL"}
        base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", **self.extra)
        if self.device == "cpu" and self.threads:
            base["OMP_NUM_THREADS"] = str(self.threads)
        if self.carry is not None:
            from .carry import environment

            e = environment(self.carry, method)
            env = dict(base, **e["env"])
            return [e["python"]], env
        from eval.demo import env_python

        spec = method_spec(method)
        py = env_python(spec["env"], method) if method != "llava" else Path(sys.executable)
        if py is None:
            raise StudyError(f"{method}: no environment .venv-{spec['env']} (bash setup.sh --test-env {spec['env']})")
        env = dict(base, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if method != "llava" and self.trees is not None:
            env["EVAL_THIRD_PARTY"] = str(self.trees)
        return [str(py)], env

    def available(self, method: str) -> str | None:
        """None when the method can run here, else why not."""
        try:
            self.command(method)
        except StudyError as e:
            return str(e)
        if self.carry is None and method != "llava":
            from eval.methods.base import method_spec

            name = method_spec(method)["upstream"]
            if not (ROOT / "third_party" / name / ".git").exists():
                return f"{method}: third_party/{name} is not populated"
        return None


def export_trees(dest: Path, methods) -> Path:
    """Patched exports of each method's upstream (once; reused when complete)."""
    from eval.methods.base import method_spec
    from eval.upstream import export_tree

    for m in methods:
        name = method_spec(m)["upstream"]
        done = dest / f".{name}.done"
        if not done.exists():
            if (dest / name).exists():
                shutil.rmtree(dest / name)
            export_tree(name, dest / name)
            done.write_text("ok\n")
    return dest


# ------------------------------------------------------------------------------------------------ runs

def run_job(job: Job, out: Path, model: Path, data: Path, envs: Envs, *, limit: int | None) -> dict:
    """Run one job (unless done.json exists) and return its done record."""
    folder = out / "runs" / job.name
    done = folder / "done.json"
    if done.exists():   # checked against this checkpoint and split before any work (check_finished_runs)
        return json.loads(done.read_text())
    if folder.exists():
        shutil.rmtree(folder)   # an unfinished run: its recording would be incomplete
    folder.mkdir(parents=True)
    cmd, env = envs.command(job.method)
    if job.control:
        env["STUDY_CONTROL"] = job.control
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "observer"), env.get("PYTHONPATH", "")])
    split = data / job.split
    record = folder / "record.npz"
    args = [*cmd, "-m", "eval.run", "--method", job.method, "--benchmark", "study", "--data-dir", str(split),
            "--model-path", str(model), "--answers-dir", str(folder / "answers"), "--mode", job.mode,
            "--device", envs.device, "--max-new-tokens", "8", "--record", str(record), "--workers", "0"]
    if job.trend:
        args += ["--trend", job.trend]
    for a in job.method_args:
        args += ["--method-arg", a]
    if limit:
        args += ["--limit", str(limit)]
    t0 = time.time()
    with open(folder / "driver.log", "w") as logf:
        r = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=logf, text=True)
    if r.returncode:
        raise StudyError(f"{job.name}: python -m eval.run exited {r.returncode}; see {folder / 'driver.log'}")
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    record_out = {"job": asdict(job), "run_dir": str(run_dir), "seconds": round(time.time() - t0, 1),
                  "made_with": {"model": model_identity(model), "questions": question_count(split)}}
    try:
        record_out.update(measure(job, run_dir, record, split))
    except Exception as e:  # noqa: BLE001 - the answers stay; the run is reported as failed, not lost
        raise StudyError(f"{job.name}: measuring the run failed ({type(e).__name__}: {e}); answers in {run_dir}")
    done.write_text(json.dumps(record_out, indent=1))
    return record_out


def model_identity(model: Path) -> dict:
    """What makes two assembled study checkpoints answer alike: the trained weights, the GGUF, the dtype."""
    info = json.loads((Path(model) / "study.json").read_text())
    return {k: info.get(k) for k in ("trained_sha256", "gguf_sha256", "dtype")}


def question_count(split: Path) -> int:
    with open(Path(split) / "questions.jsonl") as f:
        return sum(1 for line in f if line.strip())


def check_resumable(record: dict, made_with: dict, done: Path, out: Path) -> None:
    """A finished run is reused only if it was made with this checkpoint on this many questions: a study folder
    never mixes runs of other weights or another split size (runs from before this check carry no record of
    either and are refused too)."""
    was = record.get("made_with")
    if was == made_with:
        return
    if was is None:
        why = "records neither the checkpoint nor the split size it was made with"
    elif was["model"] != made_with["model"]:
        why = (f"was made with other weights (trained sha256 {str(was['model'].get('trained_sha256'))[:12]}…, "
               f"this checkpoint's {str(made_with['model'].get('trained_sha256'))[:12]}…)")
    else:
        why = f"was made on {was['questions']} questions; this study's split has {made_with['questions']}"
    raise StudyError(f"{done} {why}: give this study another --out, or remove {Path(out) / 'runs'} to redo "
                     f"every run")


def check_finished_runs(out: Path, model: Path, data: Path) -> None:
    """Before any work: every finished run in OUT must be resumable with this checkpoint and these splits."""
    identity = model_identity(model)
    counts = {}
    for done in sorted((Path(out) / "runs").rglob("done.json")):
        record = json.loads(done.read_text())
        split = record.get("job", {}).get("split", "eval")
        if split not in counts:
            counts[split] = question_count(data / split)
        check_resumable(record, {"model": identity, "questions": counts[split]}, done, out)


_MEASURE = threading.Lock()


def measure(job: Job, run_dir: Path, record: Path, split: Path) -> dict:
    """Per-question correctness and, for pruning runs, kept-token metrics. Runs one at a time: recomputing a
    ranking configures debias_core, whose settings are process-wide (runs measured concurrently would mix them)."""
    with _MEASURE:
        return _measure(job, run_dir, record, split)


def _measure(job: Job, run_dir: Path, record: Path, split: Path) -> dict:
    from debias_core.calibrate import Recording
    from eval.answers import read_answers
    from eval.scoring import answer_normalizer, exact_match, read_answer_key

    from . import selection

    answers = read_answers(run_dir / "merge.jsonl")
    scored = exact_match(answers, read_answer_key(split / "answers.jsonl"), answer_normalizer())
    out = {"accuracy": scored["accuracy"], "n": scored["n"],
           "correct": {str(k): bool(v) for k, v in scored["correct"].items()}}
    if job.kind == "unpruned" or not record.exists():
        return out
    items = {str(r["question_id"]): r for r in map(json.loads, open(split / "items.jsonl"))}
    rec = Recording.load(record)
    args = dict(a.split("=", 1) for a in job.method_args)
    spec = _method_args(job.method, args)
    kept = selection.kept_sets(rec, mode=job.mode, trend=job.trend, method_key=job.method,
                               trend_method=trend_method(job.method), final_k=selection.final_budget(job.method, spec))
    out["selection"] = selection.per_question(kept, items)
    return out


def _method_args(method: str, given: dict) -> dict:
    """The method's defaults with the job's overrides, typed as the adapter types them."""
    from eval.methods.base import method_spec, parse_method_args

    spec = dict(method_spec(method)["args"])
    for k, v in parse_method_args([f"{k}={v}" for k, v in given.items()]).items():
        spec[k] = [float(x) for x in v.split(",")] if isinstance(spec.get(k), list) and isinstance(v, str) else v
    return spec


# Seconds per 600 evaluation questions of each method's runs on one H100 with 14 time-shared drivers (2026-12-06, means):
# the scheduler starts the costliest runs first, so that the last ones to finish are short and few drivers idle.
RUN_COST = {"tokencarve": 381, "sparsevlm": 314, "himap": 247, "pdrop": 141, "fastv": 133, "llava": 111,
            "illava": 102}


def job_cost(job: Job) -> tuple[bool, float]:
    """Sort key, largest first: calibration runs (they unlock the calibrated runs), then the expected run time."""
    return job.kind == "calibration", RUN_COST.get(job.method, 100.0)


def run_all(jobs: list[Job], out: Path, model: Path, data: Path, envs: Envs, *, limit, parallel: int,
            unlocks=None) -> tuple[list[dict], list[str]]:
    """Run the jobs, ``parallel`` at once, the costliest first (``job_cost``); returns the done records and one
    line per failed run. ``unlocks(record)`` may return more jobs once a job is done (a calibration run unlocks
    its method's calibrated runs), so no driver waits for a phase to end; a StudyError it raises is a failure."""
    from tqdm import tqdm

    queue = sorted(jobs, key=job_cost, reverse=True)
    results, failures, running = [], [], {}
    with cf.ThreadPoolExecutor(max_workers=parallel) as pool, \
            tqdm(total=len(jobs), unit="run", dynamic_ncols=True, file=sys.stderr, desc="study runs") as bar:
        while queue or running:
            while queue and len(running) < parallel:
                job = queue.pop(0)
                running[pool.submit(run_job, job, out, model, data, envs, limit=limit)] = job
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                del running[f]
                try:
                    record = f.result()
                    results.append(record)
                    more = unlocks(record) if unlocks else []
                except StudyError as e:
                    failures.append(str(e))
                    print(f"failed: {e}", file=sys.stderr)
                    more = []
                if more:
                    queue = sorted(queue + list(more), key=job_cost, reverse=True)
                    bar.total += len(more)
                    bar.refresh()
                bar.update(1)
    return results, failures


def calibrate_trends(results: list[dict], out: Path, fit: str = "lsq") -> None:
    """Fit each method's trend on its calibration recording (python -m debias_core.calibrate --fit FIT)."""
    trends = out / "trends"
    trends.mkdir(parents=True, exist_ok=True)
    for r in results:
        job = r["job"]
        dest = trend_file(trends, job["method"], fit)
        if dest.exists():
            continue
        record = out / "runs" / job["name"] / "record.npz"
        cmd = [sys.executable, "-m", "debias_core.calibrate", str(record), "--model", "llava-smollm2-study",
               "--method", trend_method(job["method"]), "--fit", fit, "--out", str(dest)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise StudyError(f"calibrating {job['method']} failed: {p.stderr.strip()[-400:]}")


def check_one_calibration_fit(out: Path, fit: str) -> None:
    """A study folder holds calibrated runs of one fit only (the report has one calibrated column)."""
    runs = Path(out) / "runs"
    others = sorted({p.name for p in runs.glob("*/*/full-calibrated*")} - {f"full-calibrated{calibrated_suffix(fit)}"})
    if others:
        raise StudyError(f"{out} already holds calibrated runs of another fit ({', '.join(others)}); this run asks "
                         f"for --calibration-fit {fit}: use another --out (carry the other runs over as needed)")


def finished_results(out: Path) -> list[dict]:
    """Every finished run's record under OUT/runs (its done.json), calibration runs included."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").rglob("done.json"))]


def report_main(argv=None) -> int:
    """``python -m study report --out DIR``: the report of the finished runs in DIR, e.g. when a run was cut off
    (a later ``python -m study run`` resumes and reports again)."""
    from .report import write_report

    p = argparse.ArgumentParser(prog="python -m study report", description=report_main.__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "study")
    p.add_argument("--model", type=Path, default=DEFAULT_OUT)
    p.add_argument("--note", default=None, help="a paragraph printed first in report.md (e.g. what is missing)")
    p.add_argument("--device", default=None, help="the machine the runs ran on, recorded in study.json")
    a = p.parse_args(argv)
    results = finished_results(a.out)
    if not results:
        print(f"error: no finished runs under {a.out / 'runs'}; run python -m study run first", file=sys.stderr)
        return 2
    if not (a.model / "study.json").is_file():
        print(f"error: {a.model} is not an assembled study checkpoint; run python -m study assemble", file=sys.stderr)
        return 2
    identity = model_identity(a.model)
    if any(r.get("made_with") and r["made_with"]["model"] != identity for r in results):
        print(f"error: runs under {a.out / 'runs'} were made with a checkpoint other than or beside {a.model} "
              f"(their done.json 'made_with'); report each study folder with its own checkpoint", file=sys.stderr)
        return 2
    settings = {"rebuilt_from": str(a.out), "device": a.device, "note": a.note,
                "n_eval": max(r.get("n", 0) for r in results)}
    print(write_report(a.out, results, a.out / "data" / "eval", skipped={},
                       settings=settings, model=a.model))
    return 0


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m study run", description=__doc__.split("\n")[0],
                                epilog="exit codes: 0 done, 1 a run failed, 2 usage or input error")
    p.add_argument("--out", type=Path, default=None,
                   help="default outputs/study (with --quick: outputs/study-quick, so that a slice and a full study "
                        "never share a folder)")
    p.add_argument("--model", type=Path, default=DEFAULT_OUT, help="assembled checkpoint (python -m study assemble)")
    p.add_argument("--quick", action="store_true",
                   help="a CPU slice: 16 questions, budget 64, modes off and full (paper trend), one random seed and "
                        "the grid")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--controls", default=",".join(CONTROLS))
    p.add_argument("--n-eval", type=int, default=2200,
                   help="evaluation questions (default 2200: the committed H100 study's 2,200 kept every off -> full "
                        "paired 95 %% interval within ±2.9 points; width scales as 1/sqrt(n); that study ran as two "
                        "parts of 1,100, see --eval-first-image)")
    p.add_argument("--eval-first-image", type=int, default=0,
                   help="run on a later part of the evaluation split, from this image on (question ids from 3x it), "
                        "to add questions to a finished study: carry its trends and calibration runs, then "
                        "python -m study merge the two folders (docs/study.md)")
    p.add_argument("--n-calib", type=int, default=300)
    p.add_argument("--no-calibrated", action="store_true", help="only the paper preset trends")
    p.add_argument("--calibration-fit", choices=("lsq", "loglinear"), default="lsq",
                   help="how the calibrated trend is fitted (debias_core.calibrate --fit): lsq, least squares on the "
                        "per-position means (default, the paper's presumed recipe), or loglinear, on their logarithm "
                        "(docs/study.md: the least-squares fit over-corrects on the study model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--carry", type=Path, default=None, help="a GPU machine's carried bundle (study.carry)")
    p.add_argument("--parallel", type=int, default=1, help="driver processes at once")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="leave out baselines whose environment or upstream is missing (listed in the report)")
    p.add_argument("--stop-after", choices=["calibration", "runs"], default=None)
    a = p.parse_args(argv)
    if a.out is None:
        a.out = ROOT / "outputs" / ("study-quick" if a.quick else "study")
    if a.quick:   # a CPU slice: one budget, off vs full with the paper trend, both controls, 16 questions
        a.budgets, a.modes, a.controls, a.no_calibrated = "64", "off,full", "random:0,grid", True
        a.n_eval = min(a.n_eval, 16)
        if a.device == "cpu" and a.parallel == 1:   # two single-threaded drivers: one loads while the other computes
            a.parallel = min(2, os.cpu_count() or 1)
    return a


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"--{what} {text!r} must be comma-separated integers") from None


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return study(a)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if "failed" in str(e) else 2


def study(a) -> int:
    from .checkpoint import image_start
    from .data import SPLIT_SEEDS, SplitError, generate_split
    from .report import write_report

    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StudyError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise StudyError(f"--modes {a.modes!r}: use some of {', '.join(MODES)}")
    budgets = _ints(a.budgets, "budgets")
    controls = [c for c in a.controls.split(",") if c]
    if not (a.model / "study.json").is_file():
        raise StudyError(f"{a.model} is not an assembled study checkpoint; run python -m study assemble")
    s0 = image_start(a.model)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if a.eval_first_image < 0:
        raise StudyError(f"--eval-first-image {a.eval_first_image} must be at least 0")
    for split, n, first in (("calib", a.n_calib, 0), ("eval", a.n_eval, a.eval_first_image)):
        try:
            generate_split(split, data / split, n_questions=n, seed=SPLIT_SEEDS[split], first_image=first)
        except SplitError as e:
            raise StudyError(str(e).removeprefix("error: ")) from None

    check_finished_runs(out, a.model, data)
    threads = max(1, (os.cpu_count() or 1) // a.parallel) if a.device == "cpu" and a.parallel > 1 else None
    envs = Envs(carry=a.carry, device=a.device, threads=threads)
    skipped = {}
    for m in list(methods):
        why = envs.available(m)
        if why:
            if not a.skip_unavailable:
                raise StudyError(f"{why}; pass --skip-unavailable to leave it out")
            skipped[m] = why
            methods.remove(m)
    if a.carry is None and methods:
        envs.trees = export_trees(out / "trees", methods)

    cal_jobs = [] if a.no_calibrated else calibration_jobs(methods, s0)
    trends = out / "trends"
    if a.stop_after == "calibration":
        cal, failed = run_all(cal_jobs, out, a.model, data, envs, limit=None, parallel=a.parallel)
        calibrate_trends(cal, out, a.calibration_fit)
        return 1 if failed else 0
    if skipped.get(CONTROL_METHOD):
        controls = []
    check_one_calibration_fit(out, a.calibration_fit)
    jobs = plan(methods, budgets, modes, controls, s0, trends, calibrated=not a.no_calibrated, fit=a.calibration_fit)
    # a method's calibrated runs wait for its calibration; every other run starts at once beside the calibrations
    waiting: dict[str, list[Job]] = {}
    for j in jobs:
        if j.trend_label == "calibrated":
            waiting.setdefault(j.method, []).append(j)

    def unlocks(record: dict) -> list[Job]:
        job = record["job"]
        if job["kind"] != "calibration":
            return []
        calibrate_trends([record], out, a.calibration_fit)
        return waiting.pop(job["method"], [])

    ready = [j for j in jobs if j.trend_label != "calibrated"]
    done, failed = run_all(cal_jobs + ready, out, a.model, data, envs, limit=None, parallel=a.parallel,
                           unlocks=unlocks)
    results = [r for r in done if r["job"]["kind"] != "calibration"]
    for line in failed:
        skipped[line.split(":", 1)[0]] = line
    for method, left in waiting.items():   # their calibration failed (named in `failed`)
        for j in left:
            skipped[j.name] = f"{j.name}: not run, {method}'s calibration failed"
    if a.stop_after != "runs":
        path = write_report(out, results, data / "eval", skipped=skipped, settings=vars(a),
                            model=a.model)
        print(path)
    if failed:
        print(f"error: {len(failed)} run(s) failed; first: {failed[0]}", file=sys.stderr)
        return 1
    return 0
