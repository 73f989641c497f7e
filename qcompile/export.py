"""Export a compiled model to a Hugging Face checkpoint in the compressed-tensors format, which
transformers (with the ``compressed-tensors`` package: ``pip install qcompile[export]``) and vLLM
load.

``export(gm, dir, format="compressed-tensors", tokenizer=tok)`` writes ``config.json`` (the source
model's config plus ``quantization_config``), the tokenizer files, and safetensors shards (with a
``model.safetensors.index.json`` once the tensors pass ``max_shard_size``). The exporter asks each
lowered linear's scheme how the format names and lays out its tensors
(``LoweredScheme.compressed_tensors_scheme`` / ``compressed_tensors_tensors``, in the scheme's own
file): W8A8 becomes ``int-quantized`` (int8 weights per channel, int8 activations per token,
dynamic; or per tensor, static), weight-only W8/W4/W3 becomes ``pack-quantized`` (int32 words,
densely packed; per channel or per group; asymmetric zero points packed along the output
dimension, as compressed-tensors' own compressor writes them). The integers written are exactly
the ones qcompile computed; nothing is re-rounded from float.

What is refused, with an error that says what would work (never a checkpoint loaders reject or
silently misread):

* schemes the format cannot represent (QUIK's float outlier columns): keep qcompile's format;
* a group size that does not divide a layer's input width (compressed-tensors needs whole groups;
  qcompile handles a ragged last group), or, with ``tensor_parallel=N``, each of the N vLLM shards
  of it: the error names the layers and the group sizes that divide every quantized layer;
* linears that read the same input (q/k/v, gate/up: vLLM fuses them into one shard) with
  different schemes;
* tensors the graph reads that have no place in the source architecture's checkpoint.

Biases: equalization and bias correction are ordinary folded weights and biases. A linear that
gained a bias its architecture does not declare (LLaMA's linears have none) is declared through
the config's own boolean bias flags (LLaMA: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for
gate/up/down), chosen so that every such bias has a parameter; the other linears those flags cover
get explicit zero biases (exact). Without the flag transformers would drop the tensor as an
unexpected key. An architecture with no flag for it is refused.

Loading: ``load_compressed_tensors(dir)`` loads an export with transformers. With transformers 5.24
and compressed-tensors 0.20 the default loading route builds asymmetric zero points unpacked
([N, groups]) and rejects the packed ones compressed-tensors writes (size mismatch), so for
asymmetric checkpoints it asks for ``CompressedTensorsConfig(dequantize=True)``, which decompresses
each module with compressed-tensors' own decompressor while loading.

Activation rounding: for dynamic per-token W8A8, qcompile scales by abs-max / 127 and
compressed-tensors by abs-max / 127.5, so a loader that fake-quantizes activations (transformers)
rounds them a little differently from qcompile's kernels; weights and static activation scales
are the same arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile import atomic_dir
from qcompile.formats import LoweredNode, PerGroup, lowered_nodes, registered_schemes
from qcompile.formats.scheme import NotRepresentable
from qcompile.param_store import store_of

__all__ = ["export", "load_compressed_tensors", "ExportError", "FORMATS", "compressed_tensors_plan"]

FORMATS = ("compressed-tensors",)
_DEFAULT_SHARD = 5 * 2 ** 30
_SIDE_CAR = "qcompile_export.json"


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what would work."""


# ------------------------------------------------------------------------------ the source model

def _source(gm: fx.GraphModule) -> tuple[str, dict[str, Any]]:
    src = gm.meta.get("qcompile_source") or {}
    cfg = src.get("config")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ExportError("the compiled model does not record its source Hugging Face config "
                          "(gm.meta['qcompile_source']['config']); only models compiled from a "
                          "transformers causal LM can be exported to a Hugging Face checkpoint")
    return str(src.get("class") or ""), dict(cfg)


def _hf_config(cfg: dict[str, Any], cls_name: str):
    from transformers import AutoConfig

    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    config = AutoConfig.for_model(cfg["model_type"], **rest)
    if not getattr(config, "architectures", None) and cls_name:
        config.architectures = [cls_name]
    return config


