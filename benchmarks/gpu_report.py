"""The files a GPU run brings back (at most 8, flat in OUT_DIR): summary.json (every figure),
summary.md (the tables), epochs.tsv (every training epoch), per_gene.tsv (held-out per-gene
Pearson), logs.txt (the end of every child's log), run.log (the driver's), console.log (gpu_run.sh).
"""

from __future__ import annotations

import csv
from pathlib import Path

from gpu_support import Run, tail

EPOCH_COLUMNS = ("run", "epoch", "train_loss", "val_loss", "val_gene_pcc", "lr", "seconds")


def write_outputs(run: Run, results: Path, logs: Path) -> None:
    out = run.out
    rows = []
    for key, t in run.summary.get("training", {}).items():
        rows += [{"run": key, **r} for r in t.pop("log", [])]
    torchrun = results / "models/torchrun/loso-B4/log.csv"
    if torchrun.exists():
        with open(torchrun, newline="") as f:
            rows += [{"run": "m2ost/loso-B4 (torchrun)", **r} for r in csv.DictReader(f)]
    with open(out / "epochs.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, EPOCH_COLUMNS, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / "per_gene.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["model", "split", "sample", "gene", "pcc"])
        for path in sorted(results.glob("metrics/*/*/per_gene/*.tsv")):
            model, split = path.parts[-4], path.parts[-3]
            with open(path, newline="") as g:
                for r in csv.DictReader(g, delimiter="\t"):
                    w.writerow([model, split, path.stem, r["gene"], r["pcc"]])
    with open(out / "logs.txt", "w") as f:
        for job in run.summary.get("jobs", []):
            lines = 200 if job["rc"] != 0 else 30
            f.write(f"===== {job['name']} (exit {job['rc']}, {job['seconds']} s)\n")
            f.write(tail(logs / f"{job['name']}.log", lines) + "\n")
    run.write_summary()
    (out / "summary.md").write_text(tables(run.summary))


def _f(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def tables(s: dict) -> str:
    m = s.get("machine", {})
    lines = ["# m2ost GPU run", "",
             (f"GPU {m.get('gpu')}, torch {m.get('torch')} (CUDA {m.get('cuda')}), Python {m.get('python')}, "
              f"{m.get('cores')} cores, load {m.get('load')}; tiny setting: {s.get('tiny')}; "
              f"budget {s.get('budget_s')} s, wall {s.get('wall_s')} s"), "",
             "```", str(m.get("nvidia_smi", "")), "```", "",
             "| phase | status | seconds | budget s | error |", "|---|---|---|---|---|"]
    for name, p in s.get("phases", {}).items():
        err = (p.get("error") or "").splitlines()[:1]
        lines.append(f"| {name} | {p.get('status')} | {p.get('seconds', '-')} | {p.get('budget_s')} | "
                     f"{err[0][:120] if err else ''} |")
    if s.get("cuda_tests"):
        lines += ["", f"tests/test_cuda_path.py: {s['cuda_tests']}"]
    lines += ["", "## Held-out per-gene Pearson", "",
              "| split | model | epochs run (asked) | best epoch | spots | gene PCC mean | top-50 | train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, e in sorted(s.get("evaluation", {}).items(), key=lambda kv: kv[0].split("/")[::-1]):
        t = s.get("training", {}).get(key, {})
        kind, split = key.split("/")
        mean = e.get("mean", {})
        lines.append(f"| {split} | {kind} | {t.get('epochs_run')} ({t.get('epochs_asked')}) | {e.get('best_epoch')} | "
                     f"{e.get('n_spots')} | {_f(mean.get('gene_pcc_mean'))} | {_f(mean.get('gene_pcc_top50'))} | "
                     f"{t.get('wall_s')} | {e.get('wall_s')} |")
    check = s.get("phases", {}).get("train", {}).get("torchrun_check")
    if check:
        lines += ["", (f"torchrun (1 process) first-epoch loss {check['torchrun_loss']:.6f}, plain run "
                       f"{check['plain_loss']:.6f}: relative difference {check['rel_diff']:.2e} "
                       f"(same: {check['same']})")]
    meas = s.get("measure", {})
    if meas:
        lines += ["", (f"## Throughput: {meas.get('variant')} ({meas.get('params_m')} M parameters), "
                       f"{meas.get('views')} views of {meas.get('img_size')} px, autocast {meas.get('autocast')}, "
                       f"compile backend {meas.get('compile_backend')}"), "",
                  ("| mode | batch | train spots/s | inference spots/s | train peak GiB | inference peak GiB "
                   "| first train call s |"), "|---|---|---|---|---|---|---|"]
        eager = {}
        for r in meas.get("throughput", []):
            if r["mode"] == "eager":
                eager[r["batch"]] = r
            lines.append(f"| {r['mode']} | {r['batch']} | {_f(r.get('train_spots_s'), 1)} | "
                         f"{_f(r.get('infer_spots_s'), 1)} | {_f(r.get('train_peak_gib'))} | "
                         f"{_f(r.get('infer_peak_gib'))} | {_f(r.get('train_first_call_s'), 2)} |"
                         + (f" {r['error']}" if r.get("error") else ""))
        gains = [(r["batch"], r.get("train_spots_s"), r.get("infer_spots_s")) for r in meas.get("throughput", [])
                 if r["mode"] == "compiled" and r["batch"] in eager]
        for b, tr, inf in gains:
            e = eager[b]
            if tr and inf and e.get("train_spots_s") and e.get("infer_spots_s"):
                lines.append(f"\ncompile gain at batch {b}: training {tr / e['train_spots_s']:.2f}x, "
                             f"inference {inf / e['infer_spots_s']:.2f}x")
        if meas.get("recompile_odd_batch"):
            r = meas["recompile_odd_batch"]
            lines.append(f"\nfirst compiled training step at the odd batch {r['batch']}: {r['first_call_s']} s")
        lines += ["", f"## DataLoader wait ({meas.get('loader_spots')} spots of the bundles, augmentations on)", "",
                  "| batch | workers | spots/s | wait share | step ms (median) | wait ms (median) |",
                  "|---|---|---|---|---|---|"]
        for r in meas.get("loader", []):
            lines.append(f"| {r['batch']} | {r['workers']} | {r['spots_s']} | {r['wait_share']:.1%} | "
                         f"{r['step_ms_median']} | {r['wait_ms_median']} |")
        if meas.get("skipped"):
            lines.append(f"\nnot measured (time): {', '.join(meas['skipped'])}")
    return "\n".join(lines) + "\n"
