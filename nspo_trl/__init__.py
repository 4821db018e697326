"""nspo_trl: Null-Space constrained Policy Optimization (arXiv 2512.11391) on Hugging Face TRL."""

__version__ = "0.1.0"

from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.rewards import refusal_reward
from nspo_trl.trainer.nspo_config import NSPOConfig
from nspo_trl.trainer.nspo_trainer import NSPOTrainer
from nspo_trl.utils import ignore_known_deprecations

ignore_known_deprecations()  # TRL's own use of transformers' renamed gradient_checkpointing (see quiet.py)

__all__ = ["NSPOConfig", "NSPOTrainer", "NullSpaceProjector", "NullSpaceRule", "SubspaceFactor", "refusal_reward"]
