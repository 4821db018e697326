"""Capability suite through EleutherAI's ``lm-eval`` (gsm8k, ifeval, mmlu, … or any task it knows).

The scores are lm-eval's own; this module only runs it on a checkpoint and keeps each task's
numeric metrics (``{task: {"acc,none": 0.61, "acc_stderr,none": 0.01, …}}``). ``include_path`` adds
task YAMLs from a directory (e.g. a local copy of a benchmark, for machines without the Hub).
"""

from __future__ import annotations


def capability_report(
    model_path: str,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    include_path: str | None = None,
    backend: str = "auto",
) -> dict[str, dict[str, float]]:
    """lm-eval's numeric results per task for ``model_path`` (``backend``: ``hf``, ``vllm`` or ``auto``)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("suite capability: needs lm-eval; pip install 'nspo_trl[eval]'.") from None
    import torch
    from trl.import_utils import is_vllm_available

    if backend == "auto":
        backend = "vllm" if is_vllm_available() else "hf"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"capability_tasks: lm-eval knows no task {unknown} (add --capability_include_path DIR?).")
    results = lm_eval.simple_evaluate(
        model=backend,
        model_args={"pretrained": model_path, "dtype": "auto"},
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
    )
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for task, metrics in results["results"].items()
    }


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The task's main score: the first of acc / exact_match / prompt-level strict accuracy it reports."""
    for prefix in ("acc,", "exact_match,", "prompt_level_strict_acc,", "acc_norm,"):
        for name, value in metrics.items():
            if name.startswith(prefix):
                return name, value
    return None
