"""GPTQ side by side with llm-compressor (issue 15): SmolLM2-135M, W4A16 per channel and in groups,
the same calibration windows and the same perplexity protocol through both tools in one run.

    .venv/bin/python bench/peer_gptq.py                      # 40 windows, the default rows, writes ACCURACY.md
    .venv/bin/python bench/peer_gptq.py --rows fp32,w4a16,g128,g64,w4a16-full,g64-full
    .venv/bin/python bench/peer_gptq.py --windows 2 --calib-n 2 --no-write   # smoke run

This driver runs in qcompile's environment. It writes the float model as an HF checkpoint, the
calibration windows (16 x 512 validation tokens, seed 0) and the evaluation windows (the first
``--windows`` 2048-token windows of the test text) as safetensors under ``--cache``; then for each
row it compiles with qcompile and evaluates (``qcompile.evaluate.window_nlls``), and runs
bench/peer_gptq_worker.py inside llm-compressor's own virtual environment on the same files
(``oneshot`` + ``GPTQModifier``). llm-compressor pins its own transformers and compressed-tensors,
so it gets a virtual environment of its own, made on first use (``--peer-venv``, git-ignored):
torch 2.13.0 (CPU wheel) and llmcompressor 0.14.0.1. It is a benchmark dependency only.

Rows (``--rows``): fp32 (no quantization: both sides should agree to float rounding, the check
that the protocols match), w4a16 (per output channel: qcompile's ``gptq-w4a16`` recipe), g128 and
g64 (groups of 128 / 64 input columns). SmolLM2's linears read 576 columns (q, k, v, o, gate,
up) or 1536 (down): 64 divides both, 128 only 1536; whatever a tool does with g128 (a shorter last
group, or a refusal) is that row's result. Not run unless asked: w4a16-full and g64-full, qcompile
alone on the symmetric grid compressed-tensors uses (scale = absmax / 7.5, all 16 levels; qcompile's
default 4-bit grid divides by 7), to tell the grid's share of a gap from the rest.

Each row's result is kept as JSON under ``--cache``; ``--resume`` reuses those of a run with the
same window counts and threads (the section then says when they were measured).

Compile seconds: qcompile = the wall time of ``qcompile.compile``; llm-compressor = the wall time
of the ``oneshot`` call (its total from process start, imports and model load included, is printed
and kept in the JSON results). Both with ``--threads`` torch threads on the same machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "peer_gptq_worker.py"
ACCURACY = ROOT / "bench" / "ACCURACY.md"
SECTION = "## GPTQ side by side with llm-compressor (issue 15)"
BEGIN, END = "<!-- peer-gptq:begin -->", "<!-- peer-gptq:end -->"
PEER_VENV = ROOT / "bench" / ".venv-llmcompressor"
# the peer's pins: torch exactly qcompile's CPU build (an unpinned torch would pull CUDA wheels)
PEER_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")


@dataclass(frozen=True)
class Row:
    label: str
    group: int | None  # qcompile's group size: 0 per channel, None no quantization (FP32)
    peer_args: tuple[str, ...] | None  # the worker's arguments; None: a qcompile-only row
    grid: str | None = None  # qcompile's symmetric grid; None: its default for 4 bits


ROWS = {
    "fp32": Row("FP32 (no quantization)", None, ("--scheme", "fp32")),
    "w4a16": Row("GPTQ W4A16 per channel", 0, ("--scheme", "channel")),
    "g128": Row("GPTQ W4A16 g128", 128, ("--scheme", "group", "--group-size", "128")),
    "g64": Row("GPTQ W4A16 g64", 64, ("--scheme", "group", "--group-size", "64")),
    # not run by default: qcompile on compressed-tensors' grid (absmax / 7.5), to split the gap
    "w4a16-full": Row("GPTQ W4A16 per channel, qcompile on the 'full' grid", 0, None, "full"),
    "g64-full": Row("GPTQ W4A16 g64, qcompile on the 'full' grid", 64, None, "full"),
}
DEFAULT_ROWS = ("fp32", "w4a16", "g128", "g64")


def _ours_passes(row: Row) -> list:
    from qcompile import recipes
    from qcompile.formats import PerGroup, PerRow
    from qcompile.passes import GPTQ, QuantizeLinears

    if row.group == 0 and row.grid is None:
        return recipes.get("gptq-w4a16").passes()
    granularity = PerGroup(row.group) if row.group else PerRow()
    return [GPTQ(w_bits=4, group_size=row.group, grid=row.grid),
            QuantizeLinears(w_bits=4, a_bits=None, w_granularity=granularity, w_grid=row.grid)]


# ---------------------------------------------------------------- the peer's environment

def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(venv: Path) -> dict:
    """Make llm-compressor's virtual environment unless it is complete; return the install record
    (seconds, pins), kept in ``venv/qcompile-peer.json``."""
    record_file = venv / "qcompile-peer.json"
    if record_file.is_file() and _venv_python(venv).is_file():
        record = json.loads(record_file.read_text())
        if record.get("pins") == list(PEER_PINS):
            return record
    print(f"making llm-compressor's environment in {venv} ({', '.join(PEER_PINS)})", flush=True)
    env = dict(os.environ)
    env.setdefault("PIP_FIND_LINKS", "/opt/wheels")  # where the local CPU torch wheel lies
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run(pip + ["torch==2.13.0+cpu"], check=True, env=env)  # first, alone: never a CUDA build
    subprocess.run(pip + list(PEER_PINS), check=True, env=env)
    torch_version = subprocess.run([str(_venv_python(venv)), "-c", "import torch; print(torch.__version__)"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    if torch_version != "2.13.0+cpu":
        raise SystemExit(f"llm-compressor's environment got torch {torch_version}, not 2.13.0+cpu: "
                         f"remove {venv} and check the pins")
    record = {"pins": list(PEER_PINS), "install_s": time.perf_counter() - t0,
              "date": _now()}
    record_file.write_text(json.dumps(record, indent=1))
    print(f"llm-compressor's environment made in {record['install_s']:.0f} s", flush=True)
    return record


def run_peer(venv: Path, files: dict[str, Path], row: str, out: Path, threads: int, commit: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    cmd = [str(_venv_python(venv)), str(WORKER), "--model", str(files["model"]), "--calib",
           str(files["calib"]), "--eval", str(files["eval"]), "--threads", str(threads),
           "--out", str(out), *ROWS[row].peer_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"llm-compressor worker failed for row {row} (exit {proc.returncode}): "
                         + " ".join(shlex.quote(c) for c in cmd))
    result = json.loads(out.read_text())
    result.update(process_s=wall, date=_now(), commit=commit)  # date: when the row finished
    out.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- shared inputs

def write_inputs(cache: Path, model, tok, calib, windows) -> dict[str, Path]:
    """The float checkpoint (rewritten only when absent) and the token windows of this run."""
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    files = {"model": cache / "smollm2-135m-float", "calib": cache / "calib.safetensors",
             "eval": cache / "eval.safetensors"}
    if not (files["model"] / "config.json").is_file():
        tmp = cache / "smollm2-135m-float.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(files["model"])
    save_file({"input_ids": calib.contiguous()}, str(files["calib"]))
    save_file({"input_ids": windows.contiguous()}, str(files["eval"]))
    return files


# ---------------------------------------------------------------- reporting

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _commit() -> str:
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _reuse(path: Path) -> dict:
    """A row's result left by an earlier run (--resume), marked as such."""
    result = json.loads(path.read_text())
    if "date" not in result:  # written before results carried their date
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
        result["date"] = f"{mtime:%Y-%m-%d %H:%M} UTC (file time)"
    result.setdefault("commit", "not recorded")
    result["reused"] = True
    return result


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _ppl(nlls) -> float:
    return math.exp(sum(nlls) / len(nlls))


