"""nspo_trl: Null-Space constrained Policy Optimization (arXiv 2512.11391) on Hugging Face TRL."""

__version__ = "0.1.0"

from nspo_trl.config import NSPOConfig
from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.quiet import ignore_known_deprecations
from nspo_trl.rewards import refusal_reward
from nspo_trl.trainer import NSPOTrainer

ignore_known_deprecations()  # TRL's own use of transformers' renamed gradient_checkpointing (see quiet.py)

__all__ = ["NSPOConfig", "NSPOTrainer", "NullSpaceProjector", "NullSpaceRule", "SubspaceFactor", "refusal_reward"]
