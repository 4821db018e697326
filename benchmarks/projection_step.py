"""Per-step cost of the NSPO projection on the MLP of a model shape: factor form vs dense P.

For every MLP linear of a Qwen2-shaped model (``gate_proj``/``up_proj`` share one ``n = hidden``
projector, ``down_proj`` has ``n = intermediate``) it times one ``W ← W_ref + (W − W_ref) P`` over all
layers with

- ours: ``nspo_trl.nullspace.update.ConstrainedUpdate`` (thin basis ``n × min(k, n−k)``),
- dense: the reference code's form, an explicit ``n × n`` fp32 ``P`` per layer and ``(W − W_ref) @ P``,

on random weights and random orthonormal bases with null fraction ``k/n`` (0.5 is the worst case
for the factor form). It also checks exactness: the leakage ``‖X ΔWᵀ‖/‖X W_refᵀ‖`` on rows ``X`` drawn
from the range space must stay at fp32 round-off, even with TF32 switched on globally.

    python benchmarks/projection_step.py --preset qwen2.5-1.5b --device cuda
    python benchmarks/projection_step.py --preset small          # CPU-sized

Prints median seconds per step for each, the storage of each, and the ratio dense/ours last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results_table import device_name, record
from torch import nn

from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.targets import ProtectedLayer
from nspo_trl.nullspace.update import ConstrainedUpdate, ieee_fp32_matmul, relative_leakage

PRESETS = {
    "qwen2.5-7b": (3584, 18944, 28),
    "qwen2.5-1.5b": (1536, 8960, 28),
    "qwen2.5-0.5b": (896, 4864, 24),
    "small": (256, 1024, 4),
}


def random_factor(n: int, null_fraction: float, generator: torch.Generator, device) -> SubspaceFactor:
    """A random orthonormal thin basis (QR of an n × d Gaussian, made on the device)."""
    k = round(n * null_fraction)
    d, kind = (k, "null") if k <= n - k else (n - k, "range")
    basis = torch.linalg.qr(torch.randn(n, max(d, 1), generator=generator, device=device))[0][:, :d]
    eigenvalues = torch.cat([torch.zeros(k), torch.ones(n - k)]).double()
    return SubspaceFactor(basis.contiguous(), kind, eigenvalues, k)


def build(hidden: int, intermediate: int, layers: int, null_fraction: float, device):
    generator = torch.Generator(device=device).manual_seed(0)
    factors, groups, protected = {}, {}, []
    for index in range(layers):
        prefix = f"model.layers.{index}.mlp"
        factors[f"{prefix}.gate_proj"] = random_factor(hidden, null_fraction, generator, device)
        factors[f"{prefix}.down_proj"] = random_factor(intermediate, null_fraction, generator, device)
        for name, (n_in, n_out), group in (
            ("gate_proj", (hidden, intermediate), "gate_proj"),
            ("up_proj", (hidden, intermediate), "gate_proj"),
            ("down_proj", (intermediate, hidden), "down_proj"),
        ):
            linear = nn.Linear(n_in, n_out, bias=False, device=device)
            protected.append(ProtectedLayer(f"{prefix}.{name}", linear, {}))
            groups[f"{prefix}.{name}"] = f"{prefix}.{group}"
    projector = NullSpaceProjector(factors, groups, NullSpaceRule())
    return protected, projector


def timed(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def perturb(layers, scale=1e-3):
    with torch.no_grad():
        for layer in layers:
            layer.linear.weight.add_(scale * torch.randn_like(layer.linear.weight))


@ieee_fp32_matmul()
def leakage_on_range(update: ConstrainedUpdate, rows: int = 256) -> float:
    """Worst layer leakage on inputs drawn from each layer's range space (where P must kill ΔW), in IEEE fp32."""
    worst = 0.0
    for layer in update.layers:
        factor = update.projector.factor_for(layer.name)
        n = factor.in_features
        x = torch.randn(rows, n, device=factor.basis.device)
        x = x - factor.apply(x)  # x ← x (I − P): a pure range-space input
        worst = max(worst, relative_leakage(update.weight_delta(layer), update.reference[layer.name], x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--null-fraction", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, help="use this many decoder layers instead of the preset's")
    parser.add_argument("--skip-dense", action="store_true", help="do not time the dense-P baseline")
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden, intermediate, num_layers = PRESETS[args.preset]
    num_layers = args.layers or num_layers
    layers, projector = build(hidden, intermediate, num_layers, args.null_fraction, device)
    update = ConstrainedUpdate(layers, projector)
    perturb(layers)

    print(
        f"{args.preset}: hidden {hidden}, intermediate {intermediate}, {num_layers} layers, "
        f"{len(layers)} MLP linears, null fraction {args.null_fraction}, device {device}"
    )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}")

    flops = sum(  # (W − W_ref) B Bᵀ: two thin products; dense: one n × n product
        4 * layer.linear.weight.numel() * projector.factor_for(layer.name).basis.shape[1] for layer in layers
    )
    dense_flops = sum(2 * layer.linear.weight.numel() * layer.linear.in_features for layer in layers)
    stored = sum(f.basis.numel() for f in projector.factors.values()) * 4
    reference_bytes = sum(layer.linear.in_features**2 for layer in layers) * 4  # one dense P per linear

    ours = timed(update.project_, args.repeats, device)
    leak_ours = leakage_on_range(update)
    print(
        f"ours : {ours * 1e3:9.1f} ms/step ({flops / ours / 1e12:6.1f} TFLOP/s), leakage {leak_ours:.1e}, "
        f"projector {stored / 2**30:.2f} GiB (fp32 thin bases)"
    )
    torch.backends.fp32_precision = "tf32"  # what `--tf32 true` does in transformers
    perturb(layers)
    update.project_()
    torch.backends.fp32_precision = "none"
    print(f"       with global TF32 on: leakage {leakage_on_range(update):.1e} (the projection forces IEEE fp32)")
    if args.skip_dense:
        print(f"storage ratio reference-code dense P / ours: {reference_bytes / stored:.1f}x")
        save(args, device, len(layers), ours, None, reference_bytes / stored, stored, leak_ours)
        return

    dense_p = {group: factor.dense() for group, factor in projector.factors.items()}

    def dense_step():
        with torch.no_grad():
            for layer in layers:
                weight, anchor = layer.linear.weight, update.reference[layer.name]
                weight.copy_(anchor + (weight - anchor) @ dense_p[projector.groups[layer.name]])

    perturb(layers)
    dense = timed(dense_step, args.repeats, device)
    leak_dense = leakage_on_range(update)
    print(
        f"dense: {dense * 1e3:9.1f} ms/step ({dense_flops / dense / 1e12:6.1f} TFLOP/s), leakage {leak_dense:.1e}, "
        f"P {reference_bytes / 2**30:.2f} GiB (one fp32 P per linear, as the reference code)"
    )
    torch.backends.fp32_precision = "tf32"
    perturb(layers)
    dense_tf32 = timed(dense_step, args.repeats, device)
    torch.backends.fp32_precision = "none"
    leak_dense_tf32 = leakage_on_range(update)
    print(f"       with global TF32 on: {dense_tf32 * 1e3:.1f} ms/step, leakage {leak_dense_tf32:.1e} (no guard)")
    print(f"ratio dense/ours: time {dense / ours:.2f}x (both IEEE fp32), storage {reference_bytes / stored:.1f}x")
    save(args, device, len(layers), ours, dense, reference_bytes / stored, stored, leak_ours)


def save(args, device, linears: int, ours: float, dense: float | None, storage: float, stored: int, leak: float):
    """One row of ``results/projection_step.md``, keyed by shape, device and null fraction."""
    num_layers = PRESETS[args.preset][2]
    row = {
        "shape": f"{args.preset} MLP, {args.layers or num_layers} layers ({linears} linears)",
        "device": device_name(device.type),
        "null fraction": f"{args.null_fraction:g}",
        "ours ms/step": f"{ours * 1e3:.1f}",
        "dense ms/step": "not run" if dense is None else f"{dense * 1e3:.1f}",
        "time dense/ours": "" if dense is None else f"{dense / ours:.2f}×",
        "storage dense/ours": f"{storage:.1f}× ({stored / 2**30:.2f} GiB ours)",
        "leakage ours": f"{leak:.1e}",
    }
    print(f"recorded in {record('projection_step', row, key=('shape', 'device', 'null fraction'))}")


if __name__ == "__main__":
    main()
