"""Pass instruments: graph fingerprints and diffs, timing, a numeric probe, and the report.

Like MLIR's print-ir-after-change, a pass counts as "changed" only when the fingerprint of the
graph and of its parameters differs after it; the diff lists nodes added, removed and
retargeted (with the module they belong to) and the parameters that changed.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from tabulate import tabulate

from qcompile.frontend import module_name_of
from qcompile.kernels.tensor_stamp import TensorStamp

__all__ = ["Instrument", "GraphSnapshot", "PassRecord", "CompileReport", "ReportInstrument",
           "graph_fingerprint", "tensor_digest", "tensor_signature"]


# ---------------------------------------------------------------- fingerprints

_SIGS: dict[int, tuple[TensorStamp, "TensorSig"]] = {}
_MAX_SIGS = 20_000  # entries before the dead ones are dropped


def _content_hash(data: torch.Tensor) -> str:
    # sha256: hardware-accelerated (SHA-NI) on current x86 and ARM CPUs, 2-3x blake2b's speed there
    h = hashlib.sha256()
    h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    if data.numel():
        h.update(memoryview(data.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:24]


def tensor_digest(t: torch.Tensor) -> str:
    """A content hash of a tensor, cached on the tensor's identity and in-place version."""
    return tensor_signature(t).digest


def tensor_signature(t: torch.Tensor) -> "TensorSig":
    """Shape, dtype, content hash, norm and abs-max of ``t``; cached while ``t`` is the same tensor,
    unmodified (a snapshot after a pass recomputes only the tensors the pass changed)."""
    hit = _SIGS.get(id(t))
    if hit is not None and hit[0].matches(t):
        return hit[1]
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    if data.is_floating_point() and data.numel():
        norm, absmax = float(data.float().norm()), float(data.abs().max())
    elif data.is_floating_point():
        norm = absmax = 0.0
    else:
        norm = absmax = float("nan")
    sig = TensorSig(tuple(t.shape), str(t.dtype).replace("torch.", ""), _content_hash(data), norm, absmax)
    if len(_SIGS) > _MAX_SIGS:  # forget the tensors that no longer exist
        for key in [k for k, (stamp, _) in _SIGS.items() if stamp.ref() is None]:
            del _SIGS[key]
    try:
        _SIGS[id(t)] = (TensorStamp(t), sig)
    except TypeError:
        pass
    return sig


@dataclass(frozen=True)
class NodeSig:
    op: str
    target: str
    args: str
    module: str


@dataclass(frozen=True)
class TensorSig:
    shape: tuple[int, ...]
    dtype: str
    digest: str
    norm: float
    absmax: float


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return "%" + a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    return repr(a)


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return str(getattr(t, "_name", None) or getattr(t, "__name__", None) or t)


@dataclass
class GraphSnapshot:
    """What the diff compares: node signatures, tensor signatures and the graph's text."""

    nodes: dict[str, NodeSig]
    tensors: dict[str, TensorSig]
    text: str

    @classmethod
    def take(cls, gm: fx.GraphModule) -> "GraphSnapshot":
        nodes = {}
        lines = []
        for n in gm.graph.nodes:
            sig = NodeSig(n.op, _target_str(n), _fmt_arg(n.args) + (_fmt_arg(n.kwargs) if n.kwargs else ""),
                          module_name_of(n))
            nodes[n.name] = sig
            lines.append(f"%{n.name} = {n.op}[{sig.target}]{sig.args}")
        tensors = {}
        for name, t in _named_tensors(gm):
            tensors[name] = tensor_signature(t)
        return cls(nodes, tensors, "\n".join(lines))

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.text.encode())
        for name, sig in sorted(self.tensors.items()):
            h.update(f"{name}:{sig.digest}".encode())
        return h.hexdigest()


def _named_tensors(gm: fx.GraphModule):
    seen = set()
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in seen:
            seen.add(name)
            yield name, t


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the graph structure and every parameter/buffer's contents."""
    return GraphSnapshot.take(gm).fingerprint()


# ---------------------------------------------------------------- diffs and records

