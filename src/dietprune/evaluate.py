"""Fast zero-shot multiple-choice evaluation that reproduces lm-evaluation-harness's HF backend.

Requests are tokenized exactly as lm-eval 0.4.x does (`HFLM._encode_pair`): trailing spaces of the
context move to the continuation, the context is encoded with the tokenizer's default special tokens
(Gemma adds <bos>, SmolLM2 nothing), and the continuation tokens are `encode(context + continuation)`
minus the first `len(encode(context))` tokens. The scores are the same; the speed comes from:

* one row per distinct context: the context is followed by all its continuations ("branches"), with a
  4D attention mask that lets each branch see the context and itself only, and position ids that restart
  after the context — so the context is encoded once per example instead of once per choice. A branch's
  last token is never fed (nothing is predicted from it), so one-token continuations (BoolQ, RTE) need
  just the context, as a plain causal row;
* the LM head (a quarter-million-row matrix for Gemma) applied in float32 only at the distinct positions
  that predict continuation tokens (the context's last position once, not once per choice);
* rows sorted by length and batched with right padding up to `MAX_BATCH_TOKENS` tokens (few large
  matmuls: a CPU runs a 40-token matmul at a fraction of its speed), under `torch.inference_mode`.

Multi-token branches fall back to one plain causal sequence per request (no custom mask) when the
model's attention is neither "sdpa" nor "eager", or when a request is longer than the model's sliding
window (the custom mask would not encode the window).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dietprune.progress import progress as progress_bar
from dietprune.tasks import Example, get_task, load_examples
from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages

HEAD_CHUNK = 128  # hidden states per LM-head matmul: bounds the (chunk, vocab) float32 logits buffer
MAX_BATCH_TOKENS = 2048  # padded tokens per forward pass: large matmuls for CPU efficiency, bounded memory
PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class _Row:
    """One sequence of a batch and the target tokens scored on it."""

    tokens: list[int]
    positions: list[int] | None = None  # None: plain causal row, no custom mask
    branches: list[int] | None = None  # per token: -1 shared context, j >= 0 continuation j
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (slot, at, targets)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids exactly as lm-eval's HF backend computes them."""
    return _encode_requests(tokenizer, [(context, continuation)])[0]


def _encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    moved = []
    for context, continuation in requests:
        if not context:
            raise ValueError("empty context: every request needs a non-empty context")
        n_spaces = len(context) - len(context.rstrip())
        moved.append((context[: len(context) - n_spaces], context[len(context) - n_spaces :] + continuation))
    unique = list(dict.fromkeys(c for c, _ in moved))
    ctx_ids = dict(zip(unique, tokenizer(unique)["input_ids"], strict=True))
    wholes = tokenizer([c + k for c, k in moved])["input_ids"]
    return [(ctx_ids[c], whole[len(ctx_ids[c]) :]) for (c, _), whole in zip(moved, wholes, strict=True)]


def _plain_row(slot: int, ctx: list[int], cont: list[int]) -> _Row:
    return _Row(ctx + cont[:-1], scored=[(slot, list(range(len(ctx) - 1, len(ctx) + len(cont) - 1)), cont)])


def _shared_row(ctx: list[int], branches: list[tuple[int, list[int]]]) -> _Row:
    """The context once, then each continuation but its last token; plain if no branch token remains."""
    row = _Row(list(ctx), list(range(len(ctx))), [-1] * len(ctx))
    for j, (slot, cont) in enumerate(branches):
        start = len(row.tokens)
        row.tokens += cont[:-1]
        row.positions += range(len(ctx), len(ctx) + len(cont) - 1)
        row.branches += [j] * (len(cont) - 1)
        row.scored.append((slot, [len(ctx) - 1, *range(start, start + len(cont) - 1)], cont))
    if len(row.tokens) == len(ctx):
        row.positions = row.branches = None
    return row


