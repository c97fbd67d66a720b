"""Ridge least squares from statistics summed over calibration tokens: what recovery (recover.py,
head_refit.py) and --method obs solve with. Statistics are float64 accumulators fed one batch's product
at a time; a Gram matrix is accumulated on and below its diagonal only (what its Cholesky factorisation
reads), damped by lam = alpha x its mean diagonal (the head's K gains: each diagonal entry by alpha x
itself), factorised over itself block by block, and solved by two triangular solves, so an m x m system
never exists twice (6.6 GB each at a 70B model's MLP width).
removal_order is greedy OBS on such systems: which inputs a refit of the others absorbs best.
"""

from __future__ import annotations

import torch

from dietprune.errors import DietError

PRODUCTS = torch.float32  # the writers' Gram and the readers' cross products per batch (recover.py's doc)


def as_products(x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype one batch's products are taken in (PRODUCTS, read when called)."""
    return x.to(PRODUCTS)


def accumulators(count: int, rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """`count` float64 accumulators of rows x columns: the statistics of all batches, then (with a
    damping grid) of the held-out ones."""
    return torch.zeros(count, rows, columns, dtype=torch.float64, device=device)


def accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    """total += scale a^T b: one batch's (or chunk of rows') product in the dtype of a and b, the running
    sum in total's float64 (a stack of totals: the one product added to each)."""
    total.add_(a.T @ b, alpha=scale)


def accumulate_gram(total: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """The lower triangle of total += x^T x, by column blocks: only the blocks on and below the diagonal
    are multiplied (10 of 16 at 4 blocks). The rest of the upper triangle is left as it is: the damping
    reads the diagonal, the Cholesky factorisation the lower triangle. A stack of totals gets each block
    product once, added to each."""
    step = -(-x.shape[1] // blocks)
    for i in range(0, x.shape[1], step):
        total[..., i:, i:i + step].add_(x[:, i:].T @ x[:, i:i + step])


def damp(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """lam = alpha x the mean diagonal, added to the diagonal in place (a writer's Gram matrix is
    m x m float64: 0.7 GB at m = 9216, 6.6 GB at 28672; no copy and no identity matrix is made)."""
    lam = alpha * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    return lam


def cholesky(system: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The lower Cholesky factor L of a damped (symmetric positive definite) Gram matrix, written over its
    lower triangle block by block (right-looking): no second m x m matrix is ever made (LAPACK through
    torch copies the matrix first: 6.6 GB more at a 70B model's MLP width). Memory: one panel."""
    n = len(system)
    try:
        for j in range(0, n, block):
            e = min(j + block, n)
            system[j:e, j:e] = torch.linalg.cholesky(system[j:e, j:e])
            if e == n:
                break
            panel = torch.linalg.solve_triangular(system[j:e, j:e].T, system[e:, j:e], upper=True, left=False)
            system[e:, j:e] = panel
            for i in range(e, n, block):  # the lower part of the trailing matrix, a block row at a time
                end = min(i + block, n)
                system[i:end, e:end].addmm_(panel[i - e:end - e], panel[:end - e].T, alpha=-1)
    except torch.linalg.LinAlgError as exc:
        raise DietError("recovery's least-squares system is singular (no calibration tokens, or "
                        "--recover-alpha 0 with too few); use a positive --recover-alpha") from exc
    return system


def solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (L L^T) X = rhs, L the lower triangle of `factor`: two triangular solves, the second in
    place (the factor is read where it is, never copied)."""
    y = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.T, y, upper=True, out=y)


def symmetric(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle `lower` holds (a Gram matrix accumulated below the
    diagonal only), as a new tensor."""
    return lower.tril() + lower.tril(-1).T


def removal_order(forms: torch.Tensor, grams: torch.Tensor, remove: int, alpha: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `remove` inputs greedy OBS drops, in order, and the relative error each one adds (summed over
    sites), from the forms M = W*^T W* (sites, m, m; W* the best fit on all m inputs) and the inputs'
    Gram matrices G (sites, m, m), damped here by alpha x the mean diagonal. One input at a time (the OBS
    recursion of Hassibi & Stork, in SparseGPT's column form), with H = G^-1:

        cost(j) = M_jj / H_jj / tr(M G);   then, u = H[:, j] / H_jj, v = M[:, j]:
        M <- M - u v^T - v u^T + M_jj u u^T,   H <- H - H_jj u u^T,

    the least-squares error the refit of the others cannot absorb (relative to the site's output energy,
    so that no site outweighs another by scale); the costs of the inputs removed one after another add
    up to the error of the set."""
    gram = grams.double().clone()
    diagonal = gram.diagonal(dim1=1, dim2=2)
    diagonal += alpha * diagonal.mean(1, keepdim=True)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    form = forms.double() / torch.einsum("sij,sji->s", forms.double(), gram)[:, None, None]
    alive = torch.ones(form.shape[-1], dtype=torch.bool, device=form.device)
    order, costs = [], []
    for _ in range(remove):
        cost = (form.diagonal(dim1=1, dim2=2) / inverse.diagonal(dim1=1, dim2=2)).sum(0)
        cost = torch.where(alive, cost, torch.inf)
        j = int(cost.argmin())
        h = inverse[:, :, j].clone()
        u = h / h[:, j:j + 1]
        v = form[:, :, j].clone()
        w = v - v[:, j:j + 1] * u
        form.baddbmm_(torch.stack([u, w], 2), torch.stack([v, u], 1), alpha=-1)
        inverse.baddbmm_(h[:, :, None], u[:, None, :], alpha=-1)
        alive[j] = False
        order.append(j)
        costs.append(float(cost[j]))
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)
