"""Accuracy next to latency (`ablate eval RUN_DIR --data DIR`): greedy answers scored by exact match and ANLS, in
the same record as the timing figures.

The record is `ablate.measure`'s for the trained model, timed on one of the evaluation images with a prompt as long
as the evaluation questions, with its `accuracy` block filled (`ablate.measurement.record.Accuracy`),
so that a grid or a plot holds accuracy and TTFT of the same variant in one row. Exact match compares answers after
light normalization (case, surrounding spaces and punctuation); ANLS is the average normalized Levenshtein
similarity, 0 below 0.5 (the DocVQA/TextVQA-style metric); both take the best of a record's accepted answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ablate.api.components import DECODER_PRUNING
from ablate.api.errors import AblateError, ConfigError
from ablate.api.registry import Registry, get_registry
from ablate.config.compose import VLMConfig, config_hash, load_config
from ablate.measurement.measure import failed_record, measure
from ablate.measurement.record import Accuracy, Record
from ablate.model.build import build
from ablate.model.vlm import VLM
from ablate.train.data.llava import Example, open_image, read_examples
from ablate.train.data.templates import ChatTemplate, get_template
from ablate.train.data.tokenizer import encode, load_tokenizer, stop_token_id
from ablate.train.run_dir import trained_step

ANLS_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------- metrics


def normalize(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    return float(normalize(prediction) in {normalize(answer) for answer in answers})


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Iterable[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Best normalized Levenshtein similarity to any accepted answer; 0 when the distance is threshold or more."""
    best = 0.0
    for answer in answers:
        a, b = normalize(prediction), normalize(answer)
        distance = levenshtein(a, b) / max(len(a), len(b), 1)
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# ------------------------------------------------------------------------------------------ generation


@torch.inference_mode()
def generate(
    vlm: VLM,
    pixel_values: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    stop_id: int | None,
    max_new_tokens: int,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuation of each prompt (one image placeholder each): the new ids, without the stop id.

    Prompts are left-padded so every row's last position is its own; the LLM reruns on the growing sequence (no
    KV cache: answers are a few tokens, and the decoder interface stays the prefill one). A reducer that prunes
    inside the LLM (FastV, DART) acts in the prefill and the KV cache it leaves: then the prompts must be of one
    length, and generation goes on from that cache.
    """
    device = vlm.device
    length = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, length - len(prompt) :] = 1
    ctx = vlm.run_vision(vlm.start(pixel_values.to(device), ids))
    out: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    if DECODER_PRUNING in ctx.extras:  # FastV, DART: the pruning lives in the prefill and the KV cache it leaves
        if len({len(prompt) for prompt in prompts}) > 1:
            raise ConfigError("In-LLM pruning takes unpadded prompts: answer prompts of one length together.")
        next_ids, cache, position = vlm.start_decoding(ctx)
        for index in range(max_new_tokens):
            _collect(out, finished, next_ids[:, 0], stop_id)
            if bool(finished.all()) or index == max_new_tokens - 1:
                break
            next_ids = vlm.next_token(next_ids, cache, position + index)
        return out
    embeds, _, mask = vlm.splice(ctx.tokens, ids, ctx.text_embeds, None, mask)
    for _ in range(max_new_tokens):
        logits = vlm.decoder(embeds, attention_mask=mask).logits
        next_ids = logits.argmax(dim=-1)
        _collect(out, finished, next_ids, stop_id)
        if bool(finished.all()):
            break
        embeds = torch.cat([embeds, vlm.decoder.embed(next_ids[:, None]).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def _collect(out: list[list[int]], finished: torch.Tensor, next_ids: torch.Tensor, stop_id: int | None) -> None:
    """Append each unfinished row's (B,) next id to its answer; rows that produced the stop id finish."""
    for row, token in enumerate(next_ids.tolist()):
        if not finished[row] and token != stop_id:
            out[row].append(token)
    if stop_id is not None:
        finished |= next_ids == stop_id