def _meta_model(config, cls_name: str) -> nn.Module:
    import transformers

    with torch.device("meta"):
        cls = getattr(transformers, cls_name, None) if cls_name else None
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def _expected(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    """The checkpoint keys of ``model`` with shapes (tied duplicates dropped), the tied key ->
    the key it is tied to, and the names of its Linear modules."""
    keys: dict[str, tuple[int, ...]] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        keys[name] = tuple(t.shape)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return keys, tied, linears


# ------------------------------------------------------------------------------ the plan

def _divisors(n: int, at_least: int = 16) -> list[int]:
    return [d for d in range(at_least, n + 1) if n % d == 0]


def _names(mods: list[str], limit: int = 6) -> str:
    mods = sorted(mods)
    more = f", ... and {len(mods) - limit} more" if len(mods) > limit else ""
    return ", ".join(mods[:limit]) + more


def _exportable_schemes() -> list[str]:
    out = []
    for cls in registered_schemes().values():
        try:
            scheme = cls()
            fmt = scheme.compressed_tensors_scheme()["format"]
        except (NotRepresentable, TypeError, ValueError):
            continue
        out.append(f"{cls.__name__} ({fmt})")
    return out


def _refuse_unrepresentable(nodes: list[LoweredNode]) -> dict[str, dict[str, Any]]:
    schemes: dict[str, dict[str, Any]] = {}
    bad: dict[str, list[str]] = defaultdict(list)
    reason: dict[str, str] = {}
    for ln in nodes:
        try:
            schemes[ln.module] = ln.scheme.compressed_tensors_scheme()
        except NotRepresentable as err:
            bad[ln.scheme.describe()].append(ln.module)
            reason[ln.scheme.describe()] = str(err)
    if bad:
        lines = [f"{len(mods)} layer(s) use {desc} ({_names(mods, 3)}): {reason[desc]}"
                 for desc, mods in bad.items()]
        raise ExportError("cannot export to compressed-tensors:\n  " + "\n  ".join(lines) +
                          "\nschemes that export: " + ", ".join(_exportable_schemes()) +
                          " (recipes rtn-w8a8, smoothquant-w8a8, aweq-w8a8, rtn-w4a16*, aweq-w4a16, "
                          "aweq-w3a16 with a dividing group size, gptq-w4a16)")
    return schemes


def _refuse_ragged_groups(nodes: list[LoweredNode], widths: dict[str, int], tensor_parallel: int = 1) -> None:
    """Every group must be whole, also in each of ``tensor_parallel`` shards of a layer's input
    (conservatively checked on every layer: vLLM splits the inputs of o_proj/down_proj)."""
    tp = tensor_parallel
    bad: dict[int, list[str]] = defaultdict(list)
    for ln in nodes:
        g = ln.scheme.w_granularity
        if isinstance(g, PerGroup) and widths[ln.module] % (g.size * tp):
            bad[g.size].append(ln.module)
    if not bad:
        return
    common = math.gcd(*widths.values())
    fits = [d for d in _divisors(common) if common % (d * tp) == 0]
    shard = f" / {tp} tensor-parallel shards" if tp > 1 else ""
    lines = []
    for size, mods in sorted(bad.items()):
        cols = sorted({widths[m] for m in mods})
        lines.append(f"group size {size} does not divide the input width{shard} of {len(mods)} layer(s) "
                     f"({', '.join(map(str, cols))} columns): {_names(mods)}")
    raise ExportError("cannot export to compressed-tensors: it needs whole groups (qcompile's own format "
                      "handles a ragged last group; vLLM and transformers do not).\n  " + "\n  ".join(lines) +
                      f"\ngroup sizes that divide every quantized layer's input width{shard} "
                      f"({', '.join(map(str, sorted(set(widths.values()))))}): "
                      f"{', '.join(map(str, fits)) or 'none'}, or per channel; recompile with one of "
                      "them (e.g. w_granularity=PerGroup(%d)) or save in qcompile's own format" %
                      (max([f for f in fits if f & (f - 1) == 0] or fits or [1])))


def _refuse_split_fusions(nodes: list[LoweredNode], schemes: dict[str, dict[str, Any]]) -> None:
    """Linears reading the same tensor (q/k/v, gate/up) are one fused shard in vLLM: one scheme."""
    by_input: dict[Any, list[str]] = defaultdict(list)
    for ln in nodes:
        by_input[ln.input].append(ln.module)
    for mods in by_input.values():
        kinds = {json.dumps(schemes[m], sort_keys=True) for m in mods}
        if len(kinds) > 1:
            desc = "; ".join(f"{m}: {schemes[m]['format']} {schemes[m]['weights']}" for m in sorted(mods))
            raise ExportError(f"linears reading the same input must share one scheme (vLLM fuses them "
                              f"into one shard), but they differ: {desc}")


def _targets(mods: set[str], linears: set[str], ignore: set[str]) -> list[str]:
    """Compact compressed-tensors targets for ``mods``: "Linear" when it is every linear not
    ignored, ``re:`` on a leaf name when every linear with that leaf is in ``mods`` (or ignored),
    else exact module names."""
    if mods == linears - ignore:
        return ["Linear"]
    leaves: dict[str, set[str]] = defaultdict(set)
    for m in linears:
        leaves[m.rsplit(".", 1)[-1]].add(m)
    out: list[str] = []
    covered: set[str] = set()
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in mods}):
        group = leaves[leaf]
        if group - ignore <= mods:
            out.append(f"re:.*\\.{re.escape(leaf)}$" if any("." in m for m in group) else f"re:^{re.escape(leaf)}$")
            covered |= group & mods
    out += sorted(mods - covered)
    return out