@dataclass
class GraphDiff:
    added: list[tuple[str, NodeSig]]
    removed: list[tuple[str, NodeSig]]
    retargeted: list[tuple[str, NodeSig, NodeSig]]
    tensors_added: list[tuple[str, TensorSig]]
    tensors_removed: list[tuple[str, TensorSig]]
    tensors_changed: list[tuple[str, TensorSig, TensorSig]]
    text_diff: list[str]

    @classmethod
    def between(cls, a: GraphSnapshot, b: GraphSnapshot, name: str) -> "GraphDiff":
        added = [(k, v) for k, v in b.nodes.items() if k not in a.nodes]
        removed = [(k, v) for k, v in a.nodes.items() if k not in b.nodes]
        changed = [(k, a.nodes[k], v) for k, v in b.nodes.items() if k in a.nodes and a.nodes[k] != v]
        t_add = [(k, v) for k, v in b.tensors.items() if k not in a.tensors]
        t_rm = [(k, v) for k, v in a.tensors.items() if k not in b.tensors]
        t_ch = [(k, a.tensors[k], v) for k, v in b.tensors.items()
                if k in a.tensors and a.tensors[k].digest != v.digest]
        text = list(difflib.unified_diff(a.text.splitlines(), b.text.splitlines(),
                                         f"before {name}", f"after {name}", lineterm="", n=1))
        return cls(added, removed, changed, t_add, t_rm, t_ch, text)


@dataclass
class PassRecord:
    """One row of the report: a pass that ran, what it cost and what it changed."""

    name: str
    kind: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    diff: GraphDiff | None = None
    probe_error: float | None = None
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def params_changed(self) -> int:
        if self.diff is None:
            return 0
        return len(self.diff.tensors_added) + len(self.diff.tensors_removed) + len(self.diff.tensors_changed)


def _node_line(sign: str, name: str, sig: NodeSig) -> str:
    where = f"  [{sig.module}]" if sig.module else ""
    return f"  {sign} %{name} = {sig.op} {sig.target}{sig.args}{where}"


def _grouped_node_lines(d: "GraphDiff") -> list[str]:
    """Compute nodes added/removed per module (get_attr nodes are covered by the tensor lines)."""
    per_module: dict[str, tuple[list[str], list[str]]] = {}
    for name, sig in d.removed:
        if sig.op != "get_attr":
            per_module.setdefault(sig.module, ([], []))[0].append(sig.target)
    for name, sig in d.added:
        if sig.op != "get_attr":
            per_module.setdefault(sig.module, ([], []))[1].append(sig.target)
    lines = []
    for module, (gone, new) in per_module.items():
        what = " ".join([f"-{t}" for t in gone] + [f"+{t}" for t in new])
        lines.append(f"  [{module or '<top>'}] {what}")
    retargeted = [(k, a, b) for k, a, b in d.retargeted if a.target != b.target or a.op != b.op]
    for k, a, b in retargeted:
        lines.append(f"  ~ %{k}: {a.target} -> {b.target}" + (f"  [{b.module}]" if b.module else ""))
    rewired = len(d.retargeted) - len(retargeted)
    if rewired:
        lines.append(f"  ({rewired} nodes now read new inputs)")
    return lines


def _tensor_line(sign: str, name: str, sig: TensorSig) -> str:
    return f"  {sign} {name}: {sig.dtype}{list(sig.shape)}"


