"""Mutation check: apply one-line mistakes to a copy of the package and expect the tests to catch each.

    python tests/mutation_check.py            # every mutant; exit 1 if any survives
    python tests/mutation_check.py --list     # the mutants and the tests meant to kill them
    python tests/mutation_check.py --only W_ref   # the mutants whose name contains the text

Each mutant is an exact text replacement in one file of ``nspo_trl/`` (the script fails loudly if the
text is no longer there, so a refactor cannot silently retire a mutant). The package and the tests
are copied to a temporary folder, the mutant is applied there, and the named tests run against it
(``PYTHONPATH`` puts the copy first). A mutant is *killed* when those tests fail. Not collected by
pytest (its name does not start with ``test_``); it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTEGRITY = "tests/test_checkpoint_integrity.py"
INVARIANTS = "tests/test_invariants.py"
COPY_STATE = "copy_verified(source, checkpoint / NSPO_STATE_DIR, self._state_digests)"
COMMIT = "commit(checkpoint, self.state.global_step, self.projector_identity())"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "COMMITTED written before the nspo/ files",
        "nspo_trl/trainer/checkpointing.py",
        f"            {COPY_STATE}\n            {COMMIT}\n",
        f"            {COMMIT}\n            {COPY_STATE}\n",
        (f"{INTEGRITY}::test_commit_record_lists_every_file_with_its_digest",),
    ),
    Mutant(
        "save_total_limit not suspended: old checkpoints rotated before the new one is committed",
        "nspo_trl/trainer/checkpointing.py",
        "        self.args.save_total_limit = None\n",
        "        self.args.save_total_limit = limit\n",
        (f"{INTEGRITY}::test_older_checkpoints_are_rotated_only_after_the_new_one_is_committed",),
    ),
    Mutant(
        "W_ref not restored from the checkpoint on resume",
        "nspo_trl/trainer/checkpointing.py",
        "        self.constrained_update.load_reference(reference)\n",
        "        pass\n",
        ("tests/test_trainer_resume.py::test_resume_restores_state_and_continues_identically",),
    ),
    Mutant(
        "state hard-linked into checkpoints instead of copied",
        "nspo_trl/trainer/checkpointing.py",
        "    shutil.copytree(source, staging)\n",
        "    shutil.copytree(source, staging, copy_function=os.link)\n",
        (f"{INTEGRITY}::test_checkpoints_hold_copies_not_links",),
    ),
    Mutant(
        "copies of the state not checked against the digests taken when it was written",
        "nspo_trl/trainer/checkpointing.py",
        "    if copied != dict(digests):\n",
        "    if False:\n",
        (f"{INTEGRITY}::test_damage_to_the_state_source_is_not_copied_into_new_checkpoints",),
    ),
    Mutant(
        "an explicit checkpoint path resumed without verifying its digests",
        "nspo_trl/trainer/checkpointing.py",
        "        if not verified:\n",
        "        if False:\n",
        (f"{INTEGRITY}::test_explicit_resume_from_damaged_checkpoint_fails_in_one_line",),
    ),
    Mutant(
        "a checkpoint's size checked but not its content",
        "nspo_trl/trainer/checkpointing.py",
        ' or file_digest(path)["sha256"] != expected.get("sha256"):',
        ":",
        (f"{INTEGRITY}::test_damaged_checkpoint_is_named_and_refused",),
    ),
    Mutant(
        "resume with another projector setting accepted",
        "nspo_trl/trainer/checkpointing.py",
        "        if differing_fields(saved_identity, self.projector_identity()):\n",
        "        if False:\n",
        (f"{INTEGRITY}::test_resume_with_another_projector_setting_is_refused",),
    ),
    Mutant(
        "drift KL with its arguments swapped",
        "nspo_trl/eval/drift.py",
        "kl = (log_q.exp() * (log_q - log_p)).sum(-1)",
        "kl = (log_p.exp() * (log_p - log_q)).sum(-1)",
        (f"{INVARIANTS}::test_drift_kl_matches_a_hand_computed_value",),
    ),
    Mutant(
        "drift KL averaged over the vocabulary instead of summed",
        "nspo_trl/eval/drift.py",
        "kl = (log_q.exp() * (log_q - log_p)).sum(-1)",
        "kl = (log_q.exp() * (log_q - log_p)).mean(-1)",
        (f"{INVARIANTS}::test_drift_kl_matches_a_hand_computed_value",),
    ),
    Mutant(
        "the trainer ignores nspo_covariance_dtype",
        "nspo_trl/nullspace/build.py",
        "            dtype=settings.covariance_torch_dtype,\n",
        "            dtype=torch.float64,\n",
        (f"{INVARIANTS}::test_trainer_accumulates_covariances_in_the_configured_dtype",),
    ),
    Mutant(
        "held-out probes collected from the fit split",
        "nspo_trl/nullspace/build.py",
        'modules, heldout, covariance=False, description="NSPO held-out probes"',
        'modules, fit, covariance=False, description="NSPO held-out probes"',
        (f"{INVARIANTS}::test_heldout_probes_come_from_heldout_examples_only",),
    ),
    Mutant(
        "a protected layer's bias left trainable",
        "nspo_trl/nullspace/freezing.py",
        "            layer.linear.bias.requires_grad_(False)",
        "            pass",
        (f"{INVARIANTS}::test_protected_biases_are_frozen_and_unchanged",),
    ),
    Mutant(
        "ranks' owner maps never compared",
        "nspo_trl/nullspace/build.py",
        '        check_agreement(owners, "group owners")\n',
        "",
        (f"{INVARIANTS}::test_trainer_checks_that_ranks_agree_on_owners",),
    ),
    Mutant(
        "projection skipped after optimizer steps",
        "nspo_trl/trainer/callback.py",
        "        if every and (state.global_step + 1) % every == 0:\n            self.trainer.project_updates()",
        "        if False:\n            self.trainer.project_updates()",
        ("tests/test_trainer.py::test_mlp_targets_twenty_steps_leak_nothing",),
    ),
    Mutant(
        "push_to_hub uploads the projector without nspo_push_projector",
        "nspo_trl/trainer/hub.py",
        '({"nspo_projector"} if self.args.nspo_push_projector else set())',
        '{"nspo_projector"}',
        ("tests/test_hub.py::test_push_to_hub_sends_the_model_and_card_only",),
    ),
    Mutant(
        "--dry-run printed by every rank of a launch",
        "nspo_trl/cli/train.py",
        'if int(os.environ.get("RANK", "0")) != 0:',
        "if False:",
        ("tests/test_recipes.py::test_dry_run_prints_once_per_launch",),
    ),
    Mutant(
        "safety_mix trains without the benign-but-alarming prompts",
        "nspo_trl/data/named_sets.py",
        '            (_bundled("overrefusal_train_prompts"), "overrefusal"),\n',
        "",
        ("tests/test_safety_sets.py::test_safety_mix_trains_on_alarming_benign_prompts_and_tests_on_others",),
    ),
    Mutant(
        "W_ref re-taken on resume from the weights as loaded from the checkpoint",
        "nspo_trl/trainer/callback.py",
        "        if args.nspo_project_every and state.global_step == 0:\n",
        "        if state.global_step:  # resumed: anchor to the weights as loaded\n"
        "            self.trainer.constrained_update.load_reference(\n"
        "                {layer.name: layer.linear.weight.detach() for layer in self.trainer.protected_layers}\n"
        "            )\n"
        "        if args.nspo_project_every and state.global_step == 0:\n",
        (f"{INVARIANTS}::test_resume_anchors_to_the_saved_reference_not_to_the_loaded_weights",),
    ),
    Mutant(
        "held-out leakage computed on the fit examples' inputs",
        "nspo_trl/trainer/nspo_trainer.py",
        "self.constrained_update.leakage(self.projector.probes.get(split, {}))",
        'self.constrained_update.leakage(self.projector.probes.get("fit", {}))',
        (f"{INVARIANTS}::test_heldout_leakage_is_measured_on_heldout_inputs",),
    ),
]


def copy_tree(destination: Path) -> None:
    for name in ("nspo_trl", "tests"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("recipes", "accelerate_configs"):  # links into the package, as in the repository
        (destination / name).symlink_to(os.readlink(ROOT / name))
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, destination / name)


def tests_pass(tests: list[str], work: Path) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(work)},
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


def run_mutant(mutant: Mutant, work: Path) -> tuple[bool, float]:
    """Apply ``mutant`` in ``work``, run its tests, restore the file; (killed, seconds)."""
    target = work / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutation_check: {mutant.name!r}: the text to mutate is not in {mutant.path} exactly once")
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.time()
    try:
        killed = not tests_pass(list(mutant.tests), work)
    finally:
        target.write_text(original)
    return killed, time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--only", default=None, help="run the mutants whose name contains this text")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or args.only.lower() in m.name.lower()]
    if not mutants:
        raise SystemExit(f"mutation_check: --only: no mutant's name contains {args.only!r} (see --list)")
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}  [{mutant.path}]  -> {', '.join(mutant.tests)}")
        return 0
    survivors = []
    with tempfile.TemporaryDirectory(prefix="nspo-mutants-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        guards = sorted({test for mutant in mutants for test in mutant.tests})
        if not tests_pass(guards, work):  # a test that fails anyway would "kill" every mutant
            raise SystemExit("mutation_check: the guarding tests fail on the unmutated code; fix them first")
        print(f"unmutated: {len(guards)} guarding tests pass", flush=True)
        for mutant in mutants:
            killed, seconds = run_mutant(mutant, work)
            print(f"{'KILLED  ' if killed else 'SURVIVED'} {seconds:6.1f} s  {mutant.name}", flush=True)
            if not killed:
                survivors.append(mutant.name)
    print(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
