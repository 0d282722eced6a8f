"""Every failure is a clean record: bad input exits 2 with one paragraph naming the fix, never a traceback; with
--json stdout holds exactly one object with the full record schema and `error` filled. Unexpected failures inside a
plugin name the plugin and keep the traceback in a log file (or --debug).

The table runs the real CLI entry point in this process (fast); the cases that need a process of their own (Ctrl-C,
plugins installed on the path) run `ablate` as a subprocess.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import install_plugin, run_cli_process
from PIL import Image

import ablate
from ablate.api.errors import ConfigError, PluginFailure
from ablate.cli import main
from ablate.grid.store import Store
from ablate.measurement.record import Record


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad files of every kind a user may hand over."""
    root = tmp_path_factory.mktemp("bad")
    list_checkpoint = root / "list-checkpoint"
    list_checkpoint.mkdir()
    (list_checkpoint / "config.json").write_text("[1, 2, 3]")
    huge = root / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400 megapixels, a few kilobytes on disk
    (root / "list.yaml").write_text("- encoder\n- decoder\n")
    (root / "broken.yaml").write_text("encoder: {name: [\n")
    (root / "a.yaml").write_text("base: b.yaml\n")
    (root / "b.yaml").write_text("base: a.yaml\n")
    (root / "not-an-image.png").write_text("hello")
    (root / "resnet.json").write_text('{"model_type": "resnet"}')  # a transformers model, but no causal LM
    (root / "llava-qwen2.json").write_text('{"model_type": "llava_qwen2"}')  # ml-fastvlm's type: not transformers'
    grids = {
        "grid-unknown-key": "base: tiny\nsweep: {prompt_tokens: [4, 8]}\nsweeps: {batch_size: [1, 2]}\n",
        "grid-empty-sweep": "base: tiny\nsweep: {prompt_tokens: []}\n",
        "grid-scalar-sweep": "base: tiny\nsweep: {prompt_tokens: 4}\n",
        "grid-unequal-zip": "base: tiny\nzip: [{prompt_tokens: [4, 8], batch_size: [1, 2, 3]}]\n",
        "grid-unknown-exclude": "base: tiny\nsweep: {prompt_tokens: [4, 8]}\nexclude: [{batch_size: 2}]\n",
        "grid-ok": "base: tiny\nsweep: {prompt_tokens: [4, 8]}\n",
        "grid-zipped": "base: tiny\nzip: [{prompt_tokens: [4, 8], batch_size: [1, 2]}]\n",
        "grid-no-base": "sweep: {prompt_tokens: [4, 8]}\n",
        "grid-twice": "base: tiny\nsweep: {prompt_tokens: [4, 8]}\nzip: [{prompt_tokens: [1, 2]}]\n",
        "grid-all-excluded": "base: tiny\nsweep: {prompt_tokens: [4]}\nexclude: [{prompt_tokens: 4}]\n",
        "grid-cells-not-list": "base: tiny\ncells: {prompt_tokens: 4}\n",
    }
    for name, text in grids.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "not-a-db.db").write_text("this is not SQLite")
    Store(root / "x.db").close()  # an empty results store
    with Store(root / "rows.db") as store:  # a store with a row: the paths of filters, sorts, columns are checked
        store.put("k", Record().to_dict(), "k")
    return {"root": root, "list_checkpoint": list_checkpoint, "huge": huge}


