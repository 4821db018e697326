"""Memory planning before a run: per-rank GPU memory of a recipe (``plan.py``) from the model's shapes
(``gpu_budget.py``). ``python -m nspo_trl.planning RECIPE`` or ``nspo-trl plan RECIPE``."""
