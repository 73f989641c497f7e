"""QUIK accuracy on SmolLM2-135M: WikiText-2 test perplexity per configuration.

    python bench/accuracy_quik.py --windows 40 --rows fp32,rtn_w4a4_o32,quik_4b
    python bench/accuracy_quik.py --list

Calibration: ``--calib-n`` windows of ``--calib-len`` tokens drawn (seeded) from the WikiText-2
*validation* file only; evaluation: the first ``--windows`` non-overlapping 2048-token windows of
the test file. Each run merges its rows into bench/results/quik.md (rows measured earlier, maybe
with other window counts, are kept; the table says each row's window count, date and commit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "quik.md"
_JSON_TAG = "<!-- quik-rows-json:"

# the independent yardstick's numbers (fake-quant script, first 40 windows)
YARDSTICK = {"fp32": 20.38, "rtn_w4a4_o0": 10152.0, "rtn_w4a4_o32": 120.7, "rtn_w4a16": 44.5}


def _rows() -> dict[str, tuple[str, Callable[[], list]]]:
    from qcompile.formats import PerGroup, PerRow
    from qcompile.passes import (GPTQ, ActivationStats, ClipSearch, QuantizeLinears, ReorderOutliers,
                                 SelectOutliers)

    down8 = {"re:.*down_proj": {"w_bits": 8, "a_bits": 8}}

    def quik(k: int, gptq: bool, clip: bool = False, d8: bool = False, bits: int = 4,
             grid: str | None = None, act_order: bool = False, prop_down: bool = False,
             damp: float = 0.01, clip_search: str | None = None) -> Callable[[], list]:
        def make() -> list:
            # the outlier lowering requires the ``outliers`` analysis: k = 0 selects none
            p: list = [ActivationStats(), SelectOutliers(k=k, proportional_down=prop_down)] + (
                [ReorderOutliers()] if k else [])
            if clip_search:  # per-row ranges chosen on calibration outputs, outlier columns left out
                p.append(ClipSearch(w_bits=bits, outliers=True, w_grid=clip_search,
                                    ignore=("re:(.*\\.)?lm_head",) + (("re:.*down_proj",) if d8 else ())))
            if gptq:
                cls = _quik_act_order_gptq() if act_order else GPTQ
                p.append(cls(w_bits=bits, outliers="keep_fp16" if k else None, clip=clip, grid=grid, damp=damp,
                             overrides={"re:.*down_proj": {"w_bits": 8}} if d8 else {}))
            p.append(QuantizeLinears(w_bits=bits, a_bits=bits, outliers=True,
                                     overrides=down8 if d8 else {}))
            return p
        return make

    def w_only(bits: int, group: int, gptq: bool, clip: bool = False, act_order: bool | None = None,
               grid: str | None = None, clip_search: bool = False) -> Callable[[], list]:
        def make() -> list:
            gran = PerGroup(group) if group else PerRow()
            # clip_search: ClipSearch's ratios (chosen on calibration outputs) set GPTQ's scales
            p: list = [ClipSearch(w_bits=bits, w_granularity=gran)] if clip_search else []
            p += [GPTQ(w_bits=bits, group_size=group, clip=clip, act_order=act_order, grid=grid)
                  ] if gptq else []
            return p + [QuantizeLinears(w_bits=bits, a_bits=None, w_granularity=gran, w_grid=grid)]
        return make

    rows: dict[str, tuple[str, Callable[[], list]]] = {"fp32": ("FP32", lambda: [])}
    for k in (0, 16, 32, 64):
        rows[f"rtn_w4a4_o{k}"] = (f"RTN W4A4, {k} fp16 outliers", quik(k, False))
        rows[f"gptq_w4a4_o{k}"] = (f"GPTQ W4A4, {k} fp16 outliers", quik(k, True))
    rows.update({
        "gptq_clip_w4a4_o32": ("GPTQ + clip W4A4, 32 outliers", quik(32, True, clip=True)),
        "rtn_w4a4_o32_down8": ("RTN W4A4, 32 outliers, W8A8 down_proj", quik(32, False, d8=True)),
        "gptq_w4a4_o32_down8": ("GPTQ W4A4, 32 outliers, W8A8 down_proj", quik(32, True, d8=True)),
        "quik_4b": ("QUIK-4B: GPTQ + clip, 32 outliers, W8A8 down_proj", quik(32, True, clip=True, d8=True)),
        "quik_4b_o0": ("QUIK-4B recipe with 0 outliers", quik(0, True, clip=True, d8=True)),
        "quik_4b_o16": ("QUIK-4B recipe with 16 outliers", quik(16, True, clip=True, d8=True)),
        "quik_4b_o64": ("QUIK-4B recipe with 64 outliers", quik(64, True, clip=True, d8=True)),
        "quik_8b": ("QUIK-8B: RTN W8A8, 32 outliers", quik(32, False, bits=8)),
        # QUIK-4B variants (issue 15's <= 24 target); _ao: act-order inside QUIK mode (experiment, see
        # _quik_act_order_gptq); _pd: down_proj gets k x 1536/576 = 85 outliers (QUIK's proportional rule)
        "quik_4b_ao": ("QUIK-4B, GPTQ act-order among the 4-bit columns (bench experiment)",
                       quik(32, True, clip=True, d8=True, act_order=True)),
        "quik_4b_pd": ("QUIK-4B, down_proj outliers proportional to its width (85)",
                       quik(32, True, clip=True, d8=True, prop_down=True)),
        "quik_4b_ao_pd": ("QUIK-4B, act-order + proportional down_proj outliers (bench experiment)",
                          quik(32, True, clip=True, d8=True, act_order=True, prop_down=True)),
        "quik_4b_cs": ("QUIK-4B with ClipSearch ranges (outliers left out; restricted grid)",
                       quik(32, True, clip=True, d8=True, clip_search="restricted")),
        "quik_4b_cs_full": ("QUIK-4B with ClipSearch ranges (outliers left out; full grid)",
                            quik(32, True, clip=True, d8=True, clip_search="full")),
        "quik_4b_damp10": ("QUIK-4B, GPTQ dampening 0.1", quik(32, True, clip=True, d8=True, damp=0.1)),
        "quik_4b_noclip_ao": ("QUIK-4B without the clipping search, act-order (bench experiment)",
                              quik(32, True, d8=True, act_order=True)),
        **{f"quik_4b_o{k}_ao{'_pd' if pd else ''}": (
            f"QUIK-4B with {k} outliers, act-order{' + proportional down_proj outliers' if pd else ''} "
            "(bench experiment)", quik(k, True, clip=True, d8=True, act_order=True, prop_down=pd))
           for k in (48, 64) for pd in (False, True)},
        "quik_4b_restricted": ("QUIK-4B, GPTQ on the restricted grid", quik(32, True, clip=True, d8=True, grid="restricted")),
        "quik_4b_full": ("QUIK-4B, GPTQ on the full grid", quik(32, True, clip=True, d8=True, grid="full")),
        "rtn_w4a16": ("RTN W4A16 per channel", w_only(4, 0, False)),
        "gptq_w4a16": ("GPTQ W4A16 per channel", w_only(4, 0, True)),
        "gptq_clip_w4a16": ("GPTQ + clip W4A16 per channel", w_only(4, 0, True, clip=True)),
        "rtn_w4a16_g128": ("RTN W4A16 g128", w_only(4, 128, False)),
        "gptq_w4a16_g128": ("GPTQ W4A16 g128", w_only(4, 128, True)),
        "rtn_w3a16": ("RTN W3A16 per channel", w_only(3, 0, False)),
        "gptq_w3a16": ("GPTQ W3A16 per channel", w_only(3, 0, True)),
        "gptq_w3a16_g128": ("GPTQ W3A16 g128", w_only(3, 128, True)),
        "gptq_clip_w4a16_g128": ("GPTQ + clip W4A16 g128", w_only(4, 128, True, clip=True)),
        "gptq_clip_w3a16_g128": ("GPTQ + clip W3A16 g128", w_only(3, 128, True, clip=True)),
        "clipsearch_gptq_w4a16": ("ClipSearch + GPTQ W4A16 per channel", w_only(4, 0, True, clip_search=True)),
        "clipsearch_gptq_w4a16_g128": ("ClipSearch + GPTQ W4A16 g128", w_only(4, 128, True, clip_search=True)),
        "clipsearch_gptq_w3a16_g128": ("ClipSearch + GPTQ W3A16 g128", w_only(3, 128, True, clip_search=True)),
        "clipsearch_w4a16": ("ClipSearch + RTN W4A16 per channel", w_only(4, 0, False, clip_search=True)),
    })
    # the symmetric-grid and act-order decision (issue 15): every method x bits x granularity x grid,
    # e.g. rtn_w4a16_g128_full, gptq-ao_w3a16_restricted (act-order), gptq-nat_w4a16_full
    for method, gptq, order in (("rtn", False, None), ("gptq-ao", True, True), ("gptq-nat", True, False)):
        for bits in (3, 4):
            for group in (0, 128):
                for grid in ("restricted", "full"):
                    gran = f" g{group}" if group else " per channel"
                    label = {"rtn": "RTN", "gptq-ao": "GPTQ act-order", "gptq-nat": "GPTQ natural order"}[method]
                    rows[f"{method}_w{bits}a16{'_g128' if group else ''}_{grid}"] = (
                        f"{label} W{bits}A16{gran}, {grid} grid", w_only(bits, group, gptq, act_order=order, grid=grid))
    return rows


def _quik_act_order_gptq() -> type:
    """A bench-only experiment, not a qcompile feature: ``GPTQ`` in QUIK mode with GPTQ's act-order
    among the 4-bit columns. ``GPTQ`` refuses ``act_order`` with ``outliers="keep_fp16"`` and orders
    the 4-bit columns by ascending calibration abs-max; this subclass reorders those columns (the
    fp16 outliers stay last) by descending Hessian diagonal, the order ``act_order`` uses without
    outliers, by wrapping the pass module's ``gptq_quantize`` during its own rounding calls. Per-row
    scales are computed from the original weights either way, so only the error-feedback order
    changes; the stored layout (``quant_idx``, ``outlier_idx``) is the same."""
    import sys

    import torch

    from qcompile.gptq_math import hessian_diagonal
    from qcompile.passes import GPTQ

    mod = sys.modules[GPTQ.__module__]

    class QuikActOrderGPTQ(GPTQ):
        def _round_group(self, gm, group, h, *args, **kwargs):  # type: ignore[override]
            plain = mod.gptq_quantize

            def reordered(w, hh, *a, keep_last=0, perm=None, **kw):
                if perm is not None and keep_last:
                    kq = perm.numel() - keep_last
                    rest = perm[:kq]
                    diag = hessian_diagonal(hh, torch.float32)  # a streamed Hessian stays on disk
                    diag = diag[rest.to(diag.device)].cpu()
                    rest = rest[torch.argsort(diag, descending=True, stable=True).to(rest.device)]
                    perm = torch.cat([rest, perm[kq:]])
                return plain(w, hh, *a, keep_last=keep_last, perm=perm, **kw)

            mod.gptq_quantize = reordered
            try:
                return super()._round_group(gm, group, h, *args, **kwargs)
            finally:
                mod.gptq_quantize = plain

    return QuikActOrderGPTQ


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    return f"CPU {platform.machine()} x{os.cpu_count()} ({platform.processor() or 'unknown'}), torch " \
           + __import__("torch").__version__


def _load_existing(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        if line.startswith(_JSON_TAG):
            return json.loads(line[len(_JSON_TAG):].rstrip("-> ").strip())
    return {}


def _compile_cell(r: dict) -> str:
    cpu = r.get("compile_cpu_s")
    return f"{r['compile_s']:.0f}" + ("" if cpu is None else f" ({cpu:.0f} CPU)")


def _gptq_cell(r: dict) -> str:
    if r.get("gptq_s") is None:
        return ""
    cpu = r.get("gptq_cpu_s")
    return f"{r['gptq_s']:.0f}" + ("" if cpu is None else f" ({cpu:.0f} CPU)")


def _write(results: dict[str, dict], order: list[str], path: Path) -> str:
    """Merge ``results`` into the rows already in ``path`` (another run may have added some) and
    rewrite it."""
    results = {**_load_existing(path), **results}
    lines = ["# QUIK accuracy: SmolLM2-135M-Instruct, WikiText-2 test perplexity", "",
             "Sequence length 2048, non-overlapping windows from the start of the test split. "
             "Calibration from the validation split only. Each row says how many windows it used "
             "(40 = the yardstick's protocol); rows with fewer windows are not directly comparable "
             "to 40-window numbers.", "",
             "| row | configuration | windows | perplexity | yardstick (40 w) | calibration | "
             "compile wall s (CPU s) | GPTQ wall s (CPU s) | date (UTC) | commit | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in order:
        if key not in results:
            continue
        r = results[key]
        y = YARDSTICK.get(key)
        lines.append(f"| {key} | {r['name']} | {r['windows']} | {r['ppl']:.2f} | "
                     f"{'' if y is None else y} | {r['calibration']} | {_compile_cell(r)} | "
                     f"{_gptq_cell(r)} | {r['date']} | "
                     f"{r['commit']} | {r['device']} |")
    lines += ["", "Commands:", ""]
    for cmd in sorted({r["command"] for r in results.values()}):
        lines.append(f"    {cmd}")
    lines += ["", f"{_JSON_TAG} {json.dumps(results, sort_keys=True)} -->", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 2048 tokens")
    ap.add_argument("--rows", default="fp32,rtn_w4a4_o32,quik_4b,gptq_w4a16,rtn_w4a16",
                    help="comma-separated row keys (see --list), or 'all'")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--data", default=str(DATA), help="folder with wikitext2_{valid,test}.txt")
    ap.add_argument("--chunk", type=int, default=5, help="windows between progress lines/writes")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file the rows are merged into")
    ap.add_argument("--merge", nargs="*", default=[], help="also merge the rows of these result files")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    args = ap.parse_args(argv)

    import torch

    import qcompile
    from qcompile.data import calibration_windows, load_text
    from qcompile.data import evaluation_windows
    from qcompile.evaluate import window_nlls

    rows = _rows()
    if args.list:
        for key, (name, _) in rows.items():
            print(f"{key:22s} {name}")
        return 0
    keys = list(rows) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [k for k in keys if k not in rows]
    if unknown:
        ap.error(f"unknown rows {unknown}; see --list")
    out = Path(args.out)
    results: dict[str, dict] = {}
    for extra in args.merge:
        results.update(_load_existing(Path(extra)))
    if not keys:  # only merging result files
        print(_write(results, list(rows), out))
        return 0
    torch.set_grad_enabled(False)
    model, tok = qcompile.models.load("smollm2-135m")
    valid = load_text(Path(args.data) / "wikitext2_valid.txt")
    test = load_text(Path(args.data) / "wikitext2_test.txt")
    calib = calibration_windows(tok, valid, args.calib_n, args.calib_len, seed=0)
    windows = evaluation_windows(tok, test, 2048, args.windows)
    command = "python bench/accuracy_quik.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = _git_commit()  # the code this process runs, not HEAD when a row is written
    for key in keys:
        name, make = rows[key]
        passes = make()
        t0, c0 = time.perf_counter(), time.process_time()
        gm = qcompile.compile(model, passes, calibration=calib) if passes else model
        # wall and this process's CPU seconds: on a shared machine (paused jobs, other load) the
        # CPU seconds are the steadier figure
        compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
        gptq_s = getattr(gm, "qcompile_analyses", {}).get("gptq_time_s")
        gptq_cpu = getattr(gm, "qcompile_analyses", {}).get("gptq_cpu_s")
        nlls: list[torch.Tensor] = []
        for start in range(0, windows.shape[0], args.chunk):
            # the row is written after every chunk: an interrupted run keeps what it measured
            nlls.append(window_nlls(gm, windows[start:start + args.chunk]))
            done = sum(int(t.numel()) for t in nlls)
            ppl = math.exp(float(torch.cat(nlls).mean()))
            results[key] = {"name": name, "windows": done, "ppl": ppl, "compile_s": compile_s,
                            "compile_cpu_s": compile_cpu, "threads": torch.get_num_threads(),
                            "gptq_s": gptq_s, "gptq_cpu_s": gptq_cpu, "calibration": f"{args.calib_n} x {args.calib_len} valid",
                            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                            "commit": commit, "device": _device(), "command": command}
            _write(results, list(rows), out)
            print(f"{key:22s} ppl {ppl:10.2f}  ({done}/{windows.shape[0]} windows, compile "
                  f"{compile_s:.0f} s" + (f", GPTQ {gptq_s:.0f} s" if gptq_s else "") + ")", flush=True)
        del gm
    print(_write(results, list(rows), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
