"""Kernel benchmark: each qcompile kernel and each whole quantized linear (quantize + GEMM +
epilogue) against bf16 ``torch.nn.functional.linear`` on the same inputs, plus ``torch._int_mm``
and ``torch._scaled_mm`` (fp8, row-wise scales), on LLaMA-7B/70B layer shapes.

    python bench/kernels.py                    # all shapes, updates its section of bench/RESULTS.md
    python bench/kernels.py --m 1 16 --kn 4096x4096 --no-write
    python bench/kernels.py --e2e              # + LLaMA-7B-shaped model, each recipe vs bf16
    TRITON_INTERPRET=1 python bench/kernels.py --smoke [--e2e]   # CPU: every code path, tiny shapes

Times are ``triton.testing.do_bench`` medians (it flushes L2 before every run). Each row is
checked against its pure-torch reference before it is timed. TOPS counts 2*M*N*K operations;
bandwidth counts the fewest bytes the op must move (activations read once, weights read once,
output written once); peaks are measured on the device (a large copy, a large bf16 and int8 GEMM).
Without CUDA (and without --smoke) it says it needs a GPU and exits 0.

On a GPU it rewrites only its own section of bench/RESULTS.md, the lines between the
``RESULTS_BEGIN`` and ``RESULTS_END`` marker comments; everything else in that file (how to
run, targets, the memory and fuzzing sections) is left byte for byte as it was.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # K x N
MS = [1, 16, 128, 512, 2048, 4096]
RESULTS = ROOT / "bench" / "RESULTS.md"
RESULTS_BEGIN = "<!-- bench/kernels.py results: begin (rewritten by each GPU run; edit outside the markers) -->"
RESULTS_END = "<!-- bench/kernels.py results: end -->"


def replace_section(text: str, body: str) -> str:
    """``text`` with the lines between the RESULTS_BEGIN / RESULTS_END markers replaced by ``body``.

    Everything outside the markers is kept as it was. A file without the markers gets the marked
    section appended at its end; markers that are not exactly one begin followed by one end are
    an error (nothing is guessed, nothing is written).
    """
    nb, ne = text.count(RESULTS_BEGIN), text.count(RESULTS_END)
    section = f"{RESULTS_BEGIN}\n{body.strip()}\n{RESULTS_END}"
    if nb == ne == 0:
        sep = "" if not text else "\n" if text.endswith("\n") else "\n\n"
        return text + sep + section + "\n"
    if nb != 1 or ne != 1 or text.index(RESULTS_BEGIN) > text.index(RESULTS_END):
        raise ValueError(f"bench/RESULTS.md: expected one {RESULTS_BEGIN!r} line before one {RESULTS_END!r} "
                         f"line, found {nb} and {ne}; fix the markers by hand")
    head, rest = text.split(RESULTS_BEGIN, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    return head + section + tail


def write_results(body: str, path: Path = RESULTS) -> None:
    """Replace this script's section of ``path`` (see ``replace_section``), atomically."""
    text = path.read_text() if path.exists() else ""
    new = replace_section(text, body)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def timer(device: str):
    """Median milliseconds of fn(): do_bench on CUDA, a few wall-clock runs in --smoke mode."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return wall


def measure_peaks(device: str, bench) -> dict[str, float]:
    """Measured ceilings: copy bandwidth (read + write), bf16 and int8 GEMM rates."""
    if device != "cuda":
        return {"GB/s": float("nan"), "bf16 TFLOPS": float("nan"), "int8 TOPS": float("nan")}
    n = 1 << 28  # 512 MiB of bf16
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    gbs = 2 * a.numel() * 2 / bench(lambda: b.copy_(a)) / 1e6
    del a, b
    s = 8192
    x = torch.randn(s, s, dtype=torch.bfloat16, device=device)
    tf = 2 * s ** 3 / bench(lambda: x @ x) / 1e9
    xi = torch.randint(-127, 128, (s, s), dtype=torch.int8, device=device)
    xt = xi.t().contiguous().t()
    ti = 2 * s ** 3 / bench(lambda: torch._int_mm(xi, xt)) / 1e9
    return {"GB/s": gbs, "bf16 TFLOPS": tf, "int8 TOPS": ti}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


WO_SCHEMES = [(4, 128, "W4A16 g128"), (4, 0, "W4A16 per-row"), (8, 0, "W8A16 per-row")]


def weights(k: int, n: int, device: str) -> dict:
    """One layer's weights in every stored format (quantized once per shape, as lowering does)."""
    from qcompile.formats import PerGroup, PerRow, quantize_weight
    from qcompile.kernels.weight_only_gemm import pack_weight

    g = torch.Generator(device="cpu").manual_seed(k + n)
    w = torch.randn(n, k, generator=g) * 0.02
    q8 = quantize_weight(w, 8, PerRow())
    out = {"w": w, "wb": w.to(torch.bfloat16).to(device), "qw": q8.q.to(device),
           "sw": q8.scale.reshape(n).float().to(device)}
    for bits, gs, label in WO_SCHEMES:
        qwo = quantize_weight(w, bits, PerGroup(gs) if gs else PerRow())
        out[label] = (pack_weight(qwo.q, bits).to(device), qwo.scale.float().to(device))
    try:  # QUIK: symmetric per-row int4 on the first K - 256 columns, the last 256 in fp16
        from qcompile.kernels.w4a4_outlier_gemm import outlier_row_sum, w4a4_outlier_linear_triton  # noqa: F401
        k_out = min(256, k // 16)
        q4 = quantize_weight(w[:, :k - k_out], 4, PerRow())
        s4 = q4.scale.reshape(n).float()
        out["quik"] = (pack_weight(q4.q, 4).to(device), s4.to(device), outlier_row_sum(q4.q, s4).to(device),
                       w[:, k - k_out:].half().to(device))
    except ImportError:
        pass
    return out


def cases(m: int, k: int, n: int, device: str, wts: dict):
    """(name, fn, reference output or None, bytes moved, tolerance) for one shape."""
    from qcompile.kernels.quantize_activations import quantize_activations_reference, quantize_activations_triton
    from qcompile.kernels.w8a8_gemm import int8_gemm_triton, w8a8_linear_reference, w8a8_linear_triton
    from qcompile.kernels.weight_only_gemm import weight_only_linear_reference, weight_only_linear_triton

    g = torch.Generator(device="cpu").manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    w, wb = wts["w"], wts["wb"]
    y_bf16 = F.linear(x, wb)
    out = []
    out.append(("bf16 F.linear", lambda: F.linear(x, wb), None, 2 * (m * k + n * k + m * n), None))

    # W8A8: per-row int8 weights, per-token int8 activations
    qw, sw = wts["qw"], wts["sw"]
    w8_ref = w8a8_linear_reference(x, qw, sw)
    out.append(("quantize act int8 (triton)", lambda: quantize_activations_triton(x, 8), None,
                2 * m * k + m * k + 4 * m, None))
    qx, sx, _, _ = quantize_activations_triton(x, 8)
    qx_ref, sx_ref, _, _ = quantize_activations_reference(x, 8)
    assert torch.equal(qx, qx_ref) and torch.equal(sx, sx_ref), "activation quantization is not bit-exact"
    out.append(("W8A8 GEMM+epilogue (triton)", lambda: int8_gemm_triton(qx, qw, sx, sw, None, torch.bfloat16),
                w8_ref, m * k + n * k + 4 * (m + n) + 2 * m * n, 1e-2))
    out.append(("W8A8 linear, quantize incl. (triton)", lambda: w8a8_linear_triton(x, qw, sw), w8_ref,
                2 * m * k + n * k + 4 * n + 2 * m * n, 1e-2))
    if device == "cuda":
        qwt = qw.t()  # column-major [K, N] for _int_mm / _scaled_mm
        if m > 16:
            out.append(("torch._int_mm (GEMM only, int32 out)", lambda: torch._int_mm(qx, qwt), None,
                        m * k + n * k + 4 * m * n, None))
        else:
            out.append(("torch._int_mm (GEMM only, int32 out)", None, "needs M > 16", 0, None))
        try:
            f8 = torch.float8_e4m3fn
            sa = (x.float().abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)
            xa = (x.float() / sa).to(f8)
            sb = (w.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12).to(device)
            wf8t = (w.to(device) / sb).to(f8).t()
            sbt = sb.reshape(1, n).contiguous()

            def scaled_mm():
                return torch._scaled_mm(xa, wf8t, scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16)
            scaled_mm()
            out.append(("torch._scaled_mm fp8 rowwise (GEMM only)", scaled_mm, y_bf16,
                        m * k + n * k + 4 * (m + n) + 2 * m * n, 5e-2))
        except Exception as err:  # noqa: BLE001
            why = f"n/a: {str(err).splitlines()[0][:60]}"
            out.append(("torch._scaled_mm fp8 rowwise (GEMM only)", None, why, 0, None))

    # weight-only W4 (per row and g128), W8 per row
    for bits, gs, label in WO_SCHEMES:
        stored, scale = wts[label]
        ref = weight_only_linear_reference(x, stored, scale, None, None, bits, gs, k)
        wbytes = stored.numel() + 4 * scale.numel()
        out.append((f"{label} linear (triton)",
                    lambda s=stored, sc=scale, b=bits, g_=gs: weight_only_linear_triton(x, s, sc, None, None, b, g_, k),
                    ref, 2 * m * k + wbytes + 2 * m * n, 1e-2))

    # W4A4 + 256 fp16 outlier columns (QUIK layout: the outliers are the last 256 input columns)
    quik = wts.get("quik")
    if quik is None:
        out.append(("W4A4 + 256 outliers linear (triton)", None, "kernel not available", 0, None))
    else:
        from qcompile.kernels.w4a4_outlier_gemm import w4a4_outlier_linear_reference, w4a4_outlier_linear_triton
        qw4, s4, rs4, wout = quik
        ref = w4a4_outlier_linear_reference(x, qw4, s4, rs4, wout)
        k_out = wout.shape[1]
        out.append(("W4A4 + 256 outliers linear, quantize incl. (triton)",
                    lambda: w4a4_outlier_linear_triton(x, qw4, s4, rs4, wout), ref,
                    2 * m * k + qw4.numel() + 2 * n * k_out + 8 * n + 2 * m * n, 2e-2))
    return out, y_bf16


E2E_RECIPES = ["rtn-w8a8", "rtn-w4a16-g128", "rtn-w4a16", "quik-w4a4"]


def end_to_end(args, device: str, bench) -> list[list]:
    """A LLaMA-7B-shaped model (random weights, ``--layers`` decoder layers), traced and compiled in
    bf16 with each recipe; prefill (1 x 2048 tokens) and decode-shaped (1 x 16 tokens, M = 16 in
    every linear; the traced graph has no KV cache) forward passes vs the same graph unquantized."""
    import qcompile
    from qcompile import recipes
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        prefill, decode = 64, 16
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=32,
                          max_position_embeddings=4096)
        prefill, decode = 2048, 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    calib = torch.randint(0, cfg.vocab_size, (4, 128))
    ids = {"prefill": torch.randint(0, cfg.vocab_size, (1, prefill), device=device),
           "decode": torch.randint(0, cfg.vocab_size, (1, decode), device=device)}
    rows, base = [], {}
    for recipe in ["bf16 (no quantization)"] + (args.recipes or E2E_RECIPES):
        try:
            passes = [] if recipe.startswith("bf16") else recipes.get(recipe).passes()
            t0 = time.perf_counter()
            gm = qcompile.compile(model, passes=passes, calibration=calib).to(device)
            compile_s = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - one recipe failing must not end the run
            rows.append([recipe, "", "", "", "", f"compile failed: {str(err).splitlines()[0][:80]}"])
            continue
        cells = [recipe]
        with torch.no_grad():
            ref = None
            for phase in ("prefill", "decode"):
                ms_ = bench(lambda: gm(ids[phase]))
                base.setdefault(phase, ms_)
                cells += [f"{ms_:.2f}", f"{base[phase] / ms_:.2f}x"]
                if phase == "prefill":
                    ref = gm(ids[phase])
        cells.append(f"compiled in {compile_s:.0f}s; logits finite: {bool(torch.isfinite(ref).all())}")
        rows.append(cells)
        del gm
    return rows


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("bench/kernels.py needs a CUDA GPU (run with --smoke under TRITON_INTERPRET=1 to check "
              "the code paths on the CPU); nothing measured.")
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.kn] if args.kn else SHAPES
    ms = args.m or MS
    if args.smoke:
        shapes, ms = [(96, 80)], [1, 33]
    bench = timer(device)
    peaks = measure_peaks(device, bench)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run, Triton interpreter)"
    rows = []
    for k, n in shapes:
        wts = weights(k, n, device)
        for m in ms:
            entries, _ = cases(m, k, n, device, wts)
            base_ms = None
            for name, fn, ref, nbytes, tol in entries:
                if fn is None:
                    rows.append([f"{k}x{n}", m, name, "", "", "", "", "", ref])
                    continue
                note = ""
                if isinstance(ref, torch.Tensor):
                    err = rel_err(fn(), ref)
                    note = f"err {err:.1e}" + ("" if err <= tol else " FAIL")
                ms_ = bench(fn)
                if base_ms is None:
                    base_ms = ms_
                ops_ = 2 * m * n * k if "quantize act" not in name else 0
                tops = ops_ / ms_ / 1e9 if ops_ else float("nan")
                gbs = nbytes / ms_ / 1e6
                rows.append([f"{k}x{n}", m, name, f"{ms_ * 1e3:.1f}", f"{base_ms / ms_:.2f}x",
                             f"{tops:.1f}" if ops_ else "", f"{gbs:.0f}",
                             f"{100 * gbs / peaks['GB/s']:.0f}%" if device == "cuda" else "", note])
    headers = ["K x N", "M", "kernel", "us (median)", "vs bf16", "TOPS", "GB/s", "% peak BW", "check"]
    from tabulate import tabulate
    table = tabulate(rows, headers=headers, tablefmt="github")
    stamp = (f"Device: {dev_name}; torch {torch.__version__}; "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}")
    peak_line = ""
    if device == "cuda":
        peak_line = "Measured peaks: " + ", ".join(f"{v:.0f} {k_}" for k_, v in peaks.items())
    print(stamp)
    print(peak_line)
    print(table)
    e2e = ""
    if args.e2e:
        e2e_rows = end_to_end(args, device, bench)
        e2e = tabulate(e2e_rows, headers=["recipe", "prefill ms", "vs bf16", "decode-shaped ms", "vs bf16",
                                          "note"], tablefmt="github")
        layers = 2 if args.smoke else args.layers
        e2e = f"End to end: LLaMA-7B-shaped model, {layers} decoder layers, random weights, bf16\n\n{e2e}"
        print("\n" + e2e)
    if device == "cuda" and not args.no_write:
        write_results("Produced by `python bench/kernels.py` (see its docstring for what is counted).\n\n"
                      f"{stamp}\n\n{peak_line}\n\n{table}\n" + (f"\n{e2e}\n" if e2e else ""))
        print(f"\nupdated the bench/kernels.py section of {RESULTS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="*", help=f"token counts (default {MS})")
    ap.add_argument("--kn", nargs="*", help="K x N shapes such as 4096x11008 (default: LLaMA-7B/70B shapes)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end LLaMA-7B-shaped model benchmark")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the end-to-end model")
    ap.add_argument("--recipes", nargs="*", help=f"recipes for --e2e (default {E2E_RECIPES})")
    args = ap.parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
