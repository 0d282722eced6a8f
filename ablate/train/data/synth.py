"""A text-rich VQA task the toolkit generates itself: read a word (or number) rendered small in a cluttered image.

`ablate data synth --out DIR --seed N` writes, deterministically (same options and seed, same bytes):

    DIR/images/{train,test}-NNNNN.png   the images (a light background, clutter shapes, one dark word on top)
    DIR/train.json, DIR/test.json       LLaVA-format records ("<image>\\nWhat word is written in the image?" -> "cake")
    DIR/tokenizer/                      a word-level transformers tokenizer covering every text of the task
    DIR/meta.json                       the options, the answer pool and the chance level (1 / pool size)

The size knob is `font_size` (pixels on the `image_size` canvas): an encoder that sees the image at input
resolution r sees text font_size * r / image_size pixels high, so below some resolution the text cannot be read
and accuracy falls to chance. All words have the same length (and numbers the same digit count), so a word's blob
at low resolution says little about which word it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ablate.api.errors import ConfigError
from ablate.train.data.templates import TEMPLATES
from ablate.train.data.tokenizer import build_word_tokenizer

# Four-letter words with distinct letters and shapes; the answer pool is drawn from them by the seed.
WORDS = (
    "able acid army baby band bear bird blue boat bone book cake card cash chip city coal code cold cook corn "
    "crew dark desk door drum dust face farm fire fish flag food foot fork game gift girl gold golf hair hand "
    "hill home horn idea iron jump king lamp land leaf lion mask milk moon neck nose park pink rain ring road "
    "rock roof rope salt sand ship shoe sock song star tent tree wolf wood yard"
).split()
QUESTIONS = {
    "words": (
        "What word is written in the image?",
        "What does the text in the image say?",
        "Read the word in the picture.",
        "Which word appears in the image?",
    ),
    "numbers": (
        "What number is written in the image?",
        "Read the number in the picture.",
        "Which number appears in the image?",
    ),
}
TASK_VERSION = 1


@dataclass
class SynthOptions:
    """Knobs of the generated task."""

    seed: int = 0
    train: int = 2000  # training records
    test: int = 200  # held-out records (new images; answers from the same pool)
    image_size: int = 256  # the square canvas, pixels
    font_size: tuple[int, int] = (20, 24)  # text height range on the canvas, pixels: the readability knob
    kind: Literal["words", "numbers"] = "words"
    answers: int = 16  # size of the answer pool: chance = 1 / answers
    clutter: int = 6  # distractor shapes (lines, boxes, circles) per image
    # center: the middle; jitter: near it; random: anywhere. Off-centre text takes a from-scratch model many more steps.
    position: Literal["center", "jitter", "random"] = "center"

    def validate(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be between 0 and {2**32 - 1}, not {self.seed}.")
        if self.train < 1 or self.test < 1:
            raise ConfigError(f"--train and --test must be at least 1 (got {self.train} and {self.test}).")
        if self.image_size < 32:
            raise ConfigError(f"--image-size must be at least 32 pixels, not {self.image_size}.")
        low, high = self.font_size
        if not 4 <= low <= high <= self.image_size // 4:
            raise ConfigError(
                f"--font-size {low}-{high} must lie between 4 and a quarter of the canvas ({self.image_size // 4} "
                f"pixels), low <= high."
            )
        pool = len(WORDS) if self.kind == "words" else 900
        if not 2 <= self.answers <= pool:
            raise ConfigError(f"--answers must be between 2 and {pool} for --kind {self.kind}, not {self.answers}.")
        if self.clutter < 0:
            raise ConfigError(f"--clutter must be 0 or more, not {self.clutter}.")
        if self.kind not in QUESTIONS:
            raise ConfigError(f"--kind must be one of {', '.join(QUESTIONS)}, not {self.kind!r}.")
        if self.position not in ("jitter", "random", "center"):
            raise ConfigError(f"--position must be jitter, random or center, not {self.position!r}.")


def answer_pool(options: SynthOptions) -> list[str]:
    rng = np.random.default_rng([options.seed, 0])
    if options.kind == "words":
        return sorted(rng.choice(WORDS, size=options.answers, replace=False).tolist())
    return sorted(str(n) for n in rng.choice(np.arange(100, 1000), size=options.answers, replace=False).tolist())


def render(answer: str, options: SynthOptions, rng: np.random.Generator) -> Image.Image:
    """One image: light background, clutter shapes, then the answer in a dark colour (upper case for words)."""
    size = options.image_size
    background = tuple(int(v) for v in rng.integers(170, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(options.clutter):
        colour = tuple(int(v) for v in rng.integers(60, 200, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        shape = rng.integers(0, 3)
        width = int(rng.integers(1, 3))
        if shape == 0:
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
        elif shape == 1:
            draw.rectangle(box, outline=colour, width=width)
        else:
            draw.ellipse(box, outline=colour, width=width)
    text = answer.upper()
    font = ImageFont.load_default(size=int(rng.integers(options.font_size[0], options.font_size[1] + 1)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    margin = 4
    if options.position == "center":
        x, y = (size - width) // 2, (size - height) // 2
    elif options.position == "jitter":  # centred, moved by up to a quarter of the free room each way
        x = (size - width) // 2 + int(rng.integers(-(size - width) // 4, (size - width) // 4 + 1))
        y = (size - height) // 2 + int(rng.integers(-(size - height) // 4, (size - height) // 4 + 1))
    else:
        x = int(rng.integers(margin, max(margin + 1, size - width - margin)))
        y = int(rng.integers(margin, max(margin + 1, size - height - margin)))
    colour = tuple(int(v) for v in rng.integers(0, 70, 3))
    draw.text((x - left, y - top), text, font=font, fill=colour)
    return image


def generate(out: str | Path, options: SynthOptions) -> dict:
    """Write the task to `out` (see the module docstring); returns its metadata."""
    options.validate()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pool = answer_pool(options)
    questions = QUESTIONS[options.kind]
    splits = {}
    for split_id, (split, count) in enumerate((("train", options.train), ("test", options.test)), start=1):
        records = []
        for index in range(count):
            rng = np.random.default_rng([options.seed, split_id, index])
            answer = pool[int(rng.integers(len(pool)))]
            question = questions[int(rng.integers(len(questions)))]
            name = f"images/{split}-{index:05d}.png"
            render(answer, options, rng).save(out / name)
            records.append(
                {
                    "id": f"{split}-{index:05d}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                    "answers": [answer],
                }
            )
        (out / f"{split}.json").write_text(json.dumps(records, indent=1))
        splits[split] = records
    texts = [question for qs in QUESTIONS.values() for question in qs] + pool
    texts += [template.system for template in TEMPLATES.values()] + ["system user assistant USER ASSISTANT :"]
    tokenizer = build_word_tokenizer(texts, out / "tokenizer")
    test_answers = [record["answers"][0] for record in splits["test"]]
    majority = max(test_answers.count(answer) for answer in set(test_answers)) / len(test_answers)
    meta = {
        "task": "ablate-synth-text",
        "version": TASK_VERSION,
        "options": {**asdict(options), "font_size": list(options.font_size)},
        "answers": pool,
        "chance": 1 / len(pool),
        "majority_baseline": majority,
        "splits": {split: {"file": f"{split}.json", "records": len(records)} for split, records in splits.items()},
        "tokenizer": {"dir": "tokenizer", "vocab_size": len(tokenizer)},
        "note": (
            f"chance = 1/{len(pool)}: every answer is drawn uniformly from the pool; majority_baseline is the most "
            f"frequent test answer's share. Text is {options.font_size[0]}-{options.font_size[1]} px high on a "
            f"{options.image_size} px canvas: about {options.font_size[0]}*r/{options.image_size} px at input "
            f"resolution r."
        ),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def parse_font_size(text: str) -> tuple[int, int]:
    """'14' -> (14, 14); '12-16' -> (12, 16)."""
    try:
        parts = [int(part) for part in str(text).split("-")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ConfigError(f"--font-size takes a number or a range LOW-HIGH in pixels (e.g. 14 or 12-16), not {text!r}.")
    return (parts[0], parts[-1])
