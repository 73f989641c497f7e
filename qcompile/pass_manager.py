"""Passes, the pass registry and the manager that runs a pipeline.

A pass is a stateless function of (graph module, context) returning ``PassResult``. The manager,
not the pass, checks requirements before anything runs, recompiles and lints after each pass,
and calls the instruments (diff, timing, numeric probe). Passes never print.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch.fx as fx

__all__ = [
    "PassKind", "PassResult", "CompileContext", "Pass", "FunctionPass", "function_pass",
    "register_pass", "get_pass", "registered_passes", "PassManager", "PassError",
    "PipelineError", "resolve_passes",
]


class PassKind(str, enum.Enum):
    ANALYSIS = "analysis"
    TRANSFORM = "transform"
    LOWER = "lower"


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it thinks it changed it.

    ``notes`` (lines) and ``table`` (rows of dicts) are shown in the pass's diff in the report;
    the manager decides "changed" from a fingerprint, not from ``modified``.
    """

    graph_module: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CompileContext:
    """Shared state of one compilation: analyses computed so far and the calibration set."""

    analyses: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # qcompile.calibrate.CalibrationSet or None
    options: dict[str, Any] = field(default_factory=dict)

    def require(self, name: str, by: str) -> Any:
        if name not in self.analyses:
            providers = [p for p, cls in _REGISTRY.items() if name in getattr(cls, "provides", ())]
            hint = f"; run {' or '.join(sorted(set(providers)))} before it" if providers else ""
            raise PipelineError(f"pass {by!r} needs analysis {name!r}, which no earlier pass "
                                f"provided{hint}.")
        return self.analyses[name]


class PipelineError(ValueError):
    """The pipeline cannot run as given (unknown pass, missing analysis or calibration)."""


class PassError(RuntimeError):
    """A pass failed or broke the graph; names the pass, the passes before it, and the node."""

    def __init__(self, pass_name: str, before: Sequence[str], message: str,
                 node: fx.Node | None = None):
        where = ""
        if node is not None:
            from qcompile.frontend import module_name_of
            where = f" at node {node.name!r} ({node.op} {_target_name(node)}"
            mod = module_name_of(node)
            where += f", module {mod!r})" if mod else ")"
        prior = ", ".join(before) if before else "none"
        super().__init__(f"pass {pass_name!r} failed{where}: {message}\n  passes run before it: {prior}")
        self.pass_name = pass_name
        self.node = node


class Pass:
    """Base class of a pass. Subclasses set ``kind`` and implement ``run``.

    Class attributes: ``name`` (defaults to the class name), ``kind``, ``requires`` and
    ``provides`` (analysis names), ``needs_calibration``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind] = PassKind.TRANSFORM
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        return self.run(gm, ctx)

    def config(self) -> dict[str, Any]:
        """The pass's parameters (dataclass fields, else public attributes), for reports and recipes."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class FunctionPass(Pass):
    """A pass made from a function ``fn(gm, ctx) -> PassResult | GraphModule | None``."""

    def __init__(self, fn: Callable, name: str, kind: PassKind, requires: tuple[str, ...],
                 provides: tuple[str, ...], needs_calibration: bool):
        self.fn = fn
        self.name = name  # type: ignore[misc]
        self.kind = PassKind(kind)  # type: ignore[misc]
        self.requires = tuple(requires)  # type: ignore[misc]
        self.provides = tuple(provides)  # type: ignore[misc]
        self.needs_calibration = needs_calibration  # type: ignore[misc]

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        out = self.fn(gm, ctx)
        if out is None:
            return PassResult(gm, True)
        if isinstance(out, fx.GraphModule):
            return PassResult(out, True)
        return out

    def config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"function_pass({self.name})"


_REGISTRY: dict[str, Any] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def register_pass(obj: Any = None, *, name: str | None = None):
    """Register a Pass class (or FunctionPass instance) under its snake_case and class names."""

    def add(o: Any) -> Any:
        names = {name} if name else {_snake(o.name), o.name}
        for n in names:
            _REGISTRY[n] = o
        return o

    return add(obj) if obj is not None else add


