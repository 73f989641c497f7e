"""The ``qcompile`` command line: compile, eval, diff, report, generate, bench, export, recipes.

Every failure prints one clear message and exits non-zero; nothing partial is written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

# WikiText-2 bundled in the repository's data/ ($QCOMPILE_DATA overrides; --calib/--data per call)
from qcompile.data import default_calibration_file, default_test_file  # noqa: E402

DEFAULT_CALIB = default_calibration_file()
DEFAULT_TEST = default_test_file()


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ---------------------------------------------------------------- helpers

def _load_model(ref: str):
    import qcompile
    try:
        return qcompile.models.load(ref)
    except qcompile.models.ModelLoadError as err:
        raise CLIError(str(err)) from err


def _text(path: str | None, default: Path, what: str) -> str:
    import qcompile
    p = Path(path) if path else default
    try:
        return qcompile.data.load_text(p)
    except qcompile.data.DataError as err:
        raise CLIError(f"{what}: {err}" + ("" if path else f" (pass --{what.split()[0]} FILE)")) from err


def _recipe(name: str):
    from qcompile import recipes
    try:
        r = recipes.get(name)
        r.passes()
        return r
    except recipes.RecipeError as err:
        raise CLIError(str(err)) from err


def _calibration(args, tokenizer, text: str):
    import qcompile
    try:
        return qcompile.data.calibration_windows(tokenizer, text, n=args.calib_windows,
                                                 seq_len=args.calib_len, seed=args.seed)
    except qcompile.data.DataError as err:
        raise CLIError(f"calibration: {err}") from err


def _compile(args, with_report: bool):
    import qcompile
    from qcompile.passes import LayerReport

    recipe = _recipe(args.recipe)
    text = _text(args.calib, DEFAULT_CALIB, "calib file")  # fail fast, before loading the model
    device = _device(getattr(args, "device", "cpu"))
    model, tok = _load_model(args.model)
    calib = _calibration(args, tok, text)
    model.to(device)  # calibration, searches and GPTQ run where the model is, layer by layer
    passes = recipe.passes()
    lowered = any(p.kind.value == "lower" for p in passes)
    if with_report and lowered:
        passes.append(LayerReport())
    t0 = time.perf_counter()
    try:
        # inplace: the CLI's model is its own and unused afterwards; no second float copy
        gm = qcompile.compile(model, passes=passes, calibration=calib, probe=calib[:1, :64].to(device),
                              inplace=True)
    except MemoryError as err:
        raise CLIError(f"out of memory while compiling: lower --calib-windows / --calib-len "
                       f"(now {args.calib_windows} x {args.calib_len})") from err
    except (qcompile.PassError, qcompile.PipelineError, qcompile.TraceError) as err:
        raise CLIError(str(err)) from err
    seconds = time.perf_counter() - t0
    gm.to("cpu")  # saved and evaluated on the CPU
    gm.meta["qcompile_recipe"] = recipe.to_dict()
    gm.meta["qcompile_model_ref"] = args.model
    return gm, tok, seconds


def _streams(args) -> bool:
    """Whether ``compile`` streams the checkpoint: on ``--stream``, or when the in-memory compile
    would need more than ``--max-memory`` (default: the memory available now)."""
    from qcompile import streaming
    path = Path(args.model).expanduser()
    if not path.is_dir():
        if args.stream:
            raise CLIError(f"--stream needs a Hugging Face checkpoint directory with safetensors weights; "
                           f"{args.model} is not one")
        return False
    if args.stream:
        return True
    try:
        need = streaming.estimated_bytes(path)
    except streaming.CheckpointError:
        return False  # not streamable (e.g. .bin weights): the ordinary loader says what is wrong
    limit = args.max_memory if args.max_memory is not None else _available_memory()
    return limit is not None and need > limit


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(text: str) -> int:
    """'24GB', '512MiB', '1e9' -> bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[:-1] if unit else t) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GB, 512MB)") from None