class CompileReport:
    """Per-pass table (``print(report)``) and per-pass diffs (``report.diff(name)``)."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []

    def __getitem__(self, name: str) -> PassRecord:
        return self._find(name)

    def _find(self, name: str) -> PassRecord:
        hits = [r for r in self.records if r.name == name or r.name.lower() == name.lower()]
        if not hits:
            known = ", ".join(r.name for r in self.records)
            raise KeyError(f"no pass named {name!r} in this report; passes run: {known}")
        return hits[0]

    def table(self) -> str:
        rows = []
        for r in self.records:
            d = r.diff
            rows.append([r.name, r.kind, f"{r.seconds:.2f}", "yes" if r.changed else "no",
                         f"+{len(d.added)}/-{len(d.removed)}" if d else "+0/-0",
                         len(d.retargeted) if d else 0, r.params_changed,
                         "" if r.probe_error is None else f"{r.probe_error:.3g}"])
        return tabulate(rows, headers=["pass", "kind", "time s", "changed", "nodes +/-",
                                       "rewired", "params changed", "probe max|err|"])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"CompileReport({len(self.records)} passes)"

    def diff(self, name: str, *, style: str = "summary", max_lines: int = 200) -> str:
        """The diff a pass made: ``style="summary"`` (nodes and params) or ``"code"`` (unified diff)."""
        r = self._find(name)
        head = f"=== {r.name} ({r.kind}) {r.seconds:.2f}s"
        if not r.changed or r.diff is None:
            body = [f"{head}: no change to the graph or its parameters"]
            body += [f"  note: {n}" for n in r.notes]
            return "\n".join(body + self._table_lines(r))
        d = r.diff
        lines = [f"{head}: nodes +{len(d.added)} -{len(d.removed)} ~{len(d.retargeted)}, "
                 f"tensors +{len(d.tensors_added)} -{len(d.tensors_removed)} ~{len(d.tensors_changed)}"]
        lines += [f"  note: {n}" for n in r.notes]
        if style == "code":
            lines += d.text_diff
        else:
            lines += _grouped_node_lines(d)
            lines += [_tensor_line("-", k, s) for k, s in d.tensors_removed]
            lines += [_tensor_line("+", k, s) for k, s in d.tensors_added]
            for k, a, b in d.tensors_changed:
                lines.append(f"  ~ {k}: {b.dtype}{list(b.shape)} norm {a.norm:.4g} -> {b.norm:.4g}, "
                             f"absmax {a.absmax:.4g} -> {b.absmax:.4g}")
        lines += self._table_lines(r)
        if len(lines) > max_lines:
            lines = lines[:max_lines] + [f"  ... {len(lines) - max_lines} more lines "
                                         "(diff(name, max_lines=...) shows them)"]
        return "\n".join(lines)

    @staticmethod
    def _table_lines(r: PassRecord) -> list[str]:
        if not r.table:
            return []
        return ["  " + line for line in tabulate(r.table, headers="keys", floatfmt=".4g").splitlines()]

    def diffs(self, **kw: Any) -> str:
        """Diffs of every pass that changed the graph, in order."""
        return "\n\n".join(self.diff(r.name, **kw) for r in self.records if r.changed)


# ---------------------------------------------------------------- instruments

class Instrument:
    """Hooks the pass manager calls around every pass."""

    def start(self, gm: fx.GraphModule, ctx: Any) -> None: ...
    def before_pass(self, p: Any, gm: fx.GraphModule, ctx: Any) -> None: ...
    def after_pass(self, p: Any, gm: fx.GraphModule, ctx: Any, result: Any) -> None: ...


class ReportInstrument(Instrument):
    """Times each pass, fingerprints the graph before/after, and (optionally) probes numerics.

    ``probe``: a function ``gm -> Tensor``; the max |output - reference| after each pass is
    recorded, the reference being the output before the first pass.
    """

    def __init__(self, report: CompileReport | None = None,
                 probe: Callable[[fx.GraphModule], torch.Tensor] | None = None):
        self.report = report or CompileReport()
        self.probe = probe
        self._reference: torch.Tensor | None = None
        self._snapshot: GraphSnapshot | None = None
        self._t0 = 0.0
        self._nodes = 0

    def start(self, gm, ctx) -> None:
        self._snapshot = GraphSnapshot.take(gm)
        if self.probe is not None:
            self._reference = self.probe(gm).detach().float()

    def before_pass(self, p, gm, ctx) -> None:
        self._nodes = len(gm.graph.nodes)
        self._t0 = time.perf_counter()

    def after_pass(self, p, gm, ctx, result) -> None:
        seconds = time.perf_counter() - self._t0
        after = GraphSnapshot.take(gm)
        assert self._snapshot is not None
        changed = after.fingerprint() != self._snapshot.fingerprint()
        diff = GraphDiff.between(self._snapshot, after, p.name) if changed else None
        probe_error = None
        if self.probe is not None and self._reference is not None:
            out = self.probe(gm).detach().float()
            probe_error = float((out - self._reference).abs().max())
        self.report.records.append(PassRecord(
            p.name, str(getattr(p.kind, "value", p.kind)), seconds, changed, self._nodes,
            len(gm.graph.nodes), diff, probe_error, list(result.notes), list(result.table),
            _safe_config(p)))
        self._snapshot = after


def _safe_config(p: Any) -> dict[str, Any]:
    try:
        return dict(p.config())
    except Exception:  # noqa: BLE001 - reports must not fail the compile
        return {}
