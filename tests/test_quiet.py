"""Quiet by default: the known third-party warnings are gone from a run, and nothing else is hidden."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import nspo_trl.utils


def test_only_the_known_deprecations_are_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        nspo_trl.utils.ignore_known_deprecations()
        warnings.warn_explicit("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "training_args.py", 1, module="transformers.training_args")  # fmt: skip
        warnings.warn_explicit("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "mine.py", 1, module="my_package.config")  # fmt: skip
        warnings.warn_explicit("something else is deprecated", FutureWarning, "training_args.py", 1,
                               module="transformers.training_args")  # fmt: skip
    assert [str(w.message) for w in caught] == [
        "`gradient_checkpointing` is deprecated and will be removed in v6.",
        "something else is deprecated",
    ]
    assert {w.filename for w in caught} == {"mine.py", "training_args.py"}


def test_the_smoke_run_prints_no_warning(tmp_path):
    """The default job from the command line: no FutureWarning, no DeepSpeed CPU warning."""
    command = [str(Path(sys.executable).parent / "nspo-trl"), "train", "--max_steps", "2", "--output_dir", "out",
               "--gradient_checkpointing", "true"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "Warning" not in output and "WARNING" not in output, output[-3000:]
    assert "NSPO projector:" in result.stderr  # the summary is logged, not lost with the warnings
    assert "\r" not in output, "a progress bar redrawn in a file: " + output[output.index("\r") - 200 :][:400]


def test_progress_bars_only_at_a_terminal():
    import io
    from types import SimpleNamespace

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    args = SimpleNamespace(disable_tqdm=False)
    assert not nspo_trl.utils.plain_output_when_piped(args, stream=Terminal())
    assert args.disable_tqdm is False
    assert nspo_trl.utils.plain_output_when_piped(args, stream=io.StringIO())
    assert args.disable_tqdm is True
    assert nspo_trl.utils.progress_bar_disabled(False) is True
    assert nspo_trl.utils.progress_bar_disabled(True) is None  # tqdm then checks for a terminal itself
