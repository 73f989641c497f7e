"""Wall and CPU time of the GPTQ pass on SmolLM2-135M (all 210 linears), the figure compared with
llm-compressor's 89 s (16 x 512 calibration tokens, quiet 2-core machine).

    .venv/bin/python bench/gptq_speed.py [--windows 16] [--seq-len 512] [--bits 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import qcompile
from qcompile.passes import GPTQ

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext2_valid.txt"))
    args = ap.parse_args()
    model, tok = qcompile.models.load("smollm2-135m")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(args.data), n=args.windows,
                                              seq_len=args.seq_len, seed=0)
    gm = qcompile.trace(model)
    wall, cpu = time.perf_counter(), time.process_time()
    gm = qcompile.compile(gm, passes=[GPTQ(w_bits=args.bits)], calibration=calib, inplace=True)
    print(f"GPTQ W{args.bits} on {args.windows} x {args.seq_len} tokens: "
          f"{time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
    print(gm.qcompile_report)


if __name__ == "__main__":
    main()
