"""Bookkeeping of benchmarks/gpu_run.py: phases under time budgets, child processes, the config,
and the few output files that come back from the GPU machine.

Standard library and PyYAML only, so the driver runs before anything is installed.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Configuration: config/her2st.yaml + benchmarks/her2st_gpu.yaml + the schema's defaults
# --------------------------------------------------------------------------------------------

def merge(base: dict, extra: dict) -> dict:
    """Snakemake's merge of several --configfile: nested mappings updated key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_defaults(schema: dict, value: dict) -> dict:
    """Fill the schema's defaults into ``value`` (what snakemake's validate(set_default=True) does)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if isinstance(value.get(key), dict) and sub.get("type") == "object":
            with_defaults(sub, value[key])
    return value


def load_config(*files: Path) -> dict:
    config: dict = {}
    for f in files:
        config = merge(config, yaml.safe_load(Path(f).read_text()) or {})
    schema = yaml.safe_load((REPO / "m2ost/schemas/config.schema.yaml").read_text())
    return with_defaults(schema, config)


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------

class JobFailed(RuntimeError):
    pass


class Runner:
    """Runs commands with the run's environment, each logging to ``logs/<name>.log``."""

    def __init__(self, work: Path, python: str):
        self.work, self.python = work, python
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.set_path([])
        self.ran: list[dict] = []

    def set_path(self, extra: list[str]) -> None:
        """PYTHONPATH: installed wheels (if any) first, then the repository."""
        self.env["PYTHONPATH"] = os.pathsep.join([*extra, str(REPO)])

    def run(self, name: str, args: list[str], timeout: float, threads: int | None = None,
            python: bool = True) -> float:
        """Run ``python args`` (or ``args``); return its wall seconds, or raise JobFailed with the
        end of its log. A command past ``timeout`` is ended with its whole process group."""
        cmd = [self.python, *args] if python else list(args)
        env = dict(self.env)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log_file = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log_file, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                _end_group(proc)
                rc = None
        seconds = time.monotonic() - start
        self.ran.append({"name": name, "seconds": round(seconds, 2), "rc": rc})
        if rc != 0:
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
            raise JobFailed(f"{name}: {why}\n{tail(log_file, 25)}")
        return seconds

    def output(self, args: list[str], timeout: float = 120) -> str:
        """stdout of ``python args`` (small checks)."""
        res = subprocess.run([self.python, *args], capture_output=True, text=True, env=self.env,
                             cwd=REPO, timeout=timeout, check=False)
        if res.returncode != 0:
            raise JobFailed(f"{' '.join(args[:3])}: {res.stderr.strip()[-1500:]}")
        return res.stdout


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Phases under a budget
# --------------------------------------------------------------------------------------------

class Run:
    """The whole run: a deadline, the phases' records, and the output folder.

    Each phase gets a share of the time left, in proportion to its weight among the phases
    still to come; a phase that fails or overruns is logged and the next one starts. The
    summary is rewritten after every phase, so a run killed from outside still leaves one.
    """

    def __init__(self, out: Path, budget_s: float, weights: dict[str, float], summary: dict):
        self.out, self.t0 = out, time.monotonic()
        self.deadline = self.t0 + budget_s
        self.weights = dict(weights)
        self.summary = summary
        self.summary["phases"] = {}
        self.log_file = out / "run.log"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def phase(self, name: str, fn, min_s: float = 5.0, at_least: float = 0.0):
        """Run ``fn(budget_s)``; record status, seconds and its result (a dict) or error.
        ``at_least``: seconds the phase gets whatever its share (what every later one needs)."""
        pending = [k for k in self.weights if k not in self.summary["phases"]]
        weight = self.weights.get(name, 1.0)
        share = weight / sum(self.weights[k] for k in pending) if name in pending else 1.0
        budget = max(0.0, min(self.left(), max(self.left() * share, at_least)))
        record = {"budget_s": round(budget, 1)}
        if budget < min_s:
            record.update(status="skipped", error=f"{budget:.0f} s left for it (needs {min_s:.0f})")
            self.say(f"phase {name}: skipped ({record['error']})")
        else:
            self.say(f"phase {name}: start, budget {budget:.0f} s")
            start = time.monotonic()
            try:
                record.update(fn(budget) or {})
                record["status"] = "ok"
            except Exception as err:  # noqa: BLE001  (every phase fails alone: the run goes on)
                record.update(status="failed", error=f"{type(err).__name__}: {err}"[-4000:])
                if not isinstance(err, JobFailed):
                    record["traceback"] = traceback.format_exc()[-3000:]
            record["seconds"] = round(time.monotonic() - start, 1)
            self.say(f"phase {name}: {record['status']} in {record['seconds']} s"
                     + (f"\n{record['error']}" if record.get("error") else ""))
        self.summary["phases"][name] = record
        self.summary.setdefault("phase_order", []).append(name)
        self.write_summary()
        return record

    def write_summary(self) -> None:
        self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.out / "summary.json")


def python_info(runner: Runner) -> dict:
    """Python, torch, CUDA and GPU of the machine (from a child: the driver imports no torch)."""
    code = ("import json, os, platform, torch; c = torch.cuda.is_available(); "
            "print(json.dumps({'python': platform.python_version(), 'executable': __import__('sys').executable, "
            "'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': c, "
            "'gpu': torch.cuda.get_device_name(0) if c else None, "
            "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
            "'capability': list(torch.cuda.get_device_capability(0)) if c else None, "
            "'cores': len(os.sched_getaffinity(0)), 'load': os.getloadavg()}))")
    info = json.loads(runner.output(["-c", code]).strip().splitlines()[-1])
    try:  # driver, clocks and power as the card was found (never changed here)
        query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                             capture_output=True, text=True, timeout=20, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not run: {err}"
    return info
