"""The SLURM profile's documented command, dry-run against the demo (no cluster needed): every job
carries the site's account and partition; and the demo workflow on a real one-node cluster
(localhost, one fake GPU): GPU rules are submitted with a GPU request, CPU rules without, and the
catalogue equals that of a local run with the same seeds."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from conftest import REPO, WorkflowDir, merge, snakemake_in
from slurm.local_cluster import LocalSlurm, missing_requirements

PROFILE = REPO / "profiles" / "slurm" / "config.v8+.yaml"

GPU_RULES = {"pretrain_segment", "finetune", "finetune_scratch", "finetune_photometry", "finetune_scratch_photometry",
             "predict", "train_reconstruction", "reconstruct", "embed"}
CPU_RULES = {"ingest", "fit_scaler", "calibrate", "evaluate", "catalog", "evaluate_reconstruction", "probe_pretrained",
             "front_page"}
# one thread per job in both runs, so CPU floating-point reductions happen in the same order
ONE_THREAD = ["--set-threads", *(f"{r}=1" for r in sorted(GPU_RULES | CPU_RULES))]


def documented_setup() -> tuple[dict, list[str]]:
    """The profile header's `export` line (as variables) and its command for the demo (as words)."""
    lines = [line.lstrip("#").strip() for line in PROFILE.read_text().splitlines() if line.startswith("#")]
    export = next(line for line in lines if line.startswith("export "))
    site = dict(word.split("=", 1) for word in export.split()[1:])
    demo = next(line for line in lines if line.startswith("snakemake ") and line.endswith("the demo"))
    return site, demo.removesuffix("the demo").split()


def test_documented_command_gives_every_job_the_site_account_and_partition(checkout):
    site, command = documented_setup()
    assert command[0] == "snakemake" and "--configfile" not in command
    done = snakemake_in(checkout, *command[1:], "--dry-run", env=site)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "workflow specific profile profiles/slurm" in done.stderr and "profiles/default" not in done.stderr
    jobs, rule = [], None
    for line in done.stdout.splitlines():
        if header := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = header.group(1)
            jobs.append([rule, ""])
        elif rule and line.strip().startswith("resources:"):
            jobs[-1][1] = line
    planned = {rule for rule, _ in jobs} - {"all"}
    assert {"ingest", "fit_scaler", "pretrain_segment", "finetune", "calibrate", "predict", "catalog"} <= planned
    for rule, resources in jobs:
        if rule == "all":
            continue
        partition = site["MSA_SLURM_GPU_PARTITION" if rule in GPU_RULES else "MSA_SLURM_PARTITION"]
        assert f"slurm_account={site['MSA_SLURM_ACCOUNT']}," in resources, f"{rule}: {resources}"
        assert f"slurm_partition={partition}," in resources, f"{rule}: {resources}"


@pytest.mark.parametrize("unset", ["MSA_SLURM_ACCOUNT", "MSA_SLURM_GPU_PARTITION"])
def test_documented_command_refuses_to_run_without_the_site_settings(checkout, unset):
    site, command = documented_setup()
    env = {name: value for name, value in site.items() if name != unset}
    done = snakemake_in(checkout, *command[1:], "--dry-run", env=env, unset=(unset,))
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"reads the environment variable {unset}, which is not set: export {unset}=" in out, out
    assert "CHANGE_ME" not in PROFILE.read_text()


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


@pytest.mark.slurm
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
