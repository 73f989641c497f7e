"""AWEQ accuracy table: SmolLM2-135M WikiText-2 perplexity for FP32, RTN, SmoothQuant and AWEQ.

    .venv/bin/python bench/accuracy_aweq.py --windows 40 --rows key
    .venv/bin/python bench/accuracy_aweq.py --windows 8 --rows all
    .venv/bin/python bench/accuracy_aweq.py --windows 8 --rows 'aweq*/w4a16-*,opt/*'

Rows are ``<method>/<setting>`` (``fp32`` alone), on SmolLM2, or ``opt/<method>/<setting>`` on a
random-weight OPT (mechanics only: its perplexity is near the vocabulary size by construction).

    settings  w8a8-token   W8A8, int8 per-channel weights, per-token dynamic int8 activations
              w8a8-tensor  W8A8, per-tensor static activation scale (from calibration abs-max)
              w4a16-ch / w4a16-g128 / w3a16-ch / w3a16-g128   weight-only, symmetric,
                           per channel or groups of 128 (add "-asym" for asymmetric weights)
    methods   rtn          round to nearest (QuantizeLinears alone)
              sq<a>        SmoothQuant, alpha = a, folded into the norms (the paper's sites)
              sqbest       SmoothQuant with the alpha that wins a small sweep on validation text
              aweq         AWEQ equalization on every site (norm, v->o, up->down, fc1->fc2)
              aweqs        AWEQ with each site's strength t (s ** t) searched for this setting
                           on calibration data (Equalize(search=...)); aweqs-norm: norm sites only
              aweq-norm    AWEQ on the norm sites only (ablation); aweq-minmax: max-min ranges
              +clip        ClipSearch before the lowering (per-row clipping by output error)
              +bec         then BiasCorrection (measured; v_proj left alone, see docs/aweq.md);
                           +becc: closed form; +becv: measured, v_proj corrected too

Calibration: ``calibration_windows(tok, wikitext2_valid, n=16, seq_len=512, seed=0)``; the
activation statistics are computed once per model and copied into each row's pipeline (the same
``ActivationStats`` pass ``compile`` would run). Evaluation: non-overlapping 2048-token windows
from the start of wikitext2_test. Per-window NLLs are kept, so a row measured on 40 windows also
gives its 8-window number; every row of one column is on the same windows. Results accumulate
in ``bench/results/aweq.md`` (the raw records ride along in an HTML comment), with the command,
date, commit and device of every run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import qcompile
from qcompile.calibrate import as_calibration
from qcompile.evaluate import window_nlls
from qcompile.pass_manager import CompileContext, PassManager
from qcompile.passes import ActivationStats, BiasCorrection, ClipSearch, Equalize, QuantizeLinears

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "aweq.md"

SETTINGS: dict[str, dict[str, Any]] = {
    "w8a8-token": dict(w_bits=8, a_bits=8, a_granularity="per_token"),
    "w8a8-tensor": dict(w_bits=8, a_bits=8, a_granularity="per_tensor"),
    "w4a16-ch": dict(w_bits=4, a_bits=None),
    "w4a16-g128": dict(w_bits=4, a_bits=None, w_granularity="g128"),
    "w3a16-ch": dict(w_bits=3, a_bits=None),
    "w3a16-g128": dict(w_bits=3, a_bits=None, w_granularity="g128"),
}
SETTING_LABEL = {
    "w8a8-token": "W8A8 per-token act", "w8a8-tensor": "W8A8 per-tensor static act",
    "w4a16-ch": "W4A16 per-channel", "w4a16-g128": "W4A16 g128",
    "w3a16-ch": "W3A16 per-channel", "w3a16-g128": "W3A16 g128",
}
METHODS = ["rtn", "rtn+bec", "sq0.5", "sqbest", "aweq", "aweq+bec"]
ABLATIONS = {"w8a8-token": ["aweq-norm", "aweq-norm+bec"], "w4a16-ch": ["aweq-norm", "aweq-norm+bec"]}
SWEEP_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ALL_ROWS = (["fp32"] + [f"{m}/{s}" for s in SETTINGS for m in METHODS + ABLATIONS.get(s, [])]
            + ["opt/fp32"] + [f"opt/{m}/{s}" for s in ("w8a8-token", "w8a8-tensor") for m in METHODS])
KEY_ROWS = ["fp32", "rtn/w8a8-token", "sq0.5/w8a8-token", "aweq/w8a8-token", "aweq+bec/w8a8-token",
            "rtn/w4a16-ch", "rtn+bec/w4a16-ch", "aweq/w4a16-ch", "aweq+bec/w4a16-ch"]


# ---------------------------------------------------------------- rows -> pipelines

def parse_row(row: str) -> tuple[str, str, str | None]:
    """``[opt/]method/setting`` or ``[opt/]fp32`` -> (model, method, setting)."""
    model = "smollm2"
    parts = row.split("/")
    if parts[0] == "opt":
        model, parts = "opt", parts[1:]
    if parts == ["fp32"]:
        return model, "fp32", None
    if len(parts) != 2:
        raise SystemExit(f"bad row {row!r}: expected [opt/]<method>/<setting> or fp32")
    method, setting = parts
    if _setting(setting) is None:
        raise SystemExit(f"bad row {row!r}: unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    return model, method, setting


def _setting(name: str) -> dict[str, Any] | None:
    base, asym = (name[:-5], True) if name.endswith("-asym") else (name, False)
    if base not in SETTINGS:
        return None
    cfg = dict(SETTINGS[base])
    if asym:
        cfg["w_symmetric"] = False
    return cfg


def pipeline(method: str, setting: str, alpha_best: float | None) -> list[Any]:
    """The passes after ActivationStats for one row."""
    base, *mods = method.split("+")
    passes: list[Any] = []
    if base == "rtn":
        pass
    elif base == "aweq":
        passes.append(Equalize(method="aweq"))
    elif base == "aweqs":
        passes.append(Equalize(method="aweq", search=_setting(setting)))
    elif base == "aweqs-norm":
        passes.append(Equalize(method="aweq", sites=("norm",), search=_setting(setting)))
    elif base == "aweq-norm":
        passes.append(Equalize(method="aweq", sites=("norm",)))
    elif base == "aweq-minmax":
        passes.append(Equalize(method="aweq", range_stat="minmax"))
    elif base == "sqbest":
        if alpha_best is None:
            raise ValueError("sqbest needs the sweep result")
        passes.append(Equalize(method="smoothquant", alpha=alpha_best, sites=("norm",)))
    elif re.fullmatch(r"sq\d*\.?\d+", base):
        passes.append(Equalize(method="smoothquant", alpha=float(base[2:]), sites=("norm",)))
    else:
        raise SystemExit(f"unknown method {base!r} (rtn, sq<alpha>, sqbest, aweq, aweq-norm, aweq-minmax)")
    cfg = _setting(setting)
    if "clip" in mods:
        passes.append(ClipSearch(**{k: v for k, v in cfg.items() if k in ("w_bits", "w_granularity", "w_symmetric")}))
    passes.append(QuantizeLinears(**cfg))
    for mod in mods:
        if mod == "clip":
            continue
        if mod == "bec":
            passes.append(BiasCorrection(mode="measured"))
        elif mod == "becc":
            passes.append(BiasCorrection(mode="closed_form"))
        elif mod == "becv":
            passes.append(BiasCorrection(mode="measured", correct_values=True))
        else:
            raise SystemExit(f"unknown modifier +{mod} (+clip, +bec, +becc, +becv)")
    return passes


def split_tail(passes: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split a row's pipeline after its QuantizeLinears: (front, bias-correction tail)."""
    cut = max(i for i, p in enumerate(passes) if isinstance(p, QuantizeLinears)) + 1
    return passes[:cut], passes[cut:]


