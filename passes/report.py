"""What the quartet2 pass did to one graph, and a stable readable printout of a graph.

The report is what users read (logged at INFO under ``quartet_compile``, returned by
``quartet_compile.explain``) and what tests snapshot, so its text has no addresses or ids.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import fx

ROLES = ("forward", "grad_input", "grad_weight")


class Status(enum.Enum):
    """What became of one of a layer's three matmuls."""

    NVFP4 = "nvfp4"  # rewritten to quartet2 ops
    KEPT = "kept"  # eligible in principle, kept in high precision (skip pattern, head, router)
    INELIGIBLE = "ineligible"  # shapes or dtypes the ops do not take
    DISABLED = "disabled"  # the config turns this side (forward/backward) off
    ABSENT = "absent"  # the graph has no such matmul (inference, or no grad required)
    FAILED = "failed"  # the rewrite raised; the matmul stays as it was


@dataclass(frozen=True)
class RoleStatus:
    """A ``Status`` and the words the report prints for it."""

    status: Status
    text: str

    def __str__(self) -> str:
        return self.text


NVFP4 = RoleStatus(Status.NVFP4, "nvfp4")
NOT_SET = RoleStatus(Status.ABSENT, "")


@dataclass
class LinearReport:
    """One linear layer: ``x[T, K] @ W[N, K].T`` (or ``W[e]`` for each of E experts); per role
    "nvfp4" or why it stayed as it was."""

    module: str
    weight: str
    t: int | str
    k: int | str
    n: int | str
    dtype: str
    bias: bool
    experts: int | None = None
    forward: RoleStatus = NOT_SET
    grad_input: RoleStatus = NOT_SET
    grad_weight: RoleStatus = NOT_SET

    def rewritten(self) -> int:
        return sum(getattr(self, role).status is Status.NVFP4 for role in ROLES)

    def __str__(self) -> str:
        own = ".".join(filter(None, (self.module, "weight")))
        weight = "W" if self.weight == own else self.weight
        each = "" if self.experts is None else "[e]"
        experts = "" if self.experts is None else f", e < {self.experts} experts"
        head = (
            f"{self.module or '<root>'}: x[{self.t}, {self.k}] @ {weight}{each}[{self.n}, "
            f"{self.k}].T{' + bias' if self.bias else ''} ({self.dtype}{experts})"
        )
        statuses = [str(getattr(self, role)) for role in ROLES]
        if len(set(statuses)) == 1:
            return f"{head}\n    all: {statuses[0]}"
        roles = "; ".join(
            f"{r.replace('_', '-')}: {s}" for r, s in zip(ROLES, statuses, strict=True)
        )
        return f"{head}\n    {roles}"


@dataclass
class OtherReport:
    """A matmul that belongs to no linear layer (e.g. attention scores)."""

    node: str
    module: str
    shape: str
    reason: str

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.node}{where} {self.shape}: {self.reason}"


@dataclass
class GraphReport:
    """The pass's result on one AOTAutograd graph (joint or forward-only)."""

    kind: str
    linears: list[LinearReport] = field(default_factory=list)
    others: list[OtherReport] = field(default_factory=list)
    graph: str = ""  # format_graph() of the rewritten graph, for snapshots and debugging
    checks: int = 0  # quartet2::check_finite calls in the graph (options={"check_finite": True})

    def rewritten(self) -> int:
        return sum(lin.rewritten() for lin in self.linears)

    def __str__(self) -> str:
        lines = [
            f"quartet2: {self.kind} graph, {len(self.linears)} linear layer(s), "
            f"{self.rewritten()} matmul(s) rewritten to NVFP4"
        ]
        lines += [f"  {lin}" for lin in self.linears]
        if self.checks:
            lines.append(
                f"  check_finite: {self.checks} check(s) of the quartet2 ops' inputs and outputs "
                "(each syncs with the device)"
            )
        if self.others:
            lines.append("  other matmuls (left as they were):")
            lines += [f"    {other}" for other in self.others]
        return "\n".join(lines)


@dataclass
class Report:
    """All graphs compiled for one model (several when Dynamo breaks the graph)."""

    graphs: list[GraphReport] = field(default_factory=list)

    def rewritten(self) -> int:
        return sum(g.rewritten() for g in self.graphs)

    def __str__(self) -> str:
        if not self.graphs:
            return "quartet2: no graph was compiled"
        return "\n".join(str(g) for g in self.graphs)


def _format_arg(arg: object) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_format_arg(a) for a in arg) + "]"
    if isinstance(arg, torch.dtype):
        return str(arg).removeprefix("torch.")
    return repr(arg) if isinstance(arg, str) else str(arg)


def _format_val(val: object) -> str:
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_format_val(v) for v in val) + ")"
    return ""


def format_graph(graph: fx.Graph) -> str:
    """One line per node: ``%name: dtype[shape] = op(args)``; stable across runs."""
    lines = []
    for node in graph.nodes:
        args = [_format_arg(a) for a in node.args]
        args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
        if node.op == "placeholder":
            lines.append(f"%{node.name}: {_format_val(node.meta.get('val'))} = input")
        elif node.op == "output":
            lines.append(f"return {', '.join(args)}")
        else:
            target = (
                getattr(node.target, "__name__", None)
                if callable(node.target) and not isinstance(node.target, torch._ops.OpOverload)
                else str(node.target)
            )
            target = target.removeprefix("aten.").removeprefix("torch.ops.")
            lines.append(
                f"%{node.name}: {_format_val(node.meta.get('val'))} = {target}({', '.join(args)})"
            )
    return "\n".join(lines)