def _act_order(gm: fx.GraphModule) -> bool:
    """Whether GPTQ ran in activation order (from the recipe, or the pipeline compile recorded).
    qcompile's GPTQ keeps groups in column order either way, so it exports as ``static``."""
    recipe = gm.meta.get("qcompile_recipe") or {}
    steps = recipe.get("steps") or recipe.get("passes") or []
    if any(isinstance(s, dict) and s.get("pass") == "gptq" and s.get("act_order") for s in steps):
        return True
    return any(str(p).startswith("GPTQ(") and "act_order=True" in str(p)
               for p in getattr(gm, "qcompile_passes", None) or [])


def compressed_tensors_plan(gm: fx.GraphModule, tensor_parallel: int = 1) -> dict[str, Any]:
    """Check that ``gm`` can be exported and return the plan: the HF config (with any bias flags
    set), the ``quantization_config`` (validated by compressed-tensors), per-module schemes and
    input widths, the checkpoint keys expected. ``tensor_parallel``: the group size must also
    divide each shard of a layer's input. Raises ``ExportError``."""
    if tensor_parallel < 1:
        raise ExportError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    cls_name, cfg = _source(gm)
    nodes = lowered_nodes(gm)
    missing = [ln.node.name for ln in nodes if not ln.module]
    if missing:
        raise ExportError(f"lowered ops {missing[:5]} do not record the module they replace")
    schemes = _refuse_unrepresentable(nodes)
    widths = {ln.module: ln.in_features(gm) for ln in nodes}
    for ln in nodes:
        if ln.scheme.input_permutation(ln.tensors(gm)) is not None:
            raise ExportError(f"{ln.module} gathers its input columns; compressed-tensors has no gather")
    _refuse_ragged_groups(nodes, widths, tensor_parallel)
    _refuse_split_fusions(nodes, schemes)

    config = _hf_config(cfg, cls_name)
    state = _gm_tensors(gm)
    lowered_attrs = _lowered_attr_targets(nodes)
    float_keys = {k for k in state if k not in lowered_attrs}
    bias_needed = {ln.module + ".bias" for ln in nodes if ln.tensors(gm).get(ln.scheme.bias_arg) is not None}

    model = _meta_model(config, cls_name)
    keys, tied, linears = _expected(model)
    aliases = dict(tied)  # the graph may hold a tied tensor under either name, even once untied
    # a lowered linear, or tied weights that no longer agree, break the tie
    if tied and any(k.rsplit(".", 1)[0] in widths or
                    (k in state and v in state and not torch.equal(state[k], state[v])) for k, v in tied.items()):
        config.tie_word_embeddings = False
        model = _meta_model(config, cls_name)
        keys, tied, linears = _expected(model)
    flags = _declare_biases(config, cls_name, bias_needed | {k for k in float_keys if k.endswith(".bias")}, keys)
    if flags:
        model = _meta_model(config, cls_name)
        keys, tied, linears = _expected(model)

    not_linear = sorted(set(widths) - linears)
    if not_linear:
        raise ExportError(f"lowered modules {not_linear[:5]} are not Linear modules of {cls_name}")
    buffers = {n for n, _ in model.named_buffers()}
    stray = sorted(k for k in float_keys if k not in keys and k not in aliases and k not in buffers)
    if stray:
        raise ExportError(f"the compiled graph reads tensors with no place in a {cls_name} checkpoint: "
                          f"{_names(stray)}; only weight changes (folded scales, biases, quantized linears) "
                          "export")

    ignore = linears - set(widths)
    groups: dict[str, dict[str, Any]] = {}
    by_scheme: dict[str, set[str]] = defaultdict(set)
    for mod, sch in schemes.items():
        by_scheme[json.dumps(sch, sort_keys=True)].add(mod)
    act_order = _act_order(gm)
    formats = set()
    for i, (key, mods) in enumerate(sorted(by_scheme.items(), key=lambda kv: sorted(kv[1])[0])):
        sch = json.loads(key)
        weights = dict(sch["weights"])
        if act_order and sch["format"] == "pack-quantized":
            weights["actorder"] = "static"  # groups stay in column order: activation order was calibration only
        groups[f"group_{i}"] = {"targets": _targets(mods, linears, ignore), "weights": weights,
                                "input_activations": sch.get("input_activations"),
                                "output_activations": None, "format": sch["format"]}
        formats.add(sch["format"])
    qconfig = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else
               "mixed-precision", "quantization_status": "compressed", "config_groups": groups,
               "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
               "sparsity_config": {}, "transform_config": {}}
    _validate(qconfig, model)
    return {"config": config, "cls": cls_name, "quantization_config": qconfig, "nodes": nodes,
            "widths": widths, "keys": keys, "tied": tied, "aliases": aliases, "linears": linears, "bias_flags": flags, "state": state,
            "lowered_attrs": lowered_attrs}


