"""A real one-node SLURM cluster on localhost with one fake GPU, for the workflow's SLURM test.

Needs root and Debian's ``slurmctld slurmd slurm-client munge`` packages (``.ci/run`` installs
them). Controller state, spool, logs and PID files live under one folder. ``slurm.conf`` and
``gres.conf`` go to ``/etc/slurm``, the one place every client finds them: Snakemake's job-step
executor strips ``SLURM_CONF`` from the environment of the ``srun`` it runs inside each job. They
are written only where no slurm.conf exists (or where one of ours was left behind), and removed
by :meth:`stop`. The fake GPU is a ``gpu`` GRES backed by ``/dev/null``: SLURM
schedules it like a card and jobs see ``CUDA_VISIBLE_DEVICES=0``. No accounting database, so
Snakemake must poll with ``squeue`` (profile ``slurm-status-command: squeue``).

Every daemon started here is stopped by the PID recorded when it started, never by name.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = "slurmctld slurmd slurm-client munge"
# finished jobs stay visible to squeue this long; Snakemake's squeue polling needs it to be at
# least 3 x slurm-init-seconds-before-status-checks
MIN_JOB_AGE_S = 600
ETC = Path("/etc/slurm")
# first line of the config files we write: a slurm.conf without it belongs to someone else
MARK = "# written by MSA tests/slurm/local_cluster.py; removed when the test cluster stops"


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as root)"
    missing = [d for d in DAEMONS + ("sbatch", "squeue", "scontrol") if shutil.which(d) is None
               and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install {PACKAGES}"
    conf = ETC / "slurm.conf"
    if conf.exists() and not conf.read_text(errors="replace").startswith(MARK):
        return f"{conf} exists and is not ours: not starting a test cluster over a real SLURM setup"
    return None


def _wait_for(what: str, check, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"local SLURM: timed out after {timeout_s:.0f} s waiting for {what}")


def _succeeds(*cmd: str, env: dict | None = None, expect: str | None = None) -> bool:
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and (expect is None or expect in out.stdout)


class LocalSlurm:
    """Start with :meth:`start` (or ``with LocalSlurm(dir) as cluster:``), stop with :meth:`stop`."""

    partition = "debug"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.conf = ETC / "slurm.conf"
        self.logs = self.root / "log"
        self.pids: dict[str, int] = {}
        self.env = dict(os.environ)

    # --- configuration ---------------------------------------------------------------------------

    def _node_hardware(self) -> str:
        """slurmd's own view of this machine, memory lowered so the node is never 'low memory'."""
        line = subprocess.run([self._exe("slurmd"), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        fields.pop("NodeName", None)
        fields.pop("UpTime", None)
        fields["RealMemory"] = str(int(fields["RealMemory"]) * 9 // 10)
        return " ".join(f"{k}={v}" for k, v in fields.items())

    def write_config(self) -> None:
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ETC.mkdir(parents=True, exist_ok=True)
        run = self.root / "run"
        self.conf.write_text(f"""\
{MARK}
ClusterName=msa-ci
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={run / 'slurmctld.pid'}
SlurmdPidFile={run / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MinJobAge={MIN_JOB_AGE_S}
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 {self._node_hardware()} Gres=gpu:1 State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        # without File= slurmd drops a GPU GRES and drains the node
        (ETC / "gres.conf").write_text(
            f"{MARK}\nAutoDetect=off\nNodeName={self.node} Name=gpu Count=1 File=/dev/null\n")

    # --- daemons ---------------------------------------------------------------------------------

    @staticmethod
    def _exe(name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    def _record(self, name: str, pid_file: Path) -> None:
        _wait_for(f"{name} to write {pid_file}", lambda: pid_file.exists() and pid_file.read_text().strip(), 20)
        self.pids[name] = int(pid_file.read_text().split()[0])
        log.info("%s running as PID %d", name, self.pids[name])

    def _start_munge(self) -> None:
        if _succeeds("bash", "-c", "munge -n | unmunge"):
            log.info("a munged is already running (not ours; it will not be stopped)")
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:
            subprocess.run([self._exe("mungekey"), "--create", f"--keyfile={key}"], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        run.chmod(0o755)
        pid_file = run / "munged.pid"
        pid_file.unlink(missing_ok=True)
        # munged refuses to run as root; it forks into the background itself
        subprocess.run(["runuser", "-u", "munge", "--", self._exe("munged")], check=True)
        self._record("munged", pid_file)
        _wait_for("munge to answer", lambda: _succeeds("bash", "-c", "munge -n | unmunge"), 10)

    def start(self) -> "LocalSlurm":
        self.write_config()
        try:
            self._start_munge()
            # the controller first: slurmd registers with it
            subprocess.run([self._exe("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
            self._record("slurmctld", self.root / "run" / "slurmctld.pid")
            _wait_for("slurmctld to answer", lambda: _succeeds("scontrol", "ping", env=self.env,
                                                                 expect="is UP"), 30)
            subprocess.run([self._exe("slurmd"), "-f", str(self.conf)], check=True, env=self.env)
            self._record("slurmd", self.root / "run" / "slurmd.pid")
            _wait_for("the node to be idle", lambda: _succeeds(
                "sinfo", "-h", "-N", "-o", "%t", env=self.env, expect="idle"), 60)
        except Exception:
            log.error("local SLURM failed to start; logs in %s:\n%s", self.logs, self.log_tail())
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM every daemon started here (reverse order), SIGKILL after 20 s."""
        for name in reversed(list(self.pids)):
            pid = self.pids.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.monotonic() + 20
            while time.monotonic() < end and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                log.warning("%s (PID %d) ignored SIGTERM; sending SIGKILL", name, pid)
                os.kill(pid, signal.SIGKILL)
            log.info("stopped %s (PID %d)", name, pid)
        for name in ("slurm.conf", "gres.conf"):
            path = ETC / name
            if path.exists() and path.read_text(errors="replace").startswith(MARK):
                path.unlink()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- queries ---------------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, str]]:
        """Every job squeue still knows (finished ones for MinJobAge): id, name, state, the
        GPU/TRES request and the comment (the Snakemake rule and wildcards)."""
        fields = ["JobID", "State", "tres-per-job", "tres-per-node", "Comment"]
        out = subprocess.run(
            ["squeue", "--states=all", "-h", "-O", ",".join(f"{f}:|" for f in fields)],
            env=self.env, capture_output=True, text=True, check=True).stdout
        keys = ["job_id", "state", "tres_per_job", "tres_per_node", "comment"]
        return [dict(zip(keys, (v.strip() for v in line.split("|")))) for line in out.splitlines()
                if line.strip()]

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
