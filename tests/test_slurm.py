"""The demo workflow through the SLURM profile on a real one-node cluster (localhost, one fake GPU):
GPU rules are submitted with a GPU request, CPU rules without, and the catalogue equals that of a
local run with the same seeds."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from conftest import REPO, WorkflowDir, merge
from slurm.local_cluster import LocalSlurm, missing_requirements

pytestmark = pytest.mark.slurm

GPU_RULES = {"pretrain_segment", "finetune", "finetune_scratch", "finetune_photometry", "finetune_scratch_photometry",
             "predict", "train_reconstruction", "reconstruct", "embed"}
CPU_RULES = {"ingest", "fit_scaler", "calibrate", "evaluate", "catalog", "evaluate_reconstruction"}
# one thread per job in both runs, so CPU floating-point reductions happen in the same order
ONE_THREAD = ["--set-threads", *(f"{r}=1" for r in sorted(GPU_RULES | CPU_RULES))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason and os.environ.get("MSA_REQUIRE_SLURM"):
        pytest.fail(f"MSA_REQUIRE_SLURM is set (as in .ci/run) but the SLURM test cannot run: {reason}")
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def quick_demo_config() -> dict:
    """The bundled demo (config/config.yaml, real APOGEE x Gaia stars), with few epochs."""
    text = (REPO / "config" / "config.yaml").read_text()
    config = yaml.safe_load(text.replace("resources/demo/", f"{REPO}/resources/demo/"))
    return merge(config, {
        "model": {"encoder_widths": [32, 16]},
        "pretrain": {"epochs": 2, "epochs_per_job": 1},
        "finetune": {"members": 1, "epochs": 2, "photometry_overrides": {"epochs": 2}},
        "evaluate": {"baseline": False, "baseline_mlp": False},
        "reconstruct": {"training": {"epochs": 2}},
    })


def test_demo_through_slurm_requests_gpus_and_matches_a_local_run(cluster, tmp_path):
    import pyarrow.dataset as ds

    local = WorkflowDir(tmp_path / "local", quick_demo_config())
    local.snakemake("--cores", "2", *ONE_THREAD)

    on_slurm = WorkflowDir(tmp_path / "slurm", quick_demo_config())
    done = on_slurm.snakemake(*ONE_THREAD, profile="slurm-ci", env=cluster.env, timeout=900)
    assert "has been submitted with SLURM jobid" in done.stdout + done.stderr

    submitted: dict[str, list[dict]] = {}
    for job in cluster.jobs():
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job["comment"])
        assert rule, f"job without a Snakemake rule comment: {job}"
        submitted.setdefault(rule.group(1), []).append(job)
    assert set(submitted) == GPU_RULES | CPU_RULES, submitted.keys()
    for rule, jobs in submitted.items():
        for job in jobs:
            assert job["state"] == "COMPLETED", job
            asks_gpu = "gpu" in job["tres_per_job"] + job["tres_per_node"]
            assert asks_gpu == (rule in GPU_RULES), f"{rule}: {job}"
    assert len(submitted["pretrain_segment"]) == 2 and len(submitted["predict"]) == 1

    def catalogue(run):
        path = run.path / "results" / "catalog" / "spectro"
        # the HATS catalogue's rows: its Norder=/Dir=/Npix= files (the _metadata files are skipped)
        table = ds.dataset(path / "dataset", format="parquet").to_table().to_pandas()
        return table.sort_values("source_id").reset_index(drop=True)

    here, there = catalogue(local), catalogue(on_slurm)
    assert len(here) == 3896
    assert here.equals(there), "same seeds: the SLURM run must reproduce the local catalogue"
