"""Helpers of the whole-workflow tests (test_workflow.py, test_slurm.py, test_envs.py).

The workflow runs in a copy of the repository (its tracked and untracked-not-ignored files),
with ``PYTHONPATH`` unset: the rules find the package through ``shell.prefix`` alone.
The expensive runs are cached in this module, so that a pytest session runs the fast workflow
once locally and at most once on SLURM, whichever test asks first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FAST_CONFIG = "tests/data/fast_config.yaml"
# A whole run takes 5-10 min on 2 shared cores; a dry run a few seconds.
RUN_TIMEOUT = int(os.environ.get("M2OST_TEST_RUN_TIMEOUT", 2400))
DRY_RUN_TIMEOUT = 300
LOCAL_CORES = 4  # two 2-thread jobs at once (local_run)


# --------------------------------------------------------------------------- the copy


def repo_files() -> list[str]:
    """Tracked and untracked-not-ignored files of the checkout (what a clean clone would hold)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the repository's files")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [f for f in out.stdout.split("\0") if f and (REPO / f).is_file()]


def copy_repo(dest: Path, commit: bool = True) -> Path:
    """Copy the repository's files to ``dest``; make it a one-commit git repository.

    The commit lets the outputs record a real ``git_commit`` in their provenance.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in repo_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    if commit:
        git = ["git", "-c", "user.name=m2ost tests", "-c", "user.email=tests@m2ost.invalid",
               "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy under test"]):
            subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


def head_commit(workdir: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, check=True, capture_output=True,
                          text=True).stdout.strip()


def copy_workdir(src: Path, dest: Path) -> Path:
    """Copy a finished run (results, logs, .snakemake metadata) keeping every mtime."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


def workflow_env() -> dict[str, str]:
    """The environment of a run: no PYTHONPATH, this interpreter's bin folder first on PATH.

    PATH matters for SLURM: every job runs ``snakemake`` and ``python`` again on the node.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


# --------------------------------------------------------------------------- running snakemake


def snakemake(workdir: Path, *args: str, timeout: float = DRY_RUN_TIMEOUT, check: bool = True,
              env: dict | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake ARGS`` in ``workdir``; output (stdout and stderr) in ``.stdout``."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env or workflow_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        text = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        if log:
            log.write_text(text)
        pytest.fail(f"snakemake {' '.join(args)} ran past {timeout} s in {workdir}:\n{text[-4000:]}")
    if log:
        log.write_text(proc.stdout)
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed (exit {proc.returncode}) in {workdir}:\n"
                    f"{proc.stdout[-6000:]}\n{failed_job_logs(workdir)}")
    return proc


def failed_job_logs(workdir: Path, limit: int = 3) -> str:
    """The tails of the rule logs that mention an error, to explain a failed run."""
    out = []
    for path in sorted((workdir / "logs").rglob("*.log")) if (workdir / "logs").is_dir() else []:
        text = path.read_text(errors="replace")
        if re.search(r"error|Traceback", text, re.IGNORECASE):
            out.append(f"--- {path.relative_to(workdir)}\n{text[-1500:]}")
        if len(out) >= limit:
            break
    return "\n".join(out)


# --------------------------------------------------------------------------- dry-run parsing

_RULE = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (?P<rule>[\w-]+):\s*$")
_FIELD = re.compile(r"^\s+(?P<key>[\w ]+):\s?(?P<value>.*)$")
_WILDCARD = re.compile(r"(?P<name>\w+)=(?P<value>.*?)(?=, \w+=|$)")
_STATS_ROW = re.compile(r"^(?P<rule>[\w-]+)\s+(?P<count>\d+)\s*$")


def job(rule: str, **wildcards: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A planned job as the parser reports it: (rule, sorted wildcard items)."""
    return rule, tuple(sorted(wildcards.items()))


def parse_wildcards(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((m["name"], m["value"]) for m in _WILDCARD.finditer(text.strip())))


