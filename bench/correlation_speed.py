"""Benchmark for the issue "Correlation speed": fast correlation_matrix against a naive pair loop.

Builds random layer features (L+1 matrices of shape (N, d), each layer a noisy mix of the
previous one, like a residual stack), times ``comflp.prune.correlation.correlation_matrix`` for each
measure and a straightforward per-pair loop written here that recomputes everything for every
pair (distance matrices, Gram matrices, SVDs), checks that the two agree to 1e-6 and prints a
Markdown table (also written to ``--output`` if given).

    python bench/correlation_speed.py                      # L = 48, N = 512, d = 256
    python bench/correlation_speed.py --layers 6 --num_samples 64 --output speed.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from comflp.prune.correlation import correlation_matrix

TOLERANCE = 1e-6


# ----------------------------------------------------------------------------- naive reference


def naive_dc(x: torch.Tensor, y: torch.Tensor) -> float:
    """dCor^2 of L2-normalised rows: double-centred distance matrices, as CoMFLP reports."""

    def centred_distances(z: torch.Tensor) -> torch.Tensor:
        z = z / z.norm(dim=1, keepdim=True)
        d = torch.cdist(z, z)
        return d - d.mean(dim=0) - d.mean(dim=1, keepdim=True) + d.mean()

    a, b = centred_distances(x), centred_distances(y)
    return float((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt())


def naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with column-centred X, Y."""
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    num = torch.linalg.norm(y.T @ x) ** 2
    return float(num / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def naive_svcca(x: torch.Tensor, y: torch.Tensor, threshold: float = 0.99) -> float:
    """Mean canonical correlation (via QR bases) of the SVD-reduced inputs: each keeps the
    top directions holding ``threshold`` of its singular-value sum."""

    def reduced(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(dim=0)
        u, s, _ = torch.linalg.svd(z, full_matrices=False)
        s = s[s > s[0] * max(z.shape) * torch.finfo(s.dtype).eps]
        held = (torch.cumsum(s, 0) / s.sum()).tolist()
        k = next(i + 1 for i, h in enumerate(held) if h >= threshold - 1e-12)
        return u[:, :k] * s[:k]

    qx, _ = torch.linalg.qr(reduced(x))
    qy, _ = torch.linalg.qr(reduced(y))
    rho = torch.linalg.svdvals(qx.T @ qy)
    return float(rho.clamp(0.0, 1.0).mean())


NAIVE: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "dc": naive_dc,
    "cka": naive_cka,
    "svcca": naive_svcca,
}


def naive_matrix(feats: list[np.ndarray], measure: str) -> np.ndarray:
    """Every entry computed on its own, from scratch."""
    pair = NAIVE[measure]
    tensors = [torch.from_numpy(f) for f in feats]
    return np.array([[pair(x, y) for y in tensors] for x in tensors])


# ----------------------------------------------------------------------------- benchmark


def layer_features(layers: int, num_samples: int, dim: int, seed: int) -> list[np.ndarray]:
    """L+1 random (N, d) features; each layer adds a random update to the previous one."""
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(num_samples, dim))]
    for _ in range(layers):
        mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
        feats.append(
            feats[-1] + 0.5 * np.tanh(feats[-1] @ mix) + 0.1 * rng.normal(size=feats[-1].shape)
        )
    return feats


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def benchmark(feats: list[np.ndarray], measures: list[str]) -> list[dict]:
    rows = []
    for measure in measures:
        fast, fast_s = timed(lambda m=measure: correlation_matrix(feats, m))
        naive, naive_s = timed(lambda m=measure: naive_matrix(feats, m))
        diff = float(np.abs(fast - naive).max())
        rows.append(
            {
                "measure": measure,
                "fast": fast_s,
                "naive": naive_s,
                "diff": diff,
                "ok": diff <= TOLERANCE,
            }
        )
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"L = {args.layers} ({args.layers + 1} matrices), N = {args.num_samples}, d = {args.dim}, "
        f"torch threads = {args.threads}",
        "",
        "| measure | fast s | naive s | speed-up | max diff |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['measure']} | {r['fast']:.3f} | {r['naive']:.3f} | "
            f"{r['naive'] / r['fast']:.1f}x | {r['diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48, help="L: encoder layers (L+1 matrices)")
    parser.add_argument("--num_samples", type=int, default=512, help="N: samples per matrix")
    parser.add_argument("--dim", type=int, default=256, help="d: feature dimension")
    parser.add_argument(
        "--measures", default="dc,cka,svcca", help=f"comma-separated, from {', '.join(NAIVE)}"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    args.measures = [m for m in args.measures.split(",") if m]
    unknown = [m for m in args.measures if m not in NAIVE]
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(NAIVE)}")
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    feats = layer_features(args.layers, args.num_samples, args.dim, args.seed)
    rows = benchmark(feats, args.measures)
    table = markdown(rows, args)
    print(table, end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    failed = [r["measure"] for r in rows if not r["ok"]]
    if failed:
        print(f"max diff above {TOLERANCE} for: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
