"""A one-node SLURM cluster on this machine, for tests/test_slurm.py (see docs of SLURM.md).

Needs root and Debian's ``slurm-wlm`` and ``munge`` (.ci/run installs them). The cluster lives
only while :func:`run_on_slurm` runs the workflow: ``munged`` (unless one already answers),
``slurmctld`` and ``slurmd`` are started with pid, state, spool and log files under a
temporary folder, and stopped by those pids when the run ends, whatever happens; the
``/etc/slurm/slurm.conf`` written for it is removed again.

The partition lets two jobs share the node's cores (``OverSubscribe=FORCE:2``): the fast
workflow's jobs ask for 2 CPUs but spend most of their time starting Python on one, and the
executor notices a finished job only at its next status check (about every 12 s), so two jobs
per check instead of one halve the run. The jobs keep the CPUs, threads and memory the
profile asks for.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workflow_helpers import (FAST_CONFIG, RUN_TIMEOUT, WorkflowRun, copy_repo, head_commit,
                              snakemake, workflow_env)

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# Written by the m2ost tests (tests/slurm_cluster.py); removed when they end."
PARTITION = "debug"
BINARIES = ("slurmctld", "slurmd", "munged", "munge", "unmunge", "sbatch", "squeue", "scancel",
            "sinfo", "scontrol")
# What the repository's SLURM profile may change to run here: site-specific values only.
SITE_SPECIFIC = {"slurm_partition", "gpu", "gpu_model", "slurm_extra", "mem_mb", "threads"}


def _running(name: str) -> list[int]:
    """Pids of processes whose executable is exactly ``name`` (read-only look at /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def slurm_unavailable() -> str | None:
    """Why a private one-node cluster cannot be started here, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge not installed (apt-get install slurm-wlm munge): no {', '.join(missing)}"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[workflow]')"
    if _running("slurmctld") or _running("slurmd"):
        return "a SLURM daemon is already running on this machine; not starting a second cluster"
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace"):
        return f"{SLURM_CONF} exists and belongs to a real cluster; not overwriting it"
    return None


def _node_line() -> tuple[str, int, int]:
    """``slurmd -C``'s description of this machine: (node line, CPUs, RealMemory MB)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(text for text in out.splitlines() if text.startswith("NodeName="))
    fields = dict(f.split("=", 1) for f in line.split())
    return line, int(fields["CPUs"]), int(fields["RealMemory"])


class Cluster:
    """Start with :meth:`start`, always :meth:`stop` (it only stops what it started)."""

    def __init__(self, root: Path):
        self.root = root
        self.started: dict[str, Path] = {}  # daemon -> pid file
        self.wrote_conf = False
        self.cpus = self.mem_mb = 0

    def _sh(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    def _munge_ok(self) -> bool:
        try:
            cred = self._sh("munge", "-n", check=False, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, text=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def start(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if not self._munge_ok():
            if not Path("/etc/munge/munge.key").exists():
                self._sh("mungekey", "--create")
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            pid_file = self.root / "munged.pid"
            self._sh("munged", "--force", f"--pid-file={pid_file}")
            self.started["munged"] = pid_file
            self._wait(self._munge_ok, 20, "munged does not answer")
        node, self.cpus, real_mb = _node_line()
        self.mem_mb = real_mb
        host = dict(f.split("=", 1) for f in node.split())["NodeName"]
        r = self.root
        conf = f"""{MARKER}
ClusterName=m2osttest
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
{node} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(conf)
        self.wrote_conf = True
        for daemon in ("slurmctld", "slurmd"):
            self._sh(daemon)  # both daemonise and write their pid file
            self.started[daemon] = r / f"{daemon}.pid"
            self._wait(lambda daemon=daemon: self._pid(daemon) is not None, 20, f"{daemon} wrote no pid file")
        self._wait(lambda: self._sh("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                   "the node did not become idle")

    def _pid(self, daemon: str) -> int | None:
        try:
            pid = int(self.started[daemon].read_text().split()[0])
        except (OSError, ValueError, IndexError, KeyError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _wait(self, condition, seconds: float, message: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM test cluster: {message}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left in the queue, stop the daemons this object started, remove the conf."""
        try:
            if "slurmctld" in self.started and self._pid("slurmctld"):
                self._sh("scancel", f"--partition={PARTITION}", check=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    # Finished jobs stay listed (MinJobAge); wait for the live ones only.
                    live = self._sh("squeue", "-h", "-t", "PD,R,CG,CF,S", "-o", "%i", check=False)
                    if not live.stdout.strip():
                        break
                    time.sleep(1)
        finally:
            for daemon in ("slurmd", "slurmctld", "munged"):
                pid = self._pid(daemon) if daemon in self.started else None
                if pid is None:
                    continue
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
            if self.wrote_conf and SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text(errors="replace"):
                SLURM_CONF.unlink()


def adapt_profile(profile: dict, partition: str, cpus: int, mem_mb: int) -> tuple[dict, list[str]]:
    """The repository's SLURM profile made to fit one CPU node: (profile, changes made).

    Only site-specific values change: the partitions (one here), the GPU requests (this node
    has none), threads above the node's CPUs and memory above what two jobs can share.
    """
    profile = yaml.safe_load(yaml.safe_dump(profile))
    changes = []
    cap_mb = max(1000, mem_mb // 2)

    def fit(where: str, resources: dict) -> None:
        for key in list(resources):
            if key == "slurm_partition" and resources[key] != partition:
                changes.append(f"{where}.slurm_partition: {resources[key]} -> {partition}")
                resources[key] = partition
            elif key in ("gpu", "gpu_model") or (key == "slurm_extra" and "gpu" in str(resources[key])):
                changes.append(f"{where}.{key}: {resources[key]} -> (removed, no GPU)")
                del resources[key]
            elif key == "mem_mb" and resources[key] > cap_mb:
                changes.append(f"{where}.mem_mb: {resources[key]} -> {cap_mb}")
                resources[key] = cap_mb

    fit("default-resources", profile.setdefault("default-resources", {}))
    for rule, resources in profile.get("set-resources", {}).items():
        fit(f"set-resources.{rule}", resources)
    for rule, threads in profile.get("set-threads", {}).items():
        if threads > cpus:
            changes.append(f"set-threads.{rule}.threads: {threads} -> {cpus}")
            profile["set-threads"][rule] = cpus
    return profile, changes


def run_on_slurm(tmp_path_factory) -> WorkflowRun:
    """Run the fast workflow through the repository's SLURM profile on a private cluster."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    workdir = copy_repo(base / "repo")
    cluster = Cluster(base / "cluster")
    try:
        cluster.start()
        original = yaml.safe_load((workdir / "workflow/profiles/slurm/config.yaml").read_text())
        profile, changes = adapt_profile(original, PARTITION, cluster.cpus, cluster.mem_mb)
        (base / "profile").mkdir()
        (base / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
        start = time.monotonic()
        proc = snakemake(
            workdir, "--profile", str(base / "profile"), "--configfile", FAST_CONFIG,
            # No accounting database here: squeue for the status (MinJobAge keeps finished jobs
            # listed), no account, and a 1-s first poll so the small jobs do not wait 40 s each.
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "1",
            timeout=RUN_TIMEOUT, env=workflow_env(), log=base / "snakemake.log")
        seconds = time.monotonic() - start
    except RuntimeError as err:
        pytest.fail(str(err))
    finally:
        cluster.stop()
    return WorkflowRun(workdir, seconds, proc.stdout, "slurm", head_commit(workdir),
                       extra={"profile": profile, "original_profile": original, "changes": changes,
                              "cluster_root": cluster.root, "pids": dict(cluster.started)})
