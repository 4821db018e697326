"""Preservation drift: how far the model's behaviour on general data moved from its reference.

On a general set (token sequences, padding excluded), with ``p`` the model's and ``q`` the
reference's next-token distributions at every real position ``t`` whose next token ``y_t`` is real:

    kl_mean / kl_max  = mean / max over t of  KL(q_t ‖ p_t) = Σ_v q_t(v) (log q_t(v) − log p_t(v))
    logprob_drift_max = max over t of |log p_t(y_t) − log q_t(y_t)|
    top1_agreement    = share of t where argmax p_t = argmax q_t

and for every protected linear (``targets``, default the ``full`` preset), with ``X`` the inputs the
*reference* model feeds that layer on the same tokens (rows are tokens):

    leakage = ‖X (W − W_ref)ᵀ‖_F / ‖X W_refᵀ‖_F

which NSPO keeps ≈ 0 on its preservation data; ``protected`` marks the layers the checkpoint's
projector constrains (the others moved freely, e.g. attention under the ``mlp`` preset).
Log-probabilities are taken in float64: in float32 the rounding of ``log_softmax`` alone gives KL
values around 1e-7. The projector's null dimension per layer is read from
``MODEL/nspo_projector/projector.json`` when the checkpoint carries one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nspo_trl.data.preservation import iter_batches
from nspo_trl.nullspace.targets import resolve_protected_layers
from nspo_trl.utils import progress_bar_disabled


@torch.no_grad()
def drift_report(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    sequences: list[list[int]],
    pad_token_id: int,
    targets: list[str] | None,
    batch_size: int = 8,
    projector_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Distribution drift and per-layer leakage of ``model`` against ``reference`` (same architecture).

    ``targets=None`` skips the per-layer leakage (the distribution figures alone are much cheaper).
    """
    layers = {layer.name: layer.linear for layer in resolve_protected_layers(reference, targets)} if targets else {}
    trained = dict(model.named_modules())
    sums = {name: [0.0, 0.0] for name in layers}  # ‖X ΔWᵀ‖², ‖X W_refᵀ‖²
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0][mask_holder["mask"]].float()
            w_ref = module.weight.float()
            delta = trained[name].weight.float().to(w_ref.device) - w_ref
            sums[name][0] += float((x @ delta.T).pow(2).sum())
            sums[name][1] += float((x @ w_ref.T).pow(2).sum())

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    kl_sum = kl_max = drift_max = 0.0
    agree = positions = 0
    model_device = next(model.parameters()).device
    reference_device = next(reference.parameters()).device
    was_training = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        batches = iter_batches(sequences, batch_size, pad_token_id)
        total = -(-len(sequences) // batch_size)
        for batch in tqdm(batches, total=total, desc="drift", disable=progress_bar_disabled(progress)):
            mask = batch["attention_mask"].bool()
            mask_holder["mask"] = mask.to(reference_device)
            q = reference(**{k: v.to(reference_device) for k, v in batch.items()}).logits.double()
            p = model(**{k: v.to(model_device) for k, v in batch.items()}).logits.double().to(q.device)
            valid = (mask[:, :-1] & mask[:, 1:]).to(q.device)  # predictions of a real next token
            log_q = torch.log_softmax(q[:, :-1][valid], -1)
            log_p = torch.log_softmax(p[:, :-1][valid], -1)
            labels = batch["input_ids"][:, 1:].to(q.device)[valid]
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
            chosen = (log_p.gather(-1, labels[:, None]) - log_q.gather(-1, labels[:, None])).abs()
            drift_max = max(drift_max, float(chosen.max())) if chosen.numel() else drift_max
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            positions += int(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training[0])
        reference.train(was_training[1])
    null_dims = projector_null_dims(projector_dir)
    per_layer = {
        name: {
            "leakage": (moved / base) ** 0.5 if base > 0 else float("nan"),
            "in_features": layers[name].in_features,
            "null_dim": null_dims.get(name),
            "protected": name in null_dims,  # constrained by the checkpoint's projector
        }
        for name, (moved, base) in sums.items()
    }
    leakages = [v["leakage"] for v in per_layer.values()]
    return {
        "tokens": positions,
        "kl_mean": kl_sum / positions if positions else float("nan"),
        "kl_max": kl_max,
        "logprob_drift_max": drift_max,
        "top1_agreement": agree / positions if positions else float("nan"),
        "leakage_max": max(leakages) if leakages else float("nan"),
        "leakage_mean": sum(leakages) / len(leakages) if leakages else float("nan"),
        "layers": per_layer,
    }


def projector_null_dims(projector_dir: str | Path | None) -> dict[str, int]:
    """Module → null dimension from a saved projector's ``projector.json`` (empty when there is none)."""
    path = Path(projector_dir) / "projector.json" if projector_dir else None
    if path is None or not path.is_file():
        return {}
    stats = json.loads(path.read_text()).get("stats", {})
    return {module: group["null_dim"] for group in stats.values() for module in group["modules"]}
