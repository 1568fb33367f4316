# Shared helpers: the resolved config, shard discovery, label sets and members, the per-rule
# settings that decide what reruns, and the targets of `rule all`.

import functools
import json
import math
import os
import re
import shutil
from pathlib import Path

import tempfile

import yaml
from snakemake.exceptions import WorkflowError

# Every default filled as every `msa` command fills it (rules/config.smk).
config.update(resolved_config(config, CONFIG_SCHEMA, source="the workflow config"))

RESULTS = config["results"]
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"


def write_atomically(path, text):
    """`text` into `path` through a temporary file beside it: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o666 & ~UMASK)  # the umask's mode, not mkstemp's 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


UMASK = os.umask(0)
os.umask(UMASK)


def write_if_changed(path, text):
    """Write `text` to `path` atomically, and only when the content differs, so its mtime
    changes only with the content (it is read by jobs but is never a rule input)."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return
    write_atomically(path, text)


# The one file every `msa --config` call reads: the validated config with all defaults.
MSA_CONFIG = f"{RESULTS}/.msa/config.yaml"


# Written once this run holds Snakemake's lock (onstart runs after it is taken, never on a dry
# run): written while parsing, a second snakemake with another --configfile, refused by the lock,
# or any dry run had already rewritten the file a running run's jobs were reading (issue 27).
# Jobs of a cluster run parse with --no-hooks and so write nothing; a local run given --no-hooks
# would leave the file of the last run, so do not pass it. Key order kept: the order of features
# in the config is the model's input order.
onstart:
    write_if_changed(MSA_CONFIG, yaml.safe_dump(config, sort_keys=False))


# The checkout this workflow runs from (workflow/ is the main Snakefile's folder).
REPO_ROOT = Path(workflow.basedir).resolve().parent


