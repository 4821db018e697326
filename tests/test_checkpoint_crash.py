"""Kill a smoke run in the middle of a checkpoint save: the last committed checkpoint survives and resumes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from nspo_trl.cli.train import cli

REPO = Path(__file__).resolve().parent.parent


def committed(checkpoint: Path) -> bool:
    return (checkpoint / "nspo" / "COMMITTED").is_file()


def run_until_killed_mid_save(out: Path, model: Path) -> Path | None:
    """Start the smoke job; SIGKILL it while a checkpoint exists that is not committed yet."""
    command = [
        sys.executable, "-m", "nspo_trl.train", "recipes/smoke.yaml", "--model_name_or_path", str(model),
        "--output_dir", str(out), "--max_steps", "400", "--save_steps", "2", "--logging_steps", "100",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            checkpoints = list(out.glob("checkpoint-*"))
            pending = [c for c in checkpoints if not committed(c)]
            if pending and any(committed(c) for c in checkpoints):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return next((c for c in pending if not committed(c)), None)
            time.sleep(0.0005)
        return None
    finally:
        process.kill()
        process.wait()


def test_kill_during_save_then_resume(tmp_path, monkeypatch):
    out, model = tmp_path / "out", tmp_path / "tiny"
    victim = None
    for _ in range(5):  # the save takes milliseconds: retry if the kill landed after the commit
        shutil.rmtree(out, ignore_errors=True)
        victim = run_until_killed_mid_save(out, model)
        if victim is not None:
            break
    assert victim is not None, "could not interrupt a checkpoint save"
    step = int(victim.name.split("-")[1])
    previous = out / f"checkpoint-{step - 2}"
    assert committed(previous)
    assert json.loads((previous / "nspo" / "COMMITTED").read_text())["global_step"] == step - 2

    monkeypatch.chdir(REPO)
    code = cli([
        "recipes/smoke.yaml", "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps",
        str(step + 2), "--save_steps", "2", "--logging_steps", "100", "--resume_from_checkpoint", "true",
    ])  # fmt: skip
    assert code == 0
    assert (out / f"incomplete-checkpoint-{step}").is_dir()  # set aside, not resumed from
    final = out / f"checkpoint-{step + 2}"
    assert committed(final)
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
    # it resumed from the committed step - 2, so it wrote (and committed) step `step` itself
    assert committed(out / f"checkpoint-{step}")
