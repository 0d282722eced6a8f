"""Every token reducer and the three fair baselines at equal budgets on one trained model: accuracy, fidelity, TTFT.

The reducers are training-free: each row is `ablate eval RUN` of the same trained weights with the reducer set by
overrides (downsampling: `reducer=none encoder.target_tokens=B`, the input size that gives B tokens). Fidelity is
measured here over the evaluation images, not on one: the first-token distribution of each row against the row
without reduction (top-1 agreement and KL(full || reduced)), with one question for every image. The records go into
a results store (`ablate results --db DB --columns reducers`, `ablate plot --db DB`).

    ablate data synth --out DATA --seed 0
    ablate train synth-fastvit64 --data DATA --out RUN
    python benchmarks/reducer_accuracy.py --run RUN --data DATA --db results/reducers.db --budgets 36 16 4 --plot docs/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ablate.api.errors import AblateError
from ablate.config.compose import load_config
from ablate.grid.store import Store
from ablate.measurement.record import Fidelity
from ablate.model.build import build
from ablate.train.data.llava import open_image, read_examples
from ablate.train.data.templates import get_template
from ablate.train.data.tokenizer import load_tokenizer
from ablate.train.evaluation import eval_key, evaluate, prompt_ids

# (method, overrides at budget B): the three baselines first, then the reducers by year
METHODS = {
    "downsampling": lambda b: ["reducer=none", f"encoder.target_tokens={b}"],
    "random": lambda b: ["reducer=random", f"reducer.tokens={b}"],
    "avgpool": lambda b: ["reducer=avgpool", f"reducer.tokens={b}", "reducer.adaptive=true"],
    "matryoshka": lambda b: ["reducer=matryoshka", f"reducer.tokens={b}"],
    "prumerge": lambda b: ["reducer=prumerge", f"reducer.tokens={b}"],
    "prumerge-plus": lambda b: ["reducer=prumerge-plus", f"reducer.tokens={b}"],
    "visionzip": lambda b: ["reducer=visionzip", f"reducer.tokens={b}"],
    "fastv": lambda b: ["reducer=fastv", f"reducer.tokens={b}"],
    "divprune": lambda b: ["reducer=divprune", f"reducer.tokens={b}"],
    "vispruner": lambda b: ["reducer=vispruner", f"reducer.tokens={b}"],
    "cdpruner": lambda b: ["reducer=cdpruner", f"reducer.tokens={b}"],
    "dart": lambda b: ["reducer=dart", f"reducer.tokens={b}"],
}


@torch.inference_mode()
def first_token_logits(run: Path, overrides: list[str], data: Path, examples, batch_size: int = 50) -> torch.Tensor:
    """(N, vocab) first-token logits of the model with `overrides` on each example's image and the first question."""
    config = load_config(run, overrides, run={"threads": 1})
    vlm = build(config).eval()
    tokenizer = load_tokenizer(Path(config.train.tokenizer) if config.train.tokenizer else data / "tokenizer")
    template = get_template(config.train.stages[-1].template or config.train.template)
    ids = torch.tensor([prompt_ids(tokenizer, template, examples[0].question, vlm.image_token_id)])
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pixels = torch.stack([vlm.encoder.prepare(open_image(example)) for example in chunk])
        ctx = vlm.run_vision(vlm.start(pixels, ids.expand(len(chunk), -1)))
        out.append(vlm.prefill_stage(ctx).float())
    return torch.cat(out)


def fidelity(reference: torch.Tensor, reduced: torch.Tensor, question: str) -> Fidelity:
    log_p, log_q = torch.log_softmax(reference, dim=-1), torch.log_softmax(reduced, dim=-1)
    return Fidelity(
        top1_agreement=(reference.argmax(-1) == reduced.argmax(-1)).float().mean().item(),
        kl=(log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        rows=int(reference.shape[0]),
        reference=f"the same trained model without reduction, on each evaluation image, question {question!r}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (`ablate train`)")
    parser.add_argument("--data", type=Path, required=True, help="its data folder (`ablate data synth`)")
    parser.add_argument("--db", type=Path, required=True, help="results store for the records")
    parser.add_argument("--budgets", type=int, nargs="+", default=[36, 16, 4], help="visual tokens kept")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out records only")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=None, help="folder for reducer-accuracy.png (needs matplotlib)")
    args = parser.parse_args()
    examples, _ = read_examples(args.data / "test.json")
    examples = examples[: args.limit] if args.limit else examples
    cells = [("none", None, ["reducer=none"])]
    cells += [(method, budget, METHODS[method](budget)) for budget in args.budgets for method in args.methods]
    reference, rows = None, []
    for method, budget, overrides in cells:
        try:
            record = evaluate(
                args.run, overrides, data=args.data, limit=args.limit, repeats=args.repeats, warmup=2,
                threads=args.threads,
            )  # fmt: skip
            logits = first_token_logits(args.run, overrides, args.data, examples)
        except AblateError as exc:  # e.g. matryoshka's nested scales have no 36
            print(f"{method} @ {budget}: n/a ({str(exc).splitlines()[0][:160]})")
            rows.append((method, budget, None))
            continue
        reference = logits if reference is None else reference
        record.fidelity = fidelity(reference, logits, examples[0].question)
        with Store(args.db) as store:
            store.put(eval_key(record), record, label=method if budget is None else f"{method} @ {budget}")
        rows.append((method, budget, record.to_dict()))
        print(f"{method} @ {budget}: exact match {record.accuracy.exact_match:.1%}", flush=True)
    print_table(rows)
    if args.plot:
        plot(rows, args.plot / "reducer-accuracy.png")


def print_table(rows) -> None:
    print("| method | budget | LLM visual tokens (layer avg) | KV positions | exact match | top-1 agreement | KL | "
          "reducer ms | TTFT ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, budget, record in rows:
        if record is None:
            print(f"| {method} | {budget} | n/a | | | | | | |")
            continue
        tokens, latency, fid = record["llm_tokens"], record["latency_ms"], record["fidelity"]
        print(
            f"| {method} | {budget or '-'} | {tokens['visual_layer_average']:g} | {tokens['kv_positions']} | "
            f"{record['accuracy']['exact_match']:.1%} | {fid['top1_agreement']:.1%} | {fid['kl']:.3f} | "
            f"{latency['reducer'] or 0:.3f} | {latency['ttft']:.2f} |"
        )


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(m, b, r) for m, b, r in rows if r is not None]
    full = next(r for m, b, r in done if b is None)
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=100)
    methods = list(dict.fromkeys(m for m, b, _ in done if b is not None))
    for index, method in enumerate(methods):
        points = sorted((b, r["accuracy"]["exact_match"] * 100) for m, b, r in done if m == method)
        style = "--" if method in ("downsampling", "random", "avgpool") else "-"
        axis.plot(*zip(*points), style, marker="o", label=method, color=plt.cm.tab20(index / max(1, len(methods))))
    axis.axhline(full["accuracy"]["exact_match"] * 100, color="black", linewidth=1, label="no reduction")
    axis.axhline(full["accuracy"]["chance"] * 100, color="grey", linestyle=":", linewidth=1, label="chance")
    axis.set_xscale("log", base=2)
    budgets = sorted({b for _, b, _ in done if b is not None})
    axis.set_xticks(budgets, [str(b) for b in budgets])
    axis.set_xlabel(f"visual tokens kept (of {full['visual_tokens']}; in-LLM methods: from layer K on)")
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 105)
    axis.set_title(f"Reducers on {full['name']}, trained on the synthetic task (dashed: baselines)", fontsize=9)
    axis.legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
