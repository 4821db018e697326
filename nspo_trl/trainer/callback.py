"""Where in the transformers training loop the projection runs.

Per optimizer step ``t`` (gradient ``g``, protected weight ``W``, projector ``P``):

1. ``on_pre_optimizer_step``: on logging steps, measure ``‖gP‖/‖g‖``; with ``nspo_project_gradients``,
   ``g ← gP`` so that Adam's moments live in the null space too;
2. ``on_optimizer_step``: every ``nspo_project_every`` steps, ``W ← W_ref + (W − W_ref) P``;
3. ``on_step_end``: before a checkpoint or the end of training, project what an interval left unprojected.

The callback only decides *when*; what happens is the trainer's public methods
(:meth:`NSPOTrainer.project_updates`, :meth:`~NSPOTrainer.project_gradients`,
:meth:`~NSPOTrainer.measure_gradients`, :meth:`~NSPOTrainer.mark_unprojected`,
:meth:`~NSPOTrainer.leakage`), which a subclass can override.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import TrainerCallback

if TYPE_CHECKING:
    from nspo_trl.trainer.nspo_trainer import NSPOTrainer


class NSPOCallback(TrainerCallback):
    """Runs the projection of ``trainer`` at the right points of the training loop (module docstring)."""

    def __init__(self, trainer: NSPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # fresh start: LoRA needs A ← A P for its random init (a no-op at W = W_ref otherwise). A resumed
        # run is already projected, and re-projecting would only add fp32 round-off to a bitwise resume.
        if args.nspo_project_every and state.global_step == 0:
            self.trainer.project_updates()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # gradients are visible here (DeepSpeed keeps them in its partitions); measure only on logging steps
        if self.trainer.is_deepspeed_enabled:
            return
        if args.logging_steps and (state.global_step + 1) % max(int(args.logging_steps), 1) == 0:
            self.trainer.measure_gradients()
        if args.nspo_project_every and args.nspo_project_gradients:
            self.trainer.project_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        every = args.nspo_project_every
        if every and (state.global_step + 1) % every == 0:
            self.trainer.project_updates()
        else:
            self.trainer.mark_unprojected()

    def on_step_end(self, args, state, control, **kwargs):
        # with an interval > 1, never let a checkpoint or the final model hold unprojected weights
        finishing = control.should_save or control.should_training_stop or state.global_step >= state.max_steps
        if args.nspo_project_every and self.trainer.has_unprojected_updates and finishing:
            self.trainer.project_updates()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.leakage()  # collective: the final figures for the model card
