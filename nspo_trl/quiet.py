"""Known third-party noise, silenced where it comes from (and nothing else).

- transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on every
  use of the old names, which TRL 1.16's ``GRPOConfig`` and ``GRPOTrainer`` still use themselves: those
  deprecation messages are ignored for the modules that emit them (``transformers.training_args``,
  ``transformers.modeling_utils``), not FutureWarnings in general.
- DeepSpeed, imported by accelerate/TRL on a machine without a GPU, warns that it fell back to the CPU;
  on such a machine the command-line entry points tell it so up front (``DS_ACCELERATOR=cpu``), which is
  the setting DeepSpeed documents, so it has nothing to warn about. A GPU machine is left untouched.
"""

from __future__ import annotations

import os
import warnings

# (message, emitting module): the renamed field, and the renamed model methods
# (is_gradient_checkpointing, gradient_checkpointing_enable / _disable) TRL calls around generation
DEPRECATIONS = (
    (r"`gradient_checkpointing` is deprecated", r"transformers\.training_args"),
    (r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated", r"transformers\.modeling_utils"),
)


def ignore_known_deprecations() -> None:
    """Ignore exactly the deprecation warnings of ``DEPRECATIONS`` (message and emitting module)."""
    for message, module in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)


def quiet_command_line() -> None:
    """For ``nspo-trl`` / ``python -m nspo_trl.*``: the deprecations above, and DeepSpeed's CPU fallback."""
    ignore_known_deprecations()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