# (arguments, expected exit code, a phrase of the message). {root}, {huge}, ... are filled from `files`.
BAD_INPUT = [
    (["run", "tiny", "encoder.image_size={a"], 2, "Cannot parse the value of override 'encoder.image_size={a' as YAML"),
    (["grid", "tiny", "reducer={name: x"], 2, "Cannot parse the value of override 'reducer={name: x' as YAML"),
    (["run", "tiny", "--threads", "-1"], 2, "run.threads (--threads) must be at least 1, not -1"),
    (["run", "tiny", "--threads", "0"], 2, "run.threads (--threads) must be at least 1, not 0"),
    (["run", "tiny", "--threads", "100000"], 2, "this machine's CPU count"),
    (["run", "tiny", "--seed", "-1"], 2, "run.seed (--seed) must be between 0 and"),
    (["run", "tiny", "--device", "banana"], 2, "Unknown device 'banana'"),
    (["run", "tiny", "--device", "mps"], 2, "MPS is not available here"),
    (["run", "tiny", "--device", "cuda:7"], 2, "--device cuda:7 (run.device) was asked for"),
    (["run", "tiny", "--dtype", "float64"], 2, "Unknown dtype 'float64' (run.dtype)"),
    (["run", "tiny", "--dtype", "float16"], 2, "float16 is for GPUs"),
    (["run", "tiny", "--mode", "turbo"], 2, "Unknown mode 'turbo'"),
    (["run", "tiny", "--memory-format", "nhwc"], 2, "Unknown memory format 'nhwc'"),
    (["run", "tiny", "run.runtime=onnxrt"], 2, "Unknown runtime 'onnxrt' (config key 'run.runtime'). Did you mean"),
    (["run", "tiny", "run.runtime=onnxruntime", "--mode", "compile"], 2, "is a mode of the torch runtime"),
    (["run", "tiny", "run.quantize.decoder=int3"], 2, "Unknown quantization 'int3' (run.quantize.decoder)"),
    (["export", "tiny", "--out", "{root}/new"], 2, "the torch runtime prepares none: name one that does"),
    (["export", "tiny", "--runtime", "onnxruntime", "--out", "{root}"], 2, "is not empty: give a new or empty folder"),
    (["export", "tiny", "--runtime", "onnxruntime"], 2, "the following arguments are required: --out"),
    (["run", "tiny", "run.peak.tflops=-1"], 2, "run.peak.tflops must be a positive number"),
    (["run", "tiny", "run.peak.bandwidth_gbs=.inf"], 2, "run.peak.bandwidth_gbs must be a positive number"),
    (["run", "tiny", "--profile", "--count-only"], 2, "profiles a timed run: drop --count-only"),
    (["run", "tiny", "--profile", "{root}/missing/trace.json"], 2, "The folder of the trace file"),
    (["run", "tiny", "--repeats", "0"], 2, "run.repeats (--repeats) must be at least 1"),
    (["run", "tiny", "--warmup", "-1"], 2, "run.warmup (--warmup) must be 0 or more"),
    (["run", "tiny", "--repeats", "abc"], 2, "argument --repeats: invalid int value: 'abc'"),
    (["run", "tiny", "--precision", "0"], 2, "run.precision (--precision) is the relative standard error"),
    (["run", "tiny", "--precision", "1.5"], 2, "between 0 and 1 such as 0.01 (1%), not 1.5"),
    (["run", "tiny", "--precision", "abc"], 2, "argument --precision: invalid float value: 'abc'"),
    (["run", "tiny", "--max-time-s", "10"], 2, "is the time budget of run.precision (--precision): set a precision"),
    (["run", "tiny", "--precision", "0.01", "--max-time-s", "-1"], 2, "run.max_time_s (--max-time-s) must be a"),
    (["run", "tiny", "--max-spread", "0"], 2, "run.max_spread (--max-spread) is the fraction of the TTFT median"),
    (["run", "tiny", "--max-new-tokens", "-1"], 2, "run.max_new_tokens (--max-new-tokens) is how many tokens"),
    (["run", "tiny", "--max-new-tokens", "1"], 2, "or at least 2 (the first token is the prefill's), not 1"),
    (["run", "tiny", "run.max_new_tokens=2.5"], 2, "Bad value for config key 'run.max_new_tokens'"),
    (["run", "tiny", "--max-new-tokens", "x"], 2, "argument --max-new-tokens: invalid int value: 'x'"),
    (["grid", "tiny", "prompt_tokens=4,8", "--max-new-tokens", "-3"], 2, "run.max_new_tokens (--max-new-tokens)"),
    (["run", "tiny", "run.max_spread=.inf"], 2, "a positive number such as 0.2, not inf"),
    (["run", "tiny", "run.precision=abc"], 2, "run.precision"),
    (["run", "tiny", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["run"], 2, "the following arguments are required: config"),
    (["run", "tiny", "--image", "{root}/nope.png"], 2, "does not exist"),
    (["run", "tiny", "--image", "{root}/not-an-image.png"], 2, "Cannot read image"),
    (["run", "tiny", "--image", "{huge}"], 2, "too large to decode safely"),
    (["run", "tinyy"], 2, "Did you mean 'tiny'"),
    (["run", "{root}/list.yaml"], 2, "must hold a mapping of keys, not list"),
    (["run", "{root}/broken.yaml"], 2, "Fix the YAML syntax"),
    (["run", "{root}/a.yaml"], 2, "includes itself through `base:`"),
    (["run", "{list_checkpoint}"], 2, "holds a JSON list, not an object"),
    (["run", "tiny", "encoder=fastvithdd"], 2, "Did you mean 'fastvithd'"),
    (["run", "tiny", "connector=nope"], 2, "Unknown connector 'nope'"),
    (["run", "tiny", "encoder=[1,2]"], 2, "must be a mapping of options, not [1, 2]"),
    (["run", "tiny", "encoder.imagesize=128"], 2, "Unknown config key 'encoder.imagesize'"),
    (["run", "tiny", "encoder.image_size=100"], 2, "multiple of 64"),
    (["run", "tiny", "encoder.image_size=0"], 2, "multiple of 64"),
    (["run", "tiny", "encoder.image_size=-64"], 2, "multiple of 64"),
    (["run", "tiny", "encoder.image_size=big"], 2, "encoder.image_size"),
    (["run", "tiny", "encoder.layers.9=3"], 2, "index 9 is out of range for a list of 5 items"),
    (["run", "tiny", "encoder.layers.x=3"], 2, "'x' indexes a list"),
    (["run", "tiny", "encoder.layers.0=0"], 2, "encoder.layers=[0, 1, 1, 1, 1] must hold positive numbers"),
    (["run", "tiny", "encoder.embed_dims=[16,16,33,32,64]"], 2, "encoder.embed_dims[2]=33 must be a multiple"),
    (["run", "tiny", "encoder.embed_dims=[16,16,32,33,64]"], 2, "multiple of 32"),
    (["run", "tiny", "encoder.mean=[1,2]"], 2, "encoder.mean needs 3 values"),
    (["run", "tiny", "encoder.std=[0,0,0]"], 2, "encoder.std=[0.0, 0.0, 0.0] must be positive"),
    (["run", "tiny", "encoder.weights={root}/missing.safetensors", "--count-only"], 2, "does not exist"),
    (["run", "tiny", "weights={root}/missing", "--count-only"], 2, "Weights path"),
    (["run", "tiny", "encoder=timm", "encoder.feature_block=99"], 2, "encoder.feature_block=99 is out of range"),
    (["run", "tiny", "encoder=timm", "encoder.model_name=nonexistent_model"], 2, "timm has no model"),
    (["run", "tiny", "encoder=timm", "encoder.model_kwargs.bogus=1"], 2, "Fix or remove the offending"),
    (
        ["run", "tiny", "reducer=prumerge", "reducer.score=cls"],
        2,
        "Scores it offers: mean_query, attention_received, mean_similarity, norm",
    ),
    (["run", "tiny", "reducer.position=sideways"], 2, "Bad value for config key 'reducer.position'"),
    (["run", "tiny", "decoder.attn_implementation=bogus"], 2, "Bad value for config key 'decoder.attn_implementation'"),
    (["run", "tiny", "decoder.overrides.num_hidden_layers=-1"], 2, "num_hidden_layers must be a positive integer"),
    (["run", "tiny", "decoder.overrides.num_hiden_layers=12"], 2, "Did you mean 'num_hidden_layers'"),
    (["run", "tiny", "decoder.overrides.hidden_size=65"], 2, "not divisible by num_attention_heads"),
    (["run", "tiny", "decoder.arch=qwen3"], 2, "Unknown decoder architecture 'qwen3'"),
    (["run", "tiny", "decoder.weights={root}", "--count-only"], 2, "not a transformers model directory"),
    (["run", "tiny", "decoder.config={root}/missing.json", "--count-only"], 2, "there is no file"),
    (["run", "tiny", "decoder.config={root}", "--count-only"], 2, "config.json of a causal LM (or the folder"),
    (["run", "tiny", "decoder.config={root}/not-an-image.png"], 2, "is not a config.json transformers can read"),
    (["run", "tiny", "decoder.config={list_checkpoint}"], 2, "Unrecognized model in"),
    (["run", "tiny", "decoder.config={root}/llava-qwen2.json"], 2, "does not recognize this architecture"),
    (["run", "tiny", "decoder.config={root}/resnet.json"], 2, "transformers cannot build as a causal LM"),
    (["run", "tiny", "prompt_tokens=-5"], 2, "prompt_tokens must be 0 or more"),
    (["run", "tiny", "prompt_tokens=abc"], 2, "config.prompt_tokens"),
    (["run", "tiny", "batch_size=0"], 2, "batch_size must be at least 1"),
    (["run", "tiny", "image_token_id=-3", "--count-only"], 2, "image_token_id=-3 is outside"),
    (["run", "tiny", "promt_tokens=3"], 2, "Did you mean 'prompt_tokens'"),
    (["run", "tiny", "run.repets=3"], 2, "Unknown config key 'run.repets'"),
    (["run", "tiny", "run.dtypes.encodr=bfloat16"], 2, "Unknown config key 'run.dtypes.encodr'"),
    (["run", "tiny", "encoder..image_size=3"], 2, "has an empty key part"),
    (["run", "tiny", "=5"], 2, "has an empty key part"),
    (["run", "tiny", "encoder.image_size"], 2, "is not of the form key=value"),
    (["run", "tiny", "prompt_tokens.x=1"], 2, "has no sub-keys"),
    (["run", "tiny", "base=fastvlm-7b"], 2, "'base' cannot be overridden"),
    (["run", ""], 2, "A config is a preset name, a YAML path, a checkpoint directory or a dict"),
    (["run", "tiny", "--device", "cpu:3"], 2, "the CPU has no index"),
    (["run", "tiny", "encoder.cls_ratio=nan"], 2, "encoder.cls_ratio=nan must make the final conv's width"),
    (["run", "tiny", "encoder.cls_ratio=0.001"], 2, "a whole multiple of the last stage's width"),
    (["run", "tiny", "encoder.mean=[.nan,0,0]"], 2, "must be finite numbers"),
    (["run", "tiny", "decoder.overrides.hidden_act=bogus"], 2, "is no activation transformers knows"),
    (["run", "tiny", "decoder.overrides.tie_word_embeddings=maybe"], 2, "must be true or false"),
    (["run", "tiny", "decoder.overrides.model_type=bogus"], 2, "cannot change the model family"),
    (["run", "tiny", "decoder.overrides.vocab_size=1"], 2, "vocab_size must be at least 2"),
    (["run", "tiny", "decoder.overrides.rms_norm_eps=.inf"], 2, "must be a finite number"),
    (["run", "tiny", "encoder=timm", "reducer=prumerge", "reducer.k_nn=0"], 2, "reducer.k_nn=0 must be at least 1"),
    (["run", "tiny", "encoder=timm", "reducer=prumerge", "reducer.iqr_factor=.nan"], 2, "reducer.iqr_factor=nan"),
    (
        ["run", "tiny", "encoder=timm", "encoder.keep_prefix_tokens=true", "reducer=prumerge", "reducer.score=cls"],
        2,
        "needs attention",
    ),
    (["run", "tiny", "encoder=timm", "encoder.attention_block=99"], 2, "attention_block=99 is out of range"),
    (["grid", "{root}/grid-unknown-key.yaml"], 2, "Unknown key 'sweeps' in grid file"),
    (["grid", "{root}/grid-empty-sweep.yaml"], 2, "'prompt_tokens' is an empty list"),
    (["grid", "{root}/grid-scalar-sweep.yaml"], 2, "must be a list of values, not 4"),
    (["grid", "{root}/grid-unequal-zip.yaml"], 2, "zips lists of unequal length (prompt_tokens: 2, batch_size: 3)"),
    (["grid", "{root}/grid-unknown-exclude.yaml"], 2, "exclude[0] names 'batch_size', which no cell varies"),
    (["grid", "{root}/grid-no-base.yaml"], 2, "needs `base:`"),
    (["grid", "{root}/grid-twice.yaml"], 2, "Key 'prompt_tokens' is varied twice"),
    (["grid", "{root}/grid-all-excluded.yaml"], 2, "is excluded: loosen `exclude:`"),
    (["grid", "{root}/grid-cells-not-list.yaml"], 2, "`cells:` must be a non-empty list of mappings"),
    (["grid", "{root}/grid-zipped.yaml", "prompt_tokens=1"], 2, "its cells have prompt_tokens = 4, 8"),
    (["grid", "tiny", "prompt_tokens=4,,8"], 2, "has an empty value between commas"),
    (["grid", "tiny", "prompt_tokens=4,8", "prompt_tokens=1,2"], 2, "is given twice on the command line"),
    (["grid", "tiny", "encoder.imagesize=128,192"], 2, "No cell of grid 'tiny' has a valid config"),
    (["grid", "tiny", "prompt_tokens=4,8", "--repeats", "0"], 2, "run.repeats (--repeats) must be at least 1"),
    (["grid", "tiny", "prompt_tokens=4,8", "--precision", "2"], 2, "run.precision (--precision) is the relative"),
    (["grid", "tini", "prompt_tokens=4,8"], 2, "Did you mean 'tiny'"),
    (
        ["grid", "tiny", "prompt_tokens=4,8", "--launcher", "slurm", "--db", "{root}/x.db"],
        2,
        "Unknown launcher 'slurm'",
    ),
    (["grid", "tiny", "prompt_tokens=4,8", "--workers", "0", "--db", "{root}/x.db"], 2, "--workers must be at least 1"),
    (["grid", "tiny", "prompt_tokens=4,8", "--slurm", "partition", "--db", "{root}/x.db"], 2, "give KEY=VALUE"),
    (["grid", "tiny", "prompt_tokens=4,8", "--db", "{root}"], 2, "is a folder; give a file path"),
    (["grid", "tiny", "prompt_tokens=4,8", "--db", "{root}/not-a-db.db"], 2, "is not an ablate results store"),
    (["results", "--db", "{root}/missing.db"], 2, "No results store at"),
    (["results", "--db", "{root}/not-a-db.db"], 2, "is not an ablate results store"),
    (["results", "--db", "{root}/x.db", "--grid", "nope"], 2, "Grid 'nope' is not in"),
    (["results", "--db", "{root}/x.db", "visual_tokens~4"], 2, "is not PATH=VALUE"),
    (["results", "--db", "{root}/rows.db", "encodr=clip*"], 2, "No row has 'encodr'. Did you mean 'encoder'?"),
    (["results", "--db", "{root}/rows.db", "--sort", "latency_ms.tfft"], 2, "Unknown --sort path 'latency_ms.tfft'"),
    (["results", "--db", "{root}/rows.db", "--columns", "name,visual_token"], 2, "Did you mean 'visual_tokens'?"),
    (["results", "--db", "{root}/rows.db", "--pivot", "name,visual_tokens"], 2, "is not ROWS,COLUMNS,VALUE"),
    (
        ["results", "--db", "{root}/rows.db", "--pivot", "nme,visual_tokens,flops.total"],
        2,
        "Unknown --pivot path 'nme'",
    ),
    (["plot", "--db", "{root}/missing.db"], 2, "No results store at"),
    (["plot", "--db", "{root}/x.db", "--out", "{root}/plots"], 2, "No rows to plot"),
    # Reducers: budgets, scores and layers are checked at build time, naming the options.
    (
        ["run", "tiny", "encoder=timm", "encoder.model_name=convnext_atto", "reducer=visionzip", "reducer.score=cls"],
        2,
        "offers: mean_similarity",
    ),
    (["run", "tiny", "reducer=prumerge", "reducer.score=bogus"], 2, "Bad value for config key 'reducer.score'"),
    (["run", "tiny", "reducer=prumerge", "reducer.score=norm", "reducer.tokens=1"], 2, "must be at least 2 (one kept"),
    (["run", "tiny", "reducer=prumerge", "reducer.score=norm", "reducer.tokens=9"], 2, "can make of the 4 tokens"),
    (["run", "tiny", "encoder.image_size=256", "reducer=avgpool", "reducer.tokens=5"], 2, "gives 1, 4, 16 tokens"),
    (["run", "tiny", "reducer=avgpool", "reducer.tokens=4", "reducer.kernel=2"], 2, "give one of them"),
    (["run", "tiny", "reducer=avgpool", "reducer.tokens=8", "reducer.adaptive=true"], 2, "not a square number"),
    (["run", "tiny", "reducer=avgpool", "reducer.kernel=3"], 2, "larger than the 2x2 token grid"),
    (
        [
            "run",
            "tiny",
            "encoder.image_size=256",
            "reducer=matryoshka",
            "reducer.all_scales=true",
            "reducer.scales=[9]",
        ],
        2,
        "use counts among 1, 4, 16",
    ),
    (["run", "tiny", "reducer=random", "reducer.tokens=0"], 2, "reducer.tokens=0 must be at least 1"),
    (["run", "tiny", "reducer=random", "reducer.tokens=5"], 2, "use 1..4"),
    (
        ["run", "tiny", "reducer=visionzip", "reducer.score=norm", "reducer.tokens=3", "reducer.contextual=3"],
        2,
        "between 0 and reducer.tokens - 1",
    ),
    (["run", "tiny", "reducer=fastv"], 2, "reducer.layer=2 but decoder 'hf-causal-lm' has 2 layers"),
    (["run", "tiny", "reducer=fastv", "reducer.keep_ratio=0"], 2, "must be in (0, 1]"),
    (["run", "tiny", "reducer=fastv", "reducer.layer=0"], 2, "must be at least 1"),
    (["run", "tiny", "reducer=divprune", "reducer.tokens=5"], 2, "can make of the 4 tokens"),
    (["run", "tiny", "reducer=divprune", "reducer.keep_ratio=1.5"], 2, "reducer.keep_ratio=1.5 must be in (0, 1]"),
    (["run", "tiny", "reducer=vispruner", "reducer.important_ratio=-1"], 2, "must be in [0, 1]"),
    (
        ["run", "tiny", "encoder=timm", "encoder.model_name=convnext_atto", "reducer=vispruner", "reducer.score=cls"],
        2,
        "Scores it offers: mean_similarity, norm",
    ),
    (["run", "tiny", "reducer=cdpruner", "reducer.tokens=9"], 2, "can make of the 4 tokens"),
    (["run", "tiny", "reducer=cdpruner", "reducer.position=before_connector"], 2, "reducer.position=after_connector"),
    (["run", "tiny", "reducer=dart"], 2, "reducer.layer=2 but decoder 'hf-causal-lm' has 2 layers"),
    (["run", "tiny", "reducer=dart", "reducer.layer=1", "reducer.tokens=2"], 2, "fewer than the reducer.pivot_image=4"),
    (["run", "tiny", "reducer=dart", "reducer.layer=1", "reducer.pivot_image=0", "reducer.pivot_text=0"], 2, "pivot"),
    (["run", "tiny", "reducer=dart", "reducer.layer=1", "reducer.pivot=random"], 2, "reducer.pivot"),
    (["run", "tiny", "input_size=[0,100]"], 2, "input_size must be two positive pixel counts"),
    (["run", "tiny", "input_size=[100]"], 2, "input_size must be two positive pixel counts"),
    (["run", "llava-onevision-0.5b", "encoder.tile.imagesize=3"], 2, "Unknown config key 'encoder.tile.imagesize'"),
    (["run", "llava-onevision-0.5b", "encoder.tile.name=nope"], 2, "Unknown encoder 'nope'"),
    (["run", "llava-onevision-0.5b", "encoder.grid_pinpoints=[[384,100]]"], 2, "multiples of the tile size 384"),
    (["run", "llava-onevision-0.5b", "encoder.max_grid=0"], 2, "encoder.max_grid=0 must be at least 1"),
    (["run", "llava-onevision-0.5b", "connector.max_tiles=0", "--count-only"], 2, "connector.max_tiles=0"),
    (["run", "tiny", "connector=pixel-shuffle", "connector.scale=3", "--count-only"], 2, "divisible by 3"),
    (["run", "llava-onevision-0.5b", "connector=ldpv2", "--count-only"], 2, "needs its input tokens on one 2-D grid"),
    (
        ["run", "llava-onevision-0.5b", "reducer=avgpool", "reducer.tokens=64", "--count-only"],
        2,
        "at 1152 px gives 10 crop(s) (27x27), 7290 tokens",
    ),
    (["run", "convllava-768", "encoder.feature_block=2", "--count-only"], 2, "feature_block is not supported"),
    (["compare", "nope-claims"], 2, "Claims file 'nope-claims' is neither a file nor a known claims name"),
    (["compare", "--systems", "bogus", "--count-only"], 2, "Unknown system 'bogus' (--systems)"),
    (["compare", "--repeats", "0"], 2, "--repeats must be at least 1"),
    (["compare", "--memory-gb", "-1"], 2, "--memory-gb must be a positive number"),
    (["compare", "--device", "banana", "--count-only"], 2, "Unknown device 'banana'"),
    (["compare", "nosuch:encoder.image_size=3", "--count-only"], 2, "names system 'nosuch'"),
    (["compare", "encoder.imagesize=3", "--count-only"], 2, "Unknown config key 'encoder.imagesize'"),
    (["train", "synth-tiny", "--data", "{root}/nope", "--out", "{root}/run"], 2, "is not a folder"),
    (["train", "synth-tiny", "--data", "{root}", "--out", "{root}/run"], 2, "Tokenizer directory"),
    (["train", "tiny", "train.stages=[stage9]", "--data", "{root}", "--out", "{root}/run"], 2, "Unknown stage preset"),
    (
        ["train", "tiny", "train.stages=[{base: stage1, lr: {connector: 0}}]", "--data", "{root}", "--out", "{root}/r"],
        2,
        "positive learning",
    ),
    (["train", "tiny", "train.stages.0.lr.connector=0", "--data", "{root}", "--out", "{root}/r"], 2, "{base: NAME"),
    (["train", "tiny", "train.stages.1.steps=3", "--data", "{root}", "--out", "{root}/run"], 2, "a single value"),
    (["train", "tiny", "train.batch_size=0", "--data", "{root}", "--out", "{root}/run"], 2, "train.batch_size must be"),
    (["train", "tiny", "--data", "{root}"], 2, "the following arguments are required: --out"),
    (["eval", "{root}", "--data", "{root}"], 2, "no config.json"),
    (["eval", "{root}", "--data", "{root}", "--db", "{root}"], 2, "is a folder; give a file path"),
    (["eval", "tiny", "--data", "{root}"], 2, "test.json does not exist"),
    (["eval", "tiny", "--data", "{root}", "--limit", "0"], 2, "--limit must be at least 1"),
    (["eval", "tiny", "--data", "{root}", "--limit", "-3"], 2, "--limit must be at least 1, not -3"),
    (["eval", "{root}/no-run", "--data", "{root}"], 2, "is neither a file nor a preset"),
    (["eval", "tiny", "--data", "{root}/no-data"], 2, "no-data/test.json does not exist"),
    (["eval", "tiny", "--data", "{root}", "--split", "dev.json"], 2, "dev.json does not exist"),
    (["data", "synth", "--out", "{root}/synth", "--answers", "1"], 2, "--answers must be between 2"),
    (["data", "synth", "--out", "{root}/synth", "--font-size", "big"], 2, "--font-size takes a number"),
    (["data", "synth", "--out", "{root}/synth", "--kind", "letters"], 2, "--kind must be one of"),
    (["data", "synth"], 2, "the following arguments are required: --out"),
    (["list", "badkind"], 2, "Unknown kind 'badkind'"),
    (["show", "tiny", "encoder=nope"], 2, "Unknown encoder 'nope'"),
]


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    """Put the test's files in place of {root}, {image}, ...; other braces (YAML flow mappings) stay as they are."""
    filled = []
    for arg in args:
        for key, value in files.items():
            arg = arg.replace(f"{{{key}}}", str(value))
        filled.append(arg)
    return filled


def _check_paragraph(stderr: str, phrase: str) -> None:
    assert phrase in stderr, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n\n") == 0, f"more than one paragraph:\n{stderr}"


@pytest.mark.parametrize("args,code,phrase", BAD_INPUT, ids=[" ".join(row[0]) for row in BAD_INPUT])
def test_bad_input_table(args, code, phrase, files, capsys):
    args = _fill(args, files)
    wants_json = args[:1] in (["run"], ["grid"])
    wants_json = args[:1] in (["run"], ["eval"], ["results"])
    assert main(args + (["--json"] if wants_json else [])) == code
    captured = capsys.readouterr()
    _check_paragraph(captured.err, phrase)
    if wants_json:
        lines = captured.out.strip().splitlines()
        assert len(lines) == 1, f"stdout must hold exactly one JSON object, got: {captured.out!r}"
        record = json.loads(lines[0])
        assert set(record) == set(Record().to_dict()), "the full record schema, failed or not"
        assert record["error"]["type"] and phrase in record["error"]["message"]
    else:
        assert captured.out == ""


def test_a_runtime_whose_extra_is_missing_names_the_extra(capsys, monkeypatch):
    """Without onnxruntime installed (an import of it fails, as it does then), the run stops before building."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["run", "tiny", "run.runtime=onnxruntime", "--json"]) == 2
    captured = capsys.readouterr()
    _check_paragraph(captured.err, "pip install 'ablate-vlm[onnx]'")
    record = json.loads(captured.out)
    assert set(record) == set(Record().to_dict()) and "needs onnxruntime" in record["error"]["message"]


def test_a_torchao_scheme_without_torchao_names_the_extra(capsys, monkeypatch):
    """Without torchao (CI's case; here an import of it fails, as it does then) the run stops before building."""
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert main(["run", "tiny", "run.quantize.decoder=int4-weight-only", "--json"]) == 2
    captured = capsys.readouterr()
    _check_paragraph(captured.err, "pip install 'ablate-vlm[torchao]'")
    record = json.loads(captured.out)
    assert set(record) == set(Record().to_dict()) and "through torchao" in record["error"]["message"]
    assert main(["run", "tiny", "run.quantize.decoder=int4-weight-only", "--count-only"]) == 0  # nothing quantized


def test_the_same_table_without_json_prints_nothing_on_stdout(files, capsys):
    for args, code, phrase in BAD_INPUT[:5]:
        assert main(_fill(args, files)) == code
        captured = capsys.readouterr()
        assert captured.out == "" and phrase in captured.err


def test_a_local_folder_with_a_presets_name_does_not_hide_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny", "--count-only", "--json"]) == 2
    captured = capsys.readouterr()
    _check_paragraph(captured.err, "'tiny' is both a preset and a local path")
    assert "./tiny" in captured.err
    assert main(["run", "./tiny", "--count-only"]) == 2  # the folder itself, when asked for: no checkpoint there
    assert "no config.json" in capsys.readouterr().err


def test_overrides_may_follow_flags(capsys):
    assert main(["run", "tiny", "--count-only", "--json", "encoder.image_size=256"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == 16


def test_a_plugin_selection_that_matches_nothing_is_named(capsys, monkeypatch):
    from ablate.api.registry import get_registry

    monkeypatch.setenv("ABLATE_PLUGINS", "nonexistent")
    get_registry(reload=True)
    try:
        assert main(["run", "tiny", "--count-only"]) == 2
        message = capsys.readouterr().err
        assert "Only the plugins in ABLATE_PLUGINS=nonexistent were loaded" in message
        assert "no installed plugin has that entry-point name" in get_registry().plugins["nonexistent"].error
    finally:
        monkeypatch.delenv("ABLATE_PLUGINS")
        get_registry(reload=True)


def test_list_overrides_edit_one_item(capsys):
    assert main(["show", "tiny", "encoder.layers.0=3", "encoder.layers.-1=2"]) == 0
    assert "- 3\n  - 1\n  - 1\n  - 1\n  - 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- Python API


def test_measure_twice_in_one_process_and_state_is_restored():
    import torch

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rng = torch.random.get_rng_state()
    records = [
        ablate.measure("tiny", [f"encoder.image_size={size}"], repeats=1, warmup=0, threads=1).to_dict()
        for size in (128, 192)
    ]
    assert [r["visual_tokens"] for r in records] == [4, 9]
    assert all(r["error"] is None and r["run"]["threads"] == 1 for r in records)
    assert (torch.get_num_threads(), torch.get_default_dtype()) == (threads, dtype)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_measure_raises_with_the_partial_record():
    with pytest.raises(ConfigError) as info:
        ablate.measure("tiny", ["encoder.image_size=100"]).to_dict()
    record = info.value.record.to_dict()
    assert record["error"]["type"] == "ImageSizeError" and "multiple of 64" in record["error"]["message"]
    assert record["name"] == "tiny" and record["config"]["encoder"]["image_size"] == 100


def test_unknown_run_option_in_python():
    with pytest.raises(ConfigError, match="Unknown config key 'run.repets'.*Did you mean 'repeats'"):
        ablate.measure("tiny", repets=3).to_dict()


def test_count_only_says_the_weights_were_not_checked(tmp_path):
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"not even a safetensors file")
    record = ablate.measure("tiny", [f"encoder.weights={weights}"], count_only=True).to_dict()
    assert any("encoder.weights exist but were not loaded or checked" in note for note in record["notes"])
    with pytest.raises(Exception) as info:  # a timed run does read them, and says what is wrong
        ablate.measure("tiny", [f"encoder.weights={weights}"], repeats=1, warmup=0).to_dict()
    assert "Cannot read weights" in str(info.value)
    assert info.value.record.error.type == "CheckpointError"


# --------------------------------------------------------------------------------- failures inside a plugin


class _Boom(RuntimeError):
    pass


def test_a_plugin_bug_is_blamed_on_the_plugin_with_the_record_kept(tmp_path, monkeypatch):
    """A reducer that crashes mid-run: PluginFailure naming its plugin, the traceback in a log, figures kept."""
    from dataclasses import dataclass

    from test_registry import plugin

    from ablate.api.components import ReducerConfig, TokenReducer
    from ablate.api.registry import Registry

    @dataclass
    class Config(ReducerConfig):
        pass

    class Crashing(TokenReducer):
        """Crashes on its first call with real tensors (the counting on the meta device goes through)."""

        name = "crashing"

        def forward(self, ctx):
            if ctx.tokens.device.type != "meta":
                raise _Boom("reducer exploded")
            return ctx

    Crashing.Config = Config
    monkeypatch.setenv("ABLATE_LOG_DIR", str(tmp_path))
    registry = Registry()
    registry.load_entry_points()
    registry.add_plugin(plugin(register_reducers=lambda register: register(Crashing)), "crashy")
    with pytest.raises(PluginFailure) as info:
        ablate.measure("tiny", ["reducer=crashing"], registry=registry, repeats=2, warmup=0).to_dict()
    error = info.value
    assert error.plugin == "crashy" and error.exit_code == 1
    assert "Plugin 'crashy' failed while timing (reducer stage)" in str(error) and "reducer exploded" in str(error)
    log = Path(error.log)
    assert log.parent == tmp_path and "_Boom: reducer exploded" in log.read_text() and "Traceback" in log.read_text()
    record = error.record.to_dict()
    assert record["params"]["total"] > 0 and record["flops"]["encoder"] > 0  # measured before the failure
    assert record["error"] == {
        "type": "PluginFailure",
        "message": str(error),
        "stage": "timing (reducer stage)",
        "plugin": "crashy",
        "log": str(log),
    }


CRASHING_ENCODER = '''
from ablate.api import hookimpl
from ablate_plugins.encoders.fastvit import FastViTTiny

class Crashing(FastViTTiny):
    """A tiny FastViT whose forward fails."""
    name = "crashing-encoder"

    def forward(self, ctx):
        if ctx.pixel_values.is_meta:  # counting works; the timed run fails
            return super().forward(ctx)
        raise ZeroDivisionError("encoder divided by zero")

@hookimpl
def register_encoders(register):
    register(Crashing)
'''


def test_cli_names_the_plugin_and_hides_the_traceback_unless_debug(tmp_path):
    env = install_plugin(tmp_path, "crashing_plugin", CRASHING_ENCODER, "crashing")
    result = run_cli_process("run", "tiny", "encoder=crashing-encoder", "--repeats", "1", "--json", env=env)
    assert result.returncode == 1
    assert "Plugin 'crashing' failed while timing (encoder stage)" in result.stderr
    assert "ZeroDivisionError: encoder divided by zero" in result.stderr and "Traceback" not in result.stderr
    record = json.loads(result.stdout)
    assert record["error"]["plugin"] == "crashing" and Path(record["error"]["log"]).is_file()
    assert record["params"]["encoder"] > 0
    debug = run_cli_process("run", "tiny", "encoder=crashing-encoder", "--repeats", "1", "--debug", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "crashing_plugin.py" in debug.stderr


DUPLICATE_NAME = '''
from ablate.api import hookimpl
from ablate_plugins.encoders.fastvit import FastViTTiny

class Impostor(FastViTTiny):
    """Claims the built-in's name."""
    name = "fastvithd"

@hookimpl
def register_encoders(register):
    register(Impostor)
'''


def test_a_third_party_plugin_cannot_take_a_builtin_name(tmp_path):
    env = install_plugin(tmp_path, "impostor_plugin", DUPLICATE_NAME, "aaa-impostor")  # sorts before every built-in
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ablate.api.registry import get_registry; r = get_registry(); "
            "print(r.plugins['aaa-impostor'].error); print(r.owner[('encoder', 'fastvithd')])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    error, owner = probe.stdout.strip().splitlines()
    assert "encoder 'fastvithd' is already registered by plugin 'fastvit' (built into ablate)" in error
    assert owner == "fastvit"
    record = json.loads(run_cli_process("run", "fastvlm-0.5b", "--count-only", "--json", env=env).stdout)
    assert record["params"]["encoder"] == 122_714_208  # the real FastViTHD, not the impostor


# ------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_still_prints_one_record(tmp_path):
    """SIGINT mid-run: exit 130, one JSON object with error filled and what was measured before."""
    # stderr on a terminal, so that the progress bar shows when the timing starts; stdout a pipe, for the record.
    terminal, child_side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ablate", "run", "tiny", "--repeats", "100000", "--json"],
        stdout=subprocess.PIPE,
        stderr=child_side,
        text=True,
        # A suite started in the background of a non-interactive shell (`nohup ... &`) ignores SIGINT, and so would
        # the child: give it the default disposition, so that Python turns the signal into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(child_side)
    shown = b""
    try:
        deadline = time.monotonic() + 300
        while b"timing" not in shown:  # past the imports and the build: it would now time for hours
            assert process.poll() is None and time.monotonic() < deadline, shown.decode(errors="replace")
            if select.select([terminal], [], [], 0.5)[0]:
                shown += os.read(terminal, 65536)
        process.send_signal(signal.SIGINT)
        stdout = process.communicate(timeout=120)[0]
    finally:
        process.kill()  # never leave a run timing for hours behind a failed test
    while select.select([terminal], [], [], 0.5)[0]:
        try:
            shown += os.read(terminal, 65536)
        except OSError:  # the child closed its side
            break
    os.close(terminal)
    stderr = shown.decode(errors="replace")
    assert process.returncode == 130, stderr
    record = json.loads(stdout)
    assert record["error"]["type"] == "KeyboardInterrupt"
    assert record["params"]["total"] > 0
    assert "Traceback" not in stderr and "Interrupted" in stderr
