"""Full-sky planning: ``snakemake -n`` of ``config/gaia_dr3.yaml`` on 3,386 shards.

Lays out empty placeholder files for 3,386 shard names (the number of Gaia DR3
``XpContinuousMeanSpectrum`` files) with the config's GaiaSource and cross-match patterns and its
label catalogue, in a temporary folder, then times the dry run of the local profile (every job
listed) and prints its wall and CPU seconds and the jobs per rule (``predict`` runs per label set
and batch of ``predict.shards_per_job`` shards); with ``--slurm`` also the dry run of the SLURM
profile and how many submissions it makes (a job group, if the profile defines any, is one).

Usage: ``python benchmarks/bench_plan.py [--shards 3386] [--slurm] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GAIA_DR3_XP_FILES = 3386
JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")


def shard_names(n: int) -> list[str]:
    """Names shaped like Gaia DR3's bulk files (HEALPix-level-8 ranges ``NNNNNN-MMMMMM``)."""
    step = 3145728 // n  # level-8 pixels split evenly
    return [f"{k * step:06d}-{(k + 1) * step - 1:06d}" for k in range(n)]


def lay_out(root: Path, config: dict, n: int) -> None:
    ingest = config["ingest"]
    patterns = [ingest["xp"], ingest["source"], *(s["path"] for s in ingest["surveys"].values())]
    for pattern in patterns:
        (root / pattern).parent.mkdir(parents=True, exist_ok=True)
    for name in shard_names(n):
        for pattern in patterns:
            (root / pattern.replace("{shard}", name)).touch()
    catalogue = root / config["labels"]["catalogue"]
    catalogue.parent.mkdir(parents=True, exist_ok=True)
    catalogue.touch()


def dry_run(root: Path, profile: str, quiet: bool = False) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system: what a busy machine does not inflate) and output;
    ``quiet``: the plan alone, without printing every job (which evaluates each job's resources)."""
    cmd = [sys.executable, "-m", "snakemake", "--dry-run", "--snakefile", str(REPO / "workflow" / "Snakefile"),
           "--directory", str(root), "--configfile", str(REPO / "config" / "gaia_dr3.yaml"),
           "--workflow-profile", str(REPO / "profiles" / profile), *(["--quiet"] if quiet else [])]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, stdout


def jobs_per_rule(out: str) -> Counter:
    return Counter(m.group(1) for line in out.splitlines() if (m := JOB_HEADER.match(line)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=GAIA_DR3_XP_FILES)
    parser.add_argument("--keep", type=Path, default=None, help="lay the files out here and keep them")
    parser.add_argument("--slurm", action="store_true", help="also plan with the SLURM profile")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config" / "gaia_dr3.yaml").read_text())
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    root.mkdir(parents=True, exist_ok=True)
    lay_out(root, config, args.shards)
    try:
        quiet_s, quiet_cpu, _ = dry_run(root, "default", quiet=True)
        local_s, local_cpu, local_out = dry_run(root, "default")
        counts = jobs_per_rule(local_out)
        counts.pop("all", None)
        print(f"config/gaia_dr3.yaml on {args.shards:,} placeholder shards")
        print(f"dry run, local profile, --quiet (the plan): {quiet_s:.1f} s wall, {quiet_cpu:.1f} s CPU")
        print(f"dry run, local profile, every job printed: {local_s:.1f} s wall, {local_cpu:.1f} s CPU")
        print(f"{'rule':<20} {'jobs':>8}")
        for rule, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"{rule:<20} {n:>8,}")
        print(f"{'total':<20} {sum(counts.values()):>8,}", flush=True)
        if args.slurm:
            slurm_s, slurm_cpu, slurm_out = dry_run(root, "slurm")
            groups = sum(line.startswith("[") and "Group job" in line for line in slurm_out.splitlines())
            # what a cluster is sent: each group job once, every job outside a group (not indented) on its own
            alone = jobs_per_rule(slurm_out)
            alone.pop("all", None)
            submissions = sum(alone.values()) + groups
            print(f"dry run, SLURM profile: {slurm_s:.1f} s wall, {slurm_cpu:.1f} s CPU; {groups:,} group jobs, "
                  f"{submissions:,} submissions in all")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