def job_stats(text: str) -> dict[str, int]:
    """The first "Job stats" table of Snakemake's output: {rule: count}, with "total"."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            stats = {}
            for row in lines[i + 1:]:
                if not row.strip():
                    break
                m = _STATS_ROW.match(row.strip())
                if m:
                    stats[m["rule"]] = int(m["count"])
            return stats
    return {}


def parse_dry_run(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The set of (rule, wildcards) a ``snakemake -n`` output plans.

    Each job block starts with ``rule NAME:`` (or ``localrule``/``checkpoint``) followed by
    indented ``key: value`` lines, one of them ``wildcards: a=1, b=2`` for rules with
    wildcards. The number of blocks is checked against the "Job stats" total, so a change of
    Snakemake's format fails loudly instead of planning nothing.
    """
    if "Nothing to be done" in text:
        return set()
    jobs = []
    current = None
    for line in text.splitlines():
        m = _RULE.match(line)
        if m:
            current = {"rule": m["rule"], "wildcards": ()}
            jobs.append(current)
            continue
        if current is None:
            continue
        f = _FIELD.match(line)
        if f:
            if f["key"].strip() == "wildcards":
                current["wildcards"] = parse_wildcards(f["value"])
        else:
            current = None  # a line that is not indented ends the block
    stats = job_stats(text)
    if "total" not in stats:
        raise AssertionError(f"no job stats in the dry-run output:\n{text[-3000:]}")
    if len(jobs) != stats["total"]:
        raise AssertionError(f"parsed {len(jobs)} job blocks but Snakemake plans {stats['total']}:\n"
                             f"{text[-3000:]}")
    planned = {(j["rule"], j["wildcards"]) for j in jobs}
    if len(planned) != len(jobs):
        raise AssertionError(f"a job is listed twice in the dry run:\n{text[-3000:]}")
    return planned


def dry_run(workdir: Path, configfile: str | Path = FAST_CONFIG, *extra: str):
    proc = snakemake(workdir, "-n", "--configfile", str(configfile), *extra)
    return parse_dry_run(proc.stdout)


def write_config(path: Path, change) -> Path:
    """A copy of the fast config with ``change(config)`` applied."""
    config = yaml.safe_load((REPO / FAST_CONFIG).read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- provenance


def find_provenance(value, depth: int = 0):
    """The provenance record ({versions, git_commit, settings}) inside an output's metadata.

    Outputs store it as a dict, as JSON text, or nested under "provenance"/"provenance_json".
    """
    if depth > 5:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        if "versions" in value and "git_commit" in value:
            return value
        for key in ("provenance", "provenance_json"):
            if key in value:
                found = find_provenance(value[key], depth + 1)
                if found:
                    return found
    return None


# --------------------------------------------------------------------------- the cached runs


@dataclass
class WorkflowRun:
    workdir: Path
    seconds: float
    output: str
    kind: str  # "local" or "slurm"
    commit: str = ""
    extra: dict = field(default_factory=dict)


_RUNS: dict[str, WorkflowRun | BaseException] = {}


def _cached(key: str, make):
    if key not in _RUNS:
        try:
            _RUNS[key] = make()
        except BaseException as err:  # skips and failures too: do not retry a 10-minute run
            _RUNS[key] = err
            raise
    result = _RUNS[key]
    if isinstance(result, BaseException):
        raise result
    return result


def local_run(tmp_path_factory, key: str = "local") -> WorkflowRun:
    """The fast workflow run to completion (once per session).

    ``--cores 4`` on the 2-core CI machine: the rules ask for 2 threads, so ``--cores 2`` ran
    the 45 training, evaluation and prediction jobs one at a time, although each spends most of
    its 6-10 s starting Python on one core. Two at once halve that phase; every job keeps its
    2 threads (OMP_NUM_THREADS), as on SLURM, so the outputs stay those of the SLURM run.
    """

    def make():
        workdir = copy_repo(tmp_path_factory.mktemp(f"workflow-{key}") / "repo")
        start = time.monotonic()
        proc = snakemake(workdir, "--cores", str(LOCAL_CORES), "--configfile", FAST_CONFIG, timeout=RUN_TIMEOUT,
                         log=workdir.parent / "snakemake.log")
        return WorkflowRun(workdir, time.monotonic() - start, proc.stdout, "local", head_commit(workdir))

    return _cached(key, make)


def slurm_run(tmp_path_factory) -> WorkflowRun:
    """The fast workflow run on a one-node SLURM cluster started for it (skips without SLURM)."""
    from slurm_cluster import run_on_slurm

    return _cached("slurm", lambda: run_on_slurm(tmp_path_factory))


def second_run(tmp_path_factory) -> WorkflowRun:
    """A second run from scratch: the SLURM run where SLURM can be started, else a local one."""
    from slurm_cluster import slurm_unavailable

    if slurm_unavailable() is None:
        return slurm_run(tmp_path_factory)
    return local_run(tmp_path_factory, key="local-2")
