"""Perplexity of compressed-tensors exports loaded by transformers vs qcompile's own compiled model
(issue 16): SmolLM2-135M, WikiText-2 test windows of 2048 tokens from the bundled data/.

For each recipe: compile (calibration 16 x 512 validation tokens, seed 0), export with
``qcompile.export`` (float32 tensors), load with transformers + compressed-tensors on CPU
(``qcompile.export.load_compressed_tensors``), and evaluate both models window by window, side by
side. Prints a Markdown table (and appends it to --out when given).

    .venv/bin/python bench/export_accuracy.py --windows 40 --recipes rtn-w8a8,gptq-w4a16,g64
    .venv/bin/python bench/export_accuracy.py --list

Recipe names are qcompile's built-ins plus ``g64`` (round-to-nearest 4-bit weights in groups of 64;
compressed-tensors needs a group size dividing SmolLM2's 576-wide inputs, which 128 does not).
W8A8 differs by construction: transformers quantizes activations per token with abs-max / 127.5
(compressed-tensors' convention), qcompile with abs-max / 127.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qcompile
from qcompile import recipes
from qcompile.export import export, load_compressed_tensors

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"g64": ("RTN W4A16 g64", [{"pass": "quantize_linears", "w_bits": 4, "a_bits": None,
                                     "w_granularity": {"PerGroup": 64}}])}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _passes(name: str):
    return EXTRA[name][1] if name in EXTRA else recipes.get(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--recipes", default="rtn-w8a8,aweq-w8a8,gptq-w4a16,g64")
    ap.add_argument("--data", default=str(qcompile.data.default_data_dir()), help="folder with WikiText-2 (%(default)s)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--out", help="append the Markdown rows to this file")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        print("\n".join(recipes.names() + list(EXTRA)))
        return
    data = Path(args.data)
    model, tok = qcompile.models.load("smollm2-135m")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(data / "wikitext2_valid.txt"),
                                              n=args.calib, seq_len=512, seed=0)
    windows = qcompile.data.evaluation_windows(tok, qcompile.data.load_text(data / "wikitext2_test.txt"),
                                               2048, args.windows)
    rows = []
    for name in args.recipes.split(","):
        name = name.strip()
        t0 = time.perf_counter()
        gm = qcompile.compile(model, passes=_passes(name), calibration=calib)
        compile_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = export(gm, Path(tmp) / "ct", tokenizer=tok)
            size = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = load_compressed_tensors(path, dtype=torch.float32)
            nll_q, nll_h = [], []
            for i in range(windows.shape[0]):  # side by side, window by window
                nll_q.append(qcompile.evaluate.window_nlls(gm, windows[i:i + 1], desc=None))
                nll_h.append(qcompile.evaluate.window_nlls(hf, windows[i:i + 1], desc=None))
                print(f"  {name} window {i + 1}/{windows.shape[0]}: qcompile {float(nll_q[-1]):.4f} "
                      f"transformers {float(nll_h[-1]):.4f}", flush=True)
        pq = math.exp(float(torch.cat(nll_q).mean()))
        ph = math.exp(float(torch.cat(nll_h).mean()))
        label = EXTRA[name][0] if name in EXTRA else name
        rows.append(f"| {label} | {windows.shape[0]} | {pq:.3f} | {ph:.3f} | {100 * (ph / pq - 1):+.3f}% | "
                    f"{size / 2**20:.0f} MiB | {compile_s:.0f} s |")
        print(rows[-1], flush=True)
        del gm, hf
    head = ["| recipe | windows | qcompile | transformers (export) | difference | safetensors (fp32 floats) | compile |",
            "|---|---|---|---|---|---|---|"]
    foot = (f"\n`python bench/export_accuracy.py --windows {args.windows} --recipes {args.recipes}`; "
            f"calibration {args.calib} x 512; commit {_commit()}; {datetime.date.today()}; "
            f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    text = "\n".join(head + rows) + "\n" + foot + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
