"""The trainer: ``NSPOTrainer`` (TRL's ``GRPOTrainer`` with null-space constrained updates) and its config.

- ``nspo_config.py``: :class:`NSPOConfig`, a ``GRPOConfig`` with the ``nspo_*`` fields;
- ``nspo_trainer.py``: :class:`NSPOTrainer`, the TRL glue;
- ``callback.py``: where in the training loop the projection runs;
- ``checkpointing.py``: the NSPO state in checkpoints, verified on resume;
- ``hub.py``: the model card and what ``push_to_hub`` uploads;
- ``vllm_sync.py``: how projected weights reach vLLM.
"""

from nspo_trl.trainer.nspo_config import NSPOConfig
from nspo_trl.trainer.nspo_trainer import NSPOTrainer, grad_null_fraction_metric

__all__ = ["NSPOConfig", "NSPOTrainer", "grad_null_fraction_metric"]
