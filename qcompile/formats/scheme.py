"""The lowered-scheme protocol: one frozen object per way of lowering a linear, and the registry.

A scheme owns everything that defines a lowered linear:

- ``quantize(weight)``: round (or adopt GPTQ's integers) and pack into named tensors;
- ``op`` and ``signature``: the custom op it lowers to and that op's arguments by name;
- ``dequantize(tensors)``: the float weight the op applies;
- ``storage(n, k)``: the names, dtypes and shapes of what it stores;
- ``to_json`` / ``scheme_from_json``: its identity in a graph's metadata and in saved models.

Graph code never indexes a lowered node's arguments by position: it reads them by name through
``qcompile.formats.lowered.LoweredNode``. Adding a scheme means writing one subclass and
decorating it with ``register_scheme``; nothing else changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

import torch

from qcompile.formats.granularity import Granularity, PerRow, PerToken, granularity_from

__all__ = ["LoweredScheme", "TensorSpec", "WeightInput", "Lowering", "RoundedWeights", "LinearSpec",
           "register_scheme", "registered_schemes", "scheme_from_json", "scheme_for", "scheme_for_op",
           "sqnr_db", "NotRepresentable"]


class NotRepresentable(ValueError):
    """A scheme (or one layer of it) has no representation in an export format; the message says
    why and what to use instead."""


@dataclass(frozen=True)
class RoundedWeights:
    """Integers another pass already chose for a linear (GPTQ's record): ``q`` int8 [N, Kq] over
    the columns ``quant_idx`` (ascending); the float columns ``outlier_idx``; scales/zeros [N, G]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    quant_idx: torch.Tensor
    outlier_idx: torch.Tensor


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a scheme: name, dtype, shape (symbolic, for docs and exporters),
    whether it is a float that may be stored in a 16-bit dtype, and whether it may be absent."""

    name: str
    dtype: torch.dtype
    shape: str
    rounded_float: bool = False
    optional: bool = False


@dataclass
class WeightInput:
    """What a scheme may use to lower one linear: the float weight [N, K] and, when available,
    searched clipping ratios [N], another pass's integers, the input's calibration abs-max [K]
    (static activation scales), the float (outlier) columns, and an input gather it absorbs."""

    weight: torch.Tensor
    clip_ratio: torch.Tensor | None = None
    rounded: RoundedWeights | None = None
    act_absmax: torch.Tensor | None = None
    outlier_idx: torch.Tensor | None = None
    input_perm: torch.Tensor | None = None
    # the caller knows ``weight`` is the very tensor ``rounded`` dequantizes to, unmodified since
    # (GPTQ wrote it): the schemes then adopt the integers without comparing them to the weight
    rounded_is_current: bool = False


@dataclass
class Lowering:
    """A scheme's output for one linear: its stored tensors by name, where the integers came
    from, and the weight SQNR of the result against the float weight."""

    tensors: dict[str, torch.Tensor]
    source: str
    weight_sqnr_db: float
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LinearSpec:
    """The user-facing description of how a linear is quantized (QuantizeLinears' fields)."""

    w_bits: int = 8
    a_bits: int | None = 8           # None or >= 16: weight-only
    w_granularity: Granularity = PerRow()
    w_symmetric: bool = True
    a_granularity: Granularity = PerToken()
    outliers: bool = False
    w_grid: str | None = None        # symmetric weight grid ("restricted"/"full"); None: the default

    @property
    def weight_only(self) -> bool:
        return self.a_bits is None or self.a_bits >= 16


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor | Callable[[slice], torch.Tensor]) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2), inf when equal. ``approx`` may be a function giving
    its rows for a slice of rows (a dequantization), so that no weight-sized float copy exists:
    the sums run a band of rows at a time, in float64."""
    rows_of = approx if callable(approx) else (lambda rows: approx[rows])
    err = sig = 0.0
    for r0 in range(0, ref.shape[0], _SQNR_ROWS):
        rows = slice(r0, r0 + _SQNR_ROWS)
        r = ref[rows].float()
        err += float((r - rows_of(rows).float()).pow_(2).sum(dtype=torch.float64))
        sig += float(r.pow(2).sum(dtype=torch.float64))
    return float("inf") if err == 0 else 10.0 * math.log10(sig / err)


_SQNR_ROWS = 1024


@dataclass(frozen=True)
class LoweredScheme(ABC):
    """Base of every lowered scheme. Subclasses are frozen dataclasses and set the class
    attributes below; ``register_scheme`` makes them known to lowering, graph readers and save/load.

    ``signature`` lists the op's arguments after the activation, by name, in call order;
    ``tensor_args`` are those that are stored tensors (get_attr nodes in a graph); the others
    are constants, given by ``constants``.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1
    op_name: ClassVar[str] = ""               # "namespace::name" of a torch.library custom op
    signature: ClassVar[tuple[str, ...]] = ()
    tensor_args: ClassVar[frozenset[str]] = frozenset()
    bias_arg: ClassVar[str] = "bias"
    absorbs_input_gather: ClassVar[bool] = False  # the op takes a ``perm`` of its input columns

    # ---- identity
    @property
    def w_bits(self) -> int:
        raise NotImplementedError

    @property
    def w_granularity(self) -> Granularity:
        return PerRow()

    @property
    def w_symmetric(self) -> bool:
        return True

    @property
    def w_grid(self) -> str:
        """The symmetric weight grid RTN rounds on (``qcompile.formats.numerics.GRIDS``)."""
        return "restricted"

    @property
    def a_bits(self) -> int | None:
        """Activation bits (None: float activations)."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """One line for reports: ``"W8A8 per-row, act per-token"``."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: LinearSpec) -> "LoweredScheme | None":
        """The scheme for a user's spec, None when the spec is not of this family; raises
        ValueError naming the problem when it is of this family but invalid."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "version": self.version}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_json() if isinstance(v, Granularity) else v
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LoweredScheme":
        names = {f.name for f in fields(cls)}
        kwargs = {k: (granularity_from(v) if "granularity" in k else v) for k, v in data.items() if k in names}
        return cls(**kwargs)

    # ---- the op
    @property
    def op(self) -> Any:
        """The custom op's default overload (registered by importing its kernels module)."""
        ns, name = self.op_name.split("::")
        try:
            return getattr(getattr(torch.ops, ns), name).default
        except (AttributeError, RuntimeError) as err:
            raise RuntimeError(f"op {self.op_name} of scheme {self.kind!r} is not registered; import "
                               "qcompile.kernels (or the module that defines it) first") from err

    @abstractmethod
    def constants(self, in_features: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The op's non-tensor arguments for a layer with ``in_features`` inputs."""

    def call(self, x: torch.Tensor, args: Mapping[str, Any]) -> torch.Tensor:
        """Run the op on ``x`` with its arguments by name (missing optional ones are None)."""
        return self.op(x, *(args.get(name) for name in self.signature))

    # ---- weights
    @abstractmethod
    def quantize(self, source: WeightInput) -> Lowering:
        """Round ``source.weight`` (or adopt ``source.rounded``) and pack into named tensors."""

    @abstractmethod
    def dequantize(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """The float weight [N, K] the op applies, its columns in the op's input order."""

    def input_permutation(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The column order the op gathers its input into, if it gathers."""
        return None

    @abstractmethod
    def storage(self) -> tuple[TensorSpec, ...]:
        """What the scheme stores, by name (shapes in terms of N, K, G, Kq, k_out)."""

    # ---- export: how other checkpoint formats name and lay out this scheme (``qcompile.export``
    # asks the scheme, nowhere else). A scheme without a representation keeps these defaults.
    def compressed_tensors_scheme(self) -> dict[str, Any]:
        """The compressed-tensors description of this scheme, as plain JSON (no import of the
        package here): ``{"format": ..., "weights": {QuantizationArgs}, "input_activations":
        {QuantizationArgs} | None}``. Raises ``NotRepresentable`` when the format has none."""
        raise NotRepresentable(f"{self.describe()} ({self.kind!r}) has no compressed-tensors representation")

    def compressed_tensors_tensors(self, tensors: Mapping[str, torch.Tensor], in_features: int,
                                   float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """This layer's stored tensors under the compressed-tensors names of one module
        (``weight`` / ``weight_packed``, ``weight_scale``, ...; not the bias), laid out as that
        format's loaders read them, the integers exactly the stored ones (never re-rounded from
        float), float tensors in ``float_dtype``. Raises ``NotRepresentable``."""
        raise NotRepresentable(f"{self.describe()} ({self.kind!r}) has no compressed-tensors representation")

    def clip_from(self, record: Any, rows: int) -> torch.Tensor | None:
        """A ClipSearch record's per-row ratios, when they were searched for this scheme's grid."""
        if record is None:
            return None
        ok = record.applies_to(self.w_bits, self.w_granularity, self.w_symmetric, rows, self.w_grid)
        return record.ratio if ok else None


_SCHEMES: dict[str, type[LoweredScheme]] = {}


def register_scheme(cls: type[LoweredScheme]) -> type[LoweredScheme]:
    """Class decorator: make a scheme known (by ``kind``). Later registrations are asked first by
    ``scheme_for``, so a new scheme can take over specs an older one rejects."""
    if not cls.kind or not cls.op_name or not cls.signature:
        raise TypeError(f"{cls.__name__} must set kind, op_name and signature")
    if cls.bias_arg not in cls.signature or not cls.tensor_args <= set(cls.signature):
        raise TypeError(f"{cls.__name__}: bias_arg and tensor_args must name arguments of the signature")
    _SCHEMES[cls.kind] = cls
    return cls


def registered_schemes() -> dict[str, type[LoweredScheme]]:
    """kind -> scheme class, oldest first."""
    return dict(_SCHEMES)


def scheme_from_json(data: Any) -> LoweredScheme:
    """Rebuild a scheme from ``to_json`` output (raises ValueError for an unknown kind or version)."""
    if not isinstance(data, Mapping) or data.get("kind") not in _SCHEMES:
        known = ", ".join(sorted(_SCHEMES))
        raise ValueError(f"unknown lowered scheme {data!r}; known kinds: {known}")
    cls = _SCHEMES[data["kind"]]
    version = data.get("version", 1)
    if not isinstance(version, int) or version > cls.version:
        raise ValueError(f"scheme {cls.kind!r} version {version} is newer than this qcompile reads "
                         f"({cls.version}); upgrade qcompile")
    try:
        return cls.from_json(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"malformed {cls.kind!r} scheme {dict(data)!r}: {err}") from err


def scheme_for(spec: LinearSpec) -> LoweredScheme:
    """The registered scheme that lowers ``spec`` (newest registration first)."""
    for cls in reversed(list(_SCHEMES.values())):
        scheme = cls.from_spec(spec)
        if scheme is not None:
            return scheme
    raise ValueError(f"no lowered scheme supports {spec}; registered: {', '.join(_SCHEMES)}")


def scheme_for_op(op_name: str) -> list[type[LoweredScheme]]:
    """The scheme classes that lower to ``op_name`` ("ns::name")."""
    return [cls for cls in _SCHEMES.values() if cls.op_name == op_name]
