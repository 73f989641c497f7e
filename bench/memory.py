"""Peak memory of `qcompile compile`: against the number of calibration windows, or against the
size of the checkpoint when it is streamed.

    .venv/bin/python bench/memory.py --recipe aweq-w8a8 --windows 16 128
    .venv/bin/python bench/memory.py --recipe aweq-w8a8 gptq-w4a16 --hidden 4096 --layers 2 6

The second form generates random-weight LLaMA checkpoints (``--hidden``, one per ``--layers``
count, vocabulary ``--vocab``) under ``$QCOMPILE_CACHE/bench-checkpoints`` (default
``~/.cache/qcompile``), written tensor by tensor so generating them needs little memory, and
compiles each with the weights streamed (``qcompile.streaming``), saving the result. With
``--in-memory`` it also runs the ordinary in-memory compile for comparison (only on a machine
with the memory to spare). Hidden 4096 (LLaMA-7B's layer shape: MLP 11008, 772 MiB a layer in
float32) and a 32000 vocabulary: 2 layers 2.7 GB, 6 layers 5.9 GB, 12 layers 10.8 GB.

Each run is a fresh process; its peak resident memory comes from getrusage of the child (what
``/usr/bin/time -v`` reports as the maximum resident set size). Afterwards another process loads
the written model (``qcompile.load``) and runs a forward: the "loads" column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` under a fresh wrapper process and return (its peak RSS in MiB, seconds)."""
    wrapper = ("import resource, subprocess, sys; "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
               "sys.exit(r.stderr[-3000:]) if r.returncode else "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])}... failed:\n{out.stderr}")
    return int(out.stdout.strip()) / 1024, time.perf_counter() - t0


# ---------------------------------------------------------------- random checkpoints

def checkpoint_dir(hidden: int, layers: int, vocab: int) -> Path:
    root = Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))
    return root / "bench-checkpoints" / f"llama-h{hidden}-l{layers}-v{vocab}"


def make_checkpoint(hidden: int, layers: int, vocab: int) -> Path:
    """A random LLaMA checkpoint, one shard per decoder layer plus one for the rest (cached)."""
    import torch
    from transformers import LlamaConfig

    from qcompile.checkpoint import INDEX, write_safetensors

    path = checkpoint_dir(hidden, layers, vocab)
    if (path / INDEX).is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    inter = hidden * 11008 // 4096
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    cfg.to_json_file(path / "config.json")
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden, hidden),
              "self_attn.v_proj.weight": (hidden, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
              "post_attention_layernorm.weight": (hidden,)}

    def value(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            return 0.5 + torch.rand(t.shape, generator=gen)
        return torch.randn(t.shape, generator=gen) * 0.02

    weight_map: dict[str, str] = {}
    shards = {"model-rest.safetensors": {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                                         "lm_head.weight": (vocab, hidden)}}
    for i in range(layers):
        shards[f"model-layer{i:03d}.safetensors"] = {f"model.layers.{i}.{k}": s for k, s in shapes.items()}
    for file, tensors in shards.items():
        metas = {n: torch.empty(s, device="meta") for n, s in tensors.items()}
        write_safetensors(path / file, metas, value)
        weight_map.update({n: file for n in tensors})
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
import qcompile
from qcompile import recipes, streaming
path, recipe, out, mode, n, seq, device = sys.argv[1:8]
calib = torch.randint(0, 1000, (int(n), int(seq)), generator=torch.Generator().manual_seed(0))
passes = recipes.get(recipe).passes()
if mode == "streamed":
    gm = streaming.compile_checkpoint(path, passes, calibration=calib, device=device)
else:
    model = AutoModelForCausalLM.from_pretrained(path).eval().to(device)
    gm = qcompile.compile(model, passes, calibration=calib, inplace=True)
streaming.save(gm, out, float_dtype=torch.float16)
"""

# the written model loads (qcompile.load) and runs: logits of the right shape, all finite
LOAD = """
import sys, torch
import qcompile
gm = qcompile.load(sys.argv[1])
vocab = int(sys.argv[2])
with torch.no_grad():
    out = gm(torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1)))
logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
assert logits.shape == (1, 16, vocab), logits.shape
assert torch.isfinite(logits).all()
print("ok")
"""


def loads(out: str, vocab: int) -> str:
    """Whether the compiled model at ``out`` loads and runs a forward ("yes", or the error)."""
    r = subprocess.run([sys.executable, "-c", LOAD, out, str(vocab)], capture_output=True, text=True)
    return "yes" if r.returncode == 0 and r.stdout.strip().endswith("ok") else f"no: {r.stderr.strip()[-200:]}"


def sizes_table(args) -> list[list]:
    rows = []
    for layers in args.layers:
        path = make_checkpoint(args.hidden, layers, args.vocab)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for recipe in args.recipe:
            for mode in ["streamed"] + (["in memory"] if args.in_memory else []):
                with tempfile.TemporaryDirectory() as out:
                    cmd = [sys.executable, "-c", CHILD, str(path), recipe, f"{out}/m",
                           "streamed" if mode == "streamed" else "memory", str(args.calib_windows),
                           str(args.calib_len), args.device]
                    mib, secs = peak_rss_mib(cmd)
                    ok = loads(f"{out}/m", args.vocab)
                rows.append([recipe, mode, args.device, args.hidden, layers, f"{size / 2**20:.0f}", f"{mib:.0f}",
                             f"{100 * mib * 2**20 / size:.0f}%", f"{secs:.0f}", ok])
                print("  measured:", *rows[-1], flush=True)  # a row at a time, in case the run is cut short
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", nargs="+", default=["aweq-w8a8"])
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", help="checkpoint sizes: decoder layers of each random model")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calib-windows", type=int, default=8, help="with --layers: calibration windows")
    ap.add_argument("--in-memory", action="store_true", help="with --layers: also the in-memory compile")
    ap.add_argument("--device", default="cpu", help="with --layers: where calibration and GPTQ run")
    args = ap.parse_args()
    print(f"{datetime.date.today()}, command: {' '.join(sys.argv)}")
    if args.layers:
        print(tabulate(sizes_table(args), headers=["recipe", "compile", "device", "hidden", "layers", "checkpoint MiB",
                                                   "peak RSS MiB", "RSS / checkpoint", "time s", "loads"]))
        return
    rows = []
    for n in args.windows:
        for recipe in args.recipe:
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, "-m", "qcompile.cli", "compile", "smollm2-135m", "--recipe", recipe,
                       "--calib-windows", str(n), "--calib-len", str(args.calib_len), "--out", f"{out}/m"]
                mib, secs = peak_rss_mib(cmd)
            rows.append([recipe, n, args.calib_len, f"{mib:.0f}", f"{secs:.0f}"])
    print(tabulate(rows, headers=["recipe", "calib windows", "tokens each", "peak RSS MiB", "time s"]))


if __name__ == "__main__":
    main()
