"""Staged training: freeze policies, the M3 multi-scale loss, resuming after a kill, and train-then-eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ablate
from ablate.api.errors import ConfigError
from ablate.api.registry import get_registry
from ablate.cli import main
from ablate.config.compose import load_config
from ablate.grid.store import Store
from ablate.measurement.record import Record
from ablate.model.build import build
from ablate.train.data.llava import read_examples
from ablate.train.data.synth import SynthOptions, generate
from ablate.train.data.templates import get_template
from ablate.train.data.tokenizer import load_tokenizer
from ablate.train.evaluation import anls, answer, evaluate, exact_match
from ablate.train.evaluation import generate as generate_answers
from ablate.train.loop import build_for_stage, freeze, make_optimizer, train, training_loss

# Small and quick: 64 px (one visual token), batches of 4, a few steps.
QUICK = [
    "encoder.image_size=64",
    "train.batch_size=4",
    "train.log_every=1",
    "train.save_every=2",
    "train.stages.0.steps=2",
    "train.stages.1.steps=4",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthOptions(seed=1, train=16, test=4, answers=4))
    return out


def _batch(vlm, batch=2, size=64):
    ids = torch.randint(0, 60, (batch, 12))
    ids[:, 3] = vlm.image_token_id
    labels = ids.clone()
    labels[:, :8] = -100
    return torch.rand(batch, 3, size, size), ids, labels


# -------------------------------------------------------------------------------------------- freezing


def test_stage1_freezes_encoder_and_llm():
    config = load_config("synth-tiny", ["encoder.image_size=64"])
    stage = config.train.stages[0]
    assert stage.name == "stage1" and stage.train == ["connector"]
    vlm = build_for_stage(config, stage, ablate.api.registry.get_registry())
    freeze(vlm, stage.train)
    optimizer = make_optimizer(vlm, stage)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in vlm.connector.parameters()}
    assert [group["name"] for group in optimizer.param_groups] == ["connector"]
    before = {name: p.detach().clone() for name, p in vlm.named_parameters()}
    training_loss(vlm, *_batch(vlm))[0].backward()
    optimizer.step()
    for name, p in vlm.named_parameters():
        trained = name.startswith("connector.")
        assert p.requires_grad == trained
        assert (p.grad is not None) == trained, name
        assert torch.equal(p, before[name]) != trained, name
    assert not vlm.encoder.training and not vlm.decoder.training and vlm.connector.training


def test_stage2_trains_everything_with_a_learning_rate_per_component():
    config = load_config("synth-tiny", ["train.stages.1.lr.encoder=0.5", "train.stages.1.lr.decoder=0.25"])
    stage = config.train.stages[1]
    vlm = build_for_stage(config, stage, ablate.api.registry.get_registry())
    freeze(vlm, stage.train)
    optimizer = make_optimizer(vlm, stage)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == {"encoder": 0.5, "connector": stage.lr.connector, "decoder": 0.25}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(vlm.parameters()))


def test_a_custom_stage_and_its_errors():
    config = load_config("tiny", ["train.stages=[{name: mine, train: [decoder], lr: {decoder: 0.01}, image_size: 64}]"])
    (stage,) = config.train.stages
    assert (stage.name, stage.train, stage.lr.decoder, stage.image_size) == ("mine", ["decoder"], 0.01, 64)
    with pytest.raises(ConfigError, match=r"train.stages.0 trains the encoder but train.stages.0.lr.encoder is None"):
        load_config("tiny", ["train.stages=[{train: [encoder]}]"])
    with pytest.raises(ConfigError, match="Unknown stage preset 'stage3'"):
        load_config("tiny", ["train.stages=[stage3]"])
    with pytest.raises(ConfigError, match="Unknown config key 'train.stages.0.lrs'"):
        load_config("tiny", ["train.stages=[{base: stage1, lrs: 1}]"])
    with pytest.raises(ConfigError, match="goes into 'stage2', a single value"):
        load_config("tiny", ["train.stages.1.steps=3"])


# -------------------------------------------------------------------------------------------- M3 loss


@pytest.mark.parametrize("position", ["after_connector", "before_connector"])
def test_m3_loss_is_the_mean_of_the_per_scale_losses(position):
    """The real `matryoshka` reducer on a 2x2 grid (scales 1 and 4), pooling the connector's output as M3's code
    does, or the encoder's tokens as its paper describes."""
    overrides = ["encoder.image_size=128", "reducer=matryoshka", "reducer.tokens=4", f"reducer.position={position}"]
    config = load_config("tiny", overrides)
    torch.manual_seed(0)
    vlm = build_for_stage(config, config.train.stages[1], get_registry())
    assert vlm.reducer.config.all_scales  # training turns every scale on
    pixels, ids, labels = _batch(vlm, size=128)
    loss, per_scale = training_loss(vlm, pixels, ids, labels)
    assert sorted(per_scale) == [1, 4]
    separate = {}
    for count in per_scale:  # the same weights, one budget at a time, as plain `vlm(...).loss`
        single = ablate.build(config, [f"reducer.tokens={count}"], train=True)
        single.load_state_dict(vlm.state_dict())
        separate[count] = float(single(pixels, ids, labels=labels).loss.detach())
    assert per_scale == pytest.approx(separate, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(sum(separate.values()) / 2, rel=1e-5)
    assert len({round(value, 4) for value in separate.values()}) == 2  # the scales really differ
    loss.backward()  # one graph through every scale
    assert vlm.connector.layers[0].weight.grad is not None


def test_multiscale_can_be_switched_off():
    config = load_config("tiny", ["encoder.image_size=128", "reducer=matryoshka", "train.multiscale=false"])
    vlm = build_for_stage(config, config.train.stages[1], get_registry())
    assert not vlm.reducer.config.all_scales
    assert training_loss(vlm, *_batch(vlm, size=128))[1] == {}


# ----------------------------------------------------------------------------------- runs and resuming


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


class _Kill(KeyboardInterrupt):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_and_the_curve_continues(data, tmp_path):
    straight = train("synth-tiny", QUICK, data=data, out=tmp_path / "straight")
    assert straight["steps"] == 6 and straight["resumed_from_step"] is None

    def kill_at_step_5(stage, step, steps, figures):  # stage2's 3rd step: after the checkpoint at global step 4
        if stage == "stage2" and step == 3:
            raise _Kill

    with pytest.raises(_Kill):
        train("synth-tiny", QUICK, data=data, out=tmp_path / "killed", progress=kill_at_step_5)
    assert [c.name for c in sorted((tmp_path / "killed" / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    resumed = train("synth-tiny", QUICK, data=data, out=tmp_path / "killed")
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert [step for step, _ in _losses(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]  # no gap, no repeat
    assert [loss for _, loss in _losses(tmp_path / "killed")] == pytest.approx(
        [loss for _, loss in _losses(tmp_path / "straight")]
    )
    final, reference = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("killed", "straight"))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_a_folder_of_another_run_is_refused(data, tmp_path):
    train("synth-tiny", [*QUICK, "train.stages=[{base: stage1, steps: 1}]"], data=data, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="holds a training run of another config.*train.batch_size"):
        train(
            "synth-tiny",
            [*QUICK, "train.stages=[{base: stage1, steps: 1}]", "train.batch_size=2"],
            data=data,
            out=tmp_path / "run",
        )


def test_the_tokenizer_must_fit_the_vocabulary(data, tmp_path):
    with pytest.raises(ConfigError, match="decoder.overrides.vocab_size="):
        train("synth-tiny", [*QUICK, "decoder.overrides.vocab_size=40"], data=data, out=tmp_path / "run")


# ---------------------------------------------------------------------------------------- train + eval


def test_train_then_eval_round_trip(data, tmp_path):
    """Training on the four test records (overfitting) answers them all; the record holds accuracy and timing."""
    overrides = [
        "encoder.image_size=64",
        "train.batch_size=4",
        "train.save_every=1000",
        "train.stages=[{base: stage2, data: test.json, steps: 120, warmup: 0, schedule: constant}]",
        *[f"train.stages.0.lr.{kind}=3e-3" for kind in ("encoder", "connector", "decoder")],
    ]
    summary = train("synth-tiny", overrides, data=data, out=tmp_path / "run")
    record = evaluate(tmp_path / "run", data=data, split="test.json", repeats=1, warmup=0).to_dict()
    assert set(record) == set(Record().to_dict()) and record["error"] is None
    accuracy = record["accuracy"]
    assert accuracy["n"] == 4 and accuracy["chance"] == 0.25 and accuracy["exact_match"] == 1.0, summary
    assert accuracy["anls"] == 1.0
    assert record["latency_ms"]["ttft"] > 0 and record["visual_tokens"] == 1
    assert record["weights"] == [f"vlm: {(tmp_path / 'run').resolve()} (ablate-run)"]
    assert record["config"]["encoder"]["image_size"] == 64 and record["config"]["name"] == "synth-tiny"
    # the run folder is a checkpoint directory like any other
    vlm = ablate.from_checkpoint(tmp_path / "run")
    assert vlm.encoder.config.image_size == 64
    # `ablate eval --db` stores the record beside grid cells; `ablate plot` draws accuracy against TTFT
    db, args = tmp_path / "r.db", [str(tmp_path / "run"), "--data", str(data), "--repeats", "1", "--warmup", "0"]
    for _ in range(2):  # the same model, data and split again: its row is replaced, not duplicated
        assert main(["eval", *args, "--db", str(db)]) == 0
    with Store(db, create=False) as store:
        (row,) = store.rows()
    assert row.record["accuracy"] == record["accuracy"] and row.record["latency_ms"]["ttft"] > 0
    assert main(["plot", "--db", str(db), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy_vs_ttft.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory) -> Path:
    """Two short training runs of one config that differ only in their seed: folders a and b."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", 0), ("b", 1)):
        train("synth-tiny", [*QUICK, f"run.seed={seed}"], data=data, out=root / name)
    return root


def test_eval_rows_are_kept_apart_by_model_step_records_and_limit(data, two_runs, tmp_path, monkeypatch):
    """One store row per (model folder, training step, split file's bytes, --limit); the same eval again replaces."""
    monkeypatch.chdir(two_runs)  # labels show model folders below the working folder relative to it
    reordered = tmp_path / "reordered"  # the same file name and images, other bytes: another data set
    shutil.copytree(data, reordered)
    records = json.loads((data / "test.json").read_text())
    (reordered / "test.json").write_text(json.dumps(records[::-1]))
    db = tmp_path / "r.db"
    evals = [
        ("a", data, ["--limit", "2"]),
        ("a", data, []),
        ("a", data, ["--limit", "9"]),  # beyond the file's 4 records: the whole file, the row above again
        ("b", data, []),
        ("a/checkpoints/step-000004", data, []),  # a checkpoint: its weights, not its optimizer state
        ("a", reordered, []),
    ]
    for folder, data_dir, extra in evals:
        args = [folder, "--data", str(data_dir), "--repeats", "1", "--warmup", "0", "--db", str(db), *extra]
        assert main(["eval", *args]) == 0
    with Store(db, create=False) as store:
        rows = store.rows()
    test_json = data / "test.json"
    assert [row.label for row in rows] == [
        f"eval synth-tiny @ a on {test_json} (limit 2)",
        f"eval synth-tiny @ a on {test_json}",
        f"eval synth-tiny @ b on {test_json}",
        f"eval synth-tiny @ a/checkpoints/step-000004 on {test_json}",
        f"eval synth-tiny @ a on {reordered / 'test.json'}",
    ]
    accuracy = [row.record["accuracy"] for row in rows]
    assert [a["n"] for a in accuracy] == [2, 4, 4, 4, 4]
    assert [a["limit"] for a in accuracy] == [2, None, None, None, None]
    assert [a["step"] for a in accuracy] == [6, 6, 6, 4, 6]  # 2 + 4 steps; the checkpoint saved at step 4
    assert [a["model"] for a in accuracy] == [
        str(two_runs / folder) for folder in ("a", "a", "b", "a/checkpoints/step-000004", "a")
    ]
    digest = hashlib.sha256(test_json.read_bytes()).hexdigest()
    assert [a["split_sha256"] for a in accuracy[:4]] == [digest] * 4 and accuracy[4]["split_sha256"] != digest


def test_an_untrained_model_is_not_evaluated(data):
    with pytest.raises(ConfigError, match="loads no weights"):
        evaluate("synth-tiny", data=data, repeats=1, warmup=0)


def test_metrics():
    assert exact_match(" Cake.", ["cake"]) == 1.0 and exact_match("cakes", ["cake"]) == 0.0
    assert anls("cake", ["cake"]) == 1.0
    assert anls("cakr", ["cake"]) == pytest.approx(0.75)  # one edit in four characters
    assert anls("xyz", ["cake"]) == 0.0  # beyond the 0.5 threshold
    assert anls("cakr", ["milk", "cake"]) == pytest.approx(0.75)  # the best accepted answer counts


def test_stage_options_are_dataclasses_in_the_record():
    config = load_config("synth-tiny")
    as_dict = config.to_dict()["train"]["stages"][1]
    assert as_dict == dataclasses.asdict(config.train.stages[1]) and as_dict["name"] == "stage2"


def test_wandb_logs_the_curve_offline(data, tmp_path, monkeypatch):
    """The real client, offline: the run's records (history keys, config) are in its .wandb file."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train("synth-tiny", [*QUICK, "train.wandb=true"], data=data, out=tmp_path / "run")
    (records,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    content = records.read_bytes()
    for key in (b"train/loss", b"train/lr/connector", b"train/images_per_s", b"synth-tiny"):
        assert key in content, key
    assert (tmp_path / "run" / "wandb_id").read_text() in records.name  # a resumed run continues this W&B run


def test_in_llm_pruning_acts_on_the_answers(data, monkeypatch):
    """FastV and DART prune inside the LLM's prefill: the answers come from the pruned prefill and its KV cache, and
    prompts of several lengths are batched by length."""
    torch.manual_seed(0)
    overrides = ["reducer=fastv", "reducer.layer=1", "reducer.tokens=1"]  # 4 visual tokens at 128 px: 1 kept
    vlm = build(load_config("synth-tiny", overrides, get_registry())).eval()
    kept = []  # tokens each pruned prefill kept (a random tiny LLM's greedy ids hardly depend on the image)
    prefill_pruned = vlm.decoder.prefill_pruned

    def counting(embeds, positions, pruning, **kwargs):
        kept.append(pruning.keep)
        return prefill_pruned(embeds, positions, pruning, **kwargs)

    monkeypatch.setattr(vlm.decoder, "prefill_pruned", counting)
    pixels = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ids = vlm.make_prompt(12, 4)
    with torch.inference_mode():
        answered = generate_answers(vlm, pixels, ids.tolist(), None, 3)
        assert kept == [1]
        pruned, _ = vlm.generate(vlm.run_vision(vlm.start(pixels, ids)), 3)
    assert answered == pruned.tolist()
    with pytest.raises(ConfigError, match="unpadded prompts"):
        generate_answers(vlm, pixels[:2], [ids[0].tolist(), ids[1, 1:].tolist()], None, 3)
    # answer(): questions of different lengths, each answered as if alone
    examples, _ = read_examples(data / "test.json")
    assert len({len(example.question) for example in examples}) > 1
    tokenizer, template = load_tokenizer(data / "tokenizer"), get_template("chatml")
    kept.clear()
    together = answer(vlm, tokenizer, template, examples, batch_size=4, max_new_tokens=3)
    assert 1 < len(kept) < len(examples)  # one batch per prompt length
    alone = [answer(vlm, tokenizer, template, [example], max_new_tokens=3)[0] for example in examples]
    assert together == alone