def _build_rows(model, encoded: list[tuple[list[int], list[int]]]) -> list[_Row]:
    """Group requests by context into shared rows where exact, else one plain row per request."""
    text_config = model.config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    packable = model.config._attn_implementation in PACKABLE_ATTENTION
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for slot, (ctx, cont) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append((slot, cont))
    rows = []
    for ctx_key, branches in groups.items():
        ctx = list(ctx_key)
        longest = len(ctx) + max(len(cont) for _, cont in branches) - 1
        single = all(len(cont) == 1 for _, cont in branches)
        if single or (packable and len(branches) > 1 and (window is None or longest <= window)):
            rows.append(_shared_row(ctx, branches))
        else:
            rows += [_plain_row(slot, ctx, cont) for slot, cont in branches]
    return rows


def _attention_inputs(rows: list[_Row], length: int, eager_dtype: torch.dtype | None) -> dict:
    """4D mask (context + own branch, causal) and position ids for a batch of packed rows."""
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    branch = torch.full((len(rows), length), -2)  # padding: its own branch, sees context and padding only
    for i, row in enumerate(rows):
        positions[i, : len(row.tokens)] = torch.tensor(row.positions)
        branch[i, : len(row.tokens)] = torch.tensor(row.branches)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    key, query = branch[:, None, :], branch[:, :, None]
    mask = (causal & ((key == -1) | (key == query)))[:, None]
    if eager_dtype is not None:  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=eager_dtype).masked_fill(~mask, torch.finfo(eager_dtype).min)
    return {"attention_mask": mask, "position_ids": positions}


