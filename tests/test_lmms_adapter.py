"""lmms-eval drives a trained ablate model on a local task and gets the answers `ablate eval` gets.

Runs only where lmms-eval is installed (`pip install -e '.[lmms]'`); it is an optional, heavy dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from ablate.config.compose import load_config  # noqa: E402
from ablate.model.build import build  # noqa: E402
from ablate.train.data.llava import read_examples  # noqa: E402
from ablate.train.data.synth import SynthOptions, generate  # noqa: E402
from ablate.train.data.templates import get_template  # noqa: E402
from ablate.train.data.tokenizer import load_tokenizer  # noqa: E402
from ablate.train.evaluation import answer  # noqa: E402
from ablate.train.loop import train  # noqa: E402

TASK = """
task: ablate_synth_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lmms")
    generate(root / "data", SynthOptions(seed=2, train=8, test=6, answers=4))
    overrides = [
        "encoder.image_size=64",
        "train.batch_size=4",
        "train.stages=[{base: stage2, data: test.json, steps: 100, warmup: 0, schedule: constant}]",
        *[f"train.stages.0.lr.{kind}=3e-3" for kind in ("encoder", "connector", "decoder")],
    ]
    train("synth-tiny", overrides, data=root / "data", out=root / "run")
    return root / "run", root / "data"


def test_lmms_eval_gets_the_answers_ablate_eval_gets(run, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from ablate.train.lmms_adapter import AblateLMMS

    run_dir, data = run
    examples, _ = read_examples(data / "test.json")
    rows = [{"image": str(e.image), "question": e.question, "answer": e.answers[0]} for e in examples]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ablate_synth_local.yaml").write_text(
        TASK.format(data_file=tmp_path / "test.jsonl", cache=tmp_path / "hf-cache")
    )
    (tasks / "utils.py").write_text(UTILS)

    model = AblateLMMS(pretrained=str(run_dir), batch_size=4, max_new_tokens=8)
    results = simple_evaluate(
        model=model,
        tasks=["ablate_synth_local"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=4,
    )
    samples = sorted(results["samples"]["ablate_synth_local"], key=lambda sample: sample["doc_id"])
    lmms_answers = [sample["filtered_resps"][0] for sample in samples]

    config = load_config(run_dir)
    tokenizer = load_tokenizer(config.train.tokenizer)
    ablate_answers = answer(build(config), tokenizer, get_template(config.train.template), examples, 4, 8)
    assert lmms_answers == ablate_answers
    expected = sum(a == e.answers[0] for a, e in zip(ablate_answers, examples)) / len(examples)
    score = results["results"]["ablate_synth_local"]["exact_match,none"]
    assert score == pytest.approx(expected)


def test_loglikelihood_prefers_what_greedy_decoding_says(run):
    """The log-likelihood of the model's own greedy answer is flagged greedy and beats any other answer's."""
    from lmms_eval.api.instance import Instance

    from ablate.train.lmms_adapter import AblateLMMS

    run_dir, data = run
    examples, _ = read_examples(data / "test.json")
    model = AblateLMMS(pretrained=str(run_dir))
    model.task_dict = {"t": {"test": {i: e for i, e in enumerate(examples)}}}
    pool = json.loads((data / "meta.json").read_text())["answers"]
    greedy = model.generate_until(
        [
            Instance("generate_until", (e.question, {"max_new_tokens": 4}, _visual, i, "t", "test"), i, _meta(i))
            for i, e in enumerate(examples[:2])
        ]
    )
    for index, prediction in enumerate(greedy):
        assert prediction in pool
        requests = [
            Instance("loglikelihood", (examples[index].question, word, _visual, index, "t", "test"), 0, _meta(index))
            for word in pool
        ]
        scores = model.loglikelihood(requests)
        best = max(range(len(pool)), key=lambda k: scores[k][0])
        assert pool[best] == prediction and scores[best][1] is True


def _visual(example):
    from PIL import Image

    return [Image.open(example.image)]


def _meta(index: int) -> dict:
    return {"task": "t", "doc_id": index, "repeats": 1}
