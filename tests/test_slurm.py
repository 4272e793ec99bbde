"""The fast workflow on a one-node SLURM cluster started for the test (tests/slurm_cluster.py).

Runs through the repository's SLURM profile (workflow/profiles/slurm), adapted to the node
only where a cluster's values are site-specific (partitions, GPU requests, CPUs, memory), with
`--slurm-status-command squeue` (no accounting database here). Skips where SLURM cannot be
started: not root, or slurm-wlm/munge not installed (.ci/run installs them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slurm_cluster import MARKER, SITE_SPECIFIC, SLURM_CONF, adapt_profile
from workflow_helpers import REPO, job_stats, slurm_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm_workflow(tmp_path_factory):
    return slurm_run(tmp_path_factory)


def test_profile_adaptation_changes_site_specific_values_only():
    """What the test changes in the repository's profile: partition, GPU, threads, memory."""
    original = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert original["executor"] == "slurm"
    adapted, changes = adapt_profile(original, "debug", cpus=2, mem_mb=16000)
    assert changes
    for change in changes:
        key = change.split(":")[0].split(".")[-1]
        assert key in SITE_SPECIFIC, change
    assert adapted["set-resources"]["train"]["slurm_partition"] == "debug"
    assert "gpu" not in adapted["set-resources"]["train"] and original["set-resources"]["train"]["gpu"] == 1
    assert max(adapted["set-threads"].values()) <= 2
    # Everything else (executor, retries, runtimes, ...) is the repository's.
    for key in original:
        if key not in ("default-resources", "set-resources", "set-threads"):
            assert adapted[key] == original[key], key
    for rule, resources in original["set-resources"].items():
        assert adapted["set-resources"][rule].get("runtime") == resources.get("runtime"), rule


def test_workflow_runs_to_completion_on_slurm(slurm_workflow):
    wd = slurm_workflow.workdir
    out = slurm_workflow.output
    stats = job_stats(out)
    assert "steps (100%) done" in out
    # Every job but the target rule went through sbatch.
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", out))
    assert len(submitted) >= stats["total"] - 1, (len(submitted), stats)
    # The executor and the resources came from the (adapted) repository profile.
    command = next(line for line in out.splitlines() if line.strip().startswith("Command:"))
    assert "--profile" in command and "--executor" not in command
    assert "slurm_partition=debug" in out
    table = pd.read_csv(wd / "results/metrics/summary.tsv", sep="\t")
    assert set(table["split"]) == {"s1", "s2", "mean"}
    assert (wd / "results/predictions/P3_HE.h5ad").exists()
    for rule, n in stats.items():
        if rule not in ("all", "total"):
            assert len(list((wd / "logs" / rule).rglob("*.log"))) == n, rule


def test_cluster_is_gone_after_the_run(slurm_workflow):
    """The daemons the test started were stopped and its slurm.conf removed."""
    for daemon, pid_file in slurm_workflow.extra["pids"].items():
        pid = int(Path(pid_file).read_text().split()[0]) if Path(pid_file).exists() else None
        assert pid is None or not Path(f"/proc/{pid}").exists(), f"{daemon} (pid {pid}) still runs"
    assert not (SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text(errors="replace"))
