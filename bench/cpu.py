"""CPU speed: the lowered ops (quantize + integer GEMM + epilogue) and whole models against
``F.linear`` / the HF model in bf16 and fp32, same inputs, same run.

    python bench/cpu.py                      # layers + end to end; rewrites its section of bench/RESULTS.md
    python bench/cpu.py --layers --no-write  # layer-wise table only
    python bench/cpu.py --candidates         # the kernels the CPU dispatch chooses between, per shape
    python bench/cpu.py --e2e --models smollm2 --recipes rtn-w8a8
    python bench/cpu.py --attention --no-write   # prefill attention: the native flash kernel vs SDPA

Layer-wise: K x N in 576x1536, 1536x576 (SmolLM2), 4096x4096, 4096x11008, 11008x4096 (LLaMA-7B),
M in 1, 16, 128, 2048. Each op is the registered ``torch.ops.qcompile`` op on bf16 activations
(output bf16), its weights lowered once before timing. Times are the best of interleaved
rounds (every variant once per round, in turn, so load changes hit all alike; the minimum because
other processes only add time); ratios are bf16 time / op time from the same rounds.

Attention: causal bf16 prefill attention, qcompile's native flash kernel
(``qcompile.kernels.cpu_attention``) against torch's SDPA (its bf16 CPU flash kernel) on the heads
of SmolLM2 (9 query / 3 key-value heads of 64) and LLaMA-7B (32 / 32 of 128), 512 and 2048 tokens.

End to end: SmolLM2-135M (``qcompile.models.load("smollm2-135m")``) and a random LLaMA-7B-shaped
model of a few layers: prefill tokens/s at 2048 tokens (the prompt into the KV cache, last-position
logits only, as generation's prefill) and greedy decode tokens/s
with the KV cache (``qcompile.fast_generate``), each recipe against the HF model in bf16 and fp32
(the HF rows run transformers' own SDPA attention, ``FastModel(attention="model")``; the row "HF
bf16, compiled decode" is the same float model through qcompile's runtime, attention included, so
the table separates what the runtime gives from what quantization gives).
Speed does not depend on the weights' values, so recipes that calibrate (GPTQ) are replaced by
their round-to-nearest twin with the same lowering (named ``~`` in the table).

It rewrites only the lines between its marker comments in bench/RESULTS.md (section "CPU speed").
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN = "<!-- bench/cpu.py results: begin (rewritten by each run; edit outside the markers) -->"
END = "<!-- bench/cpu.py results: end -->"
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]  # K x N
MS = [1, 16, 128, 2048]
N_OUTLIERS = 32


# ------------------------------------------------------------------------------------- timing

def interleaved(fns: dict[str, Callable[[], object]], budget_s: float = 2.0, min_rounds: int = 3,
                max_rounds: int = 25) -> dict[str, float]:
    """Seconds per call of each fn: the best (minimum) of interleaved rounds (each fn once per
    round, in turn; a call shorter than 2 ms is repeated within its slot and averaged). The minimum,
    not the median: on a shared machine the other processes only ever add time."""
    reps = {}
    for name, fn in fns.items():  # warm up (layouts, caches) and size the repeats
        fn()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        reps[name] = max(1, min(200, int(2e-3 / max(dt, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t) / reps[name])
        rounds += 1
    return {name: min(v) for name, v in times.items()}


# ------------------------------------------------------------------------------------- layers

def lowered_layer(k: int, n: int, seed: int = 0) -> dict[str, dict]:
    """One random linear lowered by each scheme's own ``quantize`` (the tensors lowering stores)."""
    import qcompile  # noqa: F401  (registers the ops)
    from qcompile.formats import OutlierHybrid, PerGroup, PerRow, W8A8, WeightInput, WeightOnly

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    out = {"w": w}
    out["w8a8"] = W8A8().quantize(WeightInput(w)).tensors
    out["w4a16"] = WeightOnly(4, PerRow(), True).quantize(WeightInput(w)).tensors
    out["w4a16-g128"] = WeightOnly(4, PerGroup(128), True).quantize(WeightInput(w)).tensors  # K = 576: last group 64
    idx = torch.arange(k - N_OUTLIERS, k)
    out["w4a4"] = OutlierHybrid(4).quantize(WeightInput(w, outlier_idx=idx)).tensors
    return out


