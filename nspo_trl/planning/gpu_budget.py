"""The whole per-GPU memory budget of a recipe, phase by phase, from its model config alone.

Three phases hold different things on the most loaded GPU (bytes; ``P`` model parameters, ``N``
processes, ``G`` the GPU's memory):

**build** (``NSPOTrainer.__init__``, before DeepSpeed creates the optimizer):
    model shard        ZeRO-3: ``2P/N`` (bf16, partitioned at load); otherwise the loaded model, ``P·w``
    gathered module    ZeRO-3 only: the preservation forward gathers one module at a time, at most the
                       embeddings or ``lm_head``: ``2·V·h``
    covariances        the largest pass of ``nspo_build_memory_gb`` (``plan.memory_plan``), every copy
                       held per group (``C``, and ``C_train``, ``C_benign`` for a contrast subspace)
    eigh workspace     float64 ``eigh`` of the rank's widest owned group ``n``: a copy of ``C``, the
                       eigenvectors and LAPACK ``syevd``'s ``1 + 6n + 2n²`` words: ``(4n² + 6n + 1)·8``;
                       a contrast subspace ``(9n² + 6n + 1)·8`` (``contrast_host_bytes``);
                       0 with ``nspo_eigh_on_cpu`` (then host RAM)
    forward            preservation batch ``b_p × s_p`` tokens: bf16 logits ``·V·2`` and one MLP's
                       intermediates ``·(2f + 4h)·2``
    NSPO state         ``W_ref`` + projector bases owned by the rank (``plan.memory_plan``); with
                       ``nspo_projector_offload`` the bases are in host RAM and only ``W_ref`` counts
    vLLM               colocated and awake: ``vllm_gpu_memory_utilization · G``; asleep (sleep mode,
                       which TRL enters right after start-up) or a server elsewhere: 0
**generation** (vLLM colocated generates; the training state stays resident):
    training state     ZeRO-3 ``16P/N`` (bf16 weights + bf16 grads + fp32 master, Adam m, v);
                       ZeRO-2 ``2P + 14P/N``; DDP ``16P`` (fp32 weights, grads, m, v); LoRA: ``P·w``
    NSPO state, vLLM   as above (vLLM awake)
**training** (forward + backward of one micro-batch of ``T = b·(s_prompt + s_completion)`` tokens):
    training state, NSPO state
    live parameters    ZeRO-3: ``2·min(P, 1e9)`` (DeepSpeed's ``stage3_max_live_parameters``)
    activations        per layer and token ``a = (6h + 4f + 2·kv·d)·2`` bytes; with gradient
                       checkpointing ``L·T·h·2 + T·a`` (saved layer inputs + one recomputed layer),
                       without ``L·T·a``
    logits             ``T·V·6`` (bf16 logits and their fp32 log-softmax)
    projection         the widest protected weight gathered in fp32 with its anchor and delta: ``3·m·n·4``;
                       with ``nspo_projector_offload`` also the widest basis copied in: ``n·⌊n/2⌋·4``
    vLLM               colocated without sleep mode: ``utilization · G``; otherwise 0

Each phase totals its terms; a phase over ``G`` does not fit, and its largest term is named.
These are estimates of the big terms (allocator fragmentation, CUDA context and communication
buffers are not counted), meant to catch a recipe that cannot fit, not to prove one fits to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from nspo_trl.planning.shapes import model_parameters, model_shape

GiB = 2**30
DEEPSPEED_MAX_LIVE_PARAMETERS = 10**9


@dataclass(frozen=True)
class Launch:
    """What the budget needs to know about a run besides the model config."""

    num_processes: int
    backend: str  # zero3 | zero2 | ddp
    gpu_memory_gib: float
    weight_bytes: int  # bytes per weight as loaded (2 under DeepSpeed bf16)
    lora: bool
    micro_batch: int
    prompt_length: int
    completion_length: int
    gradient_checkpointing: bool
    preservation_batch: int
    preservation_length: int
    vllm_colocate: bool
    vllm_sleep: bool
    vllm_utilization: float
    eigh_on_cpu: bool = False
    projector_offload: bool = False


def gpu_budget(config: dict, launch: Launch, nspo: dict) -> dict[str, dict[str, int]]:
    """``{phase: {term: bytes}}`` on the most loaded GPU (module docstring). ``nspo``: ``plan.memory_plan``'s
    figures (``w_ref``, ``projector_max``, ``covariances_build``, ``widest_owned_group``, ``decomposition``,
    ``widest_weight``)."""
    shape = model_shape(config)
    h, f, layers, vocab, kv, d = (shape.hidden, shape.intermediate, shape.layers, shape.vocab, shape.kv_heads,
                                  shape.head_dim)  # fmt: skip
    params, n = model_parameters(config), launch.num_processes
    g = launch.gpu_memory_gib * GiB

    if launch.lora:
        state = params * launch.weight_bytes
    else:
        state = {"zero3": 16 * params // n, "zero2": 2 * params + 14 * params // n, "ddp": 16 * params}[launch.backend]
    nspo_state = nspo["w_ref"] + (0 if launch.projector_offload else nspo["projector_max"])
    vllm_awake = int(launch.vllm_utilization * g) if launch.vllm_colocate else 0
    vllm_idle = vllm_awake if not launch.vllm_sleep else 0
    widest = nspo["widest_owned_group"]
    streamed_basis = widest * (widest // 2) * 4 if launch.projector_offload else 0

    build = {
        "model shard": 2 * params // n if launch.backend == "zero3" else params * launch.weight_bytes,
        "gathered module": 2 * vocab * h if launch.backend == "zero3" else 0,
        "covariances": nspo["covariances_build"],
        "eigh workspace": 0 if launch.eigh_on_cpu else nspo["decomposition"],
        "forward": launch.preservation_batch * launch.preservation_length * (vocab * 2 + (2 * f + 4 * h) * 2),
        "NSPO state": nspo_state,
        "vLLM": vllm_idle,
    }
    generation = {"training state": state, "NSPO state": nspo_state, "vLLM": vllm_awake}
    tokens = launch.micro_batch * (launch.prompt_length + launch.completion_length)
    per_token_layer = (6 * h + 4 * f + 2 * kv * d) * 2
    if launch.gradient_checkpointing:
        activations = layers * tokens * h * 2 + tokens * per_token_layer
    else:
        activations = layers * tokens * per_token_layer
    training = {
        "training state": state,
        "NSPO state": nspo_state,
        "live parameters": 2 * min(params, DEEPSPEED_MAX_LIVE_PARAMETERS) if launch.backend == "zero3" else 0,
        "activations": activations,
        "logits": tokens * vocab * 6,
        "projection": 3 * nspo["widest_weight"] * 4 + streamed_basis,
        "vLLM": vllm_idle,
    }
    return {"build": build, "generation": generation, "training": training}


def eigh_host_bytes(n: int) -> int:
    """Float64 ``eigh`` of an ``n × n`` covariance: its copy, the eigenvectors and ``syevd``'s workspace."""
    return (4 * n * n + 6 * n + 1) * 8


