"""Grid files: the arms x seeds of an experiment (rrepa.experiments.runner runs them), parsed, checked and resolved.

A grid file (YAML) names a preset, the seeds, overrides common to every cell and the arms, each a list of
`--set` overrides (or a mapping with its own `set`, `seeds` and `preset`, e.g. to compare a pixel and a latent
preset):

    preset: fmnist
    seeds: [0, 1, 2]
    set: [train.steps=2400, train.eval_every=300, train.eval_samples=2000, train.eval_test_images=2000]
    arms:
      baseline: []
      reverse: [align.enabled=true, align.strategy=reverse]
      jacobi4: {set: [align.enabled=true, align.reverse=jacobi, align.jacobi_steps=4], seeds: [0]}
      latent: {preset: fmnist-latent}
    reuse: [results/other-grid]    # optional: cells finished there with the same resolved config are not retrained
    branch: [results/other-grid]   # optional: a cell starts at the newest checkpoint of its namesake there that it
                                   # would have reached itself (rrepa.training.branch), e.g. a longer wsd schedule

Each (arm, seed) is a Cell `ARM-sSEED` with its resolved RunConfig; a bad override fails when the grid is read,
before anything trains, naming the arm.

Paths in a grid file are relative to the grid file's folder, wherever the grid is run from: the values of
PATH_KEYS (weights files, data, caches; `data.vae` and `train.eval_ref` only where such a file or folder exists,
since they also take names) and the `reuse` and `branch` folders. A cell's config holds them relative to the current
folder (so that a grid run from the repository root stores the paths a user would type there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rrepa.training.config import RunConfig, read_yaml, resolve

# Config keys whose values are paths: relative ones in a grid file are relative to it. The second set also takes
# names (fmnist-vae, a hub id, fmnist:train), so a value there is a path only where it exists beside the grid file.
PATH_KEYS = ("train.eval_weights", "align.encoder_weights", "data.path", "data.latent_cache")
NAME_OR_PATH_KEYS = ("data.vae", "train.eval_ref")


def rebase(override: str, root: Path) -> str:
    """A key=value override with a relative path value (PATH_KEYS, NAME_OR_PATH_KEYS) taken relative to `root` and
    written relative to the current folder; anything else unchanged."""
    key, _, value = override.partition("=")
    key, value = key.strip(), value.strip()
    if key not in PATH_KEYS + NAME_OR_PATH_KEYS or not value or value.lower() in ("null", "none") \
            or os.path.isabs(os.path.expanduser(value)):
        return override
    path = root / value
    if key in NAME_OR_PATH_KEYS and not path.exists():
        return override
    return f"{key}={os.path.relpath(path)}"


@dataclass
class Cell:
    """One run of the grid: an arm (a list of overrides) at one seed."""

    arm: str  # the arm's name in the grid file
    seed: int  # train.seed
    preset: str  # the arm's preset (the grid's unless the arm names its own)
    overrides: list[str]  # the grid's common overrides, then the arm's, then train.seed
    cfg: RunConfig = field(repr=False)  # the resolved config

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


@dataclass
class Grid:
    preset: str  # the preset every cell starts from, unless its arm names another
    seeds: list[int]  # the default seeds of every arm
    common: list[str]  # overrides applied to every arm, before the arm's own
    arms: dict[str, dict]  # name -> {"set": [...], "seeds": [...][, "preset": name]}, in file order
    reuse: list[str] = field(default_factory=list)  # results folders whose finished, identical cells are copied
    branch: list[str] = field(default_factory=list)  # results folders whose cells' checkpoints cells may start at
    root: Path | None = None  # the grid file's folder, which its relative paths are relative to (None: the current)

    def reuse_folders(self) -> list[str]:
        """The reuse folders, relative to the current folder."""
        return self._here(self.reuse)

    def branch_folders(self) -> list[str]:
        """The branch folders, relative to the current folder."""
        return self._here(self.branch)

    def _here(self, folders: list[str]) -> list[str]:
        return [v if self.root is None or os.path.isabs(v) else os.path.relpath(self.root / v) for v in folders]

    def cells(self) -> list[Cell]:
        """Every cell, resolved and validated, seed-major (all arms of the first seed first), so that a grid cut
        short has the same seeds of every arm."""
        seeds = sorted({s for a in self.arms.values() for s in a["seeds"]}, key=self._seed_order)
        out = []
        for seed in seeds:
            for arm, spec in self.arms.items():
                if seed in spec["seeds"]:
                    overrides = [*self.common, *spec["set"], f"train.seed={seed}"]
                    if self.root is not None:
                        overrides = [rebase(o, self.root) for o in overrides]
                    preset = spec.get("preset", self.preset)
                    try:
                        cfg = resolve(preset, None, overrides)
                    except (KeyError, ValueError) as err:
                        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
                        raise ValueError(f"arm {arm!r} (seed {seed}): {msg}") from err
                    out.append(Cell(arm, seed, preset, overrides, cfg))
        return out

    def _seed_order(self, seed: int) -> tuple[int, int]:
        return (self.seeds.index(seed), seed) if seed in self.seeds else (len(self.seeds), seed)

    def to_dict(self) -> dict:
        d = {"preset": self.preset, "seeds": self.seeds, "set": self.common, "arms": self.arms}
        return {**d, **{k: v for k, v in (("reuse", self.reuse), ("branch", self.branch)) if v}}


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file (see the module docstring); its relative paths are relative to its folder."""
    grid = grid_from_dict(read_yaml(path, "grid file"), str(path))
    grid.root = Path(path).parent
    return grid