def front_method(method: str) -> str:
    """The method name without its bias-correction modifiers (what the front of its pipeline is)."""
    base, *mods = method.split("+")
    return "+".join([base] + [m for m in mods if not m.startswith("bec")])


# ---------------------------------------------------------------- models and data

class Bench:
    """One model's traced graph, calibration set and activation statistics, built once."""

    def __init__(self, name: str, model, tokenizer, data: Path, windows: int, calib_n: int):
        self.name = name
        valid = qcompile.data.load_text(data / "wikitext2_valid.txt")
        test = qcompile.data.load_text(data / "wikitext2_test.txt")
        self.test = qcompile.data.evaluation_windows(tokenizer, test, 2048, windows)
        self.valid_ids = qcompile.data.tokenize(tokenizer, valid)
        calib = qcompile.data.calibration_windows(tokenizer, self.valid_ids, n=calib_n, seq_len=512, seed=0)
        self.calib = as_calibration(calib)
        self.model = model
        t0 = time.perf_counter()
        self.gm = qcompile.trace(model)
        ctx = CompileContext(calibration=self.calib)
        PassManager([ActivationStats()]).run(self.gm, ctx)
        self.stats = ctx.analyses["activation_stats"]
        self.setup_s = time.perf_counter() - t0

    def compile(self, passes: list[Any]):
        gm, _ = self.compile_with_context(passes)
        return gm

    def compile_with_context(self, passes: list[Any], start: tuple[Any, CompileContext] | None = None):
        """Run ``passes`` on a copy of the traced model, or on a copy of ``start`` (gm, context)
        that an earlier row compiled: rows that differ only in a trailing BiasCorrection share the
        front of their pipeline."""
        if start is None:
            gm = copy.deepcopy(self.gm)
            ctx = CompileContext(calibration=self.calib,
                                 analyses={"activation_stats": copy.deepcopy(self.stats)})
        else:
            gm, ctx = copy.deepcopy(start)
        return PassManager(passes).run(gm, ctx), ctx

    def sweep_windows(self, n: int) -> torch.Tensor:
        """Validation windows for the alpha sweep (never the test split)."""
        return qcompile.data.evaluation_windows(None, self.valid_ids, 2048, n)


