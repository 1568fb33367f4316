"""The workflow follows the Snakemake workflow catalog's conventions: snakefmt-formatted and
lint-clean rules, a licence, the catalog's usage file, conda environments under workflow/envs/."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_workflow_is_snakefmt_clean():
    snakefmt = shutil.which("snakefmt")
    assert snakefmt, "snakefmt is a test dependency: pip install -e '.[test]'"
    run = subprocess.run(
        [snakefmt, "--check", "--config", str(REPO / "pyproject.toml"), str(REPO / "workflow")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"run `snakefmt workflow/` and commit:\n{run.stderr}"


def test_workflow_is_lint_clean():
    """`snakemake --lint` on the demo config, from the repository root as a user runs it."""
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--cores", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    out = run.stdout + run.stderr
    assert "Congratulations, your workflow is in a good condition!" in out, out


def test_licence_is_mit_of_the_msa_developers():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 MSA developers" in text


def test_catalog_usage_file_declares_conda_deployment():
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert usage["software-stack-deployment"]["conda"] is True
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    assert "--configfile config/gaia_dr3.yaml" in usage["mandatory-flags"]["flags"]


def test_root_environment_is_the_workflow_env():
    """environment.yml (top level, for `conda env create`) and workflow/envs/msa.yaml are one file."""
    assert (REPO / "environment.yml").resolve() == (REPO / "workflow" / "envs" / "msa.yaml").resolve()
