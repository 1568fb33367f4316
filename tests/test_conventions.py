"""The workflow follows the Snakemake catalogue's conventions: snakefmt-formatted rules."""

import shutil
import subprocess
from pathlib import Path

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