def _gm_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            mod, _, attr = node.target.rpartition(".")
            t = getattr(gm.get_submodule(mod) if mod else gm, attr)
            if isinstance(t, torch.Tensor):
                out[node.target] = t.detach()
    return out


def _lowered_attr_targets(nodes: list[LoweredNode]) -> set[str]:
    out = set()
    for ln in nodes:
        for name in ln.scheme.tensor_args:
            a = ln.arg(name)
            if isinstance(a, fx.Node) and a.op == "get_attr":
                out.add(a.target)
    return out


def _declare_biases(config, cls_name: str, needed: set[str], keys: dict[str, Any]) -> list[str]:
    """Turn on the config's boolean ``*bias`` flags needed for every tensor in ``needed`` to be a
    parameter of the architecture; returns the flags set (raises when no flag declares one)."""
    missing = {k for k in needed if k not in keys}
    if not missing:
        return []
    flags = [k for k, v in config.to_dict().items() if v is False and k.endswith("bias")]
    chosen = []
    for flag in flags:
        setattr(config, flag, True)
        trial, _, _ = _expected(_meta_model(config, cls_name))
        if missing & set(trial):
            chosen.append(flag)
            missing -= set(trial)
        else:
            setattr(config, flag, False)
        if not missing:
            break
    if missing:
        for flag in chosen:
            setattr(config, flag, False)
        raise ExportError(f"{_names(sorted(missing))} gained a bias (bias correction), but {cls_name}'s "
                          f"config has no flag that gives those linears a bias (tried {flags or 'none'}); "
                          "transformers would drop it. Compile without BiasCorrection, or keep qcompile's format")
    return chosen