def layer_ops(k: int, n: int, x: torch.Tensor, lay: dict) -> dict[str, Callable[[], object]]:
    ops = torch.ops.qcompile
    t8, t4, t44 = lay["w8a8"], lay["w4a16"], lay["w4a4"]
    fns = {
        "w8a8": lambda: ops.w8a8_linear(x, t8["qweight"], t8["w_scale"], None, None),
        "w4a16": lambda: ops.weight_only_linear(x, t4["qweight"], t4["scale"], None, None, 4, 0, k),
        "w4a4+32": lambda: ops.w4a4_outlier_linear(x, t44["qweight"], t44["w_scale"], t44["row_sum"],
                                                   t44["outlier_weight"], None, None, None, 4),
    }
    tg = lay["w4a16-g128"]
    fns["w4a16-g128"] = lambda: ops.weight_only_linear(x, tg["qweight"], tg["scale"], None, None, 4, 128, k)
    return fns


def bench_layers(ms: list[int], shapes: list[tuple[int, int]], budget: float, check: bool = True) -> list[dict]:
    rows = []
    for k, n in shapes:
        lay = lowered_layer(k, n)
        w32 = lay["w"]
        wb = w32.bfloat16()
        for m in ms:
            x32 = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xb = x32.bfloat16()
            fns = {"fp32": lambda: F.linear(x32, w32), "bf16": lambda: F.linear(xb, wb)}
            ops = layer_ops(k, n, xb, lay)
            if check:
                ref = F.linear(xb.float(), w32)
                for name, fn in ops.items():
                    err = ((fn().float() - ref).norm() / ref.norm()).item()
                    assert err < 0.4, f"{name} {m}x{k}x{n}: relative error {err:.3f} against the float linear"
            fns.update(ops)
            t = interleaved(fns, budget)
            row = {"M": m, "K": k, "N": n, **{f"{name} ms": v * 1e3 for name, v in t.items()}}
            for name in ops:
                row[f"{name} x bf16"] = t["bf16"] / t[name]
            row["fp32 x bf16"] = t["bf16"] / t["fp32"]
            rows.append(row)
            print(fmt_layer_row(row), flush=True)
            del fns, ops
            gc.collect()
    return rows


def fmt_layer_row(r: dict) -> str:
    names = [c[:-3] for c in r if c.endswith(" ms")]
    cells = " ".join(f"{nm}={r[nm + ' ms']:.3f}" for nm in names)
    ratios = " ".join(f"{c[:-7]}:{r[c]:.2f}x" for c in r if c.endswith(" x bf16"))
    return f"M={r['M']:5d} K={r['K']:5d} N={r['N']:5d}  {cells}  | vs bf16 {ratios}"


