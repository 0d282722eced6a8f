"""LLaVA-format data: a JSON list of records over an image folder, checked up front, tokenized once, batched.

    [{"id": "0001", "image": "images/0001.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is written here?"},
                        {"from": "gpt", "value": "cake"}],
      "answers": ["cake"]},                     # optional: every accepted answer of the first question (evaluation)
     ...]

`image` is relative to the image folder (default: the JSON file's folder). Every record is checked when the file is
read (its shape, its turns, one `<image>` placeholder, the image file's header), so a bad record fails with its
index and id before training starts, never inside the collate function; `skip_bad=True` drops such records and
counts them instead.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ablate.api.components import IGNORE_INDEX
from ablate.api.errors import DataError
from ablate.train.data.templates import IMAGE, ChatTemplate
from ablate.train.data.tokenizer import encode

HUMAN = {"human", "user"}
ASSISTANT = {"gpt", "assistant"}


@dataclass(frozen=True)
class Example:
    """One checked record: its place in the file, its id, image path and (question, answer) turns."""

    index: int
    id: str
    image: Path
    turns: tuple[tuple[str, str], ...]
    answers: tuple[str, ...]  # accepted answers of the first question

    @property
    def question(self) -> str:
        return self.turns[0][0]


@dataclass
class Skipped:
    """Records dropped with `skip_bad=True`, by reason."""

    reasons: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)  # the first few messages, for the report

    def add(self, message: str, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.first) < 3:
            self.first.append(message)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.count:
            return "no records skipped"
        kinds = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"skipped {self.count} bad record(s): {kinds}. First: {' | '.join(self.first)}"


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_examples(
    path: str | Path, image_folder: str | Path | None = None, skip_bad: bool = False
) -> tuple[list[Example], Skipped]:
    """Every record of a LLaVA JSON file, checked; bad ones raise DataError naming them (or are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Data file {path} does not exist. Point --data at a folder holding it (or name another file in the "
            f"stage's `data` key); `ablate data synth --out DIR` generates one."
        )
    folder = Path(image_folder) if image_folder else path.parent
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"Data file {path} is not valid JSON ({exc}). Fix or regenerate it.") from None
    if not isinstance(records, list):
        raise DataError(f"Data file {path} must hold a JSON list of LLaVA records, not a {type(records).__name__}.")
    examples, skipped = [], Skipped()
    for index, record in enumerate(records):
        try:
            examples.append(_checked(index, record, folder))
        except _BadRecord as exc:
            name = _name(index, record)
            message = f"{name} in {path}: {exc}"
            if not skip_bad:
                raise DataError(
                    f"Bad record {message}. Fix the record, or set train.skip_bad_records=true (--skip-bad for eval) "
                    f"to skip bad records and count them."
                ) from None
            skipped.add(message, exc.reason)
    if not examples:
        raise DataError(f"Data file {path} holds no usable records ({skipped.summary()}).")
    return examples, skipped


def _name(index: int, record: Any) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"#{index}" + (f" (id {record_id!r})" if record_id is not None else "")


