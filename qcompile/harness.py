"""lm-eval-harness on compiled models: lm-eval's tasks through its HF wrapper, float vs compiled.

The compiled model runs as its eager HF twin (``qcompile.eager``: the compiled linears inside the
HF model), so every request type works: loglikelihood, rolling perplexity and ``generate_until``.
``LOCAL_TASKS`` ship in ``harness_tasks/`` and read the bundled WikiText-2 test text, so they run
with no dataset hub; any other name (``hellaswag``, ``arc_easy``, ...) goes to lm-eval's own
registry, whose datasets come from the hub.

lm-eval is an optional dependency (``pip install 'qcompile[eval]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from qcompile.progress import shown as progress_shown

__all__ = ["HarnessError", "LOCAL_TASKS", "TASK_DIR", "INSTALL_HINT", "task_manager", "lm_eval_model",
           "evaluate", "scores", "side_by_side"]

TASK_DIR = Path(__file__).with_name("harness_tasks")
LOCAL_TASKS = ("qcompile_wikitext2", "qcompile_wikitext_cloze")
INSTALL_HINT = "pip install 'qcompile[eval]'"
BOOTSTRAP_ITERS = 1000  # stderr of bootstrapped metrics; acc's is closed-form, perplexities' none


class HarnessError(RuntimeError):
    """lm-eval is missing, or a task cannot be run as asked."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HarnessError(f"lm-eval-harness is not installed ({err.name or err} missing): "
                           f"{INSTALL_HINT}") from err
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], data_file: str | Path | None = None):
    """lm-eval's TaskManager with qcompile's local tasks added, after checking every name in
    ``tasks`` is known (a name or a glob). lm-eval's own task index is read only when a task is not
    local. ``data_file``: the text the local tasks read (default: the bundled WikiText-2 test)."""
    _, _, TaskManager = _lm_eval()
    if not tasks:
        raise HarnessError("no tasks given")
    local_only = all(t in LOCAL_TASKS for t in tasks)
    meta = {"data_file": str(data_file)} if data_file else None
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=not local_only, metadata=meta)
    unknown = [t for t in tasks if not tm.match_tasks([t])]
    if unknown:
        import difflib
        near = sorted({m for t in unknown for m in difflib.get_close_matches(t, tm.all_tasks, n=3)})
        raise HarnessError(f"unknown task{'s' * (len(unknown) > 1)} {', '.join(unknown)}"
                           + (f" (did you mean {', '.join(near)}?)" if near else "")
                           + f"; local tasks: {', '.join(LOCAL_TASKS)}; lm-eval's: `lm-eval ls tasks`")
    return tm


def lm_eval_model(model: torch.nn.Module, tokenizer, batch_size: int = 1, max_length: int = 2048):
    """lm-eval's HF wrapper (``HFLM``) around ``model``, an eager HF causal LM (the compiled model's
    eager twin included), on the model's device; log-probabilities in float32."""
    _, HFLM, _ = _lm_eval()

    quiet = not progress_shown()

    class LocalHFLM(HFLM):
        """HFLM over a model object: its model info is read locally (HFLM's asks the hub for the
        checkpoint's revision, which a model object does not have); progress bars as qcompile's."""

        def get_model_info(self) -> dict[str, Any]:
            return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                    "model_dtype": str(self.model.dtype)}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            # rolling perplexity calls this once per window (override_bs): one bar per document is enough
            per_window = override_bs is not None
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or quiet or per_window,
                                                 override_bs=override_bs)

    model.eval()
    softmax = torch.float32 if model.dtype != torch.float32 else None  # log-probs in float32
    return LocalHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                     softmax_dtype=softmax)


def evaluate(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: float | None = None,
             batch_size: int = 1, max_length: int = 2048, num_fewshot: int | None = None,
             tm=None) -> dict[str, Any]:
    """lm-eval's results of ``model`` (an eager HF causal LM: float, or with compiled linears
    from ``qcompile.eager``) on ``tasks``. ``limit``: documents per task (a fraction if < 1);
    ``max_length``: the longest window scored at once (rolling perplexity cuts documents into
    windows of it)."""
    lm_eval, _, _ = _lm_eval()
    tm = tm if tm is not None else task_manager(tasks)
    with torch.inference_mode(), _lm_eval_logs(logging.ERROR):  # no autograd dispatch around the lowered ops
        lm = lm_eval_model(model, tokenizer, batch_size, max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=tm, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    if out is None:
        raise HarnessError("lm-eval returned no results")
    return out


@contextlib.contextmanager
def _lm_eval_logs(level: int) -> Iterator[None]:
    """lm-eval's log at ``level`` (its warnings are about its own command line, e.g. passing a
    model object, which is what qcompile does on purpose)."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def scores(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(task, metric): {"value", "stderr", "n", "higher_is_better"}}`` of lm-eval's results;
    a metric of a filter other than ``none`` is named ``metric,filter``."""
    out = {}
    for task, metrics in results["results"].items():
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            out[(task, name if filt == "none" else key)] = {
                "value": float(value), "n": n, "higher_is_better": better.get(name),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def side_by_side(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A table of several models' results (``{column name: lm-eval results}``, float first):
    task, metric, n, one column per model, and with two models the difference (second - first)
    and the second's stderr."""
    names = list(results)
    per_model = [scores(r) for r in results.values()]
    keys = list(dict.fromkeys(k for s in per_model for k in s))
    headers = ["task", "metric", "n", *names]
    if len(names) == 2:
        headers += ["delta", "stderr"]
    rows = []
    for task, metric in keys:
        cells = [s.get((task, metric)) for s in per_model]
        values = [c["value"] if c else math.nan for c in cells]
        n = next((c["n"] for c in cells if c and c["n"] is not None), None)
        row = [task, metric, n, *values]
        if len(names) == 2:
            stderr = cells[1]["stderr"] if cells[1] else None
            row += [values[1] - values[0], stderr if stderr is not None else ""]
        rows.append(row)
    return headers, rows