def function_pass(fn: Callable | None = None, *, name: str | None = None,
                  kind: PassKind | str = PassKind.TRANSFORM, requires: Iterable[str] = (),
                  provides: Iterable[str] = (), needs_calibration: bool = False,
                  register: bool = True):
    """Decorator turning ``fn(gm, ctx)`` into a registered pass instance."""

    def wrap(f: Callable) -> FunctionPass:
        p = FunctionPass(f, name or f.__name__, PassKind(kind), tuple(requires), tuple(provides),
                         needs_calibration)
        if register:
            register_pass(p, name=p.name)
        return p

    return wrap(fn) if fn is not None else wrap


def registered_passes() -> dict[str, Any]:
    """Name -> pass class (or function-pass instance) for every registered pass."""
    import qcompile.passes  # noqa: F401 - registers the built-in passes
    return dict(_REGISTRY)


def get_pass(name: str, **params: Any) -> Pass:
    """Instantiate a registered pass by name (``"activation_stats"`` or ``"ActivationStats"``)."""
    registry = registered_passes()
    if name not in registry:
        known = sorted(k for k in registry if k == _snake(k))
        raise PipelineError(f"unknown pass {name!r}; registered passes: {', '.join(known)}")
    obj = registry[name]
    if isinstance(obj, Pass):
        if params:
            raise PipelineError(f"pass {name!r} is a function pass and takes no parameters")
        return obj
    allowed = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise PipelineError(f"bad parameters for pass {name!r}: unknown {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(allowed) or 'none'}")
    try:
        return obj(**params)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"bad parameters for pass {name!r}: {err}") from err


def resolve_passes(passes: Iterable[Any]) -> list[Pass]:
    """Accept Pass instances, registered names, ``(name, params)`` pairs and ``{"pass": ...}`` dicts."""
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(get_pass(p))
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            out.append(get_pass(p[0], **dict(p[1])))
        elif isinstance(p, dict) and "pass" in p:
            params = {k: v for k, v in p.items() if k != "pass"}
            out.append(get_pass(p["pass"], **params))
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise PipelineError(f"cannot use {p!r} as a pass: give a Pass instance, a registered "
                                "name, or a {'pass': name, ...} dict")
    return out


class PassManager:
    """Runs passes in order with requirement checks, recompile, lint and instruments."""

    def __init__(self, passes: Iterable[Any], instruments: Sequence[Any] = ()):
        self.passes = resolve_passes(passes)
        self.instruments = list(instruments)

    def check(self, ctx: CompileContext) -> None:
        """Name every missing analysis or calibration set before anything runs."""
        available = set(ctx.analyses)
        registry = registered_passes()
        for p in self.passes:
            missing = [r for r in p.requires if r not in available]
            if missing:
                providers = sorted({n for n, c in registry.items() if n == _snake(n)
                                    and set(missing) & set(getattr(c, "provides", ()))})
                hint = f"; add {' or '.join(providers)} before it" if providers else ""
                raise PipelineError(f"pass {p.name!r} requires analysis {', '.join(missing)} "
                                    f"that no earlier pass provides{hint}.")
            if p.needs_calibration and ctx.calibration is None:
                raise PipelineError(f"pass {p.name!r} needs calibration data: pass "
                                    "calibration=qcompile.data.calibration_windows(tokenizer, text, "
                                    "n=16, seq_len=512) to compile().")
            available.update(p.provides)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        self.check(ctx)
        done: list[str] = []
        for inst in self.instruments:
            inst.start(gm, ctx)
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            try:
                result = p(gm, ctx)
            except (PassError, PipelineError):
                raise
            except Exception as err:  # noqa: BLE001 - re-raised with the pass named
                raise PassError(p.name, done, f"{type(err).__name__}: {err}",
                                getattr(err, "qcompile_node", None)) from err
            if not isinstance(result, PassResult) or not isinstance(result.graph_module, fx.GraphModule):
                raise PassError(p.name, done, f"returned {type(result).__name__}; a pass must "
                                "return PassResult(graph_module, modified)")
            gm = result.graph_module
            try:
                gm.graph.lint()
                gm.recompile()
            except Exception as err:  # noqa: BLE001
                raise PassError(p.name, done, f"left an invalid graph: {err}",
                                _node_in_message(gm, str(err))) from err
            for inst in self.instruments:
                inst.after_pass(p, gm, ctx, result)
            done.append(p.name)
        return gm


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _node_in_message(gm: fx.GraphModule, message: str) -> fx.Node | None:
    for node in gm.graph.nodes:
        if re.search(rf"\b{re.escape(node.name)}\b", message):
            return node
    return None
