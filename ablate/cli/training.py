"""`ablate data synth` (generate the synthetic task), `ablate train` and `ablate eval` (accuracy beside timing)."""

from __future__ import annotations

import json
from typing import Any

from rich.progress import TextColumn, TimeRemainingColumn

from ablate.api.errors import AblateError
from ablate.cli.flags import parent, run_options
from ablate.cli.output import err, out, progress_bar


def add_commands(sub, parser_class) -> None:
    data = sub.add_parser("data", help="generate data sets (synth: the synthetic text-reading task)")
    data_sub = data.add_subparsers(dest="data_command", parser_class=parser_class, required=True)
    synth = data_sub.add_parser(
        "synth", parents=[parent("debug")], help="generate the synthetic text-rich VQA task (LLaVA format)"
    )
    synth.add_argument("--out", required=True, help="folder to write images, train/test JSON, tokenizer, meta.json")
    synth.add_argument("--seed", type=int, default=0, help="seed: the same seed and options give the same bytes")
    synth.add_argument("--train", type=int, default=2000, help="training records (default 2000)")
    synth.add_argument("--test", type=int, default=200, help="held-out records (default 200)")
    synth.add_argument("--image-size", type=int, default=256, help="canvas size in pixels (default 256)")
    synth.add_argument("--font-size", default="20-24", help="text height on the canvas, N or LOW-HIGH (default 20-24)")
    synth.add_argument("--kind", default="words", help="words or numbers (default words)")
    synth.add_argument("--answers", type=int, default=16, help="answer pool size; chance = 1/answers (default 16)")
    synth.add_argument("--clutter", type=int, default=6, help="distractor shapes per image (default 6)")
    synth.add_argument("--position", default="center", help="center (default), jitter (near it) or random")
    synth.set_defaults(handler=cmd_data_synth)

    train = sub.add_parser(
        "train",
        parents=[parent("debug", "device", "threads", "wandb")],
        help="train a config's stages (train: section) on a LLaVA-format data folder",
    )
    train.add_argument("config", help="preset name, YAML path, or a model directory to train further")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=8")
    train.add_argument("--data", required=True, help="data folder: train.json (or each stage's `data`), images")
    train.add_argument("--out", required=True, help="run folder; an interrupted run resumes when started again")
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        parents=[parent("json", "debug", "warmup", "repeats", "threads", "seed", "device", "dtype")],
        help="accuracy (exact match, ANLS) and timing of a trained model: one record",
    )
    evaluate.add_argument("run_dir", help="a training run folder (or one of its checkpoints)")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512")
    evaluate.add_argument("--data", required=True, help="data folder holding the evaluation file")
    evaluate.add_argument("--split", default="test.json", help="evaluation file in the data folder (default test.json)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N records only")
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions answered at once (default 16)")
    evaluate.add_argument(  # not run.max_new_tokens (decode timing): the answer's length
        "--max-new-tokens", dest="answer_tokens", type=int, default=16, help="longest answer generated (default 16)"
    )
    evaluate.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    evaluate.add_argument(
        "--db", help="also store the record in this results store, beside grid cells (`ablate results`, `ablate plot`)"
    )
    evaluate.set_defaults(handler=cmd_eval)


def cmd_data_synth(args) -> int:
    from ablate.train.data.synth import SynthOptions, generate, parse_font_size

    options = SynthOptions(
        seed=args.seed,
        train=args.train,
        test=args.test,
        image_size=args.image_size,
        font_size=parse_font_size(args.font_size),
        kind=args.kind,
        answers=args.answers,
        clutter=args.clutter,
        position=args.position,
    )
    with err.status(f"generating {options.train} + {options.test} records in {args.out}"):
        meta = generate(args.out, options)
    err.print(
        f"wrote {args.out}: {options.train} train / {options.test} test records, {len(meta['answers'])} answers "
        f"(chance {meta['chance']:.1%}), tokenizer of {meta['tokenizer']['vocab_size']} tokens",
        highlight=False,
    )
    return 0


def cmd_train(args) -> int:
    from ablate.train.loop import train

    overrides = list(args.overrides) + [f"run.{key}={value}" for key, value in run_options(args).items()]
    overrides += ["train.wandb=true"] if args.wandb else []
    with progress_bar(TextColumn("{task.fields[figures]}"), TimeRemainingColumn(), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, step: int, steps: int, figures: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=steps, completed=step - 1, figures="")
            text = (
                f"loss {figures['loss']:.4f}  {figures['images_per_s']:.1f} img/s  {figures['tokens_per_s']:,.0f} tok/s"
            )
            bar.update(tasks[stage], completed=step, figures=text)

        summary = train(args.config, overrides, data=args.data, out=args.out, progress=progress)
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] is not None else ""
    skipped = f", {summary['skipped_records']} bad records skipped" if summary["skipped_records"] else ""
    loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    out.print(
        f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s{resumed}{skipped}; final loss {loss}; "
        f"model in {summary['run_dir']} (`ablate eval {summary['run_dir']} --data DIR`)",
        highlight=False,
    )
    return 0


def cmd_eval(args) -> int:
    from ablate.grid.store import Store
    from ablate.report.tables import print_record
    from ablate.train.evaluation import evaluate

    store = Store(args.db) if args.db else None  # a bad store fails before minutes of evaluation
    try:
        with err.status(f"evaluating {args.run_dir} on {args.split}"):
            record = evaluate(
                args.run_dir,
                args.overrides,
                data=args.data,
                split=args.split,
                limit=args.limit,
                batch_size=args.batch_size,
                max_new_tokens=args.answer_tokens,
                skip_bad=args.skip_bad,
                **run_options(args),
            )
    except AblateError as exc:
        failed = getattr(exc, "record", None)
        if store is not None and failed is not None and failed.config:
            _store_eval(store, failed, args.db)
        raise
    if store is not None:
        _store_eval(store, record, args.db)
    if args.json:
        print(json.dumps(record.to_dict()))
    else:
        print_record(record.to_dict(), out)
        accuracy = record.accuracy
        chance = "" if accuracy.chance is None else f" (chance {accuracy.chance:.1%})"
        out.print(
            f"accuracy on {accuracy.n} records of {accuracy.split}: exact match {accuracy.exact_match:.1%}, "
            f"ANLS {accuracy.anls:.3f}{chance}",
            highlight=False,
        )
    return 0


def _store_eval(store, record, path: str) -> None:
    from ablate.train.evaluation import eval_key, eval_label

    with store:
        store.put(eval_key(record), record, label=eval_label(record))
    err.print(f"stored in {path}", highlight=False, markup=False)
