"""A tiny LLaMA checkpoint directory with a trained BPE tokenizer and a calibration text, for the
command line's tests of streamed and distributed compiles."""

from __future__ import annotations

from pathlib import Path

from models_for_tests import tiny_llama

TEXT = ("the quick brown fox jumps over the lazy dog and the cat sat on the mat while it rained "
        "heavily outside the old house by the river where nobody lived any more ") * 40


def write_checkpoint(d: Path, layers: int = 3, max_shard_size: str | None = None) -> Path:
    """``d/ckpt`` (weights, config, tokenizer) and ``d/text.txt``; returns ``d``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"]))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_llama(layers=layers).save_pretrained(d / "ckpt", **kwargs)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(d / "ckpt")
    (d / "text.txt").write_text(TEXT)
    return d
