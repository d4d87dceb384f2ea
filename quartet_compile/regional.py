"""Regional compilation: a model's repeated blocks are compiled once, not once per block.

Inductor's compile time grows with the number of graph nodes, and the rewrite turns every linear
layer into ~14 Triton kernel calls and ~100 nodes. A model's blocks (``blocks.0``, ``blocks.1``,
...) trace to the same graph with different weights, so the backend splits Dynamo's graph at
block boundaries (``torch.fx.passes.split_module``, as Dynamo's DDPOptimizer splits at bucket
boundaries) and compiles each piece on its own: AOTAutograd and the rewrite still run per block,
but the second and later blocks load Inductor's generated code from its FX-graph cache instead of
lowering, scheduling and generating it again. Each piece becomes one autograd.Function; the cost is
no fusion across a block boundary (the residual stream is written by one piece and read by the
next).

A block is a module whose path ends in an index (an element of an nn.ModuleList/Sequential). A
graph with fewer than two blocks of one container is compiled whole, and so is each DDP bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.split_module import split_module

from quartet_compile.passes.operands import dotted

log = logging.getLogger("quartet_compile")

CompileFn = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def block_of(node: fx.Node) -> str | None:
    """Dotted path of the outermost indexed module that ran ``node`` (``blocks.3``), or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = dotted(path).split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None:
            return ".".join(parts[: index + 1])
    return None


def partition(gm: fx.GraphModule) -> dict[fx.Node, int] | None:
    """Piece number of every computing node: runs of one block, and the runs between them.

    Nodes that carry no module path but sit between two nodes of the same block (Dynamo records
    none for some helper ops) belong to that block. None when fewer than two blocks share a
    container: nothing would be compiled once for several blocks.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    recorded = [block_of(n) for n in nodes]
    before, after = _nearest(recorded), _nearest(recorded[::-1])[::-1]
    blocks = [
        block if block is not None else (prev if prev == nxt else None)
        for block, prev, nxt in zip(recorded, before, after, strict=True)
    ]
    containers = [b.rsplit(".", 1)[0] for b in dict.fromkeys(b for b in blocks if b)]
    if all(containers.count(c) < 2 for c in containers):
        return None
    pieces, piece, current = {}, -1, object()
    for node, block in zip(nodes, blocks, strict=True):
        if block != current:
            piece, current = piece + 1, block
        pieces[node] = piece
    return pieces


def _nearest(blocks: list[str | None]) -> list[str | None]:
    """For each position, the last block recorded before it (None if there is none)."""
    nearest, last = [], None
    for block in blocks:
        nearest.append(last)
        last = block if block is not None else last
    return nearest


def compile_regions(
    gm: fx.GraphModule, example_inputs: Sequence[Any], compile_piece: CompileFn
) -> Callable[..., Any]:
    """``compile_piece`` applied to each block of ``gm`` (and to the code between blocks), or to
    the whole graph when it has no repeated blocks."""
    pieces = partition(gm)
    context = torch._guards.TracingContext.try_get()
    if pieces is None or getattr(context, "ddp_optimizer_ctx", None) is not None:
        # Under DDP, Dynamo's DDPOptimizer has split the graph into buckets already and counts
        # one forward and one backward compile per bucket: a bucket is compiled whole.
        return compile_piece(gm, example_inputs)
    split = split_module(gm, None, pieces.__getitem__, keep_original_order=True)
    for name, piece in split.named_children():
        if name.startswith("submod_"):
            _rename_nodes(piece)
    log.info("quartet2: compiling %d pieces (blocks compiled once each)", max(pieces.values()) + 1)
    # Dynamo's fake mode (a graph handed over outside torch.compile gets a fresh one).
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()
    # AOTAutograd caches a training graph once its backward is compiled, which by default waits
    # for the first backward call: every block's forward would be compiled before any entry is
    # saved. Compiling each backward with its forward lets the next block hit the cache.
    eager_backward = torch._functorch.config.patch(force_non_lazy_backward_lowering=True)
    with eager_backward:
        _PieceCompiler(split, compile_piece, fake_mode).run(*example_inputs)
    return split


def _rename_nodes(piece: fx.GraphModule) -> None:
    """Name the nodes by position, so that blocks that compute the same thing have the same code
    (Dynamo names nodes after module paths): AOTAutograd's cache then serves the second and later
    blocks as well, and the trace, the rewrite and the partitioner run once."""
    for i, node in enumerate(piece.graph.nodes):
        if node.op != "output":
            node._rename(f"{node.op}_{i}")
    piece.recompile()


class _PieceCompiler(fx.Interpreter):
    """Runs the split module on fake values; compiles each piece with the values it receives and
    puts the compiled piece in its place."""

    def __init__(self, split: fx.GraphModule, compile_piece: CompileFn, fake_mode: Any) -> None:
        super().__init__(split)
        self.compile_piece = compile_piece
        self.fake_mode = fake_mode

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        piece = self.fetch_attr(target)
        output = next(n for n in piece.graph.nodes if n.op == "output")
        single = not isinstance(output.args[0], (tuple, list))
        if single:  # AOTAutograd compiles graphs that return a tuple
            output.args = ((output.args[0],),)
            piece.recompile()
        fake_args = [
            self.fake_mode.from_tensor(a)
            if isinstance(a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor)
            else a
            for a in args
        ]
        with self.fake_mode:  # the values the next pieces receive (before compiling edits it)
            out = piece(*fake_args)
        compiled = self.compile_piece(piece, list(args))
        self.module.add_submodule(target, _Compiled(compiled, single))
        return out[0] if single else out


class _Compiled(torch.nn.Module):
    """A compiled piece as a submodule of the split graph (unwrapping a single output)."""

    def __init__(self, fn: Callable[..., Any], single: bool) -> None:
        super().__init__()
        self.fn = fn
        self.single = single

    def forward(self, *args: Any) -> Any:
        out = self.fn(*args)
        return out[0] if self.single else out