def _target_logprobs(model, hidden: torch.Tensor, at: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) given hidden[at[i]]: the LM head (+ Gemma's final softcap) once per hidden row,
    in the head's own dtype even under autocast."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    hidden = hidden.to(head.weight.dtype)
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for first in range(0, len(hidden), HEAD_CHUNK):
        with torch.autocast(hidden.device.type, enabled=False):
            logits = head(hidden[first : first + HEAD_CHUNK]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        here = (at >= first) & (at < first + HEAD_CHUNK)
        out[here] = logits.log_softmax(-1)[at[here] - first, targets[here]]
    return out


def _batches(rows: list[_Row], batch_size: int) -> Iterable[list[_Row]]:
    """Consecutive rows of one kind, at most `batch_size` rows and `MAX_BATCH_TOKENS` padded tokens."""
    batch: list[_Row] = []
    for row in rows:
        if batch and (
            (row.positions is None) != (batch[0].positions is None)
            or len(batch) == batch_size
            or (len(batch) + 1) * len(batch[0].tokens) > MAX_BATCH_TOKENS
        ):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _score_rows(
    model, tokenizer, rows: list[_Row], n_slots: int, batch_size: int, dtype, progress: bool, desc: str
) -> list[float]:
    """Sum of target log-probabilities per slot, over all rows."""
    param = next(model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eager_dtype = param.dtype if model.config._attn_implementation == "eager" else None
    autocast = (
        torch.autocast(param.device.type, dtype=dtype)
        if dtype is not None and dtype != param.dtype
        else contextlib.nullcontext()
    )
    body = model.get_decoder()
    rows = sorted(rows, key=lambda r: (r.positions is None, -len(r.tokens)))
    totals = torch.zeros(n_slots, dtype=torch.float64)
    bar = progress_bar(total=sum(len(r.scored) for r in rows), desc=desc, disable=not progress)
    with torch.inference_mode(), autocast:
        for batch in _batches(rows, batch_size):
            length = len(batch[0].tokens)
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
            inputs = {"input_ids": ids}
            if batch[0].positions is not None:
                inputs |= _attention_inputs(batch, length, eager_dtype)
            inputs = {key: value.to(param.device) for key, value in inputs.items()}
            hidden = body(**inputs, use_cache=False).last_hidden_state
            flat, targets, slots = [], [], []
            for i, row in enumerate(batch):
                for slot, at, tgt in row.scored:
                    flat += [i * length + p for p in at]
                    targets += tgt
                    slots += [slot] * len(tgt)
            where, at = torch.tensor(flat, device=param.device).unique(return_inverse=True)
            picked = hidden.reshape(-1, hidden.shape[-1])[where]
            logprobs = _target_logprobs(model, picked, at, torch.tensor(targets, device=param.device))
            totals.index_add_(0, torch.tensor(slots), logprobs.double().cpu())
            bar.update(sum(len(r.scored) for r in batch))
    bar.close()
    return totals.tolist()


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """log P(continuation | context) for each (context, continuation) request, as lm-eval computes it.

    `batch_size` caps the rows (a context with all its continuations) per forward pass, besides the
    `MAX_BATCH_TOKENS` budget; `dtype`, if it differs from the model's, runs the transformer body under
    `torch.autocast` while the LM head keeps the model's dtype and the softmax is float32. On CPU,
    autocast re-casts the weights at every call (measured 1.5x slower than float32 here); for speed, load
    the model in bfloat16 instead.
    """
    encoded = _encode_requests(tokenizer, requests)
    rows = _build_rows(model, encoded)
    return _score_rows(model, tokenizer, rows, len(encoded), batch_size, dtype, progress, desc)


def score_examples(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 64, dtype=None, progress: bool = False
) -> list[list[float]]:
    """Per example, the log-likelihood of each choice."""
    requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations, strict=True)]
    desc = examples[0].task if examples else "loglikelihood"
    flat = loglikelihoods(model, tokenizer, requests, batch_size, dtype, progress, desc)
    out, start = [], 0
    for ex in examples:
        out.append(flat[start : start + len(ex.contexts)])
        start += len(ex.contexts)
    return out


def stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def predictions(example: Example, lls: Sequence[float]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of the log-likelihoods, and of log-likelihood / choice length in
    characters (lm-eval's acc_norm: `len(choice)` without the target delimiter; first index on ties)."""
    lengths = np.array([float(len(c)) for c in example.choices])
    return int(np.argmax(lls)), int(np.argmax(np.asarray(lls) / lengths))


def task_result(examples: Sequence[Example], lls: Sequence[Sequence[float]]) -> dict:
    """Accuracy metrics and per-example predictions of one task."""
    preds = [predictions(ex, ll) for ex, ll in zip(examples, lls, strict=True)]
    acc = [float(p == ex.gold) for (p, _), ex in zip(preds, examples, strict=True)]
    acc_norm = [float(q == ex.gold) for (_, q), ex in zip(preds, examples, strict=True)]
    return {
        "acc": float(np.mean(acc)) if acc else None,
        "acc_stderr": stderr(acc),
        "acc_norm": float(np.mean(acc_norm)) if acc_norm else None,
        "acc_norm_stderr": stderr(acc_norm),
        "n": len(examples),
        "metrics": list(get_task(examples[0].task).metrics) if examples else [],
        "ids": [ex.id for ex in examples],
        "preds": [p for p, _ in preds],
        "preds_norm": [q for _, q in preds],
    }


def select_examples(
    task: str, limit: int | None, exclude: dict[str, set[str]] | None = None, source: str = "offline"
) -> list[Example]:
    """The first `limit` examples of `task` (file order) whose ids are not in `exclude[task]`."""
    skip = (exclude or {}).get(task, set())
    kept = [ex for ex in load_examples(task, source) if ex.id not in skip]
    return kept if limit is None else kept[:limit]


def headline(result: dict) -> float | None:
    """A task's headline score: acc_norm where lm-eval reports it, else acc."""
    return result["acc_norm"] if "acc_norm" in result["metrics"] else result["acc"]


def dtype_name(dtype: torch.dtype) -> str:
    """How results record a dtype: "float32", "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def summarize(per_task: dict[str, dict], settings: dict) -> dict:
    """Full results: per-task metrics, averages over tasks, settings.

    `average.acc` is the mean accuracy over tasks; `average.score` the mean of each task's headline
    metric (acc_norm for HellaSwag, ARC, OpenBookQA and PIQA, acc for BoolQ, RTE and WinoGrande).
    """
    done = [r for r in per_task.values() if r["n"]]
    mean = (lambda xs: float(np.mean(xs))) if done else (lambda xs: None)
    average = {"acc": mean([r["acc"] for r in done]), "score": mean([headline(r) for r in done])}
    return {"tasks": per_task, "average": average, "settings": settings}


def evaluate(
    model,
    tokenizer,
    tasks: Iterable[str],
    limit: int | None,
    exclude: dict[str, set[str]] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    source: str = "offline",
    progress: bool = True,
) -> dict:
    """Zero-shot accuracy on `tasks`: the first `limit` examples per task whose ids are not excluded.

    Returns a JSON-able dict: `tasks[name]` = {acc, acc_stderr, acc_norm, acc_norm_stderr, n, metrics
    (those lm-eval reports; acc_norm is always computed), ids, preds, preds_norm, seconds}, `average`
    (see `summarize`) and `settings`.
    """
    model.eval()
    per_task = {}
    for task in tasks:
        examples = select_examples(task, limit, exclude, source)
        start = time.perf_counter()
        lls = score_examples(model, tokenizer, examples, batch_size, dtype, progress)
        per_task[task] = task_result(examples, lls) | {"seconds": time.perf_counter() - start}
    settings = {
        "backend": "dietprune",
        "limit": limit,
        "batch_size": batch_size,
        "dtype": dtype_name(dtype or next(model.parameters()).dtype),
        "source": source,
        "excluded": {task: len(ids) for task, ids in (exclude or {}).items()},
    }
    return summarize(per_task, settings)


def _pct(value: float | None, err: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def markdown_table(results: dict) -> str:
    """Markdown table of per-task accuracies (in %, ± standard error) and the averages."""
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for task, r in results["tasks"].items():
        norm = _pct(r["acc_norm"], r["acc_norm_stderr"]) if "acc_norm" in r["metrics"] else "–"
        lines.append(f"| {task} | {r['n']} | {_pct(r['acc'], r['acc_stderr'])} | {norm} |")
    avg = results["average"]
    lines.append(f"| **average** (acc / headline score) | | {_pct(avg['acc'])} | {_pct(avg['score'])} |")
    if "perplexity" in results:
        ppl = results["perplexity"]
        lines.append(f"\nperplexity on {ppl['texts']} {ppl['corpus']} passages ({ppl['tokens']} tokens): "
                     f"{ppl['perplexity']:.2f}")
    return "\n".join(lines)


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str] | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Token-level perplexity exp(mean NLL) over `texts`, each truncated to `max_length` tokens.

    The default corpus is offline and held out from all calibration: the last `PERPLEXITY_PASSAGES`
    LAMBADA test passages (book prose; see `lambada_passages`). Each text is encoded with the tokenizer's
    default special tokens and scored on its own; the first token is never predicted.
    """
    corpus = "lambada" if texts is None else "custom"
    texts = [t for _, t in lambada_passages()[-PERPLEXITY_PASSAGES:]] if texts is None else list(texts)
    ids = [t[:max_length] for t in tokenizer(texts)["input_ids"]]
    rows = [_plain_row(i, t[:1], t[1:]) for i, t in enumerate(ids) if len(t) > 1]
    total = sum(_score_rows(model, tokenizer, rows, len(ids), batch_size, dtype, progress, "perplexity"))
    tokens = sum(len(t) - 1 for t in ids)
    return {"perplexity": math.exp(-total / tokens), "corpus": corpus, "texts": len(texts), "tokens": tokens,
            "max_length": max_length}