def conda_env_with_package(env_file, package_dir):
    """The conda environment `env_file` plus this package, installed (editable) from
    `package_dir` by absolute path."""
    env = yaml.safe_load(Path(env_file).read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    if not pip_sections:
        raise WorkflowError(f"{env_file} has no `- pip:` section to add the msa package to")
    pip_sections[0].append(f"-e {package_dir}")
    return env


# Software of all rules under `--sdm conda`: workflow/envs/msa.yaml plus the package from this
# checkout. Snakemake creates the environment from a copy of the file under .snakemake/conda/,
# so the package path must be absolute (a relative `-e .` would point into that folder).
MSA_ENV = os.path.abspath(f"{RESULTS}/.msa/conda-env.yaml")
write_if_changed(
    MSA_ENV,
    yaml.safe_dump(
        conda_env_with_package(REPO_ROOT / "workflow" / "envs" / "msa.yaml", REPO_ROOT),
        sort_keys=False,
    ),
)


# Names that become paths (shards; label sets are checked by the schema): no slash, no '..', no spaces
# or shell characters. Rule shell commands also quote every path and wildcard.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")


def discover_shards(pattern):
    """Shard names: the `{shard}` values of the files on disk that match `ingest.xp`."""
    if "{shard}" not in pattern:
        raise WorkflowError(
            f"ingest.xp = {pattern!r} has no {{shard}} placeholder; write the file name with "
            "{shard} where the shard name varies, e.g. XpContinuousMeanSpectrum_{shard}.csv.gz"
        )
    found = glob_wildcards(pattern.replace("{shard}", "{shard,[^/]+}")).shard
    if not found:
        raise WorkflowError(
            f"no input file matches ingest.xp = {pattern!r} (relative to {os.getcwd()}); "
            "fix the path in the config or run from the directory that holds it"
        )
    unsafe = sorted(n for n in set(found) if not SAFE_NAME.fullmatch(n))
    if unsafe:
        raise WorkflowError(
            f"input file(s) {[pattern.replace('{shard}', n) for n in unsafe[:3]]} give shard name(s) "
            f"{unsafe[:3]} with characters outside {SAFE_NAME.pattern}; a shard name becomes result "
            "paths and job arguments: rename the file(s) (letters, digits, '_', '-', '.', '+')"
        )
    return sorted(set(found))


SHARDS = discover_shards(config["ingest"]["xp"])
LABEL_SETS = list(config["label_sets"])
MEMBERS = list(range(config["finetune"]["members"]))
N_SEGMENTS = math.ceil(config["pretrain"]["epochs"] / config["pretrain"]["epochs_per_job"])
SHARD_FILES = expand(f"{RESULTS}/store/{{shard}}.h5", shard=SHARDS)
# The rules that read the whole store take this one file (one shard path a line, passed to `msa`
# as `--shards @file`) instead of every shard: on the full sky's 3,386 shards the plan then has one
# edge per shard instead of one per shard and whole-store job, and plans several times faster.
# A re-made shard re-makes the list, so everything downstream still reruns.
SHARD_LIST = f"{RESULTS}/store/shards.txt"


def shard_batches(shards, size):
    """Batch name -> its shards: consecutive chunks of `size` of the sorted shard list."""
    starts = range(0, len(shards), size)
    return {f"batch-{k:04d}": shards[i : i + size] for k, i in enumerate(starts)}


# The per-star rules (predict, reconstruct, embed) run per batch of `<section>.shards_per_job`
# shards: on the full sky ~100 jobs per label set instead of 3,386, so the plan has a tenth of the
# jobs and a cluster no one-minute jobs. Each job loads its models once.
BATCHED_SECTIONS = ("predict", "reconstruct", "embed")
BATCHES = {
    section: shard_batches(SHARDS, config[section]["shards_per_job"])
    for section in BATCHED_SECTIONS
}
BATCH_NAMES = sorted({name for batches in BATCHES.values() for name in batches})


def batch_constraint(section):
    """A rule's `{batch}` constraint: only the batches of its own section (with fewer shards a
    job, reconstruct has batches predict has not)."""
    return "|".join(re.escape(b) for b in BATCHES[section]) or "(?!)"


def batch_shard_files(section):
    """Input function: the store files of the `{batch}` of `section`."""
    return lambda wildcards: expand(
        f"{RESULTS}/store/{{shard}}.h5", shard=BATCHES[section][wildcards.batch]
    )


def batch_folders(section, folder):
    """`folder/batch-NNNN` for every batch of `section`, in shard order."""
    return [f"{folder}/{batch}" for batch in BATCHES[section]]


def write_shard_list(shards, path, log_path):
    """One shard path a line, as argparse reads `@file` arguments."""
    write_atomically(path, "".join(f"{shard}\n" for shard in shards))
    Path(log_path).write_text(f"{len(shards)} shards listed in {path}\n")


def shard_path(pattern, shard):
    """A config file pattern with `{shard}` substituted (other braces left alone)."""
    return pattern.replace("{shard}", shard)


def ingest_inputs(wildcards):
    """Raw files of one shard: XP, gaia_source (if configured) and every survey table."""
    ingest = config["ingest"]
    files = {"xp": shard_path(ingest["xp"], wildcards.shard)}
    if ingest["source"]:
        files["source"] = shard_path(ingest["source"], wildcards.shard)
    for name, survey in sorted(ingest["surveys"].items()):
        files[f"survey_{name}"] = shard_path(survey["path"], wildcards.shard)
    return files


def label_inputs():
    """The label catalogue, when labels come from a file (not only from the store)."""
    catalogue = config["labels"]["catalogue"]
    return [catalogue] if catalogue else []


def settings(**parts):
    """JSON of the config parts read by a rule, used as its `params`: changing one of them
    reruns exactly the rules that read it. Key order is kept, not sorted: the order of the
    features in the config is the model's input order, so reordering them must rerun too."""
    return json.dumps(parts, default=str)


def section(name, *, drop=()):
    return {k: v for k, v in config[name].items() if k not in drop}


def label_set_settings(label_set):
    """The labels of one label set and how each is read: adding or changing another label
    set leaves this one's jobs alone."""
    names = config["label_sets"][label_set]
    labels = config["labels"]
    return {
        "names": names,
        "catalogue": labels["catalogue"],
        "source_id_column": labels["source_id_column"],
        "columns": {n: labels["columns"].get(n) for n in names},
    }


def held_out_label_settings():
    """What decides the stars that pretrain.exclude_label_splits leaves out (nothing when off)."""
    if not config["pretrain"]["exclude_label_splits"]:
        return None
    return {
        "splits": config["splits"],
        "labels": {n: label_set_settings(n) for n in LABEL_SETS},
    }


def label_target_inputs():
    """With pretrain.label_targets, the label catalogue is an input of pretraining too."""
    return label_inputs() if config["pretrain"]["label_targets"] else []


def label_target_settings():
    """What decides the label targets' values (nothing when off): the splits and how each is read."""
    if not config["pretrain"]["label_targets"]:
        return None
    labels = config["labels"]
    return {
        "splits": config["splits"],
        "catalogue": labels["catalogue"],
        "source_id_column": labels["source_id_column"],
        "columns": {n: labels["columns"].get(n) for n in config["pretrain"]["label_targets"]},
    }


def segment_path(k, suffix=".pt"):
    return f"{RESULTS}/pretrain/segment-{k}{suffix}"


def previous_segment(wildcards):
    """The segment a pretraining segment resumes from (none for the first)."""
    k = int(wildcards.segment)
    return [segment_path(k - 1)] if k > 0 else []


# Where local jobs run on a CUDA machine (nvidia-smi on PATH), each job of a GPU rule asks for a
# card (profiles/default has one, so they run one after another). Without a GPU these rules train
# small networks on the CPU, where jobs side by side on one core each beat one job over every
# core: on a shared 2-core machine a fine-tuning member took 19 s on one thread and 29 s on two,
# the plain MLP yardstick 20 s and 55 s. SLURM profiles set `gpu` per rule themselves.
LOCAL_GPU = shutil.which("nvidia-smi") is not None
GPU_PER_JOB = 1 if LOCAL_GPU else 0


def gpu_rule_threads(threads):
    """A GPU rule's threads: its loader and host work beside a card, one core without a card."""
    return threads if LOCAL_GPU else 1


def cpu_rule_threads(threads):
    """A CPU rule's threads on a local run: up to `threads`, one core short of --cores, so that it
    starts beside whichever one-core job runs: on --cores 2 a 2-thread calibrate waited for both
    cores, ~30 min behind train_reconstruction. SLURM profiles set these threads themselves."""
    return max(1, min(threads, local_cores() - 1))


def local_cores():
    """--cores; 1 where a cluster executor runs without it (its profile sets every rule's threads)."""
    try:
        return workflow.cores or 1
    except WorkflowError:  # Snakemake refuses to read workflow.cores when none was given
        return 1


# The catalogue's path (its fine-tuned members, calibration, prediction, the catalogue) goes first
# when ready jobs wait for cores; the side jobs (yardsticks, reconstruction) take what is left.
CATALOGUE_PRIORITY = 10


def launcher(wildcards, resources):
    """`msa` alone on one device; torchrun with one process per GPU when the job has several."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc-per-node {gpus} --no-python msa"
    return "msa"


def ensemble_members(folder, label_set):
    """An ensemble's member files: the members with XP and, with finetune.photometry_members,
    as many photometry-only members, which serve the stars without XP."""
    return list(_ensemble_members(folder, label_set))


@functools.lru_cache(maxsize=None)  # asked by every job that reads an ensemble
def _ensemble_members(folder, label_set):
    kinds = ["member", "photometry"] if config["finetune"]["photometry_members"] else ["member"]
    return tuple(
        expand(
            f"{RESULTS}/{folder}/{label_set}/{{kind}}-{{member}}/model.pt",
            kind=kinds,
            member=MEMBERS,
        )
    )


def member_models(wildcards):
    return ensemble_members("finetune", wildcards.label_set)


def scratch_member_models(wildcards):
    """The from-scratch members evaluate compares against (none when evaluate.from_scratch is off)."""
    if not config["evaluate"]["from_scratch"]:
        return []
    return ensemble_members("finetune_scratch", wildcards.label_set)


def batch_predictions(path):
    """A batch's prediction folder: kept, or temp() when the catalogue is its only reader."""
    return path if config["catalog"]["keep_shard_predictions"] else temp(path)


def attempt_scaled(minutes):
    """`runtime` in minutes, growing with each retry (a job killed at its wall time resumes
    from its checkpoint with more time); `minutes` a number or a function of the wildcards."""
    first_try = minutes if callable(minutes) else lambda wildcards: minutes
    return lambda wildcards, attempt: first_try(wildcards) * attempt


def per_batch_shard(section, minutes):
    """Minutes of a `section` job: `minutes` for each shard of its batch."""
    return lambda wildcards: minutes * len(BATCHES[section][wildcards.batch])


def catalog_targets(label_set):
    return {
        "dataset": f"{RESULTS}/catalog/{label_set}",
        "summary": f"{RESULTS}/catalog/{label_set}.summary.json",
        "skymap": f"{RESULTS}/catalog/{label_set}.skymap.png",
        "distributions": f"{RESULTS}/catalog/{label_set}.distributions.png",
    }


def all_targets():
    targets = [
        f"{RESULTS}/pretrain/model.pt",
        f"{RESULTS}/pretrain/metrics.jsonl",
        f"{RESULTS}/pretrain/loss.png",
    ]
    for label_set in LABEL_SETS:
        targets.append(f"{RESULTS}/evaluate/{label_set}")
        targets.extend(catalog_targets(label_set).values())
        targets.append(f"{RESULTS}/report/{label_set}.results.rst")  # the report's front page
    return targets


# --- the foundation model's own outputs (rules/reconstruct.smk) ---------------------------------


def reconstruction_members():
    """The members `msa train-reconstruction` trains (reconstruct.training)."""
    return expand(
        f"{RESULTS}/reconstruct/member-{{member}}.pt",
        member=range(config["reconstruct"]["training"]["members"]),
    )


def autoencoder_models(section):
    """The models a section's outputs come from: for reconstruction with `training.enabled`, its
    trained members; else the pretrained model, plus the fine-tuned members of `label_set` when
    the section names one (their spread is the reported uncertainty)."""
    if section == "reconstruct" and config["reconstruct"]["training"]["enabled"]:
        return reconstruction_members()
    models = [f"{RESULTS}/pretrain/model.pt"]
    label_set = config[section]["label_set"]
    if label_set:
        models += expand(
            f"{RESULTS}/finetune/{label_set}/member-{{member}}/model.pt", member=MEMBERS
        )
    return models


def foundation_targets():
    targets = []
    if config["reconstruct"]["enabled"]:
        targets += batch_folders("reconstruct", f"{RESULTS}/reconstruct")
        targets.append(f"{RESULTS}/reconstruct/evaluation")
    if config["embed"]["enabled"]:
        targets += batch_folders("embed", f"{RESULTS}/embed")
    return targets
