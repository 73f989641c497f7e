"""Passes, the pass registry and the manager that runs a pipeline.

A pass is a stateless function of (graph module, context) returning ``PassResult``. The manager,
not the pass, checks requirements before anything runs, recompiles and lints after each pass,
stores the analyses a pass returns (and drops the ones it invalidates), verifies that a pass
declaring ``preserves_float_model`` kept the model's output on the probe input (verify-each),
and calls the instruments (diff, timing, numeric probe). Passes never print.

This module imports no pass: the built-in passes register themselves when ``qcompile.passes`` is
imported.
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

# what a pass class declares about itself; never set on an instance (a property may derive one
# from the pass's configuration)
_DECLARED = ("name", "kind", "requires", "provides", "needs_calibration", "preserves_float_model")


class PassKind(str, enum.Enum):
    ANALYSIS = "analysis"
    TRANSFORM = "transform"
    LOWER = "lower"


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it thinks it changed it.

    ``notes`` (lines) and ``table`` (rows of dicts) are shown in the pass's diff in the report;
    the manager decides "changed" from a fingerprint, not from ``modified``.

    ``updated``: analyses this pass provides, or new values replacing earlier passes' results that
    it changed (Equalize returns the rescaled ``activation_stats``); the manager stores them.
    A pass never mutates an analysis it did not create: it builds a new one and returns it here.
    ``invalidated``: analyses this pass made stale (dropped by the manager; a later pass that
    requires one of them is told which pass invalidated it).
    """

    graph_module: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    updated: dict[str, Any] = field(default_factory=dict)
    invalidated: tuple[str, ...] = ()


@dataclass
class CompileContext:
    """Shared state of one compilation: analyses computed so far and the calibration set.

    ``invalidated`` maps an analysis dropped by a transform to the pass that dropped it.
    """

    analyses: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # qcompile.calibrate.CalibrationSet or None
    options: dict[str, Any] = field(default_factory=dict)
    invalidated: dict[str, str] = field(default_factory=dict)

    def require(self, name: str, by: str) -> Any:
        if name not in self.analyses:
            raise PipelineError(_missing_message(by, [name], self))
        return self.analyses[name]


def _declared(obj: Any, attr: str) -> tuple[str, ...]:
    """A pass class's (or instance's) declared analysis names; () where a property derives them."""
    value = getattr(obj, attr, ())
    return tuple(value) if isinstance(value, (tuple, list)) else ()


def _missing_message(by: str, missing: list[str], ctx: CompileContext | None) -> str:
    invalid = {m: ctx.invalidated[m] for m in missing if ctx is not None and m in ctx.invalidated}
    providers = sorted({n for n, c in _REGISTRY.items() if n == _snake(n)
                        and set(missing) & set(_declared(c, "provides"))})
    names = ", ".join(repr(m) for m in missing)
    if invalid:
        how = "; ".join(f"{m!r} was invalidated by pass {p!r}" for m, p in invalid.items())
        hint = f"; run {' or '.join(providers)} again after it" if providers else ""
        return f"pass {by!r} requires analysis {names}: {how}{hint}."
    hint = f"; add {' or '.join(providers)} before it" if providers else ""
    return f"pass {by!r} requires analysis {names} that no earlier pass provides{hint}."


class PipelineError(ValueError):
    """The pipeline cannot run as given (unknown pass, missing analysis or calibration)."""


class PassError(RuntimeError):
    """A pass failed or broke the graph; names the pass, the passes before it, and the node
    (and, for a verify-each failure, the first module whose output diverged: ``module``)."""

    def __init__(self, pass_name: str, before: Sequence[str], message: str,
                 node: fx.Node | None = None, module: str | None = None):
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
        self.module = module


