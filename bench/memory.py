"""Peak memory of `qcompile compile` against the number of calibration windows.

    .venv/bin/python bench/memory.py --recipe aweq-w8a8 --windows 16 128

Each run is a fresh process; its peak resident memory comes from getrusage of the child.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time

from tabulate import tabulate


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` under a fresh wrapper process and return (its peak RSS in MiB, seconds)."""
    wrapper = ("import resource, subprocess, sys; "
               "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="aweq-w8a8")
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--calib-len", type=int, default=512)
    args = ap.parse_args()
    rows = []
    for n in args.windows:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "qcompile.cli", "compile", "smollm2-135m", "--recipe", args.recipe,
                   "--calib-windows", str(n), "--calib-len", str(args.calib_len), "--out", f"{out}/m"]
            mib, secs = peak_rss_mib(cmd)
            rows.append([args.recipe, n, args.calib_len, f"{mib:.0f}", f"{secs:.0f}"])
    print(f"{datetime.date.today()}, command: {' '.join(sys.argv)}")
    print(tabulate(rows, headers=["recipe", "calib windows", "tokens each", "peak RSS MiB", "time s"]))


if __name__ == "__main__":
    main()
