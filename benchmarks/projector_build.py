"""Projector build: our pipeline vs the reference code's, on the same activations, side by side.

- ours: ``C`` accumulated in float64, ``torch.linalg.eigh``, the null-space rule, and the thinner
  basis kept (``SubspaceFactor.from_covariance``);
- reference (ivanniu/NSPO ``fsdp_workers.py``): ``C`` in fp32, a general ``torch.svd(C)``, and the dense
  ``n × n`` ``P = V_k V_kᵀ`` in fp32.

Both start from the same activations ``X`` (``tokens × n``, a steep synthetic spectrum so part of it
falls under α·λmax, as for real LLM activations); the parent accumulates ``C`` once per dtype and
saves it. Each variant runs in its own subprocess that loads its ``C``; a thread samples the
process's resident memory every millisecond during the build, and the extra peak is the highest
sample minus the resident memory just before it (on CUDA: peak allocated minus allocated).

    python benchmarks/projector_build.py                     # n = 896 and 4864 (CPU: ~2 min)
    python benchmarks/projector_build.py --sizes 896 4864 18944 --device cuda

Prints time, extra peak memory and stored bytes per variant and size, the ratios last.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch
from results_table import device_name, record


def activations(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n, generator=generator) * torch.logspace(0, -3, n)


class RssSampler(threading.Thread):
    """Highest resident set size seen while running (sampled every millisecond)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def child(variant: str, cov_path: str, device: str) -> dict:
    from nspo_trl.nullspace.projector import SubspaceFactor
    from nspo_trl.nullspace.rule import NullSpaceRule

    cov = torch.load(cov_path).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        gc.collect()
        baseline = psutil.Process().memory_info().rss
        sampler = RssSampler()
        sampler.start()
    start = time.perf_counter()
    if variant == "ours":
        factor = SubspaceFactor.from_covariance(cov, NullSpaceRule(alpha=5e-5))
        stored, null_dim = factor.basis.numel() * 4, factor.null_dim
    else:
        _, s, v = torch.svd(cov)
        null = v[:, s < 5e-5 * s.max()]
        p = null @ null.T
        stored, null_dim = p.numel() * 4, null.shape[1]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else sampler.stop()) - baseline
    return {"seconds": seconds, "peak_bytes": peak, "stored_bytes": stored, "null_dim": null_dim}


def run_child(variant: str, cov_path: str, device: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--cov", cov_path, "--device", device]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def save_covariances(n: int, tokens: int, directory: str) -> tuple[str, str]:
    """C = XᵀX accumulated in float64 (ours) and in float32 (the reference), saved for the children."""
    x = activations(n, tokens)
    paths = []
    for dtype in (torch.float64, torch.float32):
        path = f"{directory}/cov_{n}_{str(dtype).split('.')[-1]}.pt"
        torch.save((x.T.to(dtype) @ x.to(dtype)).contiguous(), path)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[896, 4864])
    parser.add_argument("--tokens", type=int, default=0, help="activation rows (default 2n)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--cov", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cov, args.device)))
        return

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows = []
    for n in args.sizes:
        tokens = args.tokens or 2 * n
        with tempfile.TemporaryDirectory() as directory:
            cov64, cov32 = save_covariances(n, tokens, directory)
            ours = run_child("ours", cov64, args.device)
            reference = run_child("reference", cov32, args.device)
        assert ours["null_dim"] == reference["null_dim"], (ours, reference)
        rows.append((n, tokens, ours, reference))
        for name, r in (("ours", ours), ("reference", reference)):
            print(f"n={n:6d} tokens={tokens:6d} {name:9s}: {r['seconds']:8.2f} s, extra peak "
                  f"{r['peak_bytes'] / 2**20:9.1f} MiB, stored {r['stored_bytes'] / 2**20:8.1f} MiB, "
                  f"null dim {r['null_dim']}")  # fmt: skip
    for n, _, ours, reference in rows:
        print(f"ratio reference/ours at n={n}: time {reference['seconds'] / ours['seconds']:.2f}x, "
              f"peak memory {reference['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x, "
              f"stored {reference['stored_bytes'] / max(ours['stored_bytes'], 1):.2f}x")  # fmt: skip
    device = device_name(args.device)
    for n, _, ours, reference in rows:
        stored = ours["stored_bytes"] / 2**20, reference["stored_bytes"] / 2**20
        row = {
            "n": str(n),
            "device": device,
            "ours s": f"{ours['seconds']:.2f}",
            "reference s": f"{reference['seconds']:.2f}",
            "time reference/ours": f"{reference['seconds'] / ours['seconds']:.2f}×",
            "ours extra peak": f"{ours['peak_bytes'] / 2**20:.1f} MiB",
            "reference extra peak": f"{reference['peak_bytes'] / 2**20:.1f} MiB",
            "stored ours / reference": f"{stored[0]:.1f} / {stored[1]:.1f} MiB",
            "null dim": str(ours["null_dim"]),
        }
        print(f"recorded in {record('projector_build', row, key=('n', 'device'))}")


if __name__ == "__main__":
    main()
