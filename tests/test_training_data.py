"""Training data: chat templates, label masking, LLaVA records and their errors, the generated task and tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ablate.api.components import IGNORE_INDEX
from ablate.api.errors import ConfigError, DataError
from ablate.train.data.llava import ConversationDataset, read_examples
from ablate.train.data.synth import SynthOptions, generate
from ablate.train.data.templates import TEMPLATES, get_template
from ablate.train.data.tokenizer import encode, load_tokenizer

IMAGE_ID = 127


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small generated task: 12 training and 4 test records."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthOptions(seed=3, train=12, test=4, answers=4))
    return out


@pytest.fixture(scope="module")
def tokenizer(synth):
    return load_tokenizer(synth / "tokenizer")


# -------------------------------------------------------------------------------------------- templates


def test_chatml_renders_qwen2_chat_format():
    segments = TEMPLATES["chatml"].segments([("<image>\nWhat is it?", "cake"), ("And now?", "milk")])
    text = "".join(text for text, _ in segments)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\ncake<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\nmilk<|im_end|>\n"
    )
    assert [text for text, target in segments if target] == ["cake<|im_end|>", "milk<|im_end|>"]


def test_vicuna_v1_renders_llava_conversation_format():
    template = TEMPLATES["vicuna_v1"]
    segments = template.segments([("<image>\nWhat is it?", "cake"), ("And now?", "milk")])
    text = "".join(text for text, _ in segments)
    assert text == (
        f"{template.system} USER: <image>\nWhat is it? ASSISTANT: cake</s>USER: And now? ASSISTANT: milk</s>"
    )
    assert [text for text, target in segments if target] == [" cake</s>", " milk</s>"]
    assert template.bos and template.prompt("Q?") == f"{template.system} USER: Q? ASSISTANT:"


def test_unknown_template_names_the_choices():
    with pytest.raises(ConfigError, match="Unknown chat template 'chatm'.*Did you mean 'chatml'"):
        get_template("chatm")


# ----------------------------------------------------------------------------------------- label masking


@pytest.mark.parametrize("name", ["chatml", "vicuna_v1"])
def test_only_assistant_tokens_carry_labels(synth, tokenizer, name):
    template = TEMPLATES[name]
    first, second = json.loads((synth / "meta.json").read_text())["answers"][:2]
    turns = [("<image>\nWhat word is written in the image?", first), ("Read the word in the picture.", second)]
    ids, labels = encode(tokenizer, template, template.segments(turns), IMAGE_ID)
    assert ids.count(IMAGE_ID) == 1 and labels[ids.index(IMAGE_ID)] == IGNORE_INDEX
    kept = [tokenizer.convert_ids_to_tokens(label) for label in labels if label != IGNORE_INDEX]
    stop = template.stop
    assert kept == [first, stop, second, stop]
    assert [label for label, token in zip(labels, ids) if label != IGNORE_INDEX] == [
        token for label, token in zip(labels, ids) if label != IGNORE_INDEX
    ]
    if template.bos:
        assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX


def test_collate_pads_with_ignored_labels_and_a_zero_mask(synth, tokenizer):
    examples, _ = read_examples(synth / "train.json")
    dataset = ConversationDataset(examples[:3], tokenizer, TEMPLATES["chatml"], IMAGE_ID, lambda image: torch.zeros(3))
    dataset.encoded[1] = (dataset.encoded[1][0][:-2], dataset.encoded[1][1][:-2])  # at least one shorter row
    batch = dataset.collate([dataset[i] for i in range(3)])
    length = batch["input_ids"].shape[1]
    for row, (ids, labels) in enumerate(dataset.encoded):
        padding = length - len(ids)
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * padding
        assert batch["input_ids"][row].tolist() == ids.tolist() + [tokenizer.pad_token_id] * padding
        assert batch["labels"][row].tolist() == labels.tolist() + [IGNORE_INDEX] * padding
    assert length - len(dataset.encoded[1][0]) >= 2


# ------------------------------------------------------------------------------------------ data errors


def _write(folder: Path, records) -> Path:
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def _record(image="ok.png", **changes):
    record = {
        "id": "r1",
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
    }
    record.update(changes)
    return record


BAD_RECORDS = [
    ("not a record", "a record must be a JSON object", "malformed"),
    (_record(conversations=[]), "no 'conversations' list", "malformed"),
    (_record(conversations=[{"from": "human", "value": "Q"}]), "questions and answers must pair up", "malformed"),
    (
        _record(conversations=[{"from": "gpt", "value": "Q"}, {"from": "gpt", "value": "A"}]),
        "must be {'from': 'human'",
        "malformed",
    ),
    (_record(image=None), "has no 'image' path", "no image"),
    (_record(image="missing.png"), "missing.png does not exist", "missing image"),
    (_record(image="corrupt.png"), "corrupt.png cannot be read", "corrupt image"),
    (
        _record(conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "A"}]),
        "2 '<image>' placeholders",
        "malformed",
    ),
    (_record(answers="A"), "'answers' must be a non-empty list", "malformed"),
]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


@pytest.mark.parametrize("record,phrase,reason", BAD_RECORDS, ids=[row[2] + ":" + row[1][:20] for row in BAD_RECORDS])
def test_a_bad_record_is_named_or_skipped_and_counted(image_folder, record, phrase, reason):
    path = _write(image_folder, [_record(), record])
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert "Bad record #1" in message and phrase in message and "skip_bad_records" in message
    examples, skipped = read_examples(path, skip_bad=True)
    assert [example.id for example in examples] == ["r1"]
    assert skipped.count == 1 and skipped.reasons == {reason: 1} and "#1" in skipped.summary()


def test_a_missing_placeholder_goes_first_as_in_llava(image_folder):
    record = _record(conversations=[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}])
    (example,), _ = read_examples(_write(image_folder, [record]))
    assert example.turns[0] == ("<image>\nQ?", "A") and example.answers == ("A",)


def test_an_image_that_fails_to_decode_names_its_record(image_folder, tokenizer):
    (example,), _ = read_examples(_write(image_folder, [_record()]))
    (image_folder / "ok.png").write_bytes((image_folder / "ok.png").read_bytes()[:40])  # truncated after the check
    dataset = ConversationDataset([example], tokenizer, TEMPLATES["chatml"], IMAGE_ID, lambda image: torch.zeros(3))
    with pytest.raises(DataError, match=r"record #0 \(id 'r1'\) cannot be decoded"):
        dataset[0]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_examples(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(DataError, match="must hold a JSON list"):
        read_examples(tmp_path / "dict.json")
    with pytest.raises(DataError, match="Tokenizer directory .* does not exist"):
        load_tokenizer(tmp_path / "no-tokenizer")


# ---------------------------------------------------------------------------------------- generated task


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()


def test_generation_is_deterministic_and_states_chance(synth, tmp_path):
    generate(tmp_path / "again", SynthOptions(seed=3, train=12, test=4, answers=4))
    assert _digest(tmp_path / "again") == _digest(synth)
    generate(tmp_path / "other", SynthOptions(seed=4, train=12, test=4, answers=4))
    assert (tmp_path / "other" / "images" / "test-00000.png").read_bytes() != (
        synth / "images" / "test-00000.png"
    ).read_bytes()
    meta = json.loads((synth / "meta.json").read_text())
    assert meta["chance"] == 0.25 and len(meta["answers"]) == 4
    test = json.loads((synth / "test.json").read_text())
    assert {record["answers"][0] for record in test} <= set(meta["answers"])
    assert meta["tokenizer"]["vocab_size"] == len(load_tokenizer(synth / "tokenizer"))


def test_the_tokenizer_covers_every_template_and_answer(synth, tokenizer):
    meta = json.loads((synth / "meta.json").read_text())
    examples, _ = read_examples(synth / "train.json")
    for template in TEMPLATES.values():
        for example in examples:
            ids, _ = encode(tokenizer, template, template.segments(list(example.turns)), IMAGE_ID)
            assert tokenizer.unk_token_id not in ids
    assert [
        tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in meta["answers"]
    ] == (meta["answers"])


def test_font_size_is_the_readability_knob(tmp_path):
    """Bigger text covers more of the canvas."""
    ink = []
    for size in (8, 24):
        generate(tmp_path / str(size), SynthOptions(seed=0, train=1, test=1, font_size=(size, size), clutter=0))
        pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / str(size) / "images" / "train-00000.png")))
        ink.append(int((pixels != pixels[0, 0]).any(dim=-1).sum()))  # no clutter: all but the text is background
    assert ink[1] > 4 * ink[0] > 0


def test_bad_generator_options_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--answers must be between 2"):
        generate(tmp_path, SynthOptions(answers=1))
    with pytest.raises(ConfigError, match="--font-size 2-3 must lie between 4"):
        generate(tmp_path, SynthOptions(font_size=(2, 3)))
