"""One prepared run on a GPU machine: install, HER2+ bundles, the paper configuration trained and
scored, throughput. Start it through ``benchmarks/gpu_run.sh OUT_DIR`` (docs/performance.md,
"One GPU run").

Phases, each under a share of the time budget (``M2OST_GPU_RUN_BUDGET`` seconds, default 420);
one that fails is logged in ``summary.json`` and the next one starts:

1. ``install``  carried wheels (``DATA/wheels``, from gpu_prepare.sh) into a target folder; a
                check that anndata, scanpy, imagecodecs and OpenSlide import and work.
   ``cuda_tests`` tests/test_cuda_path.py (pinned copies, bf16 prediction, workers and compile).
2. ``data``     the rules' subcommands for the five sections in parallel: spots, convert-slide,
                tile (224/448/896 px -> 224 px), expression; then the gene panel of each split.
3. ``ddp``      loso-B4 M2OST for two epochs through torchrun (launch.train_processes: 1); its
                second epoch's time sizes the training epochs.
4. ``train``    loso-B4 and lopo-C, M2OST and single-view M2OST, concurrently: as many epochs as
                fit (early stopping on validation spots of the training sections), then evaluate.
                The torchrun epoch's loss is compared with the plain run's first epoch.
5. ``measure``  benchmarks/gpu_measure.py: spots/s, loader wait share, peak memory, compile gain.
6. ``extra``    M2OST on the other loso splits with the time left.

``M2OST_GPU_RUN_TINY=1``: 2 sections of 24 spots, 32-px views, the tiny variant, 1 epoch, 3 of
the 4 trainings, small batches, compile with the eager backend: the whole path on a CPU
(tests/test_gpu_run.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import write_outputs
from gpu_support import REPO, JobFailed, Run, Runner, load_config, merge, python_info

from m2ost.plan.samplesheet import read_sample_sheet

TINY = os.environ.get("M2OST_GPU_RUN_TINY", "") not in ("", "0")
MAIN_SPLITS = ("loso-B4", "lopo-C")
VERSIONS = ("numpy", "pandas", "anndata", "scanpy", "zarr", "numcodecs", "h5py", "imagecodecs", "openslide-python",
            "openslide-bin", "torch", "torchvision", "timm", "scipy", "tifffile", "xxhash", "einops", "PyYAML",
            "pydantic", "scikit-image", "scikit-learn", "numba", "triton")
MAIN_JOBS = [("m2ost", "loso-B4"), ("m2ost_single", "loso-B4"), ("m2ost", "lopo-C"), ("m2ost_single", "lopo-C")]
WEIGHTS = {"install": 30, "cuda_tests": 60, "data": 90, "ddp": 50, "train": 150, "measure": 140, "extra": 40}
TINY_SETTINGS = {
    "sections": ["B4", "C2"], "spots": 24,
    "config": {"views": [{"fov_px": f, "size_px": 32} for f in (224, 448, 896)],
               "splits": {"scheme": "explicit", "explicit": {
                   "loso-B4": {"train": ["C2"], "test": ["B4"]},
                   "lopo-C": {"train": ["B4"], "test": ["C2"]}}},
               "model": {"variant": "tiny"}, "tiling": {"threads": 1},
               "train": {"epochs": 1, "batch_size": 8, "workers": 1, "device": "auto"}},
    "jobs": 3,  # the single-view model on loso-B4 only
    "measure": ["--variant", "tiny", "--img-size", "32", "--batches", "8", "--compile-batches", "8",
                "--compile-backend", "eager", "--compile-estimate-s", "0", "--steps", "2", "--warmup", "1",
                "--loader-batches", "8", "--loader-workers", "1", "--loader-steps", "3"],
    "cuda_tests": ["-k", "normalisation"],
}
GPU_MEASURE = ["--variant", "paper", "--img-size", "224", "--batches", "32,64,128,256,512",
               "--compile-batches", "256", "--steps", "15", "--warmup", "3",
               "--loader-batches", "64,256", "--loader-workers", "3,6,12", "--loader-steps", "40"]


class GpuRun:
    def __init__(self, out: Path, data: Path, work: Path, python: str, budget_s: float):
        self.data, self.work = data, work
        self.results = work / "results"
        self.runner = Runner(work, python)
        files = [REPO / "config/her2st.yaml", REPO / "benchmarks/her2st_gpu.yaml"]
        cfg = load_config(*files)
        if TINY:
            cfg = merge(cfg, TINY_SETTINGS["config"])
            cfg["splits"]["explicit"] = TINY_SETTINGS["config"]["splits"]["explicit"]
        cfg["data_root"] = str(data / "her2st")
        self.cfg = cfg
        sheet = read_sample_sheet(REPO / cfg["samples"], cfg["data_root"])
        keep = TINY_SETTINGS["sections"] if TINY else [s.sample for s in sheet]
        self.samples = {s.sample: s for s in sheet if s.sample in keep}
        self.splits = cfg["splits"]["explicit"]
        self.cores = len(os.sched_getaffinity(0))
        self.calibration: dict = {}
        weights = dict(WEIGHTS)
        if all(s in MAIN_SPLITS for s in self.splits):
            weights.pop("extra")
        self.run = Run(out, budget_s, weights, {
            "tiny": TINY, "budget_s": budget_s, "config": {k: cfg[k] for k in ("views", "model", "train")},
            "splits": self.splits, "training": {}, "evaluation": {}})

    # -- helpers ------------------------------------------------------------------------------
    def r(self, *parts: str) -> str:
        path = self.results.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def d(self, *parts: str) -> str:
        path = self.results.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def pairs(self, samples, kind: str) -> list[str]:
        pattern = {"bundle": ("bundles", "{}.h5"), "expression": ("expression", "{}.h5ad")}[kind]
        return [f"{s}={self.r(pattern[0], pattern[1].format(s))}" for s in samples]

    def train_args(self, kind: str, split: str, settings: dict, out_dir: str) -> list[str]:
        train = self.splits[split]["train"]
        return ["-m", "m2ost", "train", "--kind", kind, "--bundle", *self.pairs(train, "bundle"),
                "--expression", *self.pairs(train, "expression"), "--genes", self.r("genes", f"{split}.txt"),
                "--settings", json.dumps(settings, sort_keys=True), "--out-dir", out_dir]

    def settings(self, epochs: int | None = None) -> dict:
        train = dict(self.cfg["train"])
        if epochs is not None:
            train["epochs"] = int(epochs)
        return {"model": self.cfg["model"], "train": train}

    # -- 1. install ---------------------------------------------------------------------------
    def install(self, budget: float) -> dict:
        wheels = self.data / "wheels"
        out: dict = {}
        if wheels.is_dir():
            pandas = self.runner.output(["-c", "import pandas; print(pandas.__version__)"]).strip()
            chosen = ["common", "pandas3" if int(pandas.split(".")[0]) >= 3 else "pandas2"]
            files = sorted(str(f) for c in chosen for f in (wheels / c).glob("*.whl"))
            site = self.work / "site"
            self.runner.run("install", ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                        "--no-cache-dir", "--upgrade", "--target", str(site), *files], budget)
            self.runner.set_path([str(site)])
            out.update(machine_pandas=pandas, wheel_sets=chosen, wheels=[Path(f).name for f in files])
        else:
            out["wheels"] = "none carried: this Python's own packages"
        # Versions first (kept even if the check below fails), then a check that the stack works.
        versions = ("import json, importlib.metadata as m\n"
                    "def version(name):\n    try:\n        return m.version(name)\n"
                    "    except m.PackageNotFoundError:\n        return None\n"
                    f"print(json.dumps({{n: version(n) for n in {VERSIONS!r}}}))")
        self.run.summary["versions"] = json.loads(self.runner.output(["-c", versions]).strip().splitlines()[-1])
        h5ad = str(self.work / "check.h5ad")
        self.runner.output(["-c", f"""