def layer_table(rows: list[dict]) -> str:
    names = ["w8a8", "w4a16", "w4a16-g128", "w4a4+32"]
    head = "| M | K x N | fp32 ms | bf16 ms | " + " | ".join(f"{n} ms (x bf16)" for n in names) + " |"
    lines = [head, "|" + "---|" * (4 + len(names))]
    for r in rows:
        cells = []
        for nm in names:
            cells.append(f"{r[nm + ' ms']:.3f} (**{r[nm + ' x bf16']:.2f}x**)" if nm + " ms" in r else "-")
        lines.append(f"| {r['M']} | {r['K']}x{r['N']} | {r['fp32 ms']:.3f} | {r['bf16 ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- candidates

def bench_candidates(ms: list[int], shapes: list[tuple[int, int]], budget: float) -> list[str]:
    """The kernels the CPU dispatch picks between, alone (no quantization, no epilogue)."""
    from qcompile.formats.cpu_layout import gemv_layout, int4pack_layout, int8_colsum
    from qcompile.kernels import cpu_linear, cpu_native, cpu_ops

    nat = cpu_native.lib()
    lines = []
    for k, n in shapes:
        lay = lowered_layer(k, n)
        wb = lay["w"].bfloat16()
        qw = lay["w8a8"]["qweight"]
        colsum = int8_colsum(qw)
        qwt = qw.t().contiguous()
        t4 = lay["w4a16"]
        packed = int4pack_layout(t4["qweight"], t4["scale"], None, 4, 0, k, torch.bfloat16)
        sc8 = lay["w8a8"]["w_scale"].bfloat16()
        gemv4 = gemv_layout(t4["qweight"], t4["scale"], None, None, 4, 0, k) if cpu_ops.available() else None
        gemv8 = gemv_layout(qw, lay["w8a8"]["w_scale"], None, None, 8, 0, k) if cpu_ops.available() else None
        for m in ms:
            xb = torch.randn(m, k).bfloat16()
            qa = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            qa_u = (qa.to(torch.int16) + 128).to(torch.uint8)
            acc = torch.empty(m, n, dtype=torch.int32)
            fns = {
                "bf16 F.linear": lambda: F.linear(xb, wb),
                "_int_mm(t view)": lambda: torch._int_mm(qa, qw.t()),
                "_int_mm([K,N])": lambda: torch._int_mm(qa, qwt),
                "int8pack_mm": lambda: torch._weight_int8pack_mm(xb, qw, sc8),
                "dequant4 alone": lambda: cpu_linear._dequantized(t4["qweight"], t4["scale"], None, 4, 0, k,
                                                                      torch.bfloat16, nat) if nat else None,
            }
            if nat is not None and cpu_native.has_vnni():
                fns["vnni gemv"] = lambda: nat.qc_gemv_u8s8(qa_u.data_ptr(), k, qw.data_ptr(), k, colsum.data_ptr(),
                                                            acc.data_ptr(), n, m, n, k, torch.get_num_threads())
            if gemv4 is not None:
                fns["wo_gemv w4"] = lambda: cpu_ops.wo_gemv(xb, gemv4)
                fns["wo_gemv w8"] = lambda: cpu_ops.wo_gemv(xb, gemv8)
            if packed is not None:
                fns["int4pack_mm"] = lambda: torch._weight_int4pack_mm_for_cpu(xb, packed[0], packed[2], packed[1])
            try:
                wp = torch.ops.onednn.qlinear_prepack(qw, [m, k])
                one = torch.ones(n)
                zero = torch.zeros(n, dtype=torch.long)
                fns["onednn qlinear u8"] = lambda: torch.ops.onednn.qlinear_pointwise(
                    qa_u, 1.0, 128, wp, one, zero, None, 1.0, 0, torch.float32, "none", [], "")
            except (RuntimeError, AttributeError) as err:
                print(f"onednn qlinear unavailable: {str(err)[:120]}")
            t = interleaved(fns, budget)
            line = f"M={m:5d} K={k:5d} N={n:5d}  " + "  ".join(
                f"{nm}={v * 1e3:.3f}ms({t['bf16 F.linear'] / v:.2f}x)" for nm, v in t.items())
            print(line, flush=True)
            lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------ torchao

TORCHAO_VERSION = "0.18.0"
_TORCHAO_SCRIPT = r"""
import importlib.util, json, sys, warnings
warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F
spec = importlib.util.spec_from_file_location("bench_cpu", sys.argv[1])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
import torchao
from torchao.quantization import quantize_, Int8DynamicActivationInt8WeightConfig
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
ms = json.loads(sys.argv[2]); shapes = json.loads(sys.argv[3]); budget = float(sys.argv[4])
rows = []
for k, n in shapes:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k ** 0.5
    lin = {}
    for name, cfg in (("torchao int8-dyn", Int8DynamicActivationInt8WeightConfig()),
                      ("torchao int4 g128", PrototypeInt4WeightOnlyConfig(group_size=128))):
        if "int4" in name and k % 128:
            continue
        m_ = torch.nn.Linear(k, n, bias=False).bfloat16()
        m_.weight.data.copy_(w)
        quantize_(m_, cfg)
        lin[name] = m_
    wb = w.bfloat16()
    for m in ms:
        xb = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        fns = {"bf16": lambda: F.linear(xb, wb)}
        for name, mod in lin.items():
            fns[name] = lambda mod=mod: mod(xb)
        with torch.inference_mode():
            t = bench.interleaved(fns, budget)
        rows.append({"M": m, "K": k, "N": n, "torchao": torchao.__version__,
                     **{f"{nm} x bf16": t["bf16"] / v for nm, v in t.items() if nm != "bf16"},
                     **{f"{nm} ms": v * 1e3 for nm, v in t.items()}})
        print(json.dumps(rows[-1]), flush=True)
print("RESULT " + json.dumps(rows))
"""


def torchao_python() -> tuple[str | None, str]:
    """A venv with torchao (``TORCHAO_VERSION``, a 3 MB wheel, installed ``--no-deps``) that reuses
    this environment's torch through a .pth file: no second torch download. (python, note)."""
    import venv
    base = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")) / f"torchao-{TORCHAO_VERSION}-venv"
    py = base / "bin" / "python"
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(base)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        here = [p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()]
        if not here:
            return None, "torch's site-packages not found"
        Path(site, "qcompile_main_env.pth").write_text(here[0] + "\n")
        res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", f"torchao=={TORCHAO_VERSION}"],
                             capture_output=True, text=True)
        if res.returncode:
            return None, f"pip install torchao failed: {res.stderr[-300:]}"
    return str(py), f"torchao {TORCHAO_VERSION} in {base} (its own venv; this environment's torch via a .pth file)"