def grid_from_dict(d, where: str = "grid") -> Grid:
    if not isinstance(d, dict) or not isinstance(d.get("arms"), dict) or not d["arms"]:
        raise ValueError(f"{where} must be a mapping with `arms:` (name -> list of key=value overrides), and "
                         f"optionally `preset:`, `seeds:` and `set:`")
    unknown = set(d) - {"preset", "seeds", "set", "arms", "reuse", "branch"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a grid has preset, seeds, set, arms, reuse and "
                         f"branch")
    folders = {}
    for key in ("reuse", "branch"):
        folders[key] = d.get(key, [])
        if not isinstance(folders[key], list) or not all(isinstance(x, str) and x for x in folders[key]):
            raise ValueError(f"{where}: {key} must be a list of results folders like [results/fmnist-grid], got "
                             f"{folders[key]!r}")
    seeds = _int_list(d.get("seeds", [0]), f"{where}: seeds")
    common = _str_list(d.get("set", []), f"{where}: set")
    arms = {}
    for name, spec in d["arms"].items():
        if not isinstance(name, str) or not name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"{where}: arm name {name!r} must be letters, digits, '_' or '.' (it names folders)")
        if spec is None or isinstance(spec, list):
            spec = {"set": spec or []}
        if not isinstance(spec, dict) or set(spec) - {"set", "seeds", "preset"}:
            raise ValueError(f"{where}: arm {name!r} must be a list of overrides or a mapping with `set:`, "
                             f"`seeds:` and `preset:`")
        arms[name] = {"set": _str_list(spec.get("set", []), f"{where}: arm {name} set"),
                      "seeds": _int_list(spec.get("seeds", seeds), f"{where}: arm {name} seeds")}
        if "preset" in spec:
            arms[name]["preset"] = str(spec["preset"])
    return Grid(str(d.get("preset", "fmnist")), seeds, common, arms, list(folders["reuse"]), list(folders["branch"]))


def _str_list(v, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and "=" in x for x in v):
        raise ValueError(f"{where} must be a list of key=value strings like [train.steps=2400], got {v!r}")
    return list(v)


def _int_list(v, where: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{where} must be a non-empty list of integers like [0, 1, 2], got {v!r}")
    return list(v)
