"""The main job: quantize SmolLM2-135M with the recipes (default RTN W8A8 and AWEQ W8A8), print
each per-pass report, and compare WikiText-2 perplexity and evaluation time of the float and the
compiled models side by side.

    .venv/bin/python bench/main_job.py [--windows 40] [--recipes rtn-w8a8,aweq-w8a8] [--data DIR]

WikiText-2 is read from the repository's data/ folder by default (see data/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from tabulate import tabulate

import qcompile
import qcompile.progress
from qcompile import recipes

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="2048-token test windows (the protocol uses 40)")
    ap.add_argument("--data", default=str(qcompile.data.default_data_dir()),
                    help="folder with WikiText-2 files (default: %(default)s: the repository's data/, or $QCOMPILE_DATA)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--recipes", default="rtn-w8a8,aweq-w8a8", help="comma-separated recipe names")
    args = ap.parse_args()
    data = Path(args.data)

    t0 = time.perf_counter()
    model, tok = qcompile.models.load("smollm2-135m")
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f}s")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(data / "wikitext2_valid.txt"),
                                              n=args.calib, seq_len=512, seed=0)
    models: dict[str, torch.nn.Module] = {"FP32": model}
    for name in args.recipes.split(","):
        recipe = recipes.get(name.strip())
        t0 = time.perf_counter()
        gm = qcompile.compile(model, calibration=calib, probe=calib[:1, :128], passes=recipe)
        print(f"== {recipe.name}: {recipe.description}\ncompiled (trace + passes) in "
              f"{time.perf_counter() - t0:.1f}s\n")
        print(gm.qcompile_report, "\n")
        for rec in gm.qcompile_report.records:
            if rec.name != "ActivationStats" and rec.changed:
                print(gm.qcompile_report.diff(rec.name, max_lines=12), "\n")
        models[recipe.name] = gm

    test = qcompile.data.load_text(data / "wikitext2_test.txt")
    windows = qcompile.data.evaluation_windows(tok, test, 2048, args.windows)
    nll = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    # side by side: the models alternate window by window, so load on the machine hits both alike
    for i in qcompile.progress.progress(range(windows.shape[0]), "perplexity", total=windows.shape[0]):
        for name, m in models.items():
            t0 = time.perf_counter()
            nll[name].append(qcompile.evaluate.window_nlls(m, windows[i:i + 1], desc=None))
            seconds[name] += time.perf_counter() - t0
    base = seconds["FP32"]
    rows = [[name, f"{math.exp(float(torch.cat(v).mean())):.2f}", f"{seconds[name]:.1f}",
             f"{seconds[name] / base:.2f}x"] for name, v in nll.items()]
    print(f"WikiText-2 test, {windows.shape[0]} x 2048 tokens; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; {datetime.date.today()}; commit {git_commit()}")
    print(tabulate(rows, headers=["model", "perplexity", "eval time s", "time vs FP32"]))
    print("\nFull accuracy tables: bench/ACCURACY.md (bench/accuracy_*.py); kernels: bench/RESULTS.md.")


if __name__ == "__main__":
    main()