def bench_torchao(ms: list[int], shapes: list[tuple[int, int]], budget: float) -> tuple[list[dict], str]:
    import json
    py, note = torchao_python()
    if py is None:
        return [], f"torchao skipped: {note}"
    res = subprocess.run([py, "-c", _TORCHAO_SCRIPT, str(Path(__file__).resolve()), json.dumps(ms),
                          json.dumps([list(s) for s in shapes]), str(budget)], capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        return [], f"torchao run failed: {res.stderr[-500:]}"
    return json.loads(lines[-1][7:]), note


def torchao_table(rows: list[dict]) -> str:
    names = ["torchao int8-dyn", "torchao int4 g128"]
    lines = ["| M | K x N | bf16 ms | " + " | ".join(f"{n} ms (x bf16)" for n in names) + " |",
             "|" + "---|" * (3 + len(names))]
    for r in rows:
        cells = [f"{r[n + ' ms']:.3f} (**{r[n + ' x bf16']:.2f}x**)" if n + " ms" in r else "-" for n in names]
        lines.append(f"| {r['M']} | {r['K']}x{r['N']} | {r['bf16 ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- end to end

E2E_RECIPES = {  # name in the table -> passes (speed twins of the built-in recipes, no calibration search)
    "rtn-w8a8": "rtn-w8a8",
    "rtn-w4a16": "rtn-w4a16",
    "rtn-w4a16-g128": "rtn-w4a16-g128",
    # the SmolLM2 GGUF llama.cpp runs has 4-bit linears and an 8-bit (Q8_0) output projection
    "rtn-w4a16 + W8 lm_head": [{"pass": "quantize_linears", "w_bits": 4, "a_bits": None, "ignore": [],
                                "overrides": {"re:(.*\\.)?lm_head": {"w_bits": 8}}}],
    "~quik-w4a4 (RTN)": [{"pass": "activation_stats"}, {"pass": "select_outliers", "k": 32},
                         {"pass": "reorder_outliers"},
                         {"pass": "quantize_linears", "w_bits": 4, "a_bits": 4, "outliers": True,
                          "overrides": {"re:.*down_proj": {"w_bits": 8, "a_bits": 8}}}],
}


ATTENTION_SHAPES = [("SmolLM2", 9, 3, 64), ("LLaMA-7B", 32, 32, 128)]  # name, query heads, kv heads, head size
ATTENTION_LENGTHS = [512, 2048]


def bench_attention(budget: float) -> str:
    """Causal bf16 prefill attention: SDPA vs the native flash kernel, interleaved, plus the
    largest difference between them (both against float32 attention of the same inputs)."""
    from qcompile.kernels import cpu_attention as ca

    if not ca.available():
        return "(the native AVX-512 BF16 attention kernel is not built on this machine)"
    lines = ["| heads (q / kv x size) | tokens | SDPA bf16 ms | qcompile flash ms | x SDPA | max abs error vs fp32: SDPA / ours |",
             "|---|---|---|---|---|---|"]
    for name, h, hkv, d in ATTENTION_SHAPES:
        for length in ATTENTION_LENGTHS:
            g = torch.Generator().manual_seed(length)
            q = torch.randn(1, length, h, d, generator=g).bfloat16().transpose(1, 2)  # as transformers passes it
            k, v = (torch.randn(1, hkv, length, d, generator=g).bfloat16() for _ in range(2))
            scale = d ** -0.5
            fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
                   "flash": lambda: ca.flash_attention(q, k, v, scale, True)}
            t = interleaved(fns, budget)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                                                 enable_gqa=True)
            err_sdpa = (fns["sdpa"]().float() - ref).abs().max().item()
            err_ours = (fns["flash"]().float() - ref.transpose(1, 2)).abs().max().item()
            lines.append(f"| {name} ({h} / {hkv} x {d}) | {length} | {t['sdpa'] * 1e3:.2f} | {t['flash'] * 1e3:.2f} | "
                         f"{t['sdpa'] / t['flash']:.2f} | {err_sdpa:.4f} / {err_ours:.4f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def llama7b_shaped(layers: int, seed: int = 0):
    """LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) with ``layers`` layers and
    random weights; the embedding is tied to lm_head (7B's are separate: same compute, 0.5 GB less
    float32 memory on a shared 23 GB machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).eval()
    return model


def e2e_models(which: list[str], layers: int):
    for name in which:
        if name == "smollm2":
            import qcompile
            model, _ = qcompile.models.load("smollm2-135m")
            yield "SmolLM2-135M", model.eval()
        elif name == "llama7b":
            yield f"LLaMA-7B-shaped, {layers} layers (tied lm_head)", llama7b_shaped(layers)


def _quantized(model, recipe, vocab: int):
    import qcompile
    from qcompile.eager import apply_to_eager
    from qcompile.recipes import get as get_recipe

    passes = get_recipe(recipe).passes() if isinstance(recipe, str) else recipe
    calib = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    gm = qcompile.compile(model, passes=passes, calibration=calib, example_inputs=None, verify=False)
    return apply_to_eager(gm, model)


def bench_e2e(which: list[str], recipes: list[str], layers: int, prefill_len: int, decode_tokens: int,
              compile_decode: bool, rounds: int = 3) -> list[dict]:
    """Every variant of a model is built first (the HF float32 model, its bf16 copy, each recipe's
    eager twin), warmed up (compiling the decode step where asked), then timed in interleaved rounds:
    each round times one prefill and one decode run of every variant, in turn; the best round counts.
    So a change of load on a shared machine hits every variant alike."""
    from qcompile import fast_generate as fg

    rows = []
    for label, model in e2e_models(which, layers):
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, prefill_len), generator=torch.Generator().manual_seed(1))
        short = prompt[:, :16]
        # float32 first and alone (the largest copy; freed before the interleaved rounds)
        fp32 = fg.FastModel(model, dtype=torch.float32, compile_decode=False, attention="model")
        fp32_best = (fg.time_prefill(fp32, prompt, repeats=2), fg.time_decode(fp32, short, decode_tokens, repeats=2))
        print(f"{label} / HF fp32 (alone): prefill {prefill_len / fp32_best[0]:.1f} tok/s, decode "
              f"{fp32_best[1]:.1f} tok/s", flush=True)
        del fp32
        bf16 = fg.cast_float_parts(copy.deepcopy(model), torch.bfloat16)
        runners = [("HF bf16", fg.FastModel(bf16, dtype=torch.bfloat16, compile_decode=False, attention="model"))]
        if compile_decode:  # the same bf16 model through qcompile's runtime: its attention, the compiled decode loop
            runners.append(("HF bf16, compiled decode", fg.FastModel(copy.deepcopy(bf16), dtype=torch.bfloat16,
                                                                     compile_decode=True)))
        for r in recipes:
            q = _quantized(model, E2E_RECIPES[r], vocab)
            runners.append((r, fg.FastModel(q, dtype=torch.bfloat16, compile_decode=compile_decode)))
            del q
            gc.collect()
        del model
        gc.collect()
        for name, runner in runners:  # warm-up: layouts, oneDNN primitives, the compiled decode step
            t0 = time.perf_counter()
            runner.prefill(prompt)
            runner.generate(short, decode_tokens, min_new_tokens=decode_tokens)
            print(f"{label} / {name}: warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
        best: dict[str, list[float]] = {name: [float("inf"), 0.0] for name, _ in runners}
        for _ in range(rounds):
            for name, runner in runners:
                best[name][0] = min(best[name][0], fg.time_prefill(runner, prompt, repeats=1, warmup=False))
                best[name][1] = max(best[name][1], fg.time_decode(runner, short, decode_tokens, repeats=1,
                                                                  warmup=False))
        base = best["HF bf16"]
        rows.append({"model": label, "variant": "HF fp32 (timed alone, before the rounds)", "dtype": "float32",
                     "decode": "dynamic cache, eager", "prefill tok/s": prefill_len / fp32_best[0],
                     "decode tok/s": fp32_best[1], "prefill x bf16": base[0] / fp32_best[0],
                     "decode x bf16": fp32_best[1] / base[1]})
        for name, runner in runners:
            prefill, decode = best[name]
            rows.append({"model": label, "variant": name, "dtype": str(runner.dtype).replace("torch.", ""),
                         "decode": "static cache, compiled step" if runner.compile_decode is True
                         else "dynamic cache, eager",
                         "prefill tok/s": prefill_len / prefill, "decode tok/s": decode,
                         "prefill x bf16": base[0] / prefill, "decode x bf16": decode / base[1]})
            print(rows[-1], flush=True)
        del runners, bf16
        gc.collect()
    return rows


LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # GGUF weight types timed (Q4_1: the shipped file itself)
_LLAMA_CPP_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import llama_cpp
gguf, cache, prefill_len, decode_tokens, threads, types, no_repack = sys.argv[1:8]
prefill_len, decode_tokens, threads = int(prefill_len), int(decode_tokens), int(threads)
if no_repack == "1":
    # on CPUs with AMX, llama.cpp's extra buffer types repack weights for the tiles, and that path
    # crashes in this build on prompts of 16 tokens or more: plain CPU buffers, as issue 17 ran it
    import llama_cpp.llama_cpp as _lib
    _default_params = _lib.llama_model_default_params

    def _plain_buffers():
        params = _default_params()
        params.use_extra_bufts = False
        return params

    _lib.llama_model_default_params = _plain_buffers
rows = []
for name in types.split(","):
    path = Path(cache) / f"smollm2-135m-{name}.gguf"
    if name == "Q4_1":
        path = Path(gguf)
    elif not path.exists():
        # speed does not depend on the values: requantizing the shipped Q4_1 file gives Q8_0 / Q4_0
        # tensors of the same layout and cost as a conversion from float would
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.allow_requantize = True
        params.nthread = threads
        tmp = path.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(gguf.encode(), str(tmp).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize to {name} failed")
        tmp.rename(path)
    llm = llama_cpp.Llama(str(path), n_ctx=prefill_len + decode_tokens + 32, n_threads=threads,
                          n_threads_batch=threads, n_batch=prefill_len, n_ubatch=512, verbose=False)
    gen = __import__("random").Random(1)
    prompt = [gen.randrange(100, 1000) for _ in range(prefill_len)]
    best_p, best_d = float("inf"), float("inf")
    for _ in range(4):  # the first round warms up; the best of the rest counts
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_p = min(best_p, time.perf_counter() - t0)
        llm.reset()
        llm.eval(prompt[:16])
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        best_d = min(best_d, time.perf_counter() - t0)
    rows.append({"type": name, "prefill tok/s": prefill_len / best_p, "decode tok/s": decode_tokens / best_d})
    print(json.dumps(rows[-1]), flush=True)
    del llm
print("RESULT " + json.dumps({"version": llama_cpp.__version__, "rows": rows}))
"""


def llama_cpp_python() -> tuple[str | None, str]:
    """A venv with llama-cpp-python (``LLAMA_CPP_VERSION``, built from source by pip: about 10
    minutes on 2 cores the first time), made under the qcompile cache. (python, note)."""
    import venv
    base = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")) / f"llama-cpp-python-{LLAMA_CPP_VERSION}-venv"
    py = base / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        if not py.exists():
            venv.EnvBuilder(with_pip=True).create(base)
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} into {base} (minutes)", flush=True)
        res = subprocess.run([str(py), "-m", "pip", "install", "-q", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                             capture_output=True, text=True)
        if res.returncode:
            return None, f"pip install llama-cpp-python failed: {res.stderr[-300:]}"
    return str(py), f"llama-cpp-python {LLAMA_CPP_VERSION} in {base} (its own venv, built here with its default native flags)"


def bench_llama_cpp(prefill_len: int, decode_tokens: int) -> tuple[list[dict], str]:
    """llama.cpp on SmolLM2's GGUF (the shipped Q4_1 file, and Q8_0 / Q4_0 requantized from it),
    in its own process and venv, with torch's thread count; best of 3 rounds after a warm-up."""
    import json
    from qcompile.kernels import cpu_native
    from qcompile.models import builtin_gguf_path, cache_dir
    py, note = llama_cpp_python()
    if py is None:
        return [], f"llama.cpp not run: {note}"
    threads = torch.get_num_threads()
    res = subprocess.run([py, "-c", _LLAMA_CPP_SCRIPT, str(builtin_gguf_path("smollm2-135m")), str(cache_dir()),
                          str(prefill_len), str(decode_tokens), str(threads), ",".join(LLAMA_CPP_TYPES),
                          "1" if cpu_native.has_amx() else "0"],
                         capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        return [], f"llama.cpp run failed: {res.stderr[-500:]}"
    out = json.loads(lines[-1][7:])
    rows = [{"model": "SmolLM2-135M", "variant": f"llama.cpp {out['version']} GGUF {r['type']}",
             "dtype": r["type"].lower(), "decode": "llama.cpp", "prefill tok/s": r["prefill tok/s"],
             "decode tok/s": r["decode tok/s"]} for r in out["rows"]]
    repack = "; AMX CPU: use_extra_bufts = False (its AMX weight repacking crashes here)" if cpu_native.has_amx() else ""
    return rows, (f"{note}; {threads} threads, n_batch {prefill_len}, n_ubatch 512{repack}; timed right after the "
                  "rounds above, so not interleaved with them")


def e2e_table(rows: list[dict]) -> str:
    lines = ["| model | variant | decode loop | prefill tok/s (2048) | x bf16 HF | greedy decode tok/s | x bf16 HF |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} ({r['dtype']}) | {r['decode']} | {r['prefill tok/s']:.0f} | "
                     f"{r.get('prefill x bf16', float('nan')):.2f} | {r['decode tok/s']:.1f} | "
                     f"{r.get('decode x bf16', float('nan')):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- report

def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    keep = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "f16c")]
    load = os.getloadavg()
    return (f"CPU: {info.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}; flags: {' '.join(keep)}; "
            f"AMX: {'yes' if any(f.startswith('amx') for f in flags) else 'no'}; load average at start "
            f"{load[0]:.2f}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def write_results(body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{body.strip()}\n{END}"
    nb, ne = text.count(BEGIN), text.count(END)
    if nb == ne == 0:
        new = text + ("" if text.endswith("\n") else "\n") + "\n## CPU speed\n\n" + section + "\n"
    elif nb == 1 and ne == 1 and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        new = head + section + rest.split(END, 1)[1]
    else:
        raise ValueError("bench/RESULTS.md: the bench/cpu.py markers are damaged; fix them by hand")
    tmp = path.with_name(f".{path.name}.cpu.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", action="store_true", help="layer-wise table")
    ap.add_argument("--e2e", action="store_true", help="end-to-end table")
    ap.add_argument("--candidates", action="store_true", help="the dispatch's candidate kernels alone")
    ap.add_argument("--attention", action="store_true", help="prefill attention: native flash kernel vs SDPA")
    ap.add_argument("--torchao", action="store_true", help="torchao's CPU int8-dynamic and int4 weight-only "
                    "linears on the same shapes (installs torchao into its own venv, reusing this torch)")
    ap.add_argument("--m", type=int, nargs="+", default=MS)
    ap.add_argument("--kn", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES])
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved rounds per row")
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama7b"], choices=["smollm2", "llama7b"])
    ap.add_argument("--recipes", nargs="+", default=list(E2E_RECIPES), choices=list(E2E_RECIPES))
    ap.add_argument("--llama-layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="decode without torch.compile")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch threads for the layer-wise and torchao tables (one table each)")
    ap.add_argument("--e2e-threads", type=int, help="torch threads end to end (default: the first of --threads)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not (args.layers or args.e2e or args.candidates or args.torchao or args.attention):
        args.layers = args.e2e = args.torchao = args.attention = True
    import qcompile  # noqa: F401
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.kn]
    header = machine()
    print(header, flush=True)
    parts = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        if args.candidates:
            lines = bench_candidates(args.m, shapes, args.budget)
            parts.append(f"Candidate kernels alone, {threads} thread(s) (ms, x bf16 F.linear):\n\n```\n"
                         + "\n".join(lines) + "\n```")
        if args.layers:
            rows = bench_layers(args.m, shapes, args.budget)
            parts.append(f"Layer-wise, **{threads} thread(s)**, bf16 activations in and out, quantization and "
                         "epilogue included (ratio = bf16 F.linear time / op time, same rounds; load average "
                         f"{os.getloadavg()[0]:.1f} at the end):\n\n" + layer_table(rows))
        if args.torchao:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            rows, note = bench_torchao(args.m, shapes, args.budget)
            parts.append(f"Peer, same shapes, {threads} thread(s) ({note}; ratio = bf16 F.linear / torchao linear, "
                         "same process, run right after the table above):\n\n"
                         + (torchao_table(rows) if rows else "(no rows)"))
    torch.set_num_threads(args.e2e_threads or args.threads[0])
    if args.attention:
        parts.append(f"Prefill attention, causal, bf16, **{torch.get_num_threads()} thread(s)** (best of interleaved "
                     "rounds; the kernel's output is [B, L, H, D], the layout transformers wants, SDPA's a "
                     "transposed view of it):\n\n" + bench_attention(args.budget))
    if args.e2e:
        rows = bench_e2e(args.models, args.recipes, args.llama_layers, args.prefill, args.decode_tokens,
                         not args.no_compile)
        if "smollm2" in args.models:
            lrows, lnote = bench_llama_cpp(args.prefill, args.decode_tokens)
            base = next((r for r in rows if r["model"] == "SmolLM2-135M" and r["variant"] == "HF bf16"), None)
            for r in lrows:
                if base:
                    r["prefill x bf16"] = r["prefill tok/s"] / base["prefill tok/s"]
                    r["decode x bf16"] = r["decode tok/s"] / base["decode tok/s"]
            rows += lrows
        parts.append(f"End to end, **{torch.get_num_threads()} thread(s)** (load average {os.getloadavg()[0]:.1f} at "
                     "the end; prefill: 2048 prompt tokens into the KV cache, last-position logits, as "
                     "generation's prefill; decode: greedy, tokens/s of the decode steps after a 16-token prompt):"
                     "\n\n" + e2e_table(rows))
        if "smollm2" in args.models:
            parts.append(f"llama.cpp: {lnote}.")
    cmd = "python bench/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = (f"{header}\n\nDate {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d (%H:%M} UTC), commit "
            f"{git_commit()}, command `{cmd.strip()}`.\n\n" + "\n\n".join(parts))
    print("\n" + body)
    if not args.no_write and (args.layers or args.e2e or args.torchao or args.attention):
        write_results(body)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
