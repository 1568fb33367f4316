"""The Snakemake workflow on a tiny synthetic sky: dry-run plans, exact partial re-runs, a real
end-to-end run, the report, reproducibility, and a pretraining job killed and resumed."""

from __future__ import annotations

import json
import os
import sys
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN_PATH, REPO, SNAKEFILE, WorkflowDir, merge, snakemake_in

pytestmark = pytest.mark.workflow

JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def planned_jobs(workdir: WorkflowDir, config: str = "config.yaml", *targets: str) -> set[str]:
    """The jobs a dry run would execute, as 'rule' or 'rule[name=value,...]' (rule all left out)."""
    out = workdir.snakemake("--dry-run", *targets, config=config).stdout
    jobs: list[list[str]] = []
    for line in out.splitlines():
        if header := JOB_HEADER.match(line):
            jobs.append([header.group(1), ""])
        elif jobs and (wild := WILDCARDS.match(line)):
            jobs[-1][1] = ",".join(sorted(w.strip() for w in wild.group(1).split(",")))
    return {f"{rule}[{wild}]" if wild else rule for rule, wild in jobs if rule != "all"}


def label_set_jobs(label_set: str, members: range, batches=("batch-0000",)) -> set[str]:
    """Every job of one label set, downstream of pretraining (both shards in one predict batch)."""
    return ({f"finetune[label_set={label_set},member={k}]" for k in members}
            | {f"finetune_scratch[label_set={label_set},member={k}]" for k in members}  # evaluate.from_scratch
            | {f"calibrate[label_set={label_set}]", f"evaluate[label_set={label_set}]",
               f"catalog[label_set={label_set}]", f"front_page[label_set={label_set}]"}
            | {f"predict[batch={b},label_set={label_set}]" for b in batches})


def probe_job(label_set: str) -> set[str]:
    """A label set's probe of the pretrained latent: reruns with pretraining, not with fine-tuning."""
    return {f"probe_pretrained[label_set={label_set}]"}


UPSTREAM = {"ingest[shard=s000]", "ingest[shard=s001]", "shard_list", "fit_scaler", "pretrain_segment[segment=0]",
            "pretrain_segment[segment=1]", "pretrain_model"}


# --- dry runs: cheap, no stage runs -------------------------------------------------------------

def test_dry_run_plans_every_stage_for_every_shard_label_set_and_member(workflow_dir):
    config = merge(workflow_dir.config, {
        "label_sets": {"spectro": ["teff", "logg", "fe_h", "alpha_m"], "age": ["age"]},
        "finetune": {"members": 2},
    })
    workflow_dir.write_config(config, "two_sets.yaml")
    assert planned_jobs(workflow_dir, "two_sets.yaml") == (UPSTREAM | probe_job("spectro") | probe_job("age")
                                                            | label_set_jobs("spectro", range(2))
                                                            | label_set_jobs("age", range(2)))


def test_resolved_config_is_written_once_with_every_default(workflow_dir):
    """Written by a run once it holds the lock, never by a dry run (tests/test_bad_input.py holds
    a run and starts a second one); a rerun with the same config leaves its mtime alone."""
    resolved = workflow_dir.path / "results" / ".msa" / "config.yaml"
    workflow_dir.snakemake("--dry-run")
    assert not resolved.exists()
    workflow_dir.snakemake("--cores", "1", "results/store/s000.h5")
    text = resolved.read_text()
    # a default the tiny config does not set, filled from the schema
    assert "restart_epochs: 10" in text
    mtime = resolved.stat().st_mtime_ns
    time.sleep(0.05)
    workflow_dir.snakemake("--cores", "1", "results/store/s000.h5", "--forcerun", "ingest")
    assert resolved.stat().st_mtime_ns == mtime, "unchanged config must not be rewritten"


