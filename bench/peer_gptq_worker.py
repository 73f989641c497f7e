"""llm-compressor's side of bench/peer_gptq.py; runs in the peer's own virtual environment
(bench/.venv-llmcompressor), never in qcompile's, and imports nothing from qcompile.

One run = one row: load the float checkpoint the driver wrote, quantize it with llm-compressor's
``oneshot`` + ``GPTQModifier`` on exactly the driver's calibration token windows (a
``datasets.Dataset`` of ``input_ids``; no hub access), then the mean next-token NLL of every
evaluation window, computed as ``qcompile.evaluate.window_nlls`` does (float logits of positions
0..L-2 against tokens 1..L-1, mean per window, float64). Writes one JSON file:

    {"status": "ok" | "refused", "error": str | null, "oneshot_s": float | null,
     "oneshot_cpu_s": float | null, "total_s": float | null, "nlls": [float, ...] | null,
     "versions": {...}, "settings": {...}}

``refused``: llm-compressor raised while applying the scheme (for example a group size that does
not divide a layer's input width); ``error`` holds its exception type and message, and no
evaluation is run.

    python bench/peer_gptq_worker.py --model DIR --calib calib.safetensors \
        --eval eval.safetensors --scheme group --group-size 64 --out row.json
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # "total": from before the heavy imports to the end of oneshot

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402
from importlib import metadata  # noqa: E402

# the worker must never reach a hub: everything it reads was written by the driver
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SCHEMES = ("fp32", "channel", "group")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _modifier(scheme: str, group_size: int):
    """GPTQ W4A16, symmetric int4 weights, every Linear but lm_head; llm-compressor's own
    defaults otherwise (block 128, dampening 0.01, static activation ordering, min-max observer)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=4, type="int", symmetric=True, strategy=scheme)
    if scheme == "group":
        weights["group_size"] = group_size
    group = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    return GPTQModifier(config_groups={"group_0": group}, ignore=["lm_head"])


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor) -> list[float]:
    """Mean next-token NLL per window, one window at a time (qcompile.evaluate.window_nlls)."""
    model.eval()
    out = []
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1]
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").reshape(ids.shape[0], -1).mean(dim=1)
        out.append(float(loss.double()))
        print(f"  llm-compressor window {i + 1}/{windows.shape[0]}: nll {out[-1]:.4f}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    calib = load_file(args.calib)["input_ids"]
    windows = load_file(args.eval)["input_ids"]
    settings = {"scheme": args.scheme, "group_size": args.group_size if args.scheme == "group" else None,
                "calibration": list(calib.shape), "windows": list(windows.shape),
                "threads": torch.get_num_threads()}
    result = {"status": "ok", "error": None, "oneshot_s": None, "oneshot_cpu_s": None, "total_s": None,
              "nlls": None,
              "versions": _versions(), "settings": settings}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.scheme != "fp32":
        from datasets import Dataset
        from llmcompressor import oneshot

        data = Dataset.from_dict({"input_ids": calib.tolist(),
                                  "attention_mask": torch.ones_like(calib).tolist()})
        try:
            modifier = _modifier(args.scheme, args.group_size)
            settings["modifier"] = repr(modifier)
            t0, c0 = time.perf_counter(), time.process_time()
            oneshot(model=model, processor=tokenizer, dataset=data, recipe=[modifier],
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    shuffle_calibration_samples=False, output_dir=None, log_dir=None)
            t1, c1 = time.perf_counter(), time.process_time()
        except Exception as err:  # noqa: BLE001 -- a refusal is a result, recorded as such
            result.update(status="refused", error=f"{type(err).__name__}: {err}")
            traceback.print_exc()
            return result
        result["oneshot_s"] = t1 - t0
        result["oneshot_cpu_s"] = c1 - c0  # CPU seconds of all threads of this process
        result["total_s"] = t1 - T_START
    result["nlls"] = window_nlls(model, windows)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="float HF checkpoint directory (with tokenizer)")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids [n, seq_len]")
    ap.add_argument("--eval", required=True, help="safetensors file with input_ids [windows, 2048]")
    ap.add_argument("--scheme", choices=SCHEMES, required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="the JSON result file")
    args = ap.parse_args()
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
