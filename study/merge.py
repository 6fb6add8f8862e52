"""``python -m study merge PART PART ... --out DIR``: one study from studies run on disjoint parts of the evaluation
split, so that a study too long for one sitting (or a finished one given more questions) is reported as one.

A part is a study folder whose evaluation split was written with ``--eval-first-image`` (``python -m study run
--eval-first-image K``; ``generate_split(first_image=K)``): the same seeded split, later images. The merge refuses
anything that would mix unlike runs: parts must share the split's seed and generator, the checkpoint, the
calibrated trend files (byte for byte: carry the first part's ``trends`` and calibration runs to the later ones)
and the set of runs; their images must not overlap. Each merged run's ``done.json`` holds the union of the parts'
per-question records (``correct``, ``selection``) and the accuracy over all of them; ``parts`` says where each
came from. ``python -m study report --out DIR`` then reports the whole.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from debias_core.calibrate import file_sha256

from .data import SPLIT_IDENTITY
PER_QUESTION = ("correct", "selection")
RUN_KEYS = {"job", "run_dir", "seconds", "made_with", "accuracy", "n", *PER_QUESTION}


class MergeError(Exception):
    """Parts that cannot be merged (one line naming the part and the fix)."""


def merge(parts: list[Path], out: Path) -> dict:
    """Write the merged study folder ``out``; returns a summary {runs, questions, parts}."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    if len(parts) < 2:
        raise MergeError("give at least two study folders to merge")
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} exists and is not empty; merge into a new folder")
    manifests = [_eval_manifest(p) for p in parts]
    _check_same_split(parts, manifests)
    order = sorted(range(len(parts)), key=lambda i: manifests[i].get("first_image", 0))
    parts, manifests = [parts[i] for i in order], [manifests[i] for i in order]
    _check_disjoint_images(parts, manifests)
    _check_same_trends(parts)
    runs = [_eval_runs(p) for p in parts]
    _check_same_runs(parts, runs)

    tmp = out.parent / f".{out.name}.merging"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        n = _merge_data(parts, manifests, tmp / "data" / "eval")
        if (parts[0] / "data" / "calib").is_dir():
            shutil.copytree(parts[0] / "data" / "calib", tmp / "data" / "calib")
        if (parts[0] / "trends").is_dir():
            shutil.copytree(parts[0] / "trends", tmp / "trends")
        _copy_calibration(parts, tmp)
        for name in runs[0]:
            record = merge_run([r[name] for r in runs], parts, out.resolve() / "trends")
            if record["made_with"]["questions"] != n:
                raise MergeError(f"run {name}: its parts hold {record['made_with']['questions']} questions, the "
                                 f"merged split {n}")
            dest = tmp / "runs" / name
            dest.mkdir(parents=True)
            (dest / "done.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"runs": len(runs[0]), "questions": n, "parts": [str(p) for p in parts]}


def merge_run(records: list[dict], parts: list[Path], trends: Path) -> dict:
    """One run's done.json records on disjoint question sets -> the record over all of them."""
    first = records[0]
    for part, r in zip(parts, records):
        unknown = set(r) - RUN_KEYS
        if unknown:
            raise MergeError(f"{part}: run {r['job']['name']} has fields this merge does not know "
                             f"({', '.join(sorted(unknown))}); update study.merge")
        if _trend_moved(r["job"], Path()) != _trend_moved(first["job"], Path()):
            raise MergeError(f"{part}: run {r['job']['name']} was run with other settings than in {parts[0]}")
        if r["made_with"]["model"] != first["made_with"]["model"]:
            raise MergeError(f"{part}: run {r['job']['name']} was made with other weights than in {parts[0]}")
        if ("selection" in r) != ("selection" in first):
            raise MergeError(f"{part}: run {r['job']['name']} has kept-token measures in some parts only")
    merged = {"job": _trend_moved(first["job"], trends), "run_dir": [r["run_dir"] for r in records],
              "seconds": round(sum(r["seconds"] for r in records), 1),
              "made_with": {"model": first["made_with"]["model"],
                            "questions": sum(r["made_with"]["questions"] for r in records)}}
    for key in PER_QUESTION:
        if key not in first:
            continue
        union: dict = {}
        for part, r in zip(parts, records):
            shared = union.keys() & r[key].keys()
            if shared:
                raise MergeError(f"{part}: run {r['job']['name']} repeats questions of an earlier part "
                                 f"({sorted(shared)[0]} ...)")
            union.update(r[key])
        merged[key] = dict(sorted(union.items()))
    merged["n"] = len(merged["correct"])
    merged["accuracy"] = 100.0 * sum(merged["correct"].values()) / merged["n"]
    merged["parts"] = [{"from": str(p), "n": r["n"], "accuracy": r["accuracy"]} for p, r in zip(parts, records)]
    return merged


def _trend_moved(job: dict, trends: Path) -> dict:
    """The job with its calibrated trend file (if any) named in the folder ``trends`` (the parts ran in different
    folders; ``Path()`` leaves the bare file name, to compare jobs)."""
    moved = dict(job)
    if (moved.get("trend") or "").startswith("calibrated:"):
        moved["trend"] = f"calibrated:{trends / Path(moved['trend'].split(':', 1)[1]).name}"
    return moved


def _eval_manifest(part: Path) -> dict:
    path = part / "data" / "eval" / "manifest.json"
    if not path.is_file():
        raise MergeError(f"{part}: no data/eval/manifest.json; give study folders written by python -m study run")
    manifest = json.loads(path.read_text())
    if "parts" in manifest:
        raise MergeError(f"{part} is itself a merge; merge the original parts together")
    return manifest


def _check_same_split(parts, manifests) -> None:
    for part, m in zip(parts[1:], manifests[1:]):
        differ = [k for k in SPLIT_IDENTITY if m.get(k) != manifests[0].get(k)]
        if differ:
            raise MergeError(f"{part}: its evaluation split differs from {parts[0]}'s in "
                             f"{', '.join(f'{k}={m.get(k)!r} vs {manifests[0].get(k)!r}' for k in differ)}")


def _check_disjoint_images(parts, manifests) -> None:
    for i in range(1, len(parts)):
        prev, cur = manifests[i - 1], manifests[i]
        end = prev.get("first_image", 0) + prev["n_images"]
        if cur.get("first_image", 0) < end:
            raise MergeError(f"{parts[i]}: its images start at {cur.get('first_image', 0)}, inside {parts[i - 1]}'s "
                             f"(up to {end - 1}); run the later part with --eval-first-image {end}")


def _check_same_trends(parts) -> None:
    def contents(part):
        return {f.name: f.read_bytes() for f in (part / "trends").glob("*.json")}

    first = contents(parts[0])
    for part in parts[1:]:
        d = contents(part)
        differ = sorted(name for name in first.keys() & d.keys() if first[name] != d[name])
        missing = sorted(first.keys() ^ d.keys())
        if differ or missing:
            raise MergeError(f"{part}: its calibrated trends differ from {parts[0]}'s "
                             f"({', '.join(differ + missing)}); run later parts with the first part's trends and "
                             f"calibration runs carried over, so every part uses the same trend")


def _eval_runs(part: Path) -> dict[str, dict]:
    runs = {}
    for done in sorted((part / "runs").rglob("done.json")):
        record = json.loads(done.read_text())
        if record["job"]["split"] == "eval":
            runs[record["job"]["name"]] = record
    if not runs:
        raise MergeError(f"{part}: no finished evaluation runs under {part / 'runs'}")
    return runs


def _check_same_runs(parts, runs) -> None:
    for part, r in zip(parts[1:], runs[1:]):
        missing, extra = sorted(runs[0].keys() - r.keys()), sorted(r.keys() - runs[0].keys())
        if missing or extra:
            raise MergeError(f"{part}: its finished runs differ from {parts[0]}'s (missing: {', '.join(missing) or '-'};"
                             f" only here: {', '.join(extra) or '-'}); finish the same runs in every part")


def _merge_data(parts, manifests, dest: Path) -> int:
    """Concatenate the parts' evaluation files (in image order) and copy their images; returns the questions."""
    (dest / "images").mkdir(parents=True)
    for name in ("questions.jsonl", "answers.jsonl", "items.jsonl"):
        with open(dest / name, "w", encoding="utf-8") as f:
            for part in parts:
                f.write((part / "data" / "eval" / name).read_text(encoding="utf-8"))
    for part in parts:
        for image in sorted((part / "data" / "eval" / "images").glob("*.png")):
            shutil.copy2(image, dest / "images" / image.name)
    n = sum(m["n_questions"] for m in manifests)
    manifest = {k: manifests[0].get(k) for k in SPLIT_IDENTITY}
    manifest.update(n_questions=n, n_images=sum(m["n_images"] for m in manifests),
                    items_sha256=file_sha256(dest / "items.jsonl"),
                    parts=[{"from": str(p), "first_image": m.get("first_image", 0), "n_images": m["n_images"],
                            "n_questions": m["n_questions"], "items_sha256": m["items_sha256"]}
                           for p, m in zip(parts, manifests)])
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return n


def _copy_calibration(parts, dest: Path) -> None:
    """The calibration runs (the same in every part: carried over) from the part that kept their recordings
    (the report's figures are drawn from them), else from the first."""
    have = [p for p in parts if (p / "runs" / "calibration").is_dir()]
    if not have:
        return
    source = next((p for p in have if any((p / "runs" / "calibration").rglob("record.npz"))), have[0])
    shutil.copytree(source / "runs" / "calibration", dest / "runs" / "calibration")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study merge", description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="+", type=Path, help="study folders run on disjoint parts of the evaluation split")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the merged study")
    a = p.parse_args(argv)
    try:
        summary = merge(a.parts, a.out)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {summary['runs']} runs over {summary['questions']} questions from {len(summary['parts'])} parts "
          f"into {a.out}; next: python -m study report --out {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
