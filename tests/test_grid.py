"""Grid specs: files and Hydra-style command lines expand into the cells a user expects, keyed by resolved config."""

from __future__ import annotations

import pytest
import yaml

from ablate.api.errors import ConfigError
from ablate.api.registry import get_registry
from ablate.config.compose import config_hash, load_config
from ablate.grid.expansion import is_grid_file, load_grid, split_values


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "text,values",
    [
        ("256,512,1024", ["256", "512", "1024"]),
        ("[1,2],[3,4]", ["[1,2]", "[3,4]"]),
        ("{a: 1, b: 2},x", ["{a: 1, b: 2}", "x"]),
        ('"a,b",c', ['"a,b"', "c"]),
        ("'a,b'", ["'a,b'"]),
        ("single", ["single"]),
    ],
)
def test_commas_outside_brackets_and_quotes_separate_values(text, values):
    assert split_values(text) == values


def test_command_line_sweeps_are_a_cartesian_product_in_order():
    grid = load_grid("tiny", ["encoder.image_size=128,192", "prompt_tokens=4,8,16"])
    assert [cell.label for cell in grid.cells] == [
        f"encoder.image_size={size} prompt_tokens={tokens}" for size in (128, 192) for tokens in (4, 8, 16)
    ]
    assert len({cell.key for cell in grid.cells}) == 6 and not any(cell.error for cell in grid.cells)
    assert grid.name == "tiny" and grid.id.startswith("tiny-")
    assert load_grid("fastvlm-0.5b", ["prompt_tokens=4,8"], {"count_only": True}).name == "fastvlm-0.5b"


def test_a_command_line_sweep_of_whole_components_as_yaml_mappings():
    grid = load_grid("tiny", ["reducer={name: random, tokens: 2},{name: avgpool, tokens: 1}"])
    assert [cell.values["reducer"] for cell in grid.cells] == [
        {"name": "random", "tokens": 2},
        {"name": "avgpool", "tokens": 1},
    ]
    assert not any(cell.error for cell in grid.cells) and len({cell.key for cell in grid.cells}) == 2


def test_a_cell_key_is_the_hash_of_its_resolved_config_run_section_included():
    grid = load_grid("tiny", ["encoder.image_size=128,192"], {"repeats": 3})
    expected = config_hash(load_config("tiny", ["encoder.image_size=192"], run={"repeats": 3}).to_dict())
    assert grid.cells[1].key == expected
    other_run = load_grid("tiny", ["encoder.image_size=128,192"], {"repeats": 4})
    assert {c.key for c in other_run.cells}.isdisjoint(c.key for c in grid.cells)
    assert other_run.id != grid.id
    # the same cells spelled differently are the same cells (and the same grid)
    respelled = load_grid("tiny", ["encoder.image_size=192,128", "run.repeats=3"])
    assert {c.key for c in respelled.cells} == {c.key for c in grid.cells}
    assert respelled.id == grid.id
    # W&B logging is how a cell is reported, not what it measures
    assert [c.key for c in load_grid("tiny", ["encoder.image_size=128,192", "wandb=true"], {"repeats": 3}).cells] == [
        c.key for c in grid.cells
    ]


def test_values_that_resolve_alike_are_one_cell():
    grid = load_grid("tiny", ["encoder.image_size=128,192,128"])
    assert len(grid.cells) == 2 and grid.merged == 1


def test_a_component_swap_goes_before_the_options_it_gets(tmp_path):
    """`encoder.image_size` set for every cell survives `encoder=...` swept: swaps reset options, so they go first."""
    spec = write(
        tmp_path / "g.yaml",
        {"base": "tiny", "set": {"encoder.image_size": 192}, "sweep": {"encoder": ["fastvit-tiny", "fastvithd"]}},
    )
    grid = load_grid(spec, run_options={"count_only": True})
    assert [cell.overrides[0].split("=")[0] for cell in grid.cells] == ["encoder", "encoder"]
    configs = [load_config("tiny", cell.overrides) for cell in grid.cells]
    assert [(c.encoder.name, c.encoder.image_size) for c in configs] == [("fastvit-tiny", 192), ("fastvithd", 192)]