def test_conda_env_installs_this_checkout_by_absolute_path(workflow_dir):
    """Snakemake builds a rule's environment from a copy of its file under .snakemake/conda/:
    the package must come from an absolute path to this checkout, on top of workflow/envs/msa.yaml."""
    workflow_dir.snakemake("--dry-run")
    env = yaml.safe_load((workflow_dir.path / "results" / ".msa" / "conda-env.yaml").read_text())
    base = yaml.safe_load((REPO / "workflow" / "envs" / "msa.yaml").read_text())
    *pip_deps, package = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    flag, path = package.split(maxsplit=1)
    assert flag == "-e" and Path(path).is_absolute() and Path(path) == REPO.resolve()
    assert {**env, "dependencies": [d for d in env["dependencies"] if not isinstance(d, dict)]} == {
        **base, "dependencies": [d for d in base["dependencies"] if not isinstance(d, dict)]}
    assert pip_deps == next(d["pip"] for d in base["dependencies"] if isinstance(d, dict))


def test_the_demo_plans_with_msa_not_importable_in_the_snakemake_process(checkout, without_msa):
    probe = subprocess.run([sys.executable, "-c", "import msa"], capture_output=True, text=True,
                           env={**os.environ, **without_msa}, check=False)
    assert "No module named 'msa'" in probe.stderr, "the block must work for the test to mean anything"
    done = snakemake_in(checkout, "--dry-run", env=without_msa)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    planned = {m.group(1) for line in done.stdout.splitlines() if (m := JOB_HEADER.match(line))}
    assert {"ingest", "pretrain_segment", "finetune", "calibrate", "predict", "catalog"} <= planned


@pytest.mark.parametrize("config_file", ["config.yaml", "gaia_dr3.yaml"])
def test_the_workflow_fills_defaults_as_msa_does(config_file):
    """rules/config.smk (plain Python, no rules) run as Snakemake runs it, against msa's validate."""
    from types import SimpleNamespace

    from msa.config import validate

    code = (REPO / "workflow" / "rules" / "config.smk").read_text()
    scope = {"workflow": SimpleNamespace(basedir=str(REPO / "workflow")), "Path": Path,
             "WorkflowError": ValueError}
    exec(compile(code, "config.smk", "exec"), scope)  # noqa: S102 - the file is this repository's
    config = yaml.safe_load((REPO / "config" / config_file).read_text())
    resolved = scope["resolved_config"](config, scope["CONFIG_SCHEMA"], source=config_file)
    assert resolved == validate(config)
    assert resolved["reconstruct"]["training"]["epochs"] == validate({})["reconstruct"]["training"]["epochs"]


def test_a_config_typo_is_a_short_message_naming_the_key(checkout, without_msa):
    done = snakemake_in(checkout, "--dry-run", "--config", "bogus_key=1", env=without_msa)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "(top level): Additional properties are not allowed ('bogus_key' was unexpected)" in out
    assert len(out.splitlines()) <= 30, out


def test_no_matching_input_files_is_an_error_naming_the_key(workflow_dir):
    config = merge(workflow_dir.config, {"ingest": {"xp": str(workflow_dir.path / "nothing_{shard}.csv")}})
    workflow_dir.write_config(config, "empty.yaml")
    done = workflow_dir.snakemake("--dry-run", config="empty.yaml", check=False)
    assert done.returncode != 0
    assert "ingest.xp" in done.stdout + done.stderr


def test_slurm_profile_requests_gpus_only_for_gpu_rules(workflow_dir):
    site = {"MSA_SLURM_ACCOUNT": "acct", "MSA_SLURM_PARTITION": "cpuq", "MSA_SLURM_GPU_PARTITION": "gpuq"}
    out = workflow_dir.snakemake("--dry-run", profile="slurm", env=site).stdout
    resources = {rule: job["resources"] for rule, job in dry_run_jobs(out).items()}
    for gpu_rule in ("pretrain_segment", "finetune", "finetune_scratch", "predict"):
        assert "gpu=1" in resources[gpu_rule] and "cpus_per_gpu=" in resources[gpu_rule]
        assert "slurm_partition=gpuq" in resources[gpu_rule]
    for cpu_rule in ("ingest", "fit_scaler", "calibrate", "evaluate", "catalog"):
        assert "gpu=" not in resources[cpu_rule]
        assert "slurm_partition=cpuq" in resources[cpu_rule]
    # pretraining wall time grows with each retry
    assert "runtime=480" in resources["pretrain_segment"]
    # prediction: one job for the batch of both shards, not grouped, its wall time 6 min a shard
    assert "Group job" not in out and "runtime=12" in resources["predict"]


