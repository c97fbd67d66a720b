"""The log-likelihood engine: lm-evaluation-harness's HF-backend scores, computed fast.

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
* rows sorted by length and batched with right padding up to a token budget (`budget`: 2,048 on a CPU,
  few large matmuls, as a CPU runs a 40-token matmul at a fraction of its speed; more on a GPU, by its
  free memory), under `torch.inference_mode`, with one host sync per head chunk at most.

Multi-token branches fall back to one plain causal sequence per request (no custom mask) when the
model's attention is neither "sdpa" nor "eager", or when a request is longer than the model's sliding
window (the custom mask would not encode the window).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dietprune.device import input_device
from dietprune.progress import progress as progress_bar

CPU_HEAD_CHUNK = 128  # hidden states per LM-head matmul on a CPU: bounds the (chunk, vocab) fp32 logits
CPU_BATCH_TOKENS = 2048  # padded tokens per forward pass on a CPU: large matmuls, bounded memory


def budget(model, device: torch.device) -> tuple[int, int]:
    """(padded tokens per forward pass, hidden rows per LM-head matmul): the CPU figures above; on a GPU
    as many as keep a batch's activations (~16 x width floats per token) within 5% of its free memory
    and the head's float32 logits (and their log-softmax) within 2%."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS, CPU_HEAD_CHUNK
    free = torch.cuda.mem_get_info(device)[0]
    config = model.config.get_text_config()
    tokens = int(min(32768, max(CPU_BATCH_TOKENS, free * 0.05 // (16 * config.hidden_size * 4))))
    chunk = int(min(8192, max(CPU_HEAD_CHUNK, free * 0.02 // (3 * config.vocab_size * 4))))
    return tokens, chunk
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


def _target_logprobs(model, hidden: torch.Tensor, at: torch.Tensor, targets: torch.Tensor, chunk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[i]) given hidden[at[i]], and whether targets[i] is the most likely token there: the
    LM head (+ Gemma's final softcap) once per hidden row, `chunk` rows per matmul, in the head's own
    dtype even under autocast. The results stay where the logits are until the end."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    hidden = hidden.to(head.weight.dtype if head.weight.device.type != "meta" else hidden.dtype)
    out, greedy = [], []
    for first in range(0, len(hidden), chunk):
        with torch.autocast(hidden.device.type, enabled=False):  # the head where accelerate placed it
            logits = head(hidden[first : first + chunk]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        index, columns = at.to(logits.device), targets.to(logits.device)
        here = (index >= first) & (index < first + chunk)
        rows = (index - first).clamp(0, len(logits) - 1)
        logprobs = logits.log_softmax(-1)[rows, columns]
        hits = logits.argmax(-1)[rows] == columns
        out.append(torch.where(here, logprobs, 0.0))
        greedy.append(torch.where(here, hits, True))
    return torch.stack(out).sum(0).cpu(), torch.stack(greedy).all(0).cpu()


def _batches(rows: list[_Row], batch_size: int, max_tokens: int) -> Iterable[list[_Row]]:
    """Consecutive rows of one kind, at most `batch_size` rows and `max_tokens` padded tokens."""
    batch: list[_Row] = []
    for row in rows:
        if batch and (
            (row.positions is None) != (batch[0].positions is None)
            or len(batch) == batch_size
            or (len(batch) + 1) * len(batch[0].tokens) > max_tokens
        ):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _score_rows(
    model, tokenizer, rows: list[_Row], n_slots: int, batch_size: int, dtype, progress: bool, desc: str
) -> tuple[list[float], list[bool]]:
    """Per slot, over all rows: the sum of its target log-probabilities, and whether every target is the
    most likely token (the continuation is the greedy decode)."""
    param, device = next(model.parameters()), input_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eager_dtype = param.dtype if model.config._attn_implementation == "eager" else None
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype is not None and dtype != param.dtype
        else contextlib.nullcontext()
    )
    body = model.get_decoder()
    max_tokens, chunk = budget(model, device)
    rows = sorted(rows, key=lambda r: (r.positions is None, -len(r.tokens)))
    totals = torch.zeros(n_slots, dtype=torch.float64)
    misses = torch.zeros(n_slots, dtype=torch.long)
    bar = progress_bar(total=sum(len(r.scored) for r in rows), desc=desc, disable=not progress)
    with torch.inference_mode(), autocast:
        for batch in _batches(rows, batch_size, max_tokens):
            length = len(batch[0].tokens)
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
            inputs = {"input_ids": ids}
            if batch[0].positions is not None:
                inputs |= _attention_inputs(batch, length, eager_dtype)
            inputs = {key: value.to(device) for key, value in inputs.items()}
            hidden = body(**inputs, use_cache=False).last_hidden_state
            flat, targets, slots = [], [], []
            for i, row in enumerate(batch):
                for slot, at, tgt in row.scored:
                    flat += [i * length + p for p in at]
                    targets += tgt
                    slots += [slot] * len(tgt)
            where, at = torch.tensor(flat, device=hidden.device).unique(return_inverse=True)
            picked = hidden.reshape(-1, hidden.shape[-1])[where]
            logprobs, greedy = _target_logprobs(model, picked, at, torch.tensor(targets), chunk)
            totals.index_add_(0, torch.tensor(slots), logprobs.double())
            misses.index_add_(0, torch.tensor(slots), (~greedy).long())
            bar.update(sum(len(r.scored) for r in batch))
    bar.close()
    return totals.tolist(), (misses == 0).tolist()


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> tuple[list[float], list[bool]]:
    """log P(continuation | context) for each (context, continuation) request, as lm-eval computes it,
    and whether the continuation is the greedy decode (lm-eval's `is_greedy`).

    `batch_size` caps the rows (a context with all its continuations) per forward pass, besides the
    token `budget`; `dtype`, if it differs from the model's, runs the transformer body under
    `torch.autocast` while the LM head keeps the model's dtype and the softmax is float32. On CPU,
    autocast re-casts the weights at every call (measured 1.5x slower than float32 here); for speed, load
    the model in bfloat16 instead.
    """
    encoded = _encode_requests(tokenizer, requests)
    rows = _build_rows(model, encoded)
    return _score_rows(model, tokenizer, rows, len(encoded), batch_size, dtype, progress, desc)


def continuation_logprobs(model, tokenizer, sequences: Sequence[list[int]], batch_size: int = 8,
                          dtype: torch.dtype | None = None, progress: bool = False,
                          desc: str = "loglikelihood") -> list[float]:
    """Per token sequence, the sum of log p(token | the tokens before it) over all tokens but the first."""
    rows = [_plain_row(i, seq[:1], seq[1:]) for i, seq in enumerate(sequences) if len(seq) > 1]
    return _score_rows(model, tokenizer, rows, len(sequences), batch_size, dtype, progress, desc)[0]