def test_grid_file_sweep_zip_cells_exclude_and_run(tmp_path):
    spec = write(
        tmp_path / "grid.yaml",
        {
            "name": "mixed",
            "base": "tiny",
            "set": {"prompt_tokens": 4},
            "sweep": {"encoder.image_size": [128, 192]},
            "zip": [{"decoder.overrides.num_hidden_layers": [1, 2], "batch_size": [1, 2]}],
            "cells": [{"connector": "linear"}, {"connector": "mlp2x_gelu"}],
            "exclude": [{"encoder.image_size": 192, "batch_size": 2}],
            "run": {"repeats": 2, "warmup": 0},
        },
    )
    assert is_grid_file(spec)
    grid = load_grid(spec, run_options={"warmup": 1})
    assert grid.name == "mixed" and grid.excluded == 2
    assert len(grid.cells) == 2 * 2 * 2 - 2
    for cell in grid.cells:
        assert (cell.values["decoder.overrides.num_hidden_layers"], cell.values["batch_size"]) in {(1, 1), (2, 2)}
        assert not (cell.values["encoder.image_size"] == 192 and cell.values["batch_size"] == 2)
        config = load_config(grid.base, cell.overrides, run=grid.run)
        assert config.prompt_tokens == 4 and config.connector.name == cell.values["connector"]
        assert (config.run.repeats, config.run.warmup) == (2, 1)  # the flag wins over the file's run:


def test_command_line_sweep_replaces_the_files_and_adds_axes(tmp_path):
    spec = write(tmp_path / "grid.yaml", {"base": "tiny", "sweep": {"encoder.image_size": [128, 192, 256]}})
    grid = load_grid(spec, ["encoder.image_size=128,320", "prompt_tokens=4,8"])
    assert sorted({cell.values["encoder.image_size"] for cell in grid.cells}) == [128, 320]
    assert len(grid.cells) == 4


def test_base_is_found_next_to_the_grid_file(tmp_path):
    write(tmp_path / "mine.yaml", {"base": "tiny", "prompt_tokens": 3})
    spec = write(tmp_path / "grid.yaml", {"base": "mine.yaml", "sweep": {"encoder.image_size": [128, 192]}})
    grid = load_grid(spec)
    assert all(load_config(grid.base, cell.overrides).prompt_tokens == 3 for cell in grid.cells)


def test_an_impossible_cell_keeps_its_error_and_the_others_resolve():
    grid = load_grid("tiny", ["prompt_tokens=4,-5,8"])
    errors = {cell.values["prompt_tokens"]: cell.error for cell in grid.cells}
    assert errors[4] is None and errors[8] is None and "prompt_tokens must be 0 or more" in errors[-5]


def test_a_grid_where_no_cell_resolves_is_bad_input():
    with pytest.raises(ConfigError, match="No cell of grid 'tiny' has a valid config.*Unknown config key"):
        load_grid("tiny", ["encoder.imagesize=128,192"])


def test_example_grids_expand():
    """The shipped grids: the paper's resolution sweep and the encoder comparison (count-only keeps it quick)."""
    folder = get_registry().preset_folders[0][1] / "grids"
    sweep = load_grid(str(folder / "fastvlm-resolution.yaml"), run_options={"count_only": True})
    assert [cell.values["encoder.image_size"] for cell in sweep.cells] == [256, 512, 768, 1024]
    assert not any(cell.error for cell in sweep.cells)
    encoders = load_grid(str(folder / "encoder-comparison.yaml"), run_options={"count_only": True})
    assert len({cell.values.get("encoder") for cell in encoders.cells}) >= 3
    assert not any(cell.error for cell in encoders.cells), [cell.error for cell in encoders.cells]


def test_a_value_on_a_zipped_or_listed_key_keeps_the_cells_that_have_it(tmp_path):
    """`key=value` on a key that `zip:` or `cells:` varies narrows the grid to the cells with that value (a timed
    subset of a big grid); a value no cell has is refused with the values there are."""
    path = write(
        tmp_path / "g.yaml",
        {
            "base": "tiny",
            "zip": [{"prompt_tokens": [4, 8], "batch_size": [1, 2]}],
            "cells": [{"reducer": "none"}, {"reducer": "random", "reducer.tokens": 2}, {"reducer": "avgpool"}],
        },
    )
    assert len(load_grid(path).cells) == 6
    narrowed = load_grid(path, ["prompt_tokens=8", "reducer.tokens=2"])
    assert [cell.values for cell in narrowed.cells] == [
        {"prompt_tokens": 8, "batch_size": 2, "reducer": "random", "reducer.tokens": 2}
    ]
    assert [cell.values["reducer"] for cell in load_grid(path, ["reducer=avgpool"]).cells] == ["avgpool"] * 2
    with pytest.raises(ConfigError, match="its cells have batch_size = 1, 2"):
        load_grid(path, ["batch_size=3"])
