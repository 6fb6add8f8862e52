"""``python -m study publish RUN --command "..."``: copy a training run's weights into study/weights/ with a manifest
(sha256, the command, data seeds, git sha, the training summary) so that ``python -m study assemble`` can check them.

A run started with ``--init`` continues earlier runs: ``--lineage`` takes their train.json files (or an earlier
manifest.json), oldest first, and the manifest keeps their summaries, so the whole training is on record."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .checkpoint import ROOT, WEIGHTS, sha256


def _summary(train: dict) -> dict:
    history = train.get("history", [])
    return {"settings": train.get("settings"), "steps": train.get("steps"), "seconds": train.get("seconds"),
            "device": train.get("device"), "torch": train.get("torch"), "final_val_exact": train.get("final_val_exact"),
            "validation": train.get("validation") or [h for h in history if "val_exact" in h]}


def _stages(path: Path) -> list[dict]:
    """The training stages a lineage file records: a train.json is one; an earlier manifest.json is its own
    lineage (oldest first) and then its last stage, so publishing again never drops the stages before it."""
    record = json.loads(Path(path).read_text())
    if "training" in record:        # an earlier manifest.json
        return [*record.get("lineage", []),
                {"source": Path(path).name, "command": record.get("command"), "training": record["training"],
                 "sha256": record["files"]["trained.safetensors"]["sha256"]}]
    return [{"source": Path(path).name, "training": _summary(record)}]


def publish(run: Path, *, command: str, lineage: list[Path] = ()) -> Path:
    run = Path(run)
    trained, record = run / "trained.safetensors", run / "train.json"
    for f in (trained, record):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; publish the --out folder of a finished python -m study train")
    train = json.loads(record.read_text())
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, WEIGHTS / "trained.safetensors")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    stages = [st for p in lineage for st in _stages(p)]
    manifest = {
        "files": {"trained.safetensors": {"sha256": sha256(WEIGHTS / "trained.safetensors"),
                                          "bytes": (WEIGHTS / "trained.safetensors").stat().st_size}},
        "command": command, "git_sha_at_publish": git,
        "data": {"training_stream_seed": "study.train.TRAIN_SEED + 100000 * seed (+ step on resume)",
                 "validation_seed": "study.train.VALIDATION_SEED + seed", "splits": "study.data.SPLIT_SEEDS"},
        "training": _summary(train),
        "lineage": stages,
        "total_training_seconds": round(sum(st["training"].get("seconds") or 0 for st in stages)
                                        + (train.get("seconds") or 0), 1),
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return WEIGHTS
