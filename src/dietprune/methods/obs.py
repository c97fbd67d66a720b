"""obs: per task, the dims whose loss the readers' least-squares refit absorbs go first (structured OBS
on the residual axis); the tasks' rankings are merged by --merge (DIET's vote by default).

Every linear layer that reads the residual stream reads it through a norm: the readers R_s of site s
(q/k/v or gate/up, stacked; the LM head at the final norm) see n = norm(h). Dropping the dims S of n and
refitting the kept columns by least squares on a task's tokens (what recovery does) leaves

    E_s(S) = tr(R_S Sigma_S|K R_S^T),   Sigma_S|K = ((G_s^-1)_SS)^-1,   G_s = sum over tokens of n n^T,

the readers' weights on S times the part of the dropped dims the kept ones cannot predict. A dim the
others predict costs nothing to drop however large its activations, which mean |a| cannot see. Dims
go one at a time by the OBS recursion (lstsq.removal_order, with M_s = R_s^T R_s, the head's E^T E
summed over chunks of its rows), whose costs add up to E_s of the set; for each task the dim with the
least sum over sites of E_s / tr(M_s G_s) (each site's error relative to its dense output energy) goes,
until K remain; a task's score of a dim is how late it went (the K kept: last, all equal). G_s is damped
as recovery damps it (+ alpha x its mean diagonal).
Cost: each task's Gram matrix at every site, stored in float32, tasks x (2 x layers + 1) x
d^2 x 4 bytes (0.42 GB for Gemma-3 270M's 7 tasks, 16 GB for Gemma-2 9B's: refused above MAX_BYTES), and
d - K greedy steps over all sites per task.
"""

from __future__ import annotations

import torch
from torch import nn

from dietprune.calibration import all_sum
from dietprune.errors import DietError
from dietprune.head_refit import head_gram
from dietprune.lstsq import removal_order
from dietprune.methods.base import Method, Seen
from dietprune.profile import ActivationStats
from dietprune.progress import progress
from dietprune.sequential import Observer, Weights
from dietprune.settings import PruneSettings

MAX_BYTES = 8 << 30  # the Gram matrices this method may hold


class ReaderGrams(Observer):
    """Per site (each sub-block's norm, then the final norm) the readers' form M = R^T R (float64) and,
    per calibration corpus, the Gram matrix of the norm's output over real tokens (summed in float64,
    kept in float32)."""

    sites = frozenset({"norm_output", "block_input"})

    def __init__(self, weights: Weights, corpora: int):
        self.weights, self.corpora = weights, corpora
        d, sites = weights.model.config.hidden_size, 2 * len(weights.blocks) + 1
        need = corpora * sites * d * d * 4
        if need > MAX_BYTES:
            raise DietError(f"--method obs would hold {need / 2**30:.1f} GiB of Gram matrices ({corpora} "
                            f"corpora x {sites} sites x {d}^2); at most {MAX_BYTES / 2**30:g} GiB: profile "
                            "fewer --tasks or use --method diet")
        self.forms: list[torch.Tensor] = []
        self.grams: list[torch.Tensor] = []
        self.block_grams: torch.Tensor | None = None
        self.final = torch.zeros(corpora, d, d, dtype=torch.float64, device=weights.device)

    def block(self, index: int, layer: nn.Module) -> None:
        d, subs = self.final.shape[-1], self.weights.adapter.sub_blocks
        device = self.weights.device_of(layer)
        self.block_grams = torch.zeros(len(subs), self.corpora, d, d, dtype=torch.float64, device=device)
        for sub in subs:
            form = torch.zeros(d, d, dtype=torch.float64, device=device)
            for name in sub.readers:
                weight = layer.get_submodule(name).weight.double()
                form += weight.T @ weight
            self.forms.append(form.cpu())

    def observe(self, index: int, site: str, sub: int | None, x: torch.Tensor, group: int) -> None:
        if site == "norm_output":
            x = x.double()
            self.block_grams[sub, group] += x.T @ x
        elif index == len(self.weights.blocks):  # the final norm's input
            with self.weights.onloaded(self.weights.adapter.final_norm) as norm:
                n = norm(x.to(self.weights.device_of(norm))).double()
            self.final[group] += (n.T @ n).to(self.final.device)

    def block_done(self, index: int, layer: nn.Module) -> None:
        self.grams.extend(all_sum(self.block_grams).float().cpu())
        self.block_grams = None

    @torch.no_grad()
    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(forms (sites, d, d) float64, grams (corpora, sites, d, d) float32), the head's site last."""
        forms = torch.stack([*self.forms, head_gram(self.weights, self.weights.device).cpu()])
        final = all_sum(self.final).float().cpu()
        grams = torch.stack([*self.grams, final], dim=1)
        return forms, grams


def scores(seen: Seen, settings: PruneSettings) -> dict[str, ActivationStats]:
    remove = seen.width - seen.kept
    out = {}
    for task, grams in progress(list(seen.grams.items()), desc="obs", unit="task"):
        order, _ = removal_order(seen.forms, grams, remove, settings.recover_alpha)
        score = torch.full((seen.width,), float(remove + 1), dtype=torch.float64)
        score[order] = torch.arange(1, remove + 1, dtype=torch.float64)
        out[task] = ActivationStats.fixed(score)
    return out


METHOD = Method(
    name="obs",
    summary="per task, greedy structured OBS: dims the readers' refit can absorb go first; merged by --merge",
    needs=frozenset({"tasks", "grams"}),
    scores=scores,
)
