"""A plan executed: observe what the method needs (one sequential pass, cached per task), choose what
stays, and build the pruned model block by block, in memory or straight into checkpoint files.

    calibrate -> (hidden-dim method) merge into K dims -> slice, or slice and refit (recover.py)
              -> (structural method) its edit
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from dietprune.assemble import DiscardSink, FileSink, MemorySink, Sink, assemble
from dietprune.calibration import (
    Corpus,
    all_sum,
    corpus_batches,
    generic_corpus,
    is_main_process,
    process_group,
    task_corpora,
)
from dietprune.errors import DietError
from dietprune.merge import agreement, merge
from dietprune.methods.base import Seen, require_tokens
from dietprune.methods.magnitude import Magnitude
from dietprune.methods.obs import ReaderGrams
from dietprune.models.edit import count_params, edited_config, meta_model
from dietprune.models.load import Loaded
from dietprune.models.store import Checkpoint
from dietprune.plan import Plan, recovery_set
from dietprune.profile import ActivationStats, profile
from dietprune.recover import recover
from dietprune.scores import cache_path, cached_stats, model_fingerprint, store_stats
from dietprune.sequential import Stream, Weights, capture, observe
from dietprune.settings import PruneSettings
from dietprune.slice import slice_edit, sliced_param_count


@dataclass
class Pruned:
    """A pruned model, what was done to it (saved as dietprune.json), and the dtype it is saved in.
    `model` is in memory; a streamed prune's model is in `checkpoint` instead (its directory holds the
    config and the weights, already in the saved dtype and form); a data-parallel process after the
    first has neither."""

    model: PreTrainedModel | None
    tokenizer: object
    record: dict
    save_dtype: torch.dtype
    checkpoint: Checkpoint | None = None


def execute(plan: Plan, loaded: Loaded, score_file: tuple[dict[str, ActivationStats], dict] | None = None,
            in_place: bool = False, staging: Path | None = None
            ) -> tuple[PreTrainedModel | Checkpoint | None, dict]:
    """Prune `loaded` as `plan` says; returns the pruned model (in memory, or the checkpoint it was
    streamed into under `staging`; None in a data-parallel process after the first) and the record of
    what was chosen and which samples were used."""
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = Weights(model, plan.device, plan.dtype, loaded.checkpoint if plan.stream else None)
    used: dict[str, dict] = {}
    record: dict = {}
    clock = time.perf_counter()

    def sink(config, into_dense: bool = False) -> Sink:
        if not is_main_process():  # data parallel: the first process keeps the model
            return DiscardSink(config)
        if plan.stream:
            directory = staging or Path(tempfile.mkdtemp(prefix="dietprune-pruned-"))
            return FileSink(directory, config, plan.save_dtype, getattr(model, "generation_config", None))
        return MemorySink(config, plan.dtype, into_dense)

    if plan.method.kind == "structural":
        target = sliced_param_count(model, plan.kept)
        observer = plan.method.observer(model, target)  # refuses a target it cannot meet, before any work
        corpora = task_corpora(plan.calibration)
        _record_used(used, corpora)
        batches, _ = corpus_batches(tokenizer, corpora, plan.batching, shard=True)
        stream = capture(weights, batches)
        observe(weights, stream, [observer], plan.method.name)
        require_tokens(stream.tokens())
        observed_s = time.perf_counter() - clock
        edit, structure = plan.method.edit(model, observer, target, in_place)
        out = sink(edit.config)
        assemble(weights, edit, out, plan.method.name)
        record |= {"kept_dims": list(range(edit.config.hidden_size)), "structure": structure}
    else:
        if score_file is not None:
            stats, meta = score_file
            used |= meta.get("tasks", {})
        else:
            stats = plan.method.scores(calibrate(weights, tokenizer, plan, used), plan.settings)
        observed_s = time.perf_counter() - clock
        keep, agreement_by_task = choose_dims(stats, plan.kept, plan.settings)
        record |= {"kept_dims": keep.tolist(), "task_agreement": agreement_by_task}
        channels = {"intermediate_size": plan.channels} if plan.channels else {}
        config = edited_config(model.config, {"hidden_size": plan.kept} | channels)
        if plan.parts:
            started = time.perf_counter()
            corpora = recovery_set(plan.settings, task_corpora(plan.calibration))
            _record_used(used, corpora)
            out = sink(config, into_dense=in_place)
            refit = plan.refit
            chosen = recover(weights, tokenizer, corpora, keep, refit, plan.batching, out, in_place)
            record["recovery"] = {"method": plan.settings.recover, "parts": list(refit.parts),
                                  "head": refit.head, "alpha": refit.alpha,
                                  "mlp_channels_kept": refit.channels,
                                  "alpha_chosen": {str(a): chosen.count(a) for a in refit.grid},
                                  "seconds": round(time.perf_counter() - started, 1),
                                  "tasks": {c.name: {"ids": list(c.ids)} for c in corpora}}
        else:
            out = sink(config)
            assemble(weights, slice_edit(model, keep, in_place), out)
    result = out.finish()
    shape = result if isinstance(out, MemorySink) else meta_model(out.pruned_config)
    if isinstance(out, FileSink) and out.saved_as:
        record["saved_as"] = out.saved_as
    stages = {"calibrate": round(observed_s, 2), "build": round(time.perf_counter() - clock - observed_s, 2)}
    return result, record | {"calibration": used, "hidden_size_after": shape.config.hidden_size,
                             "params_after": count_params(shape), "seconds_by_stage": stages}


def calibrate(weights: Weights, tokenizer, plan: Plan, used: dict[str, dict], also: tuple[str, ...] = ()
              ) -> Seen:
    """What a hidden-dim method needs, in one pass over the blocks: each task's (and generic text's)
    activation statistics, taken from the profile cache where they are there (all profiled again when
    the method needs their Gram matrices, which are not cached), and the weights' magnitudes. Records
    every corpus used in `used`. `also`: other sites profiled (and cached) in the same pass, for a prune
    that follows (`diet run`'s paper DIET beside the default)."""
    needs, settings = plan.method.needs, plan.calibration
    seen = Seen(weights.model.config.hidden_size, plan.kept)
    corpora = task_corpora(settings) if "tasks" in needs else []
    if "generic" in needs:
        corpora.append(generic_corpus(settings.samples * len(settings.tasks)))
    fingerprint = model_fingerprint(weights) if corpora else ""
    sites = (settings.site, *(site for site in also if site != settings.site))
    paths = {(c.name, site): cache_path(fingerprint, c, replace(settings, site=site)) for c in corpora
             for site in sites}
    stats = {c.name: cached for c in corpora
             if (cached := cached_stats(paths[c.name, settings.site], c.name)) is not None}
    if corpora:  # data parallel: cached only where every process finds it, so all profile the same corpora
        here = torch.tensor([c.name in stats for c in corpora], dtype=torch.float64, device=weights.device)
        everywhere = (all_sum(here) == process_group()[1]).tolist()
        stats = {c.name: stats[c.name] for c, hit in zip(corpora, everywhere, strict=True) if hit}
    magnitude = [Magnitude(weights)] if "magnitude" in needs else []
    grams = [ReaderGrams(weights, len(corpora))] if "grams" in needs else []  # not cached: every corpus
    missing = corpora if grams else [c for c in corpora if c.name not in stats]
    if missing:
        found = profile(weights, tokenizer, missing, sites, plan.batching, (*magnitude, *grams),
                        desc=f"profile {len(missing)} task{'s' * (len(missing) > 1)}")
        for site, per_corpus in found.items():
            for corpus, corpus_stats in zip(missing, per_corpus, strict=True):
                store_stats(paths[corpus.name, site], corpus.name, corpus_stats)
        stats |= {corpus.name: s for corpus, s in zip(missing, found[settings.site], strict=True)}
    elif magnitude:  # a weights-only pass
        observe(weights, Stream([], [], [], [], weights.device), magnitude, "magnitude")
    if magnitude:
        seen.magnitude = magnitude[0].result()
    if grams:
        seen.forms, per_corpus = grams[0].result()
        seen.grams = {c.name: g for c, g in zip(corpora, per_corpus, strict=True)}
    for corpus in corpora:
        used[corpus.name] = {"ids": list(corpus.ids), "tokens": stats[corpus.name].tokens} | (
            {"source": corpus.source} if corpus.source else {})
        if corpus.name == "lambada" and "generic" in needs:
            seen.generic = stats[corpus.name]
        else:
            seen.tasks[corpus.name] = stats[corpus.name]
    return seen


def choose_dims(stats: dict[str, ActivationStats], k: int, settings: PruneSettings
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """The k hidden dims a hidden-dim method keeps, from its per-source stats, and how many of each
    merged source's own top-k they are."""
    names = _merged_names(list(stats), settings.merge_tasks)
    matrix = torch.stack([stats[name].score(settings.aggregation) for name in names])
    keep = merge(matrix, k, settings.merge)
    return keep, agreement(matrix, keep, names)


def _merged_names(names: list[str], merge_tasks: tuple[str, ...]) -> list[str]:
    """The sources whose scores are merged: all, or the requested subset of the profiled tasks."""
    if not merge_tasks:
        return names
    unknown = sorted(set(merge_tasks) - set(names))
    if unknown:
        raise DietError(f"cannot merge {', '.join(unknown)}: not among the profiled {', '.join(names)}")
    return [n for n in names if n in merge_tasks]


def _record_used(used: dict[str, dict], corpora: list[Corpus]) -> None:
    """Record the corpora's samples as used (evaluation excludes them), beside those already there."""
    for corpus in corpora:
        entry = used.setdefault(corpus.name, {"ids": []})
        entry["ids"] += [i for i in corpus.ids if i not in entry["ids"]]
        if corpus.source:
            entry["source"] = corpus.source
