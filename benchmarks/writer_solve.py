"""The writer refit's m x m system at Llama-3-70B's MLP width (m = 28672, K = 6656 kept dims), before and
after the sequential engine, each in its own process under /usr/bin/time -v (peak RSS, seconds):

  before  the system and a second m x m matrix (C_zz' = Z^T Z'), then an LU solve (a third m x m copy);
  after   one m x m Gram matrix, the cross term accumulated as K x m (R = sum c y_K z'^T), the blocked
          Cholesky factorisation written over the Gram matrix, and two triangular solves (lstsq.py).

    .venv/bin/python benchmarks/writer_solve.py [--m 28672 --k 6656 --tokens 2048]

Both solve the same system (the script checks the two answers agree); float64 throughout, random inputs.
Results: benchmarks/results/writer_solve.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from dietprune.device import machine
from dietprune.lstsq import cholesky, solve

OUT = Path("benchmarks/results/writer_solve.json")


def inputs(m: int, k: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense and pruned writer inputs (tokens x m) and the plain-sliced writer (k x m), float64."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((tokens, m), (tokens, m),
                                                                                    (k, m)))


def before(m: int, k: int, tokens: int) -> torch.Tensor:
    """The pre-engine refit (commit 2eacd34, recover._refit_writer): two m x m matrices, then LU."""
    z, z_pruned, weight = inputs(m, k, tokens)
    system = z_pruned.T @ z_pruned
    lam = 0.01 * system.diagonal().mean()
    system.diagonal().add_(lam)
    cross = z.T @ z_pruned
    cross.diagonal().add_(lam)
    rhs = (weight @ cross).T
    del cross
    return torch.linalg.solve(system, rhs).T


def after(m: int, k: int, tokens: int) -> torch.Tensor:
    """The engine's refit (recover._refit_sub_block): one m x m Gram matrix, factorised in place."""
    z, z_pruned, weight = inputs(m, k, tokens)
    gram = z_pruned.T @ z_pruned
    cross = (weight @ z.T) @ z_pruned  # R = W'_0 C_zz', accumulated K x m
    lam = 0.01 * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    cross.add_(weight, alpha=lam)
    return solve(cholesky(gram), cross.T).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=28672)
    parser.add_argument("--k", type=int, default=6656)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--run", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        solved = {"before": before, "after": after}[args.run](args.m, args.k, args.tokens)
        torch.save(solved[:4, :4].clone(), f"/tmp/writer_solve_{args.run}.pt")
        return
    rows = {}
    for run in ("before", "after"):
        started = time.perf_counter()
        argv = [sys.executable, __file__, "--run", run, "--m", str(args.m), "--k", str(args.k), "--tokens",
                str(args.tokens)]
        out = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=True)
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1]) * 1024
        rows[run] = {"peak_rss_bytes": peak, "seconds": round(time.perf_counter() - started, 1)}
        print(run, rows[run], flush=True)
    corner = [torch.load(f"/tmp/writer_solve_{run}.pt") for run in ("before", "after")]
    result = {"m": args.m, "k": args.k, "tokens": args.tokens, **rows, "m_by_m_float64_bytes": 8 * args.m**2,
              "answers_agree": bool(torch.allclose(corner[0], corner[1], rtol=1e-6, atol=1e-9)),
              "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
