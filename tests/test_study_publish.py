"""python -m study publish keeps the whole training on record: publishing on top of an earlier manifest keeps that
manifest's own earlier stages, and the total training time counts every stage once."""
import json

from study import publish as P


def _train(path, seconds, val):
    path.mkdir(parents=True)
    (path / "trained.safetensors").write_bytes(b"weights-" + str(seconds).encode())
    (path / "train.json").write_text(json.dumps({"settings": {"minutes": seconds / 60}, "steps": 10,
                                                 "seconds": seconds, "final_val_exact": val, "history": []}))
    return path


def test_republishing_keeps_every_earlier_stage(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    monkeypatch.setattr(P, "WEIGHTS", weights)
    P.publish(_train(tmp_path / "s2", 200.0, 0.5), command="stage 2",
              lineage=[_train(tmp_path / "s1", 100.0, 0.3) / "train.json"])
    first = tmp_path / "manifest-2.json"
    first.write_text((weights / "manifest.json").read_text())
    P.publish(_train(tmp_path / "s3", 300.0, 0.9), command="stage 3", lineage=[first])
    m = json.loads((weights / "manifest.json").read_text())
    assert [st["training"]["seconds"] for st in m["lineage"]] == [100.0, 200.0]
    assert m["lineage"][1]["command"] == "stage 2" and m["training"]["final_val_exact"] == 0.9
    assert m["total_training_seconds"] == 600.0
    assert (weights / "trained.safetensors").read_bytes() == b"weights-300.0"
