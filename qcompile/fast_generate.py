"""Fast CPU generation and evaluation of compiled models (the face layer's fast path).

A compiled model runs as its eager HuggingFace twin (``qcompile.eager``: the same lowered ops,
with the same stored tensors, inside the HF model), and

- its float parts (embeddings, norms, attention, lm_head) run in bfloat16 where that is faster:
  ``dtype="auto"`` picks bf16 when the CPU has bf16 arithmetic (AVX512-BF16 or AMX) and the model
  is not tiny (``BF16_MIN_PARAMS``; below it per-op overhead dominates and bf16 buys nothing but
  rounding), float32 otherwise. The lowered ops keep their stored tensors exactly as saved (scales,
  row sums, outlier columns are not cast) and take the bf16 activations: their quantization reads
  them exactly, and they write bf16;
- everything runs under ``torch.inference_mode`` (no autograd dispatch: the lowered ops' custom-op
  autograd layer is skipped, which matters per decode step);
- weight-only linears whose layout a packed CPU kernel takes (``_weight_int4pack_mm_for_cpu``,
  ``_weight_int8pack_mm``) call it straight for calls of a few rows (decode), with the operands
  laid out once here (``attach_packed_kernels``): the same kernels and operands the op would use
  for those calls, so the same results, but a compiled decode step sees plain aten ops instead of
  one opaque custom-op call (a Python function) per linear;
- attention is ``qcompile.attention``'s: one-token attention runs as plain matmuls and a softmax
  instead of SDPA's flash kernel, whose fixed cost per call dominates at one query; an unmasked
  bf16 prefill (or full-sequence forward) runs the native flash kernel
  (``qcompile.kernels.cpu_attention``); anything else stays SDPA's. ``attention="model"`` keeps
  the model's own attention throughout (the benchmarks' plain-HF baseline);
- decoding runs a static KV cache with the one-token decode step compiled by ``torch.compile``
  (inductor). The cache length is rounded up to a power of two (at least ``MIN_CACHE_LEN``), so
  prompts and generation lengths of the same order reuse one compiled step instead of compiling
  anew. Compiling costs tens of seconds once per process, so ``compile_decode="auto"`` compiles
  only for generations of at least ``COMPILE_MIN_TOKENS`` tokens; otherwise the eager step with a
  dynamic cache runs (HF's own). The compiled step keeps no guards on the model's modules (their
  check cost about 2.7 ms per SmolLM2 token): replace none of a FastModel's modules after its first
  generation.

``FastModel(model)`` wraps an eager model (float, or with lowered ops); ``from_saved(gm)`` builds
one from a loaded compiled model. ``time_prefill`` / ``time_decode`` are what bench/cpu.py times.
"""

from __future__ import annotations

import itertools
import logging
import time
import types
from typing import Any

import torch
from torch import nn

from qcompile.attention import use_cpu_attention

__all__ = ["FastModel", "from_saved", "resolve_dtype", "cpu_has_bf16", "cast_float_parts", "time_prefill",
           "time_decode", "attach_packed_kernels", "static_cache_len", "BF16_MIN_PARAMS", "COMPILE_MIN_TOKENS",
           "MIN_CACHE_LEN"]

BF16_MIN_PARAMS = 10_000_000   # "auto" keeps models smaller than this in float32
COMPILE_MIN_TOKENS = 256       # "auto" compiles the decode step for generations at least this long
MIN_CACHE_LEN = 256            # the shortest static KV cache a compiled decode step is built for
_STEP_IDS = itertools.count()
log = logging.getLogger("qcompile.fast_generate")


def cpu_has_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), so oneDNN/MKL bf16 GEMMs are fast."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, p, lambda: False)()) for p in probes)


