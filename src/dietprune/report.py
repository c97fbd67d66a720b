"""Human-readable reports of a run: dense vs pruned accuracy per task (markdown), from the JSON."""

from __future__ import annotations


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def comparison_table(dense: dict, pruned: dict, heldout: tuple[str, ...] = ()) -> str:
    """Markdown: per task acc and acc_norm of both models with the pruned model's change."""
    lines = ["| task | n | dense acc | pruned acc | Δ acc | dense acc_norm | pruned acc_norm |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for task, d in dense["tasks"].items():
        p = pruned["tasks"][task]
        delta = f"{100 * (p['acc'] - d['acc']):+.1f}"
        name = f"{task} (held out)" if task in heldout else task
        lines.append(f"| {name} | {d['n']} | {_pct(d['acc'])} ± {100 * (d['acc_stderr'] or 0):.1f} | "
                     f"{_pct(p['acc'])} ± {100 * (p['acc_stderr'] or 0):.1f} | {delta} | "
                     f"{_pct(d['acc_norm'])} | {_pct(p['acc_norm'])} |")
    for label, keep in (("average (profiled tasks)", lambda t: t not in heldout),
                        ("average (held out)", lambda t: t in heldout)):
        tasks = [t for t in dense["tasks"] if keep(t)]
        if tasks:
            da = sum(dense["tasks"][t]["acc"] for t in tasks) / len(tasks)
            pa = sum(pruned["tasks"][t]["acc"] for t in tasks) / len(tasks)
            lines.append(f"| **{label}** | | {_pct(da)} | {_pct(pa)} | {100 * (pa - da):+.1f} | | |")
    if "perplexity" in dense and "perplexity" in pruned:
        d, p = dense["perplexity"], pruned["perplexity"]
        lines.append(f"\nperplexity on {d['texts']} held-out {d['corpus']} passages ({d['tokens']} tokens): "
                     f"dense {d['perplexity']:.2f}, pruned {p['perplexity']:.2f}")
    return "\n".join(lines)
