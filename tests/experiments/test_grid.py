"""Grid files (experiments.grid): cells seed-major with per-arm seeds and presets, a clear error for each bad file."""

from pathlib import Path

import pytest
import yaml

from rrepa.experiments.grid import grid_from_dict, load_grid
from rrepa.training.loop import check_pinned_files


def test_grid_cells_are_seed_major_with_per_arm_seeds():
    g = grid_from_dict({"preset": "fmnist", "seeds": [0, 1], "set": ["train.steps=10"],
                        "arms": {"a": [], "b": ["optim.lr=3e-3"], "c": {"set": ["optim.lr=1e-2"], "seeds": [1, 7]}}})
    cells = g.cells()
    assert [c.name for c in cells] == ["a-s0", "b-s0", "a-s1", "b-s1", "c-s1", "c-s7"]
    b = cells[1]
    assert b.cfg.optim.lr == 3e-3 and b.cfg.train.steps == 10 and b.cfg.train.seed == 0
    assert cells[-1].cfg.train.seed == 7 and cells[-1].cfg.optim.lr == 1e-2


def test_an_arm_may_name_its_own_preset():
    g = grid_from_dict({"preset": "fmnist", "set": ["train.steps=10"],
                        "arms": {"pixels": [], "ragged": {"preset": "fmnist-deep-shallow", "set": ["optim.lr=2e-3"]}}})
    pixels, ragged = g.cells()
    assert pixels.preset == "fmnist" and pixels.cfg.model.layers_per_block == 2
    assert ragged.preset == "fmnist-deep-shallow" and ragged.cfg.model.layers_per_block == (1, 1, 1, 5)
    assert ragged.cfg.train.steps == 10 and ragged.cfg.optim.lr == 2e-3  # common, then the arm's overrides
    assert g.to_dict()["arms"]["ragged"]["preset"] == "fmnist-deep-shallow"
    with pytest.raises(ValueError, match="arm 'bad' .*unknown preset"):
        grid_from_dict({"arms": {"bad": {"preset": "cifar"}}}).cells()


@pytest.mark.parametrize("grid, match", [
    ({"seeds": [0]}, "arms"),
    ({"arms": {"a": []}, "seed": [0]}, "unknown keys"),
    ({"arms": {"a": []}, "seeds": []}, "non-empty list of integers"),
    ({"arms": {"a": ["optim.lr"]}}, "key=value"),
    ({"arms": {"a/b": []}}, "names folders"),
    ({"arms": {"a": {"set": [], "seed": [1]}}}, "mapping with `set:`"),
    ({"arms": {"a": {"presets": "fmnist"}}}, "`preset:`"),
])
def test_bad_grid_files(grid, match):
    with pytest.raises(ValueError, match=match):
        grid_from_dict(grid)


def test_a_bad_override_names_its_arm(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"arms": {"ok": [], "typo": ["optim.lrr=1"]}}))
    with pytest.raises(ValueError, match="arm 'typo' .*did you mean optim.lr"):  # the config's own suggestion
        load_grid(path).cells()
    path.write_text(yaml.safe_dump({"arms": {"neg": ["optim.lr=-1"]}}))
    with pytest.raises(ValueError, match="arm 'neg' \\(seed 0\\)"):
        load_grid(path).cells()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")


REPO = Path(__file__).resolve().parents[2]
GRID_FILES = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", GRID_FILES, ids=lambda p: p.stem)
def test_every_shipped_grid_file_resolves_and_matches_its_results(path):
    """Each grid file under experiments/ resolves to valid cells that log evaluations, its pinned files are in the
    repository, and where its results are committed (results/<name>/grid.yaml) they came from this very file."""
    grid = load_grid(path)
    cells = grid.cells()
    assert cells and all(c.cfg.train.eval_every > 0 for c in cells)
    for c in cells:
        check_pinned_files(c.cfg)
    stored = REPO / "results" / path.stem / "grid.yaml"
    if stored.is_file():
        assert grid_from_dict(yaml.safe_load(stored.read_text()), str(stored)).to_dict() == grid.to_dict()