def _validate(qconfig: dict[str, Any], model: nn.Module) -> None:
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    except ImportError as err:
        raise ExportError("exporting to compressed-tensors validates the config with the compressed-tensors "
                          "package: pip install 'qcompile[export]' (or compressed-tensors>=0.20)") from err
    fields = set(QuantizationConfig.model_fields)
    try:
        QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k in fields})
        for name, group in qconfig["config_groups"].items():
            scheme = QuantizationScheme.model_validate(group)
            compressor = BaseCompressor.get_value_from_registry(group["format"])
            if not compressor.can_compress(nn.Linear, scheme):
                raise ExportError(f"compressed-tensors' {group['format']} compressor does not take {name}: {group}")
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, registry KeyError
        raise ExportError(f"compressed-tensors rejects the quantization_config written: {err}") from err


# ------------------------------------------------------------------------------ writing

def _state_dict(plan: dict[str, Any], gm: fx.GraphModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_module = {ln.module: ln for ln in plan["nodes"]}
    state = plan["state"]
    for key, shape in plan["keys"].items():
        mod, _, leaf = key.rpartition(".")
        if mod in by_module:
            if leaf == "weight":
                ln = by_module[mod]
                tensors = ln.tensors(gm)
                ct = ln.scheme.compressed_tensors_tensors(tensors, plan["widths"][mod], dtype)
                out.update({f"{mod}.{name}": t.contiguous() for name, t in ct.items()})
                continue
            if leaf == "bias":
                b = by_module[mod].tensors(gm).get(by_module[mod].scheme.bias_arg)
                out[key] = (torch.zeros(shape, dtype=dtype) if b is None else b.to(dtype)).contiguous()
                continue
            raise ExportError(f"{key}: a quantized linear's parameter the exporter does not know")
        tied_to = {k: v for k, v in plan["aliases"].items()} | {v: k for k, v in plan["aliases"].items()}
        aliases = [key] + ([tied_to[key]] if key in tied_to else [])
        held = [a for a in aliases if a in state]
        if held:
            t = state[held[0]]
        elif leaf == "bias" and mod in plan["linears"]:
            t = torch.zeros(shape)  # a bias flag turned on for a float linear
        else:
            raise ExportError(f"the compiled graph has no tensor for {key} (shape {list(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise ExportError(f"{key}: the graph holds shape {list(t.shape)}, {plan['cls']} expects {list(shape)}")
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    # no two entries may share storage (safetensors refuses it)
    seen: set[int] = set()
    for k, t in out.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            out[k] = t.clone()
        seen.add(ptr)
    return out


def _write_shards(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return files


def _write_streamed(tmp: Path, plan: dict[str, Any], gm: fx.GraphModule, dtype: torch.dtype,
                    max_shard_size: int, store: Any) -> list[str]:
    """``_write_shards`` for a streamed compile (``qcompile.param_store``): each group of the store
    is read in, converted and written as its own shard(s), so memory holds one group's tensors."""
    from safetensors.torch import save_file

    by_group: dict[str | None, dict[str, Any]] = {}
    for key, shape in plan["keys"].items():
        by_group.setdefault(store.group_of(key), {})[key] = shape
    shards: list[tuple[Path, list[str]]] = []
    total = 0
    for group in [*store.groups, None]:  # None: the tensors kept in memory (tied ones)
        if group not in by_group:
            continue
        store.activate(group)
        try:
            part = _state_dict({**plan, "keys": by_group[group], "state": _gm_tensors(gm)}, gm, dtype)
        except NotRepresentable as err:
            raise ExportError(f"cannot export to compressed-tensors: {err}") from err
        chunk: dict[str, torch.Tensor] = {}
        for name in sorted(part):
            n = part[name].numel() * part[name].element_size()
            if chunk and sum(t.numel() * t.element_size() for t in chunk.values()) + n > max_shard_size:
                shards.append(_save_part(tmp, len(shards), chunk, save_file))
                chunk = {}
            chunk[name] = part[name]
            total += n
        shards.append(_save_part(tmp, len(shards), chunk, save_file))
    store.release()
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, (path, names) in zip(files, shards):
        path.rename(tmp / fname)
        weight_map.update({k: fname for k in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return files


def _save_part(tmp: Path, i: int, tensors: dict[str, torch.Tensor], save_file: Any) -> tuple[Path, list[str]]:
    path = tmp / f"part-{i}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, sorted(tensors)


def _float_dtype(gm: fx.GraphModule, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in table:
            raise ExportError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16")
        dtype = table[dtype]
    if dtype is None:
        floats = [t.dtype for t in _gm_tensors(gm).values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ExportError(f"float tensors are written as fp32, fp16 or bf16, not {dtype}")
    return dtype


def export(gm: fx.GraphModule, directory: str | os.PathLike, format: str = "compressed-tensors", *,
           tokenizer: Any = None, dtype: torch.dtype | str | None = None,
           max_shard_size: int = _DEFAULT_SHARD, overwrite: bool = False, tensor_parallel: int = 1) -> Path:
    """Write ``gm`` (compiled from a transformers causal LM) as a checkpoint directory in
    ``format`` (only ``"compressed-tensors"``): config.json with ``quantization_config``, the
    tokenizer's files when ``tokenizer`` is given, safetensors shards of at most
    ``max_shard_size`` bytes (an index when there is more than one). ``dtype``: the float
    tensors (embeddings, norms, scales, biases), default the graph's own (float32 in memory:
    qcompile's values exactly). ``tensor_parallel``: refuse group sizes that would not divide
    each of that many vLLM shards of a layer's input. The directory is written crash-safely.
    Raises ``ExportError`` with what would work when the model cannot be exported."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)} "
                          "(qcompile's own format: qcompile.save)")
    target = Path(directory)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--force) to replace it")
    if max_shard_size < 1:
        raise ExportError(f"max_shard_size must be positive, got {max_shard_size}")
    float_dtype = _float_dtype(gm, dtype)
    plan = compressed_tensors_plan(gm, tensor_parallel)
    store = store_of(gm)  # a streamed compile: its tensors are converted group by group while writing
    try:
        tensors = _state_dict(plan, gm, float_dtype) if store is None else {}
    except NotRepresentable as err:
        raise ExportError(f"cannot export to compressed-tensors: {err}") from err
    config = plan["config"]
    config.dtype = float_dtype
    body = config.to_dict()
    body["quantization_config"] = dict(plan["quantization_config"])
    try:
        import compressed_tensors
        body["quantization_config"]["version"] = compressed_tensors.__version__
    except ImportError:  # pragma: no cover - _validate already required it
        pass
    sidecar = {"exported_by": "qcompile", "format": format, "source_class": plan["cls"],
               "recipe": gm.meta.get("qcompile_recipe"), "model_ref": gm.meta.get("qcompile_model_ref"),
               "bias_flags_set": plan["bias_flags"], "float_dtype": str(float_dtype).replace("torch.", ""),
               "schemes": {ln.module: ln.scheme.to_json() for ln in plan["nodes"]}}

    def fill(tmp: Path) -> None:
        files = (_write_shards(tmp, tensors, max_shard_size) if store is None else
                 _write_streamed(tmp, plan, gm, float_dtype, max_shard_size, store))
        (tmp / "config.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        (tmp / _SIDE_CAR).write_text(json.dumps({**sidecar, "files": files}, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_dir.write_dir(target, fill)


# ------------------------------------------------------------------------------ loading back

def load_compressed_tensors(directory: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load an exported checkpoint with transformers (needs the compressed-tensors package).

    Asymmetric ``pack-quantized`` checkpoints load through ``CompressedTensorsConfig(dequantize=
    True)``: transformers 5.24's default route builds zero points unpacked and rejects the packed
    ones compressed-tensors writes. Everything else takes the default route, which keeps
    compressed-tensors' activation fake-quantization (W8A8)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = Path(directory)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    asym = any(not ((g.get("weights") or {}).get("symmetric", True))
               for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict))
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    if asym:
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
