"""The same 12-cell grid through every launcher (in-process, worker processes, submitit's local executor, a local
Ray instance) gives the same rows; a launcher whose library is missing names the extra to install."""

from __future__ import annotations

import sys

import pytest

from ablate.cli import main
from ablate.grid.expansion import load_grid
from ablate.grid.store import Store

GRID = ["tiny", "encoder.image_size=128,192,256", "prompt_tokens=4,8,12,16"]  # 12 cells


def rows(db) -> dict[str, tuple]:
    """key -> the figures that do not depend on where or when a cell ran."""
    with Store(db) as store:
        return {
            row.key: (
                row.label,
                row.status,
                row.record["visual_tokens"],
                row.record["flops"]["total"],
                row.record["params"]["total"],
                row.record["config"]["prompt_tokens"],
            )
            for row in store.rows()
        }


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    db = tmp_path_factory.mktemp("local") / "r.db"
    assert main(["grid", *GRID, "--db", str(db), "--count-only"]) == 0
    found = rows(db)
    assert len(found) == 12
    assert {key for key in found} == {cell.key for cell in load_grid(GRID[0], GRID[1:], {"count_only": True}).cells}
    return found


@pytest.mark.parametrize(
    "launcher",
    [
        ["--workers", "2"],
        ["--launcher", "submitit", "--slurm", "cluster=local", "--workers", "2"],
        ["--launcher", "ray", "--workers", "2"],
    ],
    ids=["local-workers", "submitit", "ray"],
)
def test_every_launcher_gives_the_same_rows(launcher, in_process, tmp_path, capsys):
    db = tmp_path / "r.db"
    assert main(["grid", *GRID, "--db", str(db), "--count-only", *launcher]) == 0, capsys.readouterr().err
    assert rows(db) == in_process
    assert "12 measured now" in capsys.readouterr().err


@pytest.mark.parametrize("launcher,extra", [("submitit", "slurm"), ("ray", "ray")])
def test_a_missing_launcher_library_names_its_extra(launcher, extra, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, launcher, None)  # what `import` sees when the package is not installed
    assert main(["grid", *GRID, "--db", str(tmp_path / "r.db"), "--launcher", launcher]) == 2
    assert f"pip install 'ablate-vlm[{extra}]'" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()  # refused before anything ran
