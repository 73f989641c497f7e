"""The main job: quantize SmolLM2-135M (RTN W8A8), print the per-pass report, and compare
WikiText-2 perplexity and evaluation time of the float and the compiled model.

    .venv/bin/python bench/main_job.py [--windows 40] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time
from pathlib import Path

import torch
from tabulate import tabulate

import qcompile
from qcompile.passes import ActivationStats, QuantizeLinears

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
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with WikiText-2 files")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    args = ap.parse_args()
    data = Path(args.data)

    t0 = time.perf_counter()
    model, tok = qcompile.models.load("smollm2-135m")
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f}s")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(data / "wikitext2_valid.txt"),
                                              n=args.calib, seq_len=512, seed=0)
    t0 = time.perf_counter()
    gm = qcompile.compile(model, calibration=calib, probe=calib[:1, :128],
                          passes=[ActivationStats(), QuantizeLinears(w_bits=8, a_bits=8)])
    print(f"compiled (trace + passes) in {time.perf_counter() - t0:.1f}s\n")
    print(gm.qcompile_report, "\n")
    print(gm.qcompile_report.diff("QuantizeLinears", max_lines=12), "\n")

    test = qcompile.data.load_text(data / "wikitext2_test.txt")
    rows = []
    for name, m in [("FP32", model), ("RTN W8A8 (per-channel weights, per-token activations)", gm)]:
        t0 = time.perf_counter()
        ppl = qcompile.evaluate.perplexity(m, tok, test, max_windows=args.windows)
        rows.append([name, f"{ppl:.2f}", f"{time.perf_counter() - t0:.1f}"])
    rows[1].append(f"{float(rows[1][2]) / float(rows[0][2]):.2f}x")
    rows[0].append("1.00x")
    print(f"WikiText-2 test, {args.windows} x 2048 tokens; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; {datetime.date.today()}; commit {git_commit()}")
    print(tabulate(rows, headers=["model", "perplexity", "eval time s", "time vs FP32"]))
    print("\nFull accuracy tables: bench/ACCURACY.md (bench/accuracy_*.py); kernels: bench/RESULTS.md.")


if __name__ == "__main__":
    main()