def _compile_streamed(args):
    """``_compile`` for a checkpoint directory, its weights streamed layer by layer."""
    import qcompile
    from qcompile import streaming
    from transformers import AutoTokenizer

    recipe = _recipe(args.recipe)
    text = _text(args.calib, DEFAULT_CALIB, "calib file")
    device = _device(args.device)
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except Exception as err:  # noqa: BLE001
        raise CLIError(f"could not load the tokenizer of {args.model}: {err}") from err
    calib = _calibration(args, tok, text)
    t0 = time.perf_counter()
    try:
        gm = streaming.compile_checkpoint(args.model, recipe.passes(), calibration=calib, device=device,
                                          spill_dir=args.spill_dir)
    except streaming.CheckpointError as err:
        raise CLIError(str(err)) from err
    except (qcompile.PassError, qcompile.PipelineError, qcompile.TraceError) as err:
        raise CLIError(str(err)) from err
    gm.meta["qcompile_recipe"] = recipe.to_dict()
    gm.meta["qcompile_model_ref"] = args.model
    return gm, tok, time.perf_counter() - t0


def _device(name: str):
    """The torch device for ``--device``; a CLIError when it is not there."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available to this process (torch "
                       f"{torch.__version__}); use --device cpu")
    return torch.device(name)


def _report_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate
    cols = ["module", "scheme", "outliers", "weight SQNR dB", "output SQNR dB", "GPTQ error"]
    return tabulate([[r.get(c) for c in cols] for r in rows], headers=cols, floatfmt=".2f")


# ---------------------------------------------------------------- commands

def cmd_compile(args) -> None:
    import qcompile
    out = Path(args.out) if args.out else None
    for target in (out, Path(args.export) if args.export else None):
        if target and target.exists() and not args.force:
            raise CLIError(f"{target} already exists; pass --force to replace it")
    from qcompile import distributed
    distributed.init_from_env(_device(args.device))  # under torchrun: the ranks split the windows
    streamed = _streams(args)
    gm, tok, seconds = _compile_streamed(args) if streamed else _compile(args, with_report=True)
    rank, size = distributed.world()
    if rank != 0:
        return  # every rank holds the same compiled model; the first one reports and saves it
    if size > 1:
        print(f"calibrated on {size} processes")
    print(gm.qcompile_report)
    print(f"\ncompiled {args.model} with {args.recipe} in {seconds:.1f}s"
          + (" (streamed layer by layer)" if streamed else ""))
    if out:
        import torch
        from qcompile import streaming
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.float_dtype]
        if dtype is not None and not streamed:  # the saved model is what this process holds
            qcompile.serialize.round_floats(gm, dtype)
        try:
            streaming.save(gm, out, tokenizer=tok, float_dtype=dtype, overwrite=args.force)
        except qcompile.SerializationError as err:
            raise CLIError(str(err)) from err
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"saved to {out} ({size / 2**20:.1f} MiB)")
    if args.export:
        _export_compiled(gm, Path(args.export), tok, args)


def _export_compiled(gm, target: Path, tok, args) -> None:
    """``compile --export DIR``: the compiled model as compressed-tensors (a streamed compile is
    converted and written group by group)."""
    from qcompile.export import ExportError, export
    try:
        export(gm, target, tokenizer=tok, dtype=args.float_dtype, overwrite=args.force)
    except ExportError as err:
        raise CLIError(f"--export: {err}") from err
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"exported as compressed-tensors to {target} ({size / 2**20:.1f} MiB)")


def _load_compiled(path: str):
    import qcompile
    try:
        return qcompile.load(path)
    except qcompile.SerializationError as err:
        raise CLIError(str(err)) from err


def _tokenizer_of(path: Path):
    from transformers import AutoTokenizer
    if not (path / "tokenizer").is_dir():
        raise CLIError(f"{path} has no tokenizer; compile with `qcompile compile ... --out DIR`")
    return AutoTokenizer.from_pretrained(path / "tokenizer")


def _is_compiled_dir(path: Path) -> bool:
    return path.is_dir() and (path / "qcompile.json").is_file()


def _float_of(gm) -> tuple[str, Any] | None:
    """The float model a saved compiled model was compiled from (its recorded reference), if it loads."""
    import qcompile
    ref = gm.meta.get("qcompile_model_ref")
    if not ref:
        return None
    try:
        return ref, qcompile.models.load(ref)[0]
    except qcompile.models.ModelLoadError:
        return None


def _compiled_name(gm, path: Path) -> str:
    return f"{(gm.meta.get('qcompile_recipe') or {}).get('name', 'compiled')} ({path.name})"


def cmd_eval(args) -> None:
    if args.tasks:
        return _eval_tasks(args)
    import torch
    from tabulate import tabulate

    import qcompile
    from qcompile import fast_generate

    text = _text(args.data, DEFAULT_TEST, "data file")
    target = Path(args.model)
    models: list[tuple[str, Any]] = []
    if _is_compiled_dir(target):
        gm = _load_compiled(args.model)
        tok = _tokenizer_of(target)
        compiled: Any = gm
        if not args.no_fast:  # the eager twin on the CPU fast path (bf16 float parts where that helps)
            try:
                compiled = fast_generate.from_saved(gm, dtype=args.dtype)
            except ValueError:
                compiled = gm  # not compiled from a HF model: the graph itself
        dtype = getattr(compiled, "dtype", torch.float32)
        found = None if args.no_float else _float_of(gm)
        if found:
            ref, float_model = found
            models.append((f"float ({ref})", float_model if args.no_fast else
                           fast_generate.FastModel(float_model, dtype=dtype)))
        models.append((_compiled_name(gm, target), compiled))
    else:
        model, tok = _load_model(args.model)
        models.append((f"float ({args.model})", model if args.no_fast else
                       fast_generate.FastModel(model, dtype=args.dtype)))
    rows = []
    for name, m in models:
        t0 = time.perf_counter()
        try:
            ppl = qcompile.evaluate.perplexity(m, tok, text, seq_len=args.seq_len, max_windows=args.windows)
        except qcompile.data.DataError as err:
            raise CLIError(str(err)) from err
        dtype = str(getattr(m, "dtype", torch.float32)).replace("torch.", "")
        rows.append([name, dtype, f"{ppl:.3f}", f"{time.perf_counter() - t0:.1f}"])
    print(tabulate(rows, headers=["model", "float dtype", f"perplexity ({args.windows or 'all'} x {args.seq_len})",
                                  "time s"]))


def _eval_tasks(args) -> None:
    """``eval --tasks``: lm-eval's tasks on the float and the compiled model's eager twin, side by side."""
    from tabulate import tabulate

    from qcompile import fast_generate, harness
    from qcompile.eager import eager_from_saved

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.data or set(tasks) & set(harness.LOCAL_TASKS):
        _text(args.data, DEFAULT_TEST, "data file")  # the local tasks' text: fail fast, before loading models
    try:
        tm = harness.task_manager(tasks, data_file=args.data)
    except harness.HarnessError as err:
        raise CLIError(str(err)) from err
    target = Path(args.model)
    models: list[tuple[str, Any]] = []
    if _is_compiled_dir(target):
        gm = _load_compiled(args.model)
        tok = _tokenizer_of(target)
        try:  # the HF model with the compiled linears: lm-eval's HF wrapper runs it, generate() included
            compiled = eager_from_saved(gm)
        except ValueError as err:
            raise CLIError(f"{err}; lm-eval runs HF models") from err
        found = None if args.no_float else _float_of(gm)
        if found:
            models.append((f"float ({found[0]})", found[1]))
        models.append((_compiled_name(gm, target), compiled))
    else:
        model, tok = _load_model(args.model)
        models.append((f"float ({args.model})", model))
    dtype = fast_generate.resolve_dtype(args.dtype, models[-1][1])
    results, times = {}, []
    for name, m in models:
        fast_generate.cast_float_parts(m, dtype)  # float parts; lowered linears keep their stored tensors
        t0 = time.perf_counter()
        try:
            results[name] = harness.evaluate(m, tok, tasks, limit=args.limit, batch_size=args.batch_size,
                                             max_length=args.max_length, num_fewshot=args.num_fewshot, tm=tm)
        except harness.HarnessError as err:
            raise CLIError(str(err)) from err
        times.append(f"{name} {time.perf_counter() - t0:.1f}s")
    headers, rows = harness.side_by_side(results)
    print(tabulate(rows, headers=headers, floatfmt=".4f"))
    print(f"\nlm-eval: {len(tasks)} task(s), limit {args.limit or 'none'}, float parts in "
          f"{str(dtype).replace('torch.', '')}, max length {args.max_length}; {'; '.join(times)}")


def _limit(value: str) -> float | int:
    """--limit: a count of documents per task, or a fraction of them when below 1."""
    x = float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return int(x) if x >= 1 and x == int(x) else x


def cmd_diff(args) -> None:
    gm, *_ = _compile(args, with_report=False)
    report = gm.qcompile_report
    print(report, "\n")
    if args.pass_name:
        try:
            print(report.diff(args.pass_name, style=args.style, max_lines=args.max_lines))
        except KeyError as err:
            raise CLIError(str(err).strip("'\"")) from err
    else:
        print(report.diffs(style=args.style, max_lines=args.max_lines))


def cmd_report(args) -> None:
    from qcompile.plots import plot_activation_profiles, plot_layer_error

    gm = _load_compiled(args.dir)
    analyses = getattr(gm, "qcompile_analyses", {})
    rows = analyses.get("layer_report")
    if not rows:
        raise CLIError(f"{args.dir} has no per-layer report; compile it with `qcompile compile --out`")
    print(_report_table(rows))
    out = Path(args.out or args.dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = (gm.meta.get("qcompile_recipe") or {}).get("name", "")
    p1 = plot_layer_error(rows, out / "layer_error.png", f"Per-layer output SQNR, {recipe}")
    print(f"\nwrote {p1}")
    profiles = analyses.get("activation_profiles")
    if profiles:
        p2 = plot_activation_profiles(profiles, out / "activation_profile.png")
        print(f"wrote {p2}")


def cmd_generate(args) -> None:
    import torch

    from qcompile.eager import eager_from_saved

    gm = _load_compiled(args.dir)
    tok = _tokenizer_of(Path(args.dir))
    try:
        model = eager_from_saved(gm)
    except ValueError as err:
        raise CLIError(str(err)) from err
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if args.no_fast:  # HF generate on the float32 eager twin
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 temperature=args.temperature if args.sample else None,
                                 top_p=args.top_p if args.sample else None, pad_token_id=tok.eos_token_id)
        else:  # the CPU fast path: bf16 float parts where that helps, compiled static-cache decode
            from qcompile.fast_generate import FastModel
            runner = FastModel(model, dtype=args.dtype, compile_decode={"auto": "auto", "yes": True,
                                                                        "no": False}[args.compile])
            eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
            out = runner.generate(ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                                  top_p=args.top_p, eos_token_id=eos)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def cmd_bench(args) -> None:
    import torch
    if not torch.cuda.is_available():
        print("qcompile bench: no CUDA device here; the kernel benchmarks (bench/kernels.py) need a GPU. "
              "Accuracy benchmarks run on CPU: python bench/accuracy_aweq.py / bench/accuracy_quik.py")
        return
    script = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    if not script.is_file():
        raise CLIError(f"{script} not found (bench/ ships with the repository, not the wheel)")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.rest]))


def cmd_export(args) -> None:
    from qcompile.export import ExportError, export

    out = Path(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"{out} already exists; pass --force to replace it")
    gm = _load_compiled(args.dir)
    tok = _tokenizer_of(Path(args.dir))
    dtype = None if args.float_dtype == "auto" else args.float_dtype
    if dtype is None:  # the saved model's float storage dtype: its values are exact there
        import qcompile
        entries = qcompile.serialize.read_manifest(args.dir)["tensors"].values()
        stored = [e["stored_dtype"] for e in entries if isinstance(e, dict) and "stored_dtype" in e]
        dtype = max(set(stored), key=stored.count) if stored else None
    try:
        path = export(gm, out, format=args.format, tokenizer=tok, overwrite=args.force, dtype=dtype,
                      tensor_parallel=args.tensor_parallel,
                      max_shard_size=int(args.max_shard_size * 2**20))
    except ExportError as err:
        raise CLIError(str(err)) from err
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"exported {args.dir} as {args.format} to {path} ({size / 2**20:.1f} MiB); load it with "
          f"transformers (pip install 'qcompile[export]') or vLLM")


def cmd_recipes(args) -> None:
    from qcompile import recipes
    if args.name:
        r = _recipe(args.name)
        print(r.to_yaml() if args.format == "yaml" else r.to_json())
        return
    for name in recipes.names():
        print(f"{name:18s} {recipes.get(name).description}")


# ---------------------------------------------------------------- parser

def _add_compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF checkpoint dir, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--recipe", default="rtn-w8a8", help="built-in recipe name or a .json/.yaml recipe file")
    p.add_argument("--calib", help=f"calibration text file (default {DEFAULT_CALIB})")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where calibration, searches and GPTQ run (the model is moved there)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompile", description="Quantizing compiler for LLMs on torch.fx")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="quantize a model with a recipe and save it")
    _add_compile_args(p)
    p.add_argument("--out", help="directory to save the compiled model to")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--stream", action="store_true",
                   help="read the checkpoint's weights one decoder layer at a time (models bigger than memory)")
    p.add_argument("--spill-dir", metavar="DIR",
                   help="streamed: where changed layers and offloaded analyses wait (up to about the "
                        "checkpoint's size again; default a temporary directory)")
    p.add_argument("--export", metavar="DIR",
                   help="also write the compiled model as a compressed-tensors checkpoint (pip install 'qcompile[export]')")
    p.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="stream when the in-memory compile would need more (default: the memory available)")
    p.add_argument("--float-dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="storage of unquantized tensors (embeddings, norms, lm_head, outliers)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("eval", help="perplexity (or lm-eval tasks), side by side with the float model")
    p.add_argument("model", help="saved compiled dir, or a model (HF dir, .gguf, built-in name)")
    p.add_argument("--data", help=f"evaluation text; with --tasks, the local tasks' text (default {DEFAULT_TEST})")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated, instead of the perplexity table: the local "
                   "qcompile_wikitext2, qcompile_wikitext_cloze (offline), or lm-eval's (hellaswag, arc_easy...); "
                   "pip install 'qcompile[eval]'")
    p.add_argument("--limit", type=_limit, help="with --tasks: documents per task (a fraction if below 1)")
    p.add_argument("--batch-size", type=int, default=1, help="with --tasks: lm-eval's batch size")
    p.add_argument("--max-length", type=int, default=2048, help="with --tasks: longest window scored at once")
    p.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples (default: each task's own)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--no-float", action="store_true", help="skip the float model")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="float parts' dtype on the fast path (auto: bf16 on CPUs with bf16 arithmetic)")
    p.add_argument("--no-fast", action="store_true",
                   help="run the saved graph itself in float32 (no fast path; --tasks always runs the eager twin)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("diff", help="per-pass graph diffs of a recipe")
    _add_compile_args(p)
    p.add_argument("--pass", dest="pass_name", help="only this pass")
    p.add_argument("--style", choices=["summary", "code"], default="summary")
    p.add_argument("--max-lines", type=int, default=60)
    p.set_defaults(func=cmd_diff, calib_windows=2, calib_len=256)

    p = sub.add_parser("report", help="per-layer table and PNG plots of a saved compiled model")
    p.add_argument("dir")
    p.add_argument("--out", help="where to write the PNGs (default: DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="generate text with a saved compiled model (KV cache)")
    p.add_argument("dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="float parts' dtype (auto: bf16 on CPUs with bf16 arithmetic, for models of 10M+ parameters)")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                   help="compile the decode step (torch.compile; auto: for 256+ new tokens)")
    p.add_argument("--no-fast", action="store_true", help="HF generate on the float32 model instead of the fast path")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="kernel benchmarks (needs a GPU)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a saved compiled model as a checkpoint transformers and vLLM load")
    p.add_argument("dir", help="saved compiled model (qcompile compile ... --out DIR)")
    p.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--float-dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="float tensors (embeddings, norms, scales, biases); auto: the dtype the saved model stores them in")
    p.add_argument("--max-shard-size", type=float, default=5120, help="MiB per safetensors shard")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="vLLM tensor-parallel size the checkpoint must shard into (group sizes checked)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recipes", help="list recipes, or print one as YAML/JSON to edit")
    p.add_argument("name", nargs="?")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_recipes)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except CLIError as err:
        print(f"qcompile {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qcompile {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
