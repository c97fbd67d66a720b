"""The fast log-likelihood core against a naive full-vocabulary computation, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from dietprune.engine import _build_rows, _encode_requests, encode_pair, loglikelihoods
from dietprune.errors import DietError
from dietprune.evaluate import evaluate, perplexity, score_examples, select_examples
from dietprune.metrics import predictions
from dietprune.report import markdown_table

CORPUS = [
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide",
    "The cup fell off the table because the table was wobbly.",
    "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing.",
    "Is the sky blue? yes. Is grass red? no. True or False? True",
]
REQUESTS = [  # shared contexts, a trailing-space context, one- and multi-token continuations, long rows
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants take in?\nAnswer:", " nitrogen and argon"),
    ("Is the sky blue? ", "yes"),
    ("Is the sky blue? ", "no"),
    ("The cup fell off the table because the cup", " was wobbly."),
    ("The cup fell off the table because the table", " was wobbly."),
    ("A man is sitting on a roof. " * 4 + "He", " starts pulling up roofing."),
    ("A man is sitting on a roof. " * 4 + "He", " is"),
    ("True or False?", " True"),  # one-token continuations: a plain row scoring both at its last position
    ("True or False?", " table"),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fly (merges cross word starts, like real tokenizers); adds <s>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>")


def _model(kind: str, vocab: int, attn: str = "sdpa"):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, pad_token_id=0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
    else:  # sliding window 48: the long rows exceed it and take the plain path; softcap is exercised
        config = transformers.Gemma3TextConfig(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=48, final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def _naive(model, tokenizer, requests, greedy: bool = False) -> list:
    """lm-eval's HF recipe: encode whole and context, split, full forward, full-vocab log-softmax;
    with `greedy`, (loglikelihood, is_greedy) pairs."""
    out = []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx) :]
        with torch.no_grad():
            logprobs = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
        ll = sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        is_greedy = all(logprobs[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        out.append((ll, is_greedy) if greedy else ll)
    return out


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Is the sky blue? ", "yes")
    assert ctx == tokenizer.encode("Is the sky blue?")
    assert ctx + cont == tokenizer.encode("Is the sky blue? yes")
    assert ctx[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in cont


@pytest.mark.parametrize(("kind", "attn"), [("llama", "sdpa"), ("gemma3", "sdpa"), ("gemma3", "eager")])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_match_naive(tokenizer, kind, attn, batch_size):
    model = _model(kind, len(tokenizer), attn)
    expected = _naive(model, tokenizer, REQUESTS)
    got, greedy = loglikelihoods(model, tokenizer, REQUESTS, batch_size=batch_size)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
    assert max(expected) - min(expected) > 5  # the check has power: scores differ widely
    assert greedy == [g for _, g in _naive(model, tokenizer, REQUESTS, greedy=True)]
    rows = _build_rows(model, _encode_requests(tokenizer, REQUESTS))
    shared = sorted(len(r.scored) for r in rows if r.positions is not None)
    assert shared == ([2, 3] if kind == "gemma3" else [2, 2, 3])  # Gemma's long rows: plain
    assert [len(r.scored) for r in rows if r.positions is None and len(r.scored) > 1] == [2]


def test_bfloat16_autocast_is_close(tokenizer):
    model = _model("llama", len(tokenizer))
    exact = loglikelihoods(model, tokenizer, REQUESTS)[0]
    fast = loglikelihoods(model, tokenizer, REQUESTS, dtype=torch.bfloat16)[0]
    assert fast != exact
    assert fast == pytest.approx(exact, rel=0.05)


def test_score_examples_and_evaluate(tokenizer):
    model = _model("llama", len(tokenizer))
    examples = select_examples("arc_easy", 4) + select_examples("winogrande", 3)
    lls = score_examples(model, tokenizer, examples, batch_size=2)
    for ex, ll in zip(examples, lls, strict=True):
        pairs = list(zip(ex.contexts, ex.continuations, strict=True))
        assert ll == pytest.approx(_naive(model, tokenizer, pairs), abs=1e-4)

    results = evaluate(model, tokenizer, ["arc_easy", "winogrande"], limit=4, exclude={"arc_easy": {"1"}},
                       progress=False)
    arc = results["tasks"]["arc_easy"]
    assert arc["ids"] == ["0", "2", "3", "4"] and arc["n"] == 4
    golds = [ex.gold for ex in select_examples("arc_easy", 4, {"arc_easy": {"1"}})]
    assert arc["acc"] == pytest.approx(sum(p == g for p, g in zip(arc["preds"], golds, strict=True)) / 4)
    assert results["tasks"]["winogrande"]["metrics"] == ["acc"]
    wino = results["tasks"]["winogrande"]
    assert results["average"]["acc"] == pytest.approx((arc["acc"] + wino["acc"]) / 2)
    assert results["average"]["score"] == pytest.approx((arc["acc_norm"] + wino["acc"]) / 2)
    assert "| arc_easy | 4 |" in markdown_table(results)


def test_perplexity_matches_naive(tokenizer):
    model = _model("gemma3", len(tokenizer))
    texts = CORPUS[:3]
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text)[:20]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        nll -= sum(logprobs[i, t].item() for i, t in enumerate(ids[1:]))
        count += len(ids) - 1
    result = perplexity(model, tokenizer, texts, max_length=20, batch_size=2)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["tokens"] == count and result["texts"] == 3


def test_perplexity_text_is_never_calibration_text():
    from dietprune.calibration import generic_corpus
    from dietprune.tasks.data import PERPLEXITY_PASSAGES, lambada_passages

    passages = lambada_passages()
    held_out = {i for i, _ in passages[-PERPLEXITY_PASSAGES:]}
    ids = generic_corpus(len(passages) - PERPLEXITY_PASSAGES).ids  # the largest generic calibration set
    assert len(held_out) == PERPLEXITY_PASSAGES and not held_out & set(ids)
    with pytest.raises(DietError, match="calibration passages"):
        generic_corpus(len(passages) - PERPLEXITY_PASSAGES + 1)


@pytest.mark.slow
def test_same_predictions_as_lm_eval_on_embedded_model():
    """Ours and lm-eval's HF backend agree per example (float ties allowed) on the embedded Gemma-3 270M."""
    pytest.importorskip("lm_eval")
    from dietprune.lm_eval_bridge import lm_eval_loglikelihoods
    from dietprune.models.load import load_model

    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = {task: select_examples(task, 6) for task in ("arc_easy", "winogrande", "boolq", "hellaswag")}
    theirs = lm_eval_loglikelihoods(model, tokenizer, examples, batch_size=8)[0]
    for task, exs in examples.items():
        for ex, ours, ref in zip(exs, score_examples(model, tokenizer, exs), theirs[task], strict=True):
            assert ours == pytest.approx(ref, abs=1e-3)
            norm = [r / len(c) for r, c in zip(ref, ex.choices, strict=True)]
            (pred, pred_norm), (ref_pred, ref_norm) = predictions(ex, ours), predictions(ex, ref)
            assert pred == ref_pred or abs(ref[pred] - ref[ref_pred]) < 1e-4, (task, ex.id)
            assert pred_norm == ref_norm or abs(norm[pred_norm] - norm[ref_norm]) < 1e-4, (task, ex.id)


def test_greedy_continuations_are_recognised():
    """A continuation made of the model's own argmax tokens is greedy; changing its last token is not.
    (A word-level tokenizer whose every id is a word, so token ids and strings convert both ways.)"""
    from conftest import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    context = "Question: is the a ? Answer:"
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    words = tokenizer.convert_ids_to_tokens(ids[-3:])
    changed = words[:2] + ["yes" if words[2] != "yes" else "no"]
    requests = [(context, " " + " ".join(words)), (context, " " + " ".join(changed))]
    lls, greedy = loglikelihoods(model, tokenizer, requests)
    assert greedy == [g for _, g in _naive(model, tokenizer, requests, greedy=True)] == [True, False]