def answer(
    vlm: VLM,
    tokenizer,
    template: ChatTemplate,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_new_tokens: int = 16,
) -> list[str]:
    """The model's greedy answer to each example's first question."""
    stop = stop_token_id(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [prompt_ids(tokenizer, template, example.question, vlm.image_token_id) for example in examples]
    batches = [range(start, min(start + batch_size, len(examples))) for start in range(0, len(examples), batch_size)]
    if vlm.reducer.prunes_in_decoder:  # in-LLM pruning takes unpadded prompts: batch those of one length together
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        batches = [
            group[start : start + batch_size]
            for group in by_length.values()
            for start in range(0, len(group), batch_size)
        ]
    predictions = [""] * len(examples)
    for batch in batches:
        pixels = torch.stack([vlm.encoder.prepare(open_image(examples[index])) for index in batch])
        for index, ids in zip(
            batch, generate(vlm, pixels, [prompts[index] for index in batch], stop, max_new_tokens, pad)
        ):
            predictions[index] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return predictions


def prompt_ids(tokenizer, template: ChatTemplate, question: str, image_token_id: int) -> list[int]:
    return encode(tokenizer, template, [(template.prompt(question), False)], image_token_id)[0]


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(
    run_dir: str | Path | VLMConfig,
    overrides: Iterable[str] = (),
    *,
    data: str | Path,
    split: str = "test.json",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    skip_bad: bool = False,
    registry: Registry | None = None,
    **run_options: Any,
) -> Record:
    """Score a trained model (a run folder or checkpoint) on a LLaVA file and time it: one record with `accuracy`.

    `run_options` set the timing run (`repeats`, `warmup`, `device`, ...) as for `ablate.measure`. On failure this
    raises an AblateError carrying the partial record, like `measure`.
    """
    registry = registry or get_registry()
    try:
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {limit}.")
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be at least 1.")
        config = load_config(run_dir, overrides, registry, run=run_options)
        data = Path(data)
        examples, skipped = read_examples(data / split, config.train.image_folder, skip_bad)
        split_sha256 = hashlib.sha256((data / split).read_bytes()).hexdigest()
        limit = limit if limit and limit < len(examples) else None  # a limit that cuts nothing is the whole file
        examples = examples[:limit] if limit else examples
        tokenizer_dir = Path(config.train.tokenizer) if config.train.tokenizer else data / "tokenizer"
        tokenizer = load_tokenizer(tokenizer_dir)
        template = get_template(config.train.stages[-1].template or config.train.template)
        torch.manual_seed(config.run.seed)
        vlm = build(config, registry=registry)
        if not vlm.loaded_weights:
            raise ConfigError(
                f"{run_dir} loads no weights: evaluate a trained model (an `ablate train` run folder or checkpoint), "
                f"or a config whose `weights` name trained weights."
            )
        predictions = answer(vlm, tokenizer, template, examples, batch_size, max_new_tokens)
        prompt_tokens = int(
            statistics.median(
                len(prompt_ids(tokenizer, template, example.question, vlm.image_token_id)) - 1 for example in examples
            )
        )
        del vlm
    except AblateError as exc:
        if getattr(exc, "record", None) is None:
            exc.record = failed_record(exc, "evaluating")
        raise
    accuracy = Accuracy(
        exact_match=statistics.fmean(exact_match(p, e.answers) for p, e in zip(predictions, examples)),
        anls=statistics.fmean(anls(p, e.answers) for p, e in zip(predictions, examples)),
        n=len(examples),
        chance=_chance(data),
        split=split,
        data=str(data.resolve()),
        split_sha256=split_sha256,
        limit=limit,
        model=config.weights or config.name,
        step=trained_step(Path(config.weights)) if config.weights else None,
        skipped=skipped.count,
        max_new_tokens=max_new_tokens,
    )
    timing_options = {**run_options, "image": str(examples[0].image)}
    try:
        record = measure(config, [f"prompt_tokens={prompt_tokens}"], registry=registry, **timing_options)
    except AblateError as exc:
        exc.record.accuracy = accuracy
        raise
    record.accuracy = accuracy
    record.notes.append(
        f"accuracy: greedy answers to {len(examples)} records of {split}; timing: one of its images, a prompt of "
        f"{prompt_tokens} text tokens (the median question)."
    )
    return record


def _chance(data: Path) -> float | None:
    """The chance level a generated data set states in its meta.json (None for other data)."""
    try:
        return float(json.loads((data / "meta.json").read_text())["chance"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# What an eval row is keyed by, beside the model's config: change any of these and the answers may change, so a
# results store keeps one row each (and scoring the same model on the same records again replaces its row).
EVAL_KEY_FIELDS = ("model", "step", "data", "split", "split_sha256", "limit", "max_new_tokens")


def eval_key(record: Record) -> str:
    """The results-store key of an eval record: its resolved config plus `EVAL_KEY_FIELDS` of its accuracy."""
    accuracy = record.accuracy or Accuracy()
    return config_hash({**(record.config or {}), "eval": {name: getattr(accuracy, name) for name in EVAL_KEY_FIELDS}})


def eval_label(record: Record) -> str:
    """Which model on which records, for tables and plots: 'eval synth-tiny @ runs/a on data/test.json (limit 20)'."""
    accuracy = record.accuracy or Accuracy()
    label = f"eval {record.name}"
    if accuracy.model and accuracy.model != record.name:
        label += f" @ {_short_path(accuracy.model)}"
    if accuracy.data and accuracy.split:
        label += f" on {_short_path(os.path.join(accuracy.data, accuracy.split))}"
    return label + (f" (limit {accuracy.limit})" if accuracy.limit else "")


def _short_path(path: str) -> str:
    """A path below the working folder relative to it (as the user typed it, usually), any other in full."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
