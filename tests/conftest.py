"""Shared fixtures: a tiny synthetic sky and a runner for the real Snakemake workflow."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"


def merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, nested dicts key by key (a new dict)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# rules call `msa` (and torchrun): take them from the interpreter running the tests, also when
# its bin folder is not on PATH (an unactivated venv, a --user install)
BIN_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


class WorkflowDir:
    """A folder holding one config for the workflow; runs `snakemake` there (nothing in the repo)."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    def write_config(self, config: dict, name: str = "config.yaml") -> Path:
        target = self.path / name
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    def snakemake(self, *args: str, config: str = "config.yaml", profile: str = "default",
                  timeout: float = 900, check: bool = True, env: dict | None = None,
                  ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
               "--directory", str(self.path), "--configfile", str(self.path / config),
               "--workflow-profile", str(REPO / "profiles" / profile), *args]
        done = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PATH": BIN_PATH, **(env or {})})
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
        return done


def snakemake_in(root: Path, *args: str, env: dict | None = None,
                 unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`snakemake ARGS` run in `root` as a user types it (no --snakefile, no profile named), with
    `env` added to this environment and the variables `unset` taken out."""
    env = {name: value for name, value in {**os.environ, "PATH": BIN_PATH, **(env or {})}.items()
           if name not in unset}
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=root, capture_output=True,
                          text=True, timeout=600, check=False, env=env)


@pytest.fixture(scope="session")
def tiny_sky(tmp_path_factory):
    """Two shards of a synthetic sky (a few hundred stars, some without XP)."""
    from msa.data.synthetic import write_sky

    return write_sky(tmp_path_factory.mktemp("sky"), n_stars=600, n_shards=2, seed=3)


@pytest.fixture(scope="session")
def tiny_config(tiny_sky):
    """Config of the tiny sky: one label set, one member, two one-epoch pretraining segments."""
    from msa.data.synthetic import synthetic_config

    config = synthetic_config(tiny_sky.out_dir, "results", seed=7)
    # no tree or MLP yardstick in evaluate: the slowest steps, not what these tests check (test_evaluate
    # does); the from-scratch members stay, so their jobs are planned and run
    config = merge(config, {"finetune": {"members": 1}, "pretrain": {"epochs": 2, "epochs_per_job": 1},
                            "evaluate": {"baseline": False, "baseline_mlp": False}})
    config["label_sets"] = {"spectro": ["teff", "logg", "fe_h", "alpha_m"]}
    return config


@pytest.fixture
def workflow_dir(tmp_path, tiny_config):
    """A fresh workflow folder with the tiny config."""
    return WorkflowDir(tmp_path / "run", tiny_config)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A folder laid out like the repository's root (its workflow, profiles, config and demo data
    linked in): a documented command runs there as written, and its results stay out of the repo."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("workflow", "profiles", "config", "resources"):
        (root / name).symlink_to(REPO / name)
    return root


# A sitecustomize that makes `import msa` fail: the snakemake process of a `--sdm conda` run, where
# only the jobs' environments have the package.
BLOCK_MSA = '''
import sys


class NoMsa:
    def find_spec(self, name, path=None, target=None):
        if name == "msa" or name.startswith("msa."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


sys.meta_path.insert(0, NoMsa())
'''


@pytest.fixture
def without_msa(tmp_path) -> dict:
    """Environment variables under which a Python process cannot import `msa`."""
    folder = tmp_path / "no_msa"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCK_MSA)
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def no_progress_setting_stays_in_its_test():
    """`msa ... --no-progress` called in-process sets MSA_NO_PROGRESS for the processes it starts;
    it must not turn progress off for the tests that follow."""
    before = os.environ.get("MSA_NO_PROGRESS")
    yield
    if before is None:
        os.environ.pop("MSA_NO_PROGRESS", None)
    else:
        os.environ["MSA_NO_PROGRESS"] = before