def contrast_host_bytes(n: int) -> int:
    """Float64 peak of ``SubspaceFactor.from_contrast`` for an ``n × n`` group beyond its covariances: float64
    copies of ``C_g`` and ``C_t`` (none when they are float64 already), then ``C_g``'s eigenvectors, the whitening
    ``W``, the eigenvectors ``w`` of ``Wᵀ C_t W``, ``w`` flipped, ``W w`` and its QR factors ``Q, R`` live at once
    (9 ``n × n`` in all), more than at any earlier point (``eigh``'s ``syevd`` workspace is ``1 + 6n + 2n²``
    words). Measured at ``n = 2048`` with float64 covariances: 6.6 ``n²`` words above the start."""
    return (9 * n * n + 6 * n + 1) * 8


def verdict(budget: dict[str, dict[str, int]], gpu_memory_gib: float) -> list[str]:
    """One line per phase: its total against the GPU, FITS or DOES NOT FIT with the largest term named."""
    lines = []
    for phase, terms in budget.items():
        total = sum(terms.values())
        fits = total <= gpu_memory_gib * GiB
        largest = max(terms, key=terms.get)
        word = "FITS" if fits else f"DOES NOT FIT (largest term: {largest}, {terms[largest] / GiB:.1f} GiB)"
        lines.append(f"{phase}: {total / GiB:.1f} GiB of {gpu_memory_gib:g} GiB: {word}")
    return lines