def dry_run_jobs(out: str) -> dict[str, dict]:
    """Per rule, its first job's ``threads`` and ``priority`` (a dry run prints them only above 1
    and 0) and its ``resources`` line."""
    found, rule = {}, None
    for line in out.splitlines():
        line = line.strip()
        if header := JOB_HEADER.match(line):
            rule = header.group(1) if header.group(1) not in found else None
            if rule:
                found[rule] = {"threads": 1, "priority": 0, "resources": ""}
        elif rule and line.startswith(("threads:", "priority:")):
            field, value = line.split(":")
            found[rule][field] = int(value)
        elif rule and line.startswith("resources:"):
            found[rule]["resources"] = line
    return found


def test_local_gpu_rules_take_one_card_each_or_run_side_by_side_on_one_core(workflow_dir, tmp_path):
    without = os.pathsep.join(d for d in BIN_PATH.split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvidia-smi").chmod(0o755)
    cpu = dry_run_jobs(workflow_dir.snakemake("--dry-run", env={"PATH": without}).stdout)
    gpu = dry_run_jobs(workflow_dir.snakemake("--dry-run", env={"PATH": f"{fake}{os.pathsep}{without}"}).stdout)
    for rule in ("pretrain_segment", "finetune", "predict"):
        # no card: one thread, no gpu resource, so the profile's gpu cap does not serialise them
        assert cpu[rule]["threads"] == 1 and "gpu=0" in cpu[rule]["resources"], cpu[rule]
        assert gpu[rule]["threads"] == 2 and "gpu=1" in gpu[rule]["resources"], gpu[rule]  # the profile's --cores 2
    assert "gpu=" not in cpu["calibrate"]["resources"]


def test_on_two_cores_cpu_rules_start_beside_a_side_job_and_the_catalogue_path_goes_first(workflow_dir):
    config = merge(workflow_dir.config, {"reconstruct": {"enabled": True, "training": {"enabled": True}}})
    workflow_dir.write_config(config, "side_jobs.yaml")
    two = dry_run_jobs(workflow_dir.snakemake("--dry-run", "--cores", "2", config="side_jobs.yaml").stdout)
    four = dry_run_jobs(workflow_dir.snakemake("--dry-run", "--cores", "4", config="side_jobs.yaml").stdout)
    # one core short of --cores: beside train_reconstruction's one core, not waiting for it
    for rule in ("calibrate", "evaluate", "evaluate_reconstruction"):
        assert two[rule]["threads"] == 1, rule
        assert four[rule]["threads"] == 2, rule
    priority = {rule: job["priority"] for rule, job in two.items()}
    assert {r for r, p in priority.items() if p > 0} == {"finetune", "calibrate", "predict", "catalog"}
    assert {"finetune_scratch", "train_reconstruction", "evaluate", "reconstruct"} <= set(priority)


def test_pretraining_on_several_gpus_runs_under_torchrun(workflow_dir):
    one = workflow_dir.snakemake("--dry-run").stdout
    four = workflow_dir.snakemake("--dry-run", "--set-resources", "pretrain_segment:gpu=4",
                                  "--resources", "gpu=4").stdout
    assert "torchrun" not in one and "Shell command: msa pretrain" in one
    assert "torchrun --standalone --nproc-per-node 4 --no-python msa pretrain" in four


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, sub in (node.get("properties") or {}).items():
        keys.append(prefix + name)
        keys += schema_keys(sub, f"{prefix}{name}.")
    return keys


def test_config_readme_documents_every_schema_key():
    from msa.config import schema

    readme = (REPO / "config" / "README.md").read_text()
    missing = [k for k in schema_keys(schema()) if f"`{k}`" not in readme]
    assert not missing, f"config/README.md does not document: {missing}"


FULL_SKY_SHARDS = ["000000-003111", "003112-005263", "005264-006601"]


def full_sky_layout(folder: Path) -> WorkflowDir:
    """config/gaia_dr3.yaml in `folder`, with three (empty) bulk-file triples named like Gaia
    DR3's and an empty label catalogue: enough for a dry run."""
    config = yaml.safe_load((REPO / "config" / "gaia_dr3.yaml").read_text())
    placeholders = [config["labels"]["catalogue"]]
    for shard in FULL_SKY_SHARDS:
        for pattern in (config["ingest"]["xp"], config["ingest"]["source"],
                        *(s["path"] for s in config["ingest"]["surveys"].values())):
            placeholders.append(pattern.replace("{shard}", shard))
    for name in placeholders:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return WorkflowDir(folder, config)


def test_full_sky_config_resolves_to_the_file_plus_schema_defaults_only(tmp_path):
    """The demo config (the Snakefile's `configfile:`) must not leak into a --configfile run:
    its file is present here, as in a checkout, and sets values gaia_dr3.yaml leaves out."""
    from msa.config import validate

    run = full_sky_layout(tmp_path / "sky")
    (run.path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", run.path / "config" / "config.yaml")
    # a real run writes the file, once it holds the lock and before its first job, which fails here
    # on the empty placeholder files (a dry run writes nothing)
    done = run.snakemake("--cores", "1", f"results/store/{FULL_SKY_SHARDS[0]}.h5", check=False)
    assert done.returncode != 0
    resolved = yaml.safe_load((run.path / "results" / ".msa" / "config.yaml").read_text())
    assert resolved == validate(run.config)


def test_full_sky_config_plans_the_cluster_run(tmp_path):
    """config/gaia_dr3.yaml against three (empty) bulk-file triples named like Gaia DR3's."""
    run = full_sky_layout(tmp_path / "sky")
    config = run.config
    run.write_config(merge(config, {"predict": {"shards_per_job": 2}}), "two_per_job.yaml")
    planned = planned_jobs(run, "two_per_job.yaml")
    count = lambda rule: sum(j.split("[")[0] == rule for j in planned)  # noqa: E731
    n_sets, members = len(config["label_sets"]), config["finetune"]["members"]
    assert count("ingest") == 3
    assert count("pretrain_segment") == config["pretrain"]["epochs"] // config["pretrain"]["epochs_per_job"]
    assert count("finetune") == n_sets * members
    # the three shards in batches of two: one job of two shards and one of the last shard
    assert {j for j in planned if j.startswith("predict[")} == {
        f"predict[batch={b},label_set={s}]" for b in ("batch-0000", "batch-0001") for s in config["label_sets"]}
    assert count("catalog") == count("calibrate") == count("evaluate") == n_sets


# --- one real run, then dry runs against its recorded state -------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
    """The tiny workflow run end to end (raw files -> catalogue)."""
    run = WorkflowDir(tmp_path_factory.mktemp("finished") / "run", tiny_config)
    run.snakemake("--cores", "2")
    return run


def test_run_produces_every_output(finished_run):
    results = finished_run.path / "results"
    assert (results / "pretrain" / "model.pt").read_bytes() == (results / "pretrain" / "segment-1.pt").read_bytes()
    assert (results / "evaluate" / "spectro" / "metrics.json").is_file()
    assert [p.name for p in (results / "predict" / "spectro").iterdir()] == ["batch-0000"]
    # (Snakemake adds its .snakemake_timestamp to a directory output)
    assert sorted(p.name for p in (results / "predict" / "spectro" / "batch-0000").glob("*.parquet")) == [
        "s000.parquet", "s001.parquet"]
    assert (results / "catalog" / "spectro.summary.json").is_file()
    assert (results / "catalog" / "spectro.skymap.png").is_file()
    assert planned_jobs(finished_run) == set(), "a finished run must have nothing left to do"


def test_changing_finetune_lr_reruns_finetune_and_what_follows_only(finished_run):
    config = merge(finished_run.config, {"finetune": {"lr_head": 0.003}})
    finished_run.write_config(config, "lr.yaml")
    assert planned_jobs(finished_run, "lr.yaml") == label_set_jobs("spectro", range(1))


def test_changing_predict_settings_reruns_predict_and_catalog_only(finished_run):
    config = merge(finished_run.config, {"predict": {"batch_size": 512}})
    finished_run.write_config(config, "predict.yaml")
    assert planned_jobs(finished_run, "predict.yaml") == {"predict[batch=batch-0000,label_set=spectro]",
                                                          "catalog[label_set=spectro]",
                                                          "front_page[label_set=spectro]"}


def test_enabling_reconstruction_and_embeddings_adds_only_their_jobs(finished_run):
    jobs = {"reconstruct[batch=batch-0000]", "evaluate_reconstruction", "embed[batch=batch-0000]"}
    config = merge(finished_run.config, {"reconstruct": {"enabled": True}, "embed": {"enabled": True}})
    finished_run.write_config(config, "foundation.yaml")
    assert planned_jobs(finished_run, "foundation.yaml") == jobs
    # with a label set's members the jobs also wait for them (already there: nothing else reruns)
    config = merge(config, {"reconstruct": {"label_set": "spectro"}})
    finished_run.write_config(config, "foundation_members.yaml")
    assert planned_jobs(finished_run, "foundation_members.yaml") == jobs
    # one job per batch of shards, one Parquet file per shard in the batch's folder
    config = merge(config, {"reconstruct": {"shards_per_job": 1}})
    finished_run.write_config(config, "foundation_batches.yaml")
    assert planned_jobs(finished_run, "foundation_batches.yaml") == jobs | {"reconstruct[batch=batch-0001]"}
    # a batch of reconstruct's is not one of predict's: no rule makes it (not a KeyError in the plan)
    asked = finished_run.snakemake("--dry-run", "results/predict/spectro/batch-0001",
                                   config="foundation_batches.yaml", check=False)
    assert asked.returncode != 0 and "KeyError" not in asked.stdout + asked.stderr
    assert "MissingRule" in asked.stdout + asked.stderr
    finished_run.snakemake("--cores", "2", "results/reconstruct/batch-0001", "results/embed/batch-0000",
                           config="foundation_batches.yaml")
    results = finished_run.path / "results"
    assert [p.name for p in (results / "reconstruct" / "batch-0001").glob("*.parquet")] == ["s001.parquet"]
    assert sorted(p.name for p in (results / "embed" / "batch-0000").glob("*.parquet")) == [
        "s000.parquet", "s001.parquet"]


def test_training_reconstruction_members_adds_them_and_reruns_only_the_reconstruction(finished_run):
    trained = merge(finished_run.config, {"reconstruct": {"enabled": True,
                                                          "training": {"enabled": True, "members": 2, "epochs": 3}}})
    finished_run.write_config(trained, "reconstruct_trained.yaml")
    # the members feed the reconstruction; nothing upstream reruns
    assert planned_jobs(finished_run, "reconstruct_trained.yaml") == {
        "train_reconstruction[member=0]", "train_reconstruction[member=1]",
        "reconstruct[batch=batch-0000]", "evaluate_reconstruction"}


def test_adding_a_reconstruction_member_keeps_the_trained_one(finished_run):
    one = merge(finished_run.config, {"reconstruct": {"enabled": True,
                                                      "training": {"enabled": True, "members": 1, "epochs": 1}}})
    finished_run.write_config(one, "reconstruct_one.yaml")
    finished_run.snakemake("--cores", "2", "results/reconstruct/member-0.pt", config="reconstruct_one.yaml")
    two = merge(one, {"reconstruct": {"training": {"members": 2}}})
    finished_run.write_config(two, "reconstruct_two.yaml")
    assert planned_jobs(finished_run, "reconstruct_two.yaml") == {
        "train_reconstruction[member=1]", "reconstruct[batch=batch-0000]", "evaluate_reconstruction"}


def test_reordering_features_reruns_everything_after_ingest(finished_run):
    config = dict(finished_run.config)
    photometry = config["features"]["gaia_photometry"]
    config["features"] = {**config["features"], "gaia_photometry": dict(reversed(photometry.items()))}
    finished_run.write_config(config, "reordered.yaml")
    # the feature order is the model's input order: not a cosmetic change
    assert planned_jobs(finished_run, "reordered.yaml") == (
        UPSTREAM - {"ingest[shard=s000]", "ingest[shard=s001]", "shard_list"}) | label_set_jobs("spectro", range(1)) \
        | probe_job("spectro")


def test_adding_a_label_set_adds_only_its_jobs(finished_run):
    config = merge(finished_run.config, {"label_sets": {"age": ["age"]}})
    finished_run.write_config(config, "age.yaml")
    assert planned_jobs(finished_run, "age.yaml") == label_set_jobs("age", range(1)) | probe_job("age")


def test_adding_a_member_keeps_existing_members(finished_run):
    config = merge(finished_run.config, {"finetune": {"members": 2}})
    finished_run.write_config(config, "members.yaml")
    planned = planned_jobs(finished_run, "members.yaml")
    assert planned == label_set_jobs("spectro", range(2)) - {"finetune[label_set=spectro,member=0]",
                                                             "finetune_scratch[label_set=spectro,member=0]"}


def test_photometry_members_add_their_jobs_and_feed_every_ensemble_consumer(finished_run):
    config = merge(finished_run.config, {"finetune": {"photometry_members": True,
                                                      "photometry_overrides": {"epochs": 3}}})
    finished_run.write_config(config, "photometry.yaml")
    planned = planned_jobs(finished_run, "photometry.yaml")
    new = {"finetune_photometry[label_set=spectro,member=0]",
           "finetune_scratch_photometry[label_set=spectro,member=0]"}
    # the members with XP stay; what reads the ensemble reruns with the photometry members added
    assert planned == new | {"calibrate[label_set=spectro]", "evaluate[label_set=spectro]",
                             "catalog[label_set=spectro]", "front_page[label_set=spectro]",
                             "predict[batch=batch-0000,label_set=spectro]"}


def test_touching_a_raw_file_without_changing_it_reruns_nothing(finished_run, tiny_sky):
    xp = tiny_sky.xp_paths[1]
    before = xp.stat()
    try:
        os.utime(xp)  # newer than its shard, same content: Snakemake compares checksums
        assert planned_jobs(finished_run) == set()
    finally:
        os.utime(xp, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_changing_one_raw_file_reingests_only_its_shard(finished_run, tiny_sky):
    import pandas as pd

    tmass = tiny_sky.tmass_paths[1]
    original, before = tmass.read_bytes(), tmass.stat()
    try:
        table = pd.read_csv(tmass)
        table.loc[0, "j_m"] += 0.01
        table.to_csv(tmass, index=False, float_format="%.3f")
        planned = planned_jobs(finished_run)
    finally:
        tmass.write_bytes(original)
        os.utime(tmass, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert {j for j in planned if j.startswith("ingest")} == {"ingest[shard=s001]"}
    # everything downstream of the changed shard follows
    assert planned == (UPSTREAM - {"ingest[shard=s000]"}) | label_set_jobs("spectro", range(1)) | probe_job("spectro")


def test_report_gathers_figures_and_metrics(finished_run):
    report = finished_run.path / "results" / "report.html"
    finished_run.snakemake("--report", str(report))
    html = report.read_text(errors="replace")
    for expected in ("loss.png", "coverage.png", "metrics.json", "skymap.png", "spectro.summary.json",
                     "spectro.json"):
        assert expected in html, f"{expected} missing from the report"


def test_two_runs_from_scratch_give_identical_catalogues(finished_run, tmp_path, tiny_config):
    import pyarrow.dataset as ds

    second = WorkflowDir(tmp_path / "again", tiny_config)
    second.snakemake("--cores", "2")

    def catalogue(run):
        table = ds.dataset(run.path / "results" / "catalog" / "spectro" / "dataset",
                           format="parquet").to_table().to_pandas()
        return table.sort_values("source_id").reset_index(drop=True)

    first, again = catalogue(finished_run), catalogue(second)
    assert len(first) == 600
    assert first.columns.tolist() == again.columns.tolist()
    assert first.equals(again), "same seed, same data: the catalogues must be identical"


def test_a_label_from_the_store_runs_from_ingest_to_catalogue(tmp_path, tiny_config):
    """The full-sky `parallax` label set in miniature: Gaia's parallax from the store is the label
    (every star with a parallax is labelled), its calibration and test stars are left out of
    pretraining, and the workflow runs to the catalogue."""
    import pyarrow.dataset as ds

    config = merge(tiny_config, {"pretrain": {"exclude_label_splits": True},
                                 "finetune": {"max_train_rows": 200, "max_validation_rows": 40},
                                 "calibrate": {"max_rows": 100}, "evaluate": {"max_rows": 100,
                                                                              "from_scratch": False},
                                 "catalog": {"sky_map_label": "parallax", "keep_shard_predictions": False}})
    config["labels"]["columns"]["parallax"] = {"store": "parallax", "error": "parallax_error"}
    config["label_sets"] = {"parallax": ["parallax"]}
    run = WorkflowDir(tmp_path / "run", config)
    run.snakemake("--cores", "2")
    results = run.path / "results"
    catalogue = ds.dataset(results / "catalog" / "parallax" / "dataset", format="parquet").to_table()
    assert catalogue.num_rows == 600 and "parallax_q50" in catalogue.column_names
    assert not (results / "predict" / "parallax").exists() or not any((results / "predict" / "parallax").iterdir())
    metrics = json.loads((results / "evaluate" / "parallax" / "metrics.json").read_text())
    assert metrics["n_test"] <= 100 and metrics["labels"] == ["parallax"]
    # the probe of the pretrained latent, with the parallax input hidden (it is the label)
    assert metrics["probe"]["test"]["xp"]["pretrained"]["parallax"]["nmad"] > 0  # (NaN fails too)
    first_epoch = json.loads((results / "pretrain" / "segment-0.metrics.jsonl").read_text().splitlines()[0])
    rows = first_epoch["rows"]
    # without the exclusion ~570 rows (all but the 5 % validation); 20 % of them are calibration or test
    assert 300 < rows < 600 * 0.95 * 0.9
    assert (results / "finetune" / "parallax" / "member-0" / "model.pt").stat().st_mode & 0o222 == 0  # protected


# --- preemption: a pretraining job killed mid-segment resumes when Snakemake retries ------------

def _pretrain_pid(workdir: Path) -> int | None:
    """PID of the `msa pretrain` process running in `workdir` (ours: the folder is unique)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == str(workdir) and "pretrain" in args and "--segment" in args \
                and any(Path(a).name == "msa" for a in args[:2]):
            return int(proc.name)
    return None


@pytest.fixture(scope="module")
def pretrained_once(tmp_path_factory, tiny_config):
    """Ingest, scaler and an uninterrupted 2-epoch pretraining segment, with a checkpoint every step."""
    config = merge(tiny_config, {"pretrain": {"epochs": 2, "epochs_per_job": 2, "batch_size": 16,
                                              "checkpoint_every": 1}})
    run = WorkflowDir(tmp_path_factory.mktemp("uninterrupted") / "run", config)
    run.snakemake("--cores", "2", "results/pretrain/segment-0.pt")
    return run


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_pretraining_resumes_exactly_on_retry(tmp_path, pretrained_once, kill_signal):
    import torch

    # the same store and scaler (and Snakemake's records of them); pretraining to redo
    workdir = tmp_path / "preempt"
    shutil.copytree(pretrained_once.path, workdir, symlinks=True)
    shutil.rmtree(workdir / "results" / "pretrain")
    (workdir / "results" / "logs" / "pretrain" / "segment-0.log").unlink()
    target = "results/pretrain/segment-0.pt"
    work_checkpoint = workdir / "results" / "pretrain" / "work" / "segment-0.pt"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--workflow-profile",
           str(REPO / "profiles" / "default"), "--cores", "2", "--retries", "1", target]
    snakemake = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "PATH": BIN_PATH})
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and snakemake.poll() is None and killed is None:
        if work_checkpoint.exists():
            pid = _pretrain_pid(workdir)
            if pid is not None:
                os.kill(pid, kill_signal)
                killed = pid
        time.sleep(0.01)
    out, _ = snakemake.communicate(timeout=600)
    assert killed is not None, f"the pretraining job finished before it could be killed:\n{out[-3000:]}"
    assert snakemake.returncode == 0, out[-4000:]
    log = (workdir / "results" / "logs" / "pretrain" / "segment-0.log").read_text()
    assert "resuming from" in log and "work/segment-0.pt" in log, log[-3000:]

    def metrics(run_dir):
        path = run_dir / "results" / "pretrain" / "segment-0.metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    resumed, uninterrupted = metrics(workdir), metrics(pretrained_once.path)
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted], \
        "the resumed run must take exactly the steps of an uninterrupted one"
    assert [m["train_loss"] for m in resumed] == pytest.approx([m["train_loss"] for m in uninterrupted])
    weights = torch.load(workdir / target, weights_only=True, map_location="cpu")["model"]
    expected = torch.load(pretrained_once.path / target, weights_only=True, map_location="cpu")["model"]
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not work_checkpoint.exists(), "a finished segment leaves no in-progress checkpoint"
