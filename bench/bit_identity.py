"""Bit-identity check for refactors: compile SmolLM2 with a few recipes on a fixed calibration set,
run a fixed input, and compare the SHA-256 of each model's logits with the recorded ones.

    .venv/bin/python bench/bit_identity.py --record     # at the commit before a refactor
    .venv/bin/python bench/bit_identity.py              # after it: prints same / DIFFERENT per recipe

The record lives in ``bench/results/logits_sha256.json`` with the commit it was taken at.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from pathlib import Path

import torch

import qcompile
from qcompile import recipes

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "bench" / "results" / "logits_sha256.json"
DEFAULT_RECIPES = "rtn-w8a8,aweq-w8a8,gptq-w4a16,quik-w4a4"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def fingerprints(names: list[str], data: Path) -> dict[str, dict[str, object]]:
    torch.manual_seed(0)
    model, tok = qcompile.models.load("smollm2-135m")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(data / "wikitext2_valid.txt"),
                                              n=4, seq_len=256, seed=0)
    ids = qcompile.data.evaluation_windows(tok, qcompile.data.load_text(data / "wikitext2_test.txt"), 128, 1)
    out: dict[str, dict[str, object]] = {}
    for name in names:
        t0 = time.perf_counter()
        gm = qcompile.compile(model, calibration=calib, passes=recipes.get(name))
        with torch.no_grad():
            logits = qcompile.evaluate.logits_of(gm(ids)).float().contiguous()
        out[name] = {"sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                     "sum": float(logits.double().sum()), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="write the record instead of comparing")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--data", default=str(ROOT / "data"), help="folder with the WikiText-2 files")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "wikitext2_test.txt").exists():
        data = ROOT.parent / "shared" / "data"
    got = fingerprints(args.recipes.split(","), data)
    if args.record:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps({"commit": _commit(), "torch": torch.__version__, "logits": got}, indent=2))
        print(f"recorded {RECORD}")
        return
    want = json.loads(RECORD.read_text())
    bad = 0
    for name, fp in got.items():
        ref = want["logits"].get(name)
        same = ref is not None and ref["sha256"] == fp["sha256"]
        bad += not same
        print(f"{name}: {'same' if same else 'DIFFERENT'} (recorded at {want['commit']})")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