def _n_params(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def resolve_dtype(choice: str | torch.dtype, model: nn.Module | None = None) -> torch.dtype:
    """"bf16" / "fp32" / a dtype as given; "auto": bf16 on bf16-capable CPUs for models of at
    least ``BF16_MIN_PARAMS`` parameters, else float32."""
    if isinstance(choice, torch.dtype):
        return choice
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if choice in table:
        return table[choice]
    if choice != "auto":
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {choice!r}")
    big = model is None or _n_params(model) >= BF16_MIN_PARAMS
    return torch.bfloat16 if cpu_has_bf16() and big else torch.float32


def _is_lowered(module: nn.Module) -> bool:
    from qcompile.eager import LoweredLinear
    return isinstance(module, LoweredLinear)


@torch.no_grad()
def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parameters and buffers of ``model`` to ``dtype`` in place, except the stored
    tensors of lowered linears (their op defines how it reads them) and rotary frequency tables
    (``inv_freq``: kept in float32, as HF computes the rotary angles in float32)."""
    for module in model.modules():
        if _is_lowered(module):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype and "inv_freq" not in name:
                module._buffers[name] = b.to(dtype)
    return model


def static_cache_len(tokens: int) -> int:
    """The static KV cache length for ``tokens`` positions: the next power of two, at least
    ``MIN_CACHE_LEN`` (each distinct length is its own compiled decode step)."""
    return max(MIN_CACHE_LEN, 1 << max(tokens - 1, 0).bit_length())


@torch.no_grad()
def attach_packed_kernels(model: nn.Module, dtype: torch.dtype) -> int:
    """Let each weight-only lowered linear of ``model`` on the CPU call its packed kernel straight
    for small-M ``dtype`` inputs (``LoweredLinear.fast_path``); returns how many can. The operands
    are the CPU kernels' own cached layouts of the stored tensors, built now."""
    from qcompile.eager import LoweredLinear
    from qcompile.formats.weight_only import WeightOnly
    from qcompile.kernels.cpu_linear import packed_weight_matmul, small_m_operands

    count = 0
    for module in model.modules():
        if not (isinstance(module, LoweredLinear) and isinstance(module.scheme, WeightOnly)):
            continue
        qweight = module.qweight
        if qweight.device.type != "cpu":
            continue
        c = module.constants
        ops = small_m_operands(qweight, module.scale, getattr(module, "zero", None), getattr(module, "bias", None),
                               c["bits"], c["group_size"], c["in_features"], dtype)
        if ops is not None:
            module.fast_path = (ops[0], dtype, packed_weight_matmul, ops)
            count += 1
    return count


class FastModel:
    """An eager causal LM prepared for fast CPU inference: float parts in ``dtype``; ``generate``
    with a static KV cache and a compiled decode step (``compile_decode``: True, False or "auto")."""

    def __init__(self, model: nn.Module, dtype: str | torch.dtype = "auto",
                 compile_decode: bool | str = "auto", attention: str = "qcompile"):
        self.dtype = resolve_dtype(dtype, model)
        self.model = cast_float_parts(model, self.dtype)
        self.model.eval()
        self.compile_decode = compile_decode
        self.packed_linears = attach_packed_kernels(self.model, self.dtype)
        if attention not in ("qcompile", "model"):
            raise ValueError(f"attention must be 'qcompile' or 'model', got {attention!r}")
        self.cpu_attention = attention == "qcompile" and use_cpu_attention(self.model)
        self._compiled = None
        self.decode_graph_breaks: str | None = None  # why the compiled step is not one graph, if it is not

    # ---- forward
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a full forward (prefill / evaluation), in the model's float dtype."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What generation's prefill computes: the whole prompt into a fresh KV cache, and the
        logits of its last position only [B, vocab] (as HF ``generate`` does, ``logits_to_keep=1``)."""
        from transformers import DynamicCache
        pos = torch.arange(input_ids.shape[1])
        return self.model(input_ids=input_ids, cache=DynamicCache(config=self.model.config), cache_position=pos,
                          position_ids=pos[None], use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any):
        """Forward as the HF model (``evaluate.perplexity`` calls models this way)."""
        with torch.inference_mode():
            return self.model(input_ids=input_ids, use_cache=False, **kwargs)

    def eval(self) -> "FastModel":
        self.model.eval()
        return self

    # ---- decoding
    def _use_compile(self, max_new_tokens: int) -> bool:
        if self.compile_decode == "auto":
            return max_new_tokens >= COMPILE_MIN_TOKENS
        return bool(self.compile_decode)

    def _step_fn(self):
        if self._compiled is None:
            model = self.model

            def step(ids, cache, pos):
                return model(input_ids=ids, cache=cache, cache_position=pos, position_ids=pos[None],
                             use_cache=True, logits_to_keep=1).logits

            # a code object of its own: dynamo keeps compiled code per code object, so FastModels sharing
            # one would recompile into one cache (checked in turn on every call, keeping every model
            # alive, and no longer compiling after torch._dynamo.config.recompile_limit models)
            code = step.__code__.replace(co_name=f"qcompile_decode_step_{next(_STEP_IDS)}")
            step = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
            self._compiled = _DecodeStep(step, self)
        return self._compiled

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 min_new_tokens: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (or temperature / top-p sampled) continuation of ``input_ids`` [1, T]: returns
        [1, T + n] ids, stopping after ``eos_token_id`` (once ``min_new_tokens`` are out)."""
        from transformers import DynamicCache, StaticCache

        if input_ids.shape[0] != 1:
            raise ValueError("FastModel.generate takes one sequence (batch size 1)")
        t = input_ids.shape[1]
        compiled = self._use_compile(max_new_tokens)
        cache = (StaticCache(config=self.model.config, max_cache_len=static_cache_len(t + max_new_tokens))
                 if compiled else DynamicCache(config=self.model.config))
        pos = torch.arange(t)
        logits = self.model(input_ids=input_ids, cache=cache, cache_position=pos, position_ids=pos[None],
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        out = [input_ids]
        step = self._step_fn() if compiled else None
        for i in range(max_new_tokens):
            nxt = _pick(logits.float(), do_sample, temperature, top_p, generator)
            out.append(nxt)
            if eos_token_id is not None and i + 1 >= min_new_tokens and int(nxt) == eos_token_id:
                break
            if i + 1 == max_new_tokens:
                break
            p = torch.tensor([t + i])
            if step is not None:
                logits = step(nxt, cache, p)[:, -1]
            else:
                logits = self.model(input_ids=nxt, cache=cache, cache_position=p, position_ids=p[None],
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
        return torch.cat(out, dim=1)


_UNCHECKED = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}


class _DecodeStep:
    """The compiled decode step: one graph without guards on the model's modules, else (a step
    that cannot be one graph) a graph-broken compile that keeps them.

    Checking the module guards (hundreds of parameters and attributes) took about 2.7 ms of each
    SmolLM2 token here, so the step is first compiled with ``fullgraph=True`` and
    ``skip_guard_on_all_nn_modules_unsafe``: the model is the FastModel's own and its parameters
    are graph inputs, so only replacing its modules afterwards would go unseen; the guards on the
    inputs (ids, position, the static cache's tensors) stay. Without module guards a *graph
    break* would be wrong, not slow: the code compiled for the rest of layer 0's forward would be
    reused for every layer (its weights, its cache index), so a step that breaks is recompiled
    with the module guards (and the reason kept in ``FastModel.decode_graph_breaks``).

    The one-graph step also leaves out inductor's per-call checks of every input's sizes, strides
    and alignment (about 1,000 Python calls per SmolLM2 step: 135.8 -> 153.1 tokens/s, measured
    interleaved in one process): dynamo's guards check the step's own inputs, and the model's
    parameters keep their shapes (as the skipped module guards already assume)."""

    def __init__(self, step: Any, owner: "FastModel"):
        self.step, self.owner = step, owner
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip is None:
            self.fn = self._guarded()
        else:
            self.fn = torch.compile(step, backend="inductor", dynamic=False, fullgraph=True,
                                    options={"guard_filter_fn": skip, **_UNCHECKED})
        self.whole = skip is not None

    def _guarded(self) -> Any:
        return torch.compile(self.step, backend="inductor", dynamic=False)

    def __call__(self, *args: Any) -> torch.Tensor:
        try:
            return self.fn(*args)
        except torch._dynamo.exc.Unsupported as err:  # a graph break under fullgraph=True
            if not self.whole:
                raise
            self.whole = False
            self.owner.decode_graph_breaks = str(err).split("\n")[0]
            log.warning("qcompile fast_generate: the decode step cannot be compiled as one graph (%s); "
                        "compiling it in pieces, with guards on the model's modules (slower)",
                        self.owner.decode_graph_breaks)
            self.fn = self._guarded()
            return self.fn(*args)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token [1, 1]: argmax, or a sample at ``temperature`` from the top-p nucleus."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the smallest prefix reaching top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(dim=-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice)
    return torch.multinomial(probs, 1, generator=generator)


def from_saved(gm: Any, dtype: str | torch.dtype = "auto", compile_decode: bool | str = "auto") -> FastModel:
    """A loaded compiled model (``qcompile.load``) as a ``FastModel`` (its eager HF twin)."""
    from qcompile.eager import eager_from_saved
    return FastModel(eager_from_saved(gm), dtype=dtype, compile_decode=compile_decode)


# ------------------------------------------------------------------------------- timing (bench)

def time_prefill(runner: FastModel, input_ids: torch.Tensor, repeats: int = 3, warmup: bool = True) -> float:
    """Seconds of a generation prefill over ``input_ids`` (``FastModel.prefill``: KV cache filled,
    last-position logits): the best of ``repeats`` (after a warm-up)."""
    if warmup:
        runner.prefill(input_ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.prefill(input_ids)
        times.append(time.perf_counter() - t0)
    return min(times)


def time_decode(runner: FastModel, prompt: torch.Tensor, new_tokens: int, repeats: int = 2,
                warmup: bool = True) -> float:
    """Greedy decode tokens/s: (time of ``new_tokens`` tokens - time of 1 token) / (new_tokens - 1),
    so the prompt's prefill is not counted; the best of ``repeats``, after one warm-up run (which
    compiles, if compiling)."""
    if warmup:
        runner.generate(prompt, new_tokens, min_new_tokens=new_tokens)
        runner.generate(prompt, 1)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.generate(prompt, new_tokens, min_new_tokens=new_tokens)
        t1 = time.perf_counter()
        runner.generate(prompt, 1)
        t2 = time.perf_counter()
        best.append((new_tokens - 1) / max((t1 - t0) - (t2 - t1), 1e-9))
    return max(best)