import anndata, h5py, imagecodecs, numpy as np, openslide, pandas as pd, scanpy, torch
a = anndata.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame({{"s": ["a", "b", "c"]}}, index=["x", "y", "z"]))
scanpy.pp.log1p(a)
a.write_h5ad({h5ad!r})
assert anndata.read_h5ad({h5ad!r}).obs["s"].tolist() == ["a", "b", "c"]
"""])
        out["check"] = "anndata, scanpy, imagecodecs, openslide, h5py and torch import; an h5ad round trip works"
        return out

    # -- CUDA path tests -------------------------------------------------------------------------
    def cuda_tests(self, budget: float) -> dict:
        args = ["-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_cuda_path.py",
                *(TINY_SETTINGS["cuda_tests"] if TINY else [])]
        try:
            self.runner.run("cuda_tests", args, budget, self.cores)
        finally:
            lines = [line for line in (self.runner.logs / "cuda_tests.log").read_text().splitlines() if line.strip()]
            self.run.summary["cuda_tests"] = lines[-1] if lines else ""
        return {"result": self.run.summary["cuda_tests"]}

    # -- 2. data ------------------------------------------------------------------------------
    def data_phase(self, budget: float) -> dict:
        import time
        deadline = time.monotonic() + budget
        left = lambda: deadline - time.monotonic()
        threads = int(self.cfg["tiling"]["threads"])
        seconds: dict = {}

        def section(name: str) -> None:
            s = self.samples[name]
            if Path(self.r("bundles", f"{name}.h5")).is_file() and Path(self.r("expression", f"{name}.h5ad")).is_file():
                seconds[name] = "reused (an earlier run on this machine; written atomically)"
                return
            files = s.expression_files()
            positions = files["positions"]
            if TINY:  # the first spots only
                lines = Path(positions).read_text().splitlines(keepends=True)
                positions = self.r("input", f"{name}_selection.tsv")
                Path(positions).write_text("".join(lines[:TINY_SETTINGS["spots"] + 1]))
            spots, info = self.r("spots", f"{name}.tsv"), self.r("slides", f"{name}.json")
            t = {"spots": self.runner.run(f"spots_{name}", ["-m", "m2ost", "spots", "--sample", name, "--format",
                                          s.format, "--positions", positions, "--out", spots], left(), 1)}
            expr = pool.submit(self.runner.run, f"expression_{name}", [
                "-m", "m2ost", "expression", "--sample", name, "--format", s.format, "--counts", files["counts"],
                "--spots", spots, "--settings", json.dumps(self.cfg["expression"]),
                "--out", self.r("expression", f"{name}.h5ad")], left(), 1)
            mpp = ["--mpp", str(s.mpp)] if s.mpp else []
            t["convert"] = self.runner.run(f"convert_{name}", [
                "-m", "m2ost", "convert-slide", "--sample", name, "--slide", s.slide, "--spots", spots,
                "--format", s.format, *mpp, "--converted", self.r("slides", f"{name}.tif"),
                "--settings", json.dumps(self.cfg["slides"]), "--out", info], left(), 1)
            t["tile"] = self.runner.run(f"tile_{name}", [
                "-m", "m2ost", "tile", "--sample", name, "--slide-info", info, "--spots", spots,
                "--settings", json.dumps({"views": self.cfg["views"]}), "--workers", str(threads),
                "--no-progress", "--out", self.r("bundles", f"{name}.h5")], left(), 1)
            t["expression"] = expr.result()
            seconds[name] = {k: round(v, 1) for k, v in t.items()}

        with cf.ThreadPoolExecutor(len(self.samples)) as pool, \
                cf.ThreadPoolExecutor(len(self.samples)) as chains:
            for job in [chains.submit(section, name) for name in self.samples]:
                job.result()
        panel = dict(self.cfg["panel"])
        if panel.get("list_file"):
            panel["list_file"] = str(Path(self.cfg["data_root"]) / panel["list_file"])
        for split, spec in self.splits.items():
            self.runner.run(f"panel_{split}", [
                "-m", "m2ost", "panel", "--train", *self.pairs(spec["train"], "expression"),
                "--other", *self.pairs(spec["test"], "expression"), "--settings", json.dumps(panel),
                "--out", self.r("genes", f"{split}.txt")], left(), 1)
        sizes = {s: os.path.getsize(self.r("bundles", f"{s}.h5")) for s in self.samples}
        return {"seconds": seconds, "bundle_mib": {s: round(v / 2**20, 1) for s, v in sizes.items()},
                "tile_workers": threads}

    # -- 3. torchrun with one process ---------------------------------------------------------
    def ddp_phase(self, budget: float) -> dict:
        """Two epochs: the first one's loss for the comparison (warm-up spans epoch 1 whatever the
        number of epochs, so its steps match the plain run's), the second one's time (workers
        and CUDA started) to size the training."""
        out_dir = self.d("models", "torchrun", "loso-B4")
        epochs = 1 if TINY else 2
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                *self.train_args("m2ost", "loso-B4", self.settings(epochs), out_dir)]
        wall = self.runner.run("train_torchrun_loso-B4", args, budget, max(1, self.cores // 2))
        rows = read_log(Path(out_dir) / "log.csv")
        seconds = [float(r["seconds"]) for r in rows]
        self.calibration = {"epoch_s": seconds[-1], "startup_s": max(0.0, wall - sum(seconds))}
        return {"torchrun_first_epoch_loss": float(rows[0]["train_loss"]), "wall_s": round(wall, 1),
                "epoch_seconds": seconds, **{k: round(v, 2) for k, v in self.calibration.items()}}

    # -- 4./6. training and evaluation --------------------------------------------------------
    def epochs_for(self, budget: float, jobs: int) -> int:
        cal = self.calibration or {"epoch_s": 5.0, "startup_s": 30.0}
        contention = 1.0 + 0.25 * (jobs - 1)  # concurrent runs share the GPU and the cores
        # start-up of training and evaluation, a margin of a fifth, then epochs
        fit = (0.8 * budget - 3 * cal["startup_s"]) / (cal["epoch_s"] * contention)
        return max(1, min(int(self.cfg["train"]["epochs"]), int(fit)))

    def train_and_score(self, jobs: list[tuple[str, str]], budget: float) -> dict:
        import time
        deadline = time.monotonic() + budget
        epochs = self.epochs_for(budget, len(jobs))
        threads = max(1, self.cores // len(jobs))

        def one(kind: str, split: str) -> None:
            key = f"{kind}/{split}"
            model_dir = self.d("models", kind, split)
            wall = self.runner.run(f"train_{kind}_{split}", self.train_args(kind, split, self.settings(epochs),
                                                                          model_dir),
                                   deadline - time.monotonic() - 15, threads)
            rows = read_log(Path(model_dir) / "log.csv")
            self.run.summary["training"][key] = {"epochs_run": len(rows), "epochs_asked": epochs,
                                                 "wall_s": round(wall, 1), "log": rows}
            test = self.splits[split]["test"]
            metrics = self.d("metrics", kind, split)
            train = self.cfg["train"]
            ev = {"device": train["device"], "batch_size": train["eval_batch_size"] or 2 * train["batch_size"]}
            wall = self.runner.run(f"evaluate_{kind}_{split}", [
                "-m", "m2ost", "evaluate", "--model", f"{model_dir}/model.pt", "--bundle", *self.pairs(test, "bundle"),
                "--expression", *self.pairs(test, "expression"), "--name", kind, "--split", split,
                "--settings", json.dumps(ev), "--out-dir", metrics], max(5.0, deadline - time.monotonic()), threads)
            summary = json.loads(Path(metrics, "summary.json").read_text())
            self.run.summary["evaluation"][key] = {"wall_s": round(wall, 1), "best_epoch": summary["best_epoch"],
                                                   "n_spots": summary["n_spots"], "mean": summary["mean"],
                                                   "test_samples": summary["test_samples"]}

        failed = []
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {pool.submit(one, kind, split): f"{kind}/{split}" for kind, split in jobs}
            for fut, key in futures.items():
                try:
                    fut.result()
                except Exception as err:  # noqa: BLE001  (one job fails alone)
                    failed.append(f"{key}: {err}")
                    self.run.say(f"{key} failed: {err}")
        if failed and len(failed) == len(jobs):
            raise JobFailed("; ".join(failed))
        return {"epochs_asked": epochs, "jobs": [f"{k}/{s}" for k, s in jobs], "failed": failed}

    def train_phase(self, budget: float) -> dict:
        jobs = MAIN_JOBS[:TINY_SETTINGS["jobs"]] if TINY else MAIN_JOBS
        out = self.train_and_score(jobs, budget)
        ddp = self.run.summary["phases"].get("ddp", {})
        plain = self.run.summary["training"].get("m2ost/loso-B4", {}).get("log")
        if ddp.get("status") == "ok" and plain:
            a, b = ddp["torchrun_first_epoch_loss"], float(plain[0]["train_loss"])
            out["torchrun_check"] = {"torchrun_loss": a, "plain_loss": b, "abs_diff": abs(a - b),
                                     "rel_diff": abs(a - b) / max(abs(b), 1e-12),
                                     "same": abs(a - b) <= 1e-3 * max(abs(b), 1e-12)}
        return out

    def extra_phase(self, budget: float) -> dict:
        jobs = [("m2ost", s) for s in self.splits if s not in MAIN_SPLITS]
        if not jobs:
            return {"jobs": []}
        return self.train_and_score(jobs, budget)

    # -- 5. throughput ------------------------------------------------------------------------
    def measure_phase(self, budget: float) -> dict:
        result = self.r("measure.json")
        bundles = [self.r("bundles", f"{s}.h5") for s in self.samples]
        bundles = [b for b in bundles if os.path.exists(b)]
        args = [str(REPO / "benchmarks/gpu_measure.py"), *(TINY_SETTINGS["measure"] if TINY else GPU_MEASURE),
                "--budget-s", str(max(5.0, budget - 20)), "--json", result]
        if bundles:
            args += ["--bundles", *bundles]
        try:
            self.runner.run("measure", args, budget, self.cores)
        finally:  # what was measured before a failure or the deadline is kept
            if os.path.exists(result):
                self.run.summary["measure"] = json.loads(Path(result).read_text())
        return {"bundles": len(bundles)}

    def main(self) -> None:
        r = self.run
        # A rerun on a warm machine reuses the bundles and expression built with the same settings,
        # and trains anew.
        stamp = json.dumps({k: self.cfg[k] for k in ("views", "slides", "expression")} | {"tiny": TINY},
                           sort_keys=True)
        stamp_file = self.results / "data_settings.json"
        stale = ["models", "metrics", "genes"]
        if not stamp_file.is_file() or stamp_file.read_text() != stamp:
            stale += ["spots", "slides", "bundles", "expression", "input"]
        for folder in stale:
            shutil.rmtree(self.results / folder, ignore_errors=True)
        self.results.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(stamp)
        r.say(f"m2ost GPU run: tiny={TINY}, data {self.data}, work {self.work}, budget {r.left():.0f} s")
        try:
            r.summary["machine"] = python_info(self.runner)
        except Exception as err:  # noqa: BLE001  (the run goes on without it)
            r.summary["machine"] = {"error": str(err)}
        r.phase("install", self.install, at_least=60.0)  # everything after needs it
        r.phase("cuda_tests", self.cuda_tests)
        r.phase("data", self.data_phase)
        r.phase("ddp", self.ddp_phase)
        r.phase("train", self.train_phase)
        r.phase("measure", self.measure_phase)
        if "extra" in r.weights:
            r.phase("extra", self.extra_phase, min_s=30.0)
        r.summary["jobs"] = self.runner.ran
        write_outputs(r, self.results, self.runner.logs)
        r.say(f"done: {r.out}")


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: gpu_run.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(os.environ.get("M2OST_GPU_DATA", REPO / ".gpu_data")).resolve()
    work = Path(os.environ.get("M2OST_GPU_WORK", "/tmp/m2ost_gpu_work")).resolve()
    # The tiny setting checks the path, not the speed: a loaded CPU must not run out of time.
    budget = float(os.environ.get("M2OST_GPU_RUN_BUDGET", "900" if TINY else "420"))
    python = os.environ.get("PYTHON", sys.executable)
    if not (data / "her2st").is_dir():
        print(f"gpu_run: {data / 'her2st'} not found; run benchmarks/gpu_prepare.sh first", file=sys.stderr)
        return 2
    GpuRun(out, data, work, python, budget).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