def _fmt_ppl(side: dict | None, row: str | None = None) -> str:
    if side is None:
        return "-" if row and ROWS[row].peer_args is None else "not run"
    if side["status"] != "ok":
        return "refused"
    return f"{_ppl(side['nlls']):.3f}"


def _fmt_s(side: dict | None, key: str) -> str:
    value = side.get(key) if side else None
    return "-" if value is None else f"{value:.0f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| row | perplexity qcompile | perplexity llm-compressor | compile s qcompile | "
             "compile s llm-compressor | ratio (llm-compressor / qcompile) |",
             "|---|---|---|---|---|---|"]
    for row, sides in results.items():
        ours, peer = sides.get("ours"), sides.get("peer")
        ratio = "-"
        if ours and peer and ours.get("compile_s") and peer.get("oneshot_s"):
            ratio = f"{peer['oneshot_s'] / ours['compile_s']:.2f}x"
        lines.append(f"| {ROWS[row].label} | {_fmt_ppl(ours)} | {_fmt_ppl(peer, row)} | {_fmt_s(ours, 'compile_s')} | "
                     f"{_fmt_s(peer, 'oneshot_s')} | {ratio} |")
    return "\n".join(lines)


def notes(results: dict[str, dict]) -> list[str]:
    """Refusals (their text) and the FP32 agreement, as Markdown lines."""
    out = []
    for row, sides in results.items():
        for name, side in (("qcompile", sides.get("ours")), ("llm-compressor", sides.get("peer"))):
            if side and side["status"] != "ok":
                listed = [ln.strip("- ").strip() for ln in side["error"].splitlines() if ln.startswith("  - ")]
                where = f" ({len(listed)} layers listed, the first {listed[0]})" if listed else ""
                out.append(f"- {ROWS[row].label}, {name} refused{where}: ``{side['error'].splitlines()[0][:600]}``")
    fp = results.get("fp32", {})
    if fp.get("ours", {}).get("nlls") and fp.get("peer", {}).get("nlls"):
        a, b = fp["ours"]["nlls"], fp["peer"]["nlls"]
        worst = max(abs(x - y) for x, y in zip(a, b))
        out.append(f"- FP32 protocol check: perplexity {_ppl(a):.4f} (qcompile) vs {_ppl(b):.4f} "
                   f"(llm-compressor's environment), largest per-window NLL difference {worst:.2e}")
    for row, sides in results.items():
        ours, peer = sides.get("ours") or {}, sides.get("peer") or {}
        parts = []
        if ours.get("compile_cpu_s") is not None:
            parts.append(f"qcompile compile {_fmt_s(ours, 'compile_cpu_s')} CPU s")
        if peer.get("oneshot_cpu_s") is not None:
            parts.append(f"llm-compressor `oneshot` {_fmt_s(peer, 'oneshot_cpu_s')} CPU s, and "
                         f"{_fmt_s(peer, 'total_s')} s wall from its process start (imports, model load, "
                         "calibration set) to the end of `oneshot`")
        if parts:
            out.append(f"- {ROWS[row].label}: " + "; ".join(parts))
    return out