def _checked(index: int, record: Any, folder: Path) -> Example:
    if not isinstance(record, dict):
        raise _BadRecord("malformed", f"a record must be a JSON object, not {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _BadRecord("malformed", "it has no 'conversations' list")
    if len(conversations) % 2:
        raise _BadRecord("malformed", f"it has {len(conversations)} turns; questions and answers must pair up")
    turns = []
    for turn_index in range(0, len(conversations), 2):
        question, answer = conversations[turn_index], conversations[turn_index + 1]
        for turn, roles, expected in ((question, HUMAN, "human"), (answer, ASSISTANT, "gpt")):
            if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
                raise _BadRecord(
                    "malformed",
                    f"turn {conversations.index(turn)} must be {{'from': '{expected}', 'value': TEXT}}, not {turn!r}",
                )
        turns.append((question["value"], answer["value"]))
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise _BadRecord("no image", "it has no 'image' path (ablate trains on image-text records)")
    placeholders = sum(question.count(IMAGE) for question, _ in turns)
    if placeholders > 1 or any(IMAGE in answer for _, answer in turns):
        raise _BadRecord("malformed", f"it holds {placeholders} '{IMAGE}' placeholders; give exactly one per record")
    if not placeholders:  # LLaVA's convention: the image comes first in the first question
        turns[0] = (f"{IMAGE}\n{turns[0][0]}", turns[0][1])
    image_path = folder / image
    if not image_path.is_file():
        raise _BadRecord("missing image", f"image file {image_path} does not exist")
    try:
        with Image.open(image_path) as opened:
            opened.verify()  # header and checksums, without decoding every pixel
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _BadRecord(
            "corrupt image", f"image file {image_path} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    answers = record.get("answers", [turns[0][1]])
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise _BadRecord("malformed", f"'answers' must be a non-empty list of strings, not {answers!r}")
    return Example(index, str(record.get("id", index)), image_path, tuple(turns), tuple(answers))


def open_image(example: Example) -> Image.Image:
    """The example's image as RGB; a file that passed the header check but fails to decode names its record."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(example.image) as image:
                return image.convert("RGB")
    except Exception as exc:
        raise DataError(
            f"Image {example.image} of record #{example.index} (id {example.id!r}) cannot be decoded "
            f"({type(exc).__name__}: {exc}). Replace the file or remove the record."
        ) from None


class ConversationDataset(torch.utils.data.Dataset):
    """Examples tokenized once with a template; items are (pixel_values, input_ids, labels).

    `prepare` turns a PIL image into the encoder's pixel_values (the encoder's own preprocessing, at the stage's
    resolution); prepared images are kept in memory when all of them fit in `cache_bytes`. Conversations longer
    than `max_length` tokens are cut at the end (counted in `truncated`).
    """

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        template: ChatTemplate,
        image_token_id: int,
        prepare: Callable[[Image.Image], torch.Tensor],
        max_length: int = 2048,
        cache_bytes: int = 512 * 2**20,
    ):
        self.examples = examples
        self.prepare = prepare
        self.truncated = 0
        self.encoded = []
        for example in examples:
            ids, labels = encode(tokenizer, template, template.segments(list(example.turns)), image_token_id)
            if len(ids) > max_length:
                if image_token_id not in ids[:max_length]:
                    raise DataError(
                        f"Record #{example.index} (id {example.id!r}) has its image placeholder after token "
                        f"{max_length} (train.max_length): raise train.max_length or shorten the record."
                    )
                ids, labels = ids[:max_length], labels[:max_length]
                self.truncated += 1
            self.encoded.append((torch.tensor(ids), torch.tensor(labels)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache: dict[int, torch.Tensor] | None = None  # prepared images, when they fit in `cache_bytes`
        self.cache_bytes = cache_bytes

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = self.encoded[index]
        if self.cache is not None and index in self.cache:
            return self.cache[index], ids, labels
        pixels = self.prepare(open_image(self.examples[index]))
        if self.cache is None and pixels.numel() * pixels.element_size() * len(self) <= self.cache_bytes:
            self.cache = {}  # decoding and resizing cost as much as a small model's step: keep them
        if self.cache is not None:
            self.cache[index] = pixels
        return pixels, ids, labels

    def collate(self, items) -> dict[str, torch.Tensor]:
        """Right padding: pad ids, IGNORE_INDEX labels, attention mask 0 on the padding."""
        pixels, ids, labels = zip(*items)
        length = max(len(row) for row in ids)
        batch = {
            "pixel_values": torch.stack(pixels),
            "input_ids": torch.full((len(ids), length), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), length), dtype=torch.long),
        }
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, : len(row_ids)] = row_ids
            batch["labels"][row, : len(row_labels)] = row_labels
            batch["attention_mask"][row, : len(row_ids)] = 1
        return batch
