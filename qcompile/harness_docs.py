"""The documents of qcompile's local lm-eval tasks, built from the bundled WikiText-2 test text.

``qcompile/harness_tasks/*.yaml`` name these functions (``!function qcompile.harness_docs...``),
so the tasks need no dataset hub: lm-eval calls ``wikitext_pages`` / ``wikitext_cloze`` as the
task's ``custom_dataset`` and gets a ``{"test": datasets.Dataset}``.

- ``qcompile_wikitext2`` (rolling loglikelihood): one document per article, cut at the
  top-level ``= Title =`` headings (section headings are ``= = Section = =``), as WikiText-2's
  document-level form is; 62 articles in the test split.
- ``qcompile_wikitext_cloze`` (multiple choice): a sentence, its true next sentence and 3
  distractor sentences from elsewhere in the same article (same topic, so the model must judge
  the continuation, not the subject), in a seeded order; ``CLOZE_TEST_ITEMS`` items.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from qcompile.data import default_test_file, load_text

__all__ = ["articles", "cloze_items", "page_text", "page_results", "wikitext_pages", "wikitext_cloze",
           "PAGES_IN_TEST", "CLOZE_TEST_ITEMS", "CLOZE_SEED"]

PAGES_IN_TEST = 62        # articles in WikiText-2's test split
CLOZE_TEST_ITEMS = 1529   # cloze items cut from it (one per paragraph that has a usable pair)
CLOZE_SEED = 0
CLOZE_WORDS = (6, 40)     # a sentence of the cloze has this many words (inclusive)

_TOP_HEADING = re.compile(r"^= [^=].* =$")       # "= Robert Boulter =", not "= = Career = ="
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")  # WikiText's tokens: "... actor . He had ..."


def articles(text: str) -> list[list[str]]:
    """The text's articles, each a list of its non-empty stripped lines (its title line first)."""
    out: list[list[str]] = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line:
            continue
        if _TOP_HEADING.match(line) or not out:
            out.append([])
        out[-1].append(line)
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _usable(sentence: str) -> bool:
    return CLOZE_WORDS[0] <= len(sentence.split()) <= CLOZE_WORDS[1]


def cloze_items(text: str, seed: int = CLOZE_SEED) -> list[dict[str, Any]]:
    """One item per paragraph that holds two consecutive usable sentences (the first such pair):
    ``context`` the first, ``choices`` the second and 3 usable sentences of other paragraphs of
    the same article, ``label`` the true one's index. Deterministic for a given text and seed."""
    rng = random.Random(seed)
    items = []
    for lines in articles(text):
        paragraphs = [_sentences(ln) for ln in lines if not ln.startswith("=")]
        for p, sents in enumerate(paragraphs):
            pair = next(((a, b) for a, b in zip(sents, sents[1:]) if _usable(a) and _usable(b)), None)
            if pair is None:
                continue
            pool = sorted({s for q, other in enumerate(paragraphs) if q != p for s in other if _usable(s)}
                          - set(pair))
            if len(pool) < 3:
                continue
            choices = rng.sample(pool, 3)
            label = rng.randrange(4)
            choices.insert(label, pair[1])
            items.append({"context": _sentence(pair[0]), "choices": [_sentence(c) for c in choices],
                          "label": label})
    return items


def detokenize(text: str) -> str:
    """WikiText's tokenized text as prose, by lm-eval's own wikitext rules (so scores compare)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    return wikitext_detokenizer({"page": text})


def _sentence(text: str) -> str:
    return detokenize(text + " ").strip()  # the rules join a final " ." only when a space follows


# ---------------------------------------------------------------- what the task YAMLs call

def _test_text(data_file: str | Path | None) -> str:
    return load_text(data_file or default_test_file())


def _dataset(rows: list[dict[str, Any]]):
    import datasets
    return {"test": datasets.Dataset.from_list(rows)}


def wikitext_pages(data_file: str | None = None, **_metadata: Any):
    """``custom_dataset`` of ``qcompile_wikitext2``: ``{"page": text}`` per article. ``data_file``
    comes from the TaskManager's metadata (``qcompile.harness``); default: the bundled test file."""
    return _dataset([{"page": "\n".join(lines)} for lines in articles(_test_text(data_file))])


def wikitext_cloze(data_file: str | None = None, **_metadata: Any):
    """``custom_dataset`` of ``qcompile_wikitext_cloze``."""
    return _dataset(cloze_items(_test_text(data_file)))


def page_text(doc: dict[str, Any]) -> str:
    """What the model scores for a page: its detokenized text."""
    return detokenize(doc["page"])


def page_results(doc: dict[str, Any], results: tuple[float]) -> dict[str, tuple[float, int]]:
    """The page's loglikelihood, weighted by its words and bytes as counted in the WikiText text
    before detokenizing (the convention of lm-eval's wikitext task)."""
    (loglikelihood,) = results
    words, size = len(doc["page"].split()), len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