def random_opt(vocab: int):
    """A random-weight OPT with a few strong outlier channels in its LayerNorms (as real OPT has)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                    num_attention_heads=8, max_position_embeddings=2048, word_embed_proj_dim=256,
                    dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
                p[torch.randperm(p.numel(), generator=gen)[:4]] *= 20.0  # outlier channels
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------- records and the table

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "passes", "qcompile", "kernels",
                                "bench/accuracy_aweq.py"], cwd=ROOT, capture_output=True, text=True).stdout
        return out + ("+dirty" if dirty.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    m = re.search(r"<!-- records\n(.*?)\n-->", path.read_text(), re.S)
    if not m:
        return []
    return [json.loads(line) for line in m.group(1).splitlines() if line.strip()]


def ppl_of(rec: dict[str, Any], n: int) -> float | None:
    nll = rec["nll"]
    return math.exp(sum(nll[:n]) / n) if len(nll) >= n else None


def latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row, the record with the most windows (the newest among equals)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        old = out.get(r["row"])
        if old is None or len(r["nll"]) >= len(old["nll"]):
            out[r["row"]] = r
    return out


def render(records: list[dict[str, Any]]) -> str:
    rows = latest([r for r in records if r["kind"] == "eval"])
    runs = {}
    for r in records:
        runs.setdefault(r["run"], r)
    counts = sorted({len(r["nll"]) for r in rows.values()})
    cols = [c for c in (8, 40) if any(len(r["nll"]) >= c for r in rows.values())] or counts[:1]
    lines = ["# AWEQ accuracy: WikiText-2 perplexity", "",
             "Generated by `bench/accuracy_aweq.py` (see its docstring for the row names). Lower is "
             "better. Each PPL column uses the first N 2048-token windows of the test split for every "
             "row in it, so numbers in one column are comparable; a blank cell means the row was not "
             "run on that many windows. Calibration: 16 x 512 tokens of the validation split, seed 0. "
             "`run` points to the command below.", ""]
    for model, title in (("smollm2", "SmolLM2-135M-Instruct (weights from the Q4_1 GGUF, dequantized)"),
                         ("opt", "Random-weight OPT (4 layers, hidden 256, outlier LayerNorm channels): "
                                 "mechanics only")):
        body = []
        order = [r for r in ALL_ROWS if r.startswith("opt/") == (model == "opt")]
        extra = sorted(k for k in rows if k not in ALL_ROWS and k.startswith("opt/") == (model == "opt"))
        for key in order + extra:
            rec = rows.get(key)
            if rec is None:
                continue
            _, method, setting = parse_row(key)
            cells = [SETTING_LABEL.get((setting or "").replace("-asym", ""), "FP32")
                     + (" asym" if setting and setting.endswith("-asym") else ""),
                     method + (f" (alpha={rec['alpha']})" if rec.get("alpha") is not None
                               and method == "sqbest" else "")]
            for c in cols:
                p = ppl_of(rec, c)
                cells.append("" if p is None else f"{p:.2f}")
            cells += [f"{rec['compile_s']:.0f}", rec["run"]]
            body.append(cells)
        if body:
            lines += [f"## {title}", "", tabulate(body, headers=["setting", "method"] + [
                f"PPL ({c} win)" for c in cols] + ["compile s", "run"], tablefmt="github"), ""]
    sweeps = [r for r in records if r["kind"] == "sweep"]
    if sweeps:
        lines += ["## SmoothQuant alpha sweep (validation split, not test)", ""]
        body = [[s["setting"], s["alpha"], f"{math.exp(sum(s['nll']) / len(s['nll'])):.3f}", len(s["nll"]),
                 s["run"]] for s in sweeps]
        lines += [tabulate(body, headers=["setting", "alpha", "valid PPL", "windows", "run"],
                           tablefmt="github"), ""]
    lines += ["## Runs", ""]
    for run, r in runs.items():
        lines.append(f"- `{run}`: {r['date']}, commit `{r['commit']}`, {r['device']}  \n"
                     f"  `{r['command']}`")
    lines += ["", "<!-- records", *[json.dumps(r, sort_keys=True) for r in records], "-->", ""]
    return "\n".join(lines)


def save(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(records))
    os.replace(tmp, path)


# ---------------------------------------------------------------- main

def select_rows(spec: str) -> list[str]:
    out: list[str] = []
    for pat in spec.split(","):
        pat = pat.strip()
        if not pat:
            continue
        hits = (KEY_ROWS if pat == "key" else ALL_ROWS if pat == "all"
                else [r for r in ALL_ROWS if fnmatch.fnmatchcase(r, pat)])
        if not hits and not any(ch in pat for ch in "*?["):
            parse_row(pat)  # an explicit extra row (ablation): validate it
            hits = [pat]
        if not hits:
            raise SystemExit(f"--rows: {pat!r} matches no row; rows: {', '.join(ALL_ROWS)}")
        out += [h for h in hits if h not in out]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40, help="2048-token test windows per row")
    ap.add_argument("--rows", default="key", help="comma-separated row names or globs; 'key', 'all'")
    ap.add_argument("--sweep-windows", type=int, default=2, help="validation windows per sweep point")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with WikiText-2")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file to (re)write")
    ap.add_argument("--fresh", action="store_true", help="forget earlier records in --out")
    ap.add_argument("--skip-done", action="store_true",
                    help="skip rows already recorded with at least --windows windows")
    args = ap.parse_args(argv)
    rows = select_rows(args.rows)
    out = Path(args.out)
    records = [] if args.fresh else load_records(out)
    command = "python bench/accuracy_aweq.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_id = datetime.datetime.now().strftime("r%Y%m%d-%H%M%S")
    meta = {"run": run_id, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device(), "command": command}
    data = Path(args.data)
    print(f"# {command}\n# {meta['date']}  commit {meta['commit']}  {meta['device']}", flush=True)

    done = latest([r for r in records if r["kind"] == "eval"])
    if args.skip_done:
        rows = [r for r in rows if r not in done or len(done[r]["nll"]) < args.windows]
    benches: dict[str, Bench] = {}

    def bench_for(model_name: str) -> Bench:
        if model_name not in benches:
            model, tok = qcompile.models.load("smollm2-135m")
            if model_name == "opt":
                model = random_opt(len(tok))
                windows = min(args.windows, 8)
            else:
                windows = args.windows
            benches[model_name] = Bench(model_name, model, tok, data, windows, args.calib)
        return benches[model_name]

    def best_alpha(b: Bench, setting: str) -> float:
        key = f"{b.name}/{setting}"
        prior = [r for r in records if r["kind"] == "sweep" and r["key"] == key
                 and len(r["nll"]) >= args.sweep_windows]
        have = {r["alpha"]: r for r in prior}
        windows = b.sweep_windows(args.sweep_windows)
        for a in SWEEP_ALPHAS:
            if a in have:
                continue
            gm = b.compile([Equalize(method="smoothquant", alpha=a, sites=("norm",)),
                            QuantizeLinears(**_setting(setting))])
            nll = window_nlls(gm, windows).tolist()
            rec = {**meta, "kind": "sweep", "key": key, "setting": key, "alpha": a, "nll": nll}
            records.append(rec)
            have[a] = rec
            print(f"  sweep {key} alpha={a}: valid ppl {math.exp(sum(nll) / len(nll)):.3f}", flush=True)
            save(records, out)
        return min(SWEEP_ALPHAS, key=lambda a: sum(have[a]["nll"][:args.sweep_windows]))

    fronts: dict[str, Any] = {}  # the last compiled pipeline front: key, (gm, context), seconds
    for row in rows:
        model_name, method, setting = parse_row(row)
        b = bench_for(model_name)
        t0 = time.perf_counter()
        alpha = None
        if method == "fp32":
            gm = b.model
        else:
            if method.split("+")[0] == "sqbest":
                alpha = best_alpha(b, setting)
            passes = pipeline(method, setting, alpha)
            front, tail = split_tail(passes)
            front_key = (model_name, front_method(method), setting, alpha)
            if fronts.get("key") != front_key:
                t0 = time.perf_counter()
                fronts.update(key=front_key, state=b.compile_with_context(front),
                              seconds=time.perf_counter() - t0)
            t0 = time.perf_counter()
            gm = b.compile_with_context(tail, fronts["state"])[0] if tail else fronts["state"][0]
        # the shared front's time counts in full for every row that uses it
        compile_s = time.perf_counter() - t0 + (fronts["seconds"] if method != "fp32" else 0.0)
        t1 = time.perf_counter()
        nll = window_nlls(gm, b.test).tolist()
        rec = {**meta, "kind": "eval", "row": row, "alpha": alpha, "nll": nll,
               "compile_s": compile_s, "eval_s": time.perf_counter() - t1}
        records.append(rec)
        save(records, out)
        ppl = math.exp(sum(nll) / len(nll))
        print(f"{row:28s} ppl {ppl:8.3f} on {len(nll)} windows  (compile {compile_s:.0f}s, "
              f"eval {rec['eval_s']:.0f}s)", flush=True)
        del gm
    print()
    print(render(records).split("<!-- records")[0])


if __name__ == "__main__":
    main()