class Pass:
    """Base class of a pass. Subclasses set ``kind`` and implement ``run``.

    Class attributes: ``name`` (defaults to the class name), ``kind``, ``requires`` and
    ``provides`` (analysis names), ``needs_calibration``, ``preserves_float_model`` (the pass
    must not change the float model's outputs: the manager checks it on the probe input).
    They are declared by the class, never set on an instance; where one depends on the pass's
    configuration, the class defines it as a read-only property (``GPTQ.requires``).
    Configuration is immutable: passes are frozen dataclasses.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind] = PassKind.TRANSFORM
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False
    preserves_float_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        for attr in ("requires", "provides"):
            value = cls.__dict__.get(attr)
            if isinstance(value, (list, str)):
                raise TypeError(f"{cls.__name__}.{attr} must be a tuple of analysis names (or a property)")

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _DECLARED:
            raise AttributeError(f"{type(self).__name__}.{key} is declared by the class, not set on an "
                                 "instance; derive it from the configuration with a property")
        super().__setattr__(key, value)

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
    """A pass made from a function ``fn(gm, ctx) -> PassResult | GraphModule | None``.

    Its declarations are fixed at creation and read-only (properties over private fields).
    """

    def __init__(self, fn: Callable, name: str, kind: PassKind, requires: tuple[str, ...],
                 provides: tuple[str, ...], needs_calibration: bool, preserves_float_model: bool = False):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_decl", (name, PassKind(kind), tuple(requires), tuple(provides),
                                           bool(needs_calibration), bool(preserves_float_model)))

    fn = property(lambda self: self._fn)
    name = property(lambda self: self._decl[0])  # type: ignore[assignment]
    kind = property(lambda self: self._decl[1])  # type: ignore[assignment]
    requires = property(lambda self: self._decl[2])  # type: ignore[assignment]
    provides = property(lambda self: self._decl[3])  # type: ignore[assignment]
    needs_calibration = property(lambda self: self._decl[4])  # type: ignore[assignment]
    preserves_float_model = property(lambda self: self._decl[5])  # type: ignore[assignment]

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
                  preserves_float_model: bool = False, register: bool = True):
    """Decorator turning ``fn(gm, ctx)`` into a registered pass instance."""

    def wrap(f: Callable) -> FunctionPass:
        p = FunctionPass(f, name or f.__name__, PassKind(kind), tuple(requires), tuple(provides),
                         needs_calibration, preserves_float_model)
        if register:
            register_pass(p, name=p.name)
        return p

    return wrap(fn) if fn is not None else wrap


def registered_passes() -> dict[str, Any]:
    """Name -> pass class (or function-pass instance) for every registered pass (the built-in
    ones once ``qcompile.passes`` has been imported, which ``import qcompile`` does)."""
    return dict(_REGISTRY)


def get_pass(name: str, **params: Any) -> Pass:
    """Instantiate a registered pass by name (``"activation_stats"`` or ``"ActivationStats"``)."""
    registry = registered_passes()
    if name not in registry:
        known = sorted(k for k in registry if k == _snake(k))
        listed = ", ".join(known) if known else "none (import qcompile.passes to register the built-in ones)"
        raise PipelineError(f"unknown pass {name!r}; registered passes: {listed}")
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
    """Runs passes in order with requirement checks, recompile, lint, analyses and instruments.

    ``probe``: inputs of the graph (a tensor or a tuple of positional arguments). With it and
    ``verify=True`` (the default), every pass declaring ``preserves_float_model`` is checked:
    its graph must give the same output on the probe as before it, to ``verify_rtol`` of the
    largest |output| (default ``qcompile.verify.float_tolerance``: 1e-4 in float32), or the run
    stops with a ``PassError`` naming the pass and the first module whose output diverged.
    """

    def __init__(self, passes: Iterable[Any], instruments: Sequence[Any] = (), *, probe: Any = None,
                 verify: bool = True, verify_rtol: float | None = None):
        self.passes = resolve_passes(passes)
        self.instruments = list(instruments)
        self.probe = None if probe is None else (tuple(probe) if isinstance(probe, (tuple, list)) else (probe,))
        self.verify = verify
        self.verify_rtol = verify_rtol

    def check(self, ctx: CompileContext) -> None:
        """Name every missing analysis or calibration set before anything runs."""
        available = set(ctx.analyses)
        for p in self.passes:
            missing = [r for r in p.requires if r not in available]
            if missing:
                raise PipelineError(_missing_message(p.name, missing, None))
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
            missing = [r for r in p.requires if r not in ctx.analyses]
            if missing:  # dropped since check() by a pass that invalidated it
                raise PipelineError(_missing_message(p.name, missing, ctx))
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            verifying = self.verify and self.probe is not None and bool(p.preserves_float_model)
            before = self._probe_trace(gm) if verifying else None
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
            if before is not None:
                self._verify(p, gm, before, done)
            self._store_analyses(p, result, ctx, done)
            for inst in self.instruments:
                inst.after_pass(p, gm, ctx, result)
            done.append(p.name)
        return gm

    def _probe_trace(self, gm: fx.GraphModule) -> Any:
        from qcompile.verify import ProbeTrace
        return ProbeTrace.take(gm, self.probe)

    def _verify(self, p: Pass, gm: fx.GraphModule, before: Any, done: list[str]) -> None:
        """verify-each: a pass that preserves the float model left its output on the probe alone."""
        from qcompile.verify import compare
        div = compare(before, self._probe_trace(gm), self.verify_rtol)
        if div is None:
            return
        node = _last_node_of(gm, div.module) if div.module else None
        raise PassError(p.name, done, div.message(), node, div.module)

    @staticmethod
    def _store_analyses(p: Pass, result: PassResult, ctx: CompileContext, done: list[str]) -> None:
        """Drop what the pass invalidated and store what it provided or replaced."""
        undeclared = [k for k in result.updated if k not in p.provides and k not in ctx.analyses]
        if undeclared:
            raise PassError(p.name, done, f"returned analysis {', '.join(map(repr, undeclared))}, which it "
                            "neither declares in provides nor replaces (no earlier pass provided it)")
        clash = set(result.updated) & set(result.invalidated)
        if clash:
            raise PassError(p.name, done, f"both updates and invalidates {', '.join(sorted(clash))}")
        for name in result.invalidated:
            if ctx.analyses.pop(name, None) is not None:
                ctx.invalidated[name] = p.name
        for name, value in result.updated.items():
            ctx.analyses[name] = value
            ctx.invalidated.pop(name, None)


def _last_node_of(gm: fx.GraphModule, module: str) -> fx.Node | None:
    from qcompile.frontend import module_name_of
    found = None
    for node in gm.graph.nodes:
        m = module_name_of(node)
        if m == module or m.startswith(module + "."):
            found = node
    return found


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _node_in_message(gm: fx.GraphModule, message: str) -> fx.Node | None:
    for node in gm.graph.nodes:
        if re.search(rf"\b{re.escape(node.name)}\b", message):
            return node
    return None