def write_section(text: str, path: Path = ACCURACY) -> None:
    """Replace what lies between the markers (adding the section at the end the first time)."""
    doc = path.read_text()
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(doc)


# ---------------------------------------------------------------- the run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="2048-token test windows (%(default)s)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated, from {', '.join(ROWS)} (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in both processes (%(default)s)")
    ap.add_argument("--data", help="folder with wikitext2_valid.txt and wikitext2_test.txt "
                                   "(default: qcompile.data.default_data_dir())")
    ap.add_argument("--calib-n", type=int, default=16, help="calibration windows of 512 tokens "
                                                            "(%(default)s; fewer only to debug)")
    ap.add_argument("--skip-peer", action="store_true", help="qcompile's side only")
    ap.add_argument("--skip-ours", action="store_true", help="llm-compressor's side only")
    ap.add_argument("--peer-venv", default=str(PEER_VENV), help="llm-compressor's environment (%(default)s)")
    ap.add_argument("--cache", help="where the checkpoint, token windows and per-row results go "
                                    "(default: $QCOMPILE_CACHE/peer_gptq)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse per-row results a previous run with the same settings left in --cache")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/ACCURACY.md alone")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    command = ("python bench/peer_gptq.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    started, commit = _now(), _commit()

    import torch

    import qcompile
    import qcompile.passes  # noqa: F401 -- every pass module now, so one run uses one version of them
    from qcompile.evaluate import window_nlls
    from qcompile.formats import default_grid, symmetric_qmax

    torch.set_num_threads(args.threads)
    venv = Path(args.peer_venv)
    install = None if args.skip_peer else ensure_peer_venv(venv)

    data = Path(args.data) if args.data else qcompile.data.default_data_dir()
    model, tok = qcompile.models.load("smollm2-135m")
    calib = qcompile.data.calibration_windows(tok, qcompile.data.load_text(data / "wikitext2_valid.txt"),
                                              n=args.calib_n, seq_len=512, seed=0)
    windows = qcompile.data.evaluation_windows(tok, qcompile.data.load_text(data / "wikitext2_test.txt"),
                                               2048, args.windows)
    cache = Path(args.cache) if args.cache else qcompile.models.cache_dir() / "peer_gptq"
    files = write_inputs(cache, model, tok, calib, windows)
    tag = f"w{windows.shape[0]}-c{calib.shape[0]}x{calib.shape[1]}-t{args.threads}"

    results: dict[str, dict] = {}
    for row in rows:
        spec = ROWS[row]
        sides = results.setdefault(row, {})
        ours_file, peer_file = cache / f"{row}-{tag}-qcompile.json", cache / f"{row}-{tag}-peer.json"
        if not args.skip_ours:
            if args.resume and ours_file.is_file():
                sides["ours"] = _reuse(ours_file)
            else:
                print(f"[{row}] qcompile: {spec.label}", flush=True)
                ours = {"status": "ok", "error": None, "compile_s": None, "commit": commit}
                if spec.group is None:
                    target = model
                else:
                    t0, c0 = time.perf_counter(), time.process_time()
                    target = qcompile.compile(model, passes=_ours_passes(spec), calibration=calib)
                    ours["compile_s"] = time.perf_counter() - t0
                    ours["compile_cpu_s"] = time.process_time() - c0  # all threads of this process
                    ours["pass_s"] = {r.name: r.seconds for r in target.qcompile_report.records}
                    print(f"[{row}] qcompile compile {ours['compile_s']:.1f} s "
                          f"({ours['compile_cpu_s']:.1f} CPU s); per pass {ours['pass_s']}", flush=True)
                ours["nlls"] = [float(x) for x in window_nlls(target, windows, desc=f"{row} qcompile")]
                del target
                ours["date"] = _now()  # when the row finished
                ours_file.write_text(json.dumps(ours))
                sides["ours"] = ours
            print(f"[{row}] qcompile perplexity {_fmt_ppl(sides['ours'])}", flush=True)
        if not args.skip_peer and spec.peer_args is not None:
            if args.resume and peer_file.is_file():
                sides["peer"] = _reuse(peer_file)
            else:
                print(f"[{row}] llm-compressor: {spec.label}", flush=True)
                sides["peer"] = run_peer(venv, files, row, peer_file, args.threads, commit)
            peer = sides["peer"]
            extra = (f", oneshot {_fmt_s(peer, 'oneshot_s')} s ({_fmt_s(peer, 'oneshot_cpu_s')} CPU s; "
                     f"{_fmt_s(peer, 'total_s')} s from process start)"
                     if peer.get("oneshot_s") is not None else "")
            print(f"[{row}] llm-compressor perplexity {_fmt_ppl(peer)}{extra}"
                  + (f": {peer['error']}" if peer["status"] != "ok" else ""), flush=True)
        if sides.get("ours", {}).get("nlls") and sides.get("peer", {}).get("nlls"):
            for i, (a, b) in enumerate(zip(sides["ours"]["nlls"], sides["peer"]["nlls"])):
                print(f"  {row} window {i + 1}: qcompile {a:.4f}  llm-compressor {b:.4f}  diff {b - a:+.4f}")

    peer_versions = next((s["peer"]["versions"] for s in results.values() if s.get("peer")), None)
    import transformers
    lines = [table(results), ""] + notes(results) + [""]
    reused = sorted({f"{side['date']}, commit {side['commit']}" for sides in results.values()
                     for side in sides.values() if side.get("reused")})
    lines.append(f"Command: `{command}`; started {started}; commit {commit}; "
                 f"{_cpu()}, {os.cpu_count()} CPUs, {args.threads} torch threads per process "
                 "(shared with other jobs: the seconds are indicative)."
                 + (f" Results reused from earlier runs (--resume), finished: {'; '.join(reused)}." if reused else ""))
    lines.append(f"Calibration: {calib.shape[0]} x {calib.shape[1]} WikiText-2 validation tokens (seed 0), "
                 f"the same tensor for both tools; evaluation: the first {windows.shape[0]} non-overlapping "
                 "2048-token windows of the test text, mean next-token NLL per window (qcompile's "
                 "`window_nlls`, reimplemented line for line in the worker), exp of the mean.")
    grid_pc, grid_g = default_grid(4, "gptq"), default_grid(4, "gptq", True)
    lines.append("Settings: 4-bit symmetric weights, every Linear except lm_head, block 128, dampening 0.01, "
                 "static activation order, on both sides. qcompile's default GPTQ grids: per channel "
                 f"{grid_pc!r} (scale = absmax / {symmetric_qmax(4, grid_pc):g}), in groups {grid_g!r} "
                 f"(absmax / {symmetric_qmax(4, grid_g):g}); compressed-tensors' min-max "
                 "observer uses absmax / 7.5 (all 16 levels). qcompile rounds each decoder layer's linears "
                 "in groups by shared input (q/k/v, o, gate/up, down), each group seeing the rounded ones "
                 "before it; llm-compressor collects every linear's Hessian of a decoder layer in one pass "
                 "(inputs from the rounded previous layers, the layer's own linears still float), then "
                 "rounds them all.")
    lines.append(f"qcompile {qcompile.__version__} (torch {torch.__version__}, transformers "
                 f"{transformers.__version__}); llm-compressor: "
                 + (", ".join(f"{k} {v}" for k, v in peer_versions.items()) if peer_versions else "not run")
                 + (f"; its environment took {install['install_s']:.0f} s to make ({install['date']})"
                    if install and install.get("install_s") else "") + ".")
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        write_section(text)
        print(f"\nwritten to {ACCURACY.relative_to(ROOT)} ({SECTION})")


if __name__ == "__main__":
    main()
