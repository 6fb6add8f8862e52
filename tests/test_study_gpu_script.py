"""scripts/study_gpu.sh train: a training run that fails or is refused (e.g. its folder holds a finished run)
stops the script, so an earlier run's weights are never copied out or assembled as if they were this run's."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stubs(bin_dir: Path, log: Path, train_rc: int) -> None:
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "python3 $*" >> "{log}"\n'
        f'if [[ "$*" == *"study train"* ]]; then echo "error: training there finished" >&2; exit {train_rc}; fi\n'
        "exit 0\n")
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA Stub, 1 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def _train(tmp_path, train_rc):
    log, out, dest = tmp_path / "calls.log", tmp_path / "out", tmp_path / "earlier-run"
    dest.mkdir()
    (dest / "trained.safetensors").write_bytes(b"weights of an earlier run")
    (dest / "train.json").write_text("{}")
    _stubs(tmp_path / "bin", log, train_rc)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OUT=str(out), TRAIN_OUT=str(dest))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh"), "train", "1"], env=env, capture_output=True,
                       text=True, timeout=60)
    return r, log.read_text(), out


def test_a_refused_training_run_stops_before_copying_or_assembling(tmp_path):
    r, calls, out = _train(tmp_path, train_rc=1)
    assert r.returncode == 1, r.stderr
    assert "training exited 1" in r.stderr
    assert "study assemble" not in calls
    assert not (out / "trained.safetensors").exists()


def test_a_finished_training_run_is_copied_and_assembled(tmp_path):
    r, calls, out = _train(tmp_path, train_rc=0)
    assert r.returncode == 0, r.stderr
    assert "study assemble --trained" in calls and str(tmp_path / "earlier-run") in calls
    assert (out / "trained.safetensors").read_bytes() == b"weights of an earlier run"
