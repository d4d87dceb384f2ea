"""What trainers do around a compiled model, with quartet2: gradient accumulation under DDP's
``no_sync``, activation checkpointing, bfloat16 and float32 weights side by side, and bfloat16
autocast over float32 weights.

Each is compared with the same steps without the feature (equal gradients where quartet2 is
deterministic: its forward) or without quartet2 (float32 eager, within NVFP4's error). The graphs
run eagerly (``inductor=False``), which leaves the rewritten graphs as they are.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from logged_reports import logged_reports
from models import TinyLlama
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from quartet_compile.passes.report import GraphReport

EAGER = {"inductor": False}
FORWARD_ONLY = {**EAGER, "backward": False}  # deterministic: gradients can be compared exactly
# A gradient's relative distance from float32 eager's after one NVFP4 step of these models:
# 0.02-0.30 measured (random Hadamard signs, stochastic rounding); a wrong rewrite is off by ~1.
NVFP4_ERROR = 0.4
PROJECTIONS = 7  # per TinyLlama block: q, k, v, o, gate, up, down
# Three micro-batches of byte tokens.
TOKENS = torch.randint(0, 256, (3, 2, 65), generator=torch.Generator().manual_seed(0))


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _compiled(model: nn.Module, options: dict[str, Any] | None) -> nn.Module:
    """``model`` compiled with quartet2 and ``options``; as it is when ``options`` is None."""
    torch._dynamo.reset()
    return model if options is None else torch.compile(model, backend="quartet2", options=options)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_close_to_eager(grads: dict, eager: dict) -> None:
    for name, grad in grads.items():
        assert grad.dtype == eager[name].dtype and torch.isfinite(grad).all(), name
        error = (grad.float() - eager[name].float()).norm() / eager[name].float().norm()
        assert error <= NVFP4_ERROR, (name, error.item())


def _assert_projections_rewritten(reports: list[GraphReport], layers: int, dtype: str) -> None:
    """Every projection's three matmuls in NVFP4, computed in ``dtype``; lm_head not."""
    linears = [lin for report in reports for lin in report.linears]
    projections = [lin for lin in linears if lin.module != "lm_head"]
    assert len(projections) == layers * PROJECTIONS
    assert all(lin.rewritten() == 3 and lin.dtype == dtype for lin in projections)
    assert [lin.rewritten() for lin in linears if lin.module == "lm_head"] == [0]


# --- gradient accumulation under DDP's no_sync ------------------------------------------------


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group: DDP's reducer, buckets and no_sync run as on several ranks."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _accumulate(ddp: bool, options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Gradients accumulated over three micro-batches, as a trainer accumulates them under DDP:
    the first two under ``no_sync`` (no all-reduce), the third synchronized."""
    torch.manual_seed(0)
    model = TinyLlama()
    wrapped = DistributedDataParallel(model) if ddp else model
    compiled = _compiled(wrapped, options)
    torch.manual_seed(1)
    with wrapped.no_sync() if ddp else contextlib.nullcontext():
        for tokens in TOKENS[:2]:
            _loss(compiled, tokens).backward()
    _loss(compiled, TOKENS[2]).backward()
    return _grads(model)


def test_gradient_accumulation_under_ddp_no_sync(process_group: None) -> None:
    accumulated, plain = _accumulate(True, FORWARD_ONLY), _accumulate(False, FORWARD_ONLY)
    for name, grad in accumulated.items():
        assert torch.equal(grad, plain[name]), name
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with logged_reports() as reports:
        accumulated = _accumulate(True, EAGER)
    # One graph for all three micro-batches: entering and leaving no_sync does not recompile.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    _assert_projections_rewritten(reports, layers=1, dtype="float32")
    _assert_close_to_eager(accumulated, _accumulate(False, None))


# --- activation checkpointing -------------------------------------------------------------------


class CheckpointedLlama(TinyLlama):
    """TinyLlama whose blocks keep only their inputs: the backward recomputes the rest."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return self.lm_head(self.norm(x))


class _CountForwardQuantizations(TorchDispatchMode):
    """Counts quartet2::quantize_fwd calls (the graphs run eagerly: each call is dispatched)."""

    supports_higher_order_operators = True  # the recomputation replays RNG ops in one

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        self.calls += func is torch.ops.quartet2.quantize_fwd.default
        return func(*args, **(kwargs or {}))


def _step(model: nn.Module, options: dict[str, Any] | None) -> tuple[dict, int]:
    """One step's gradients, and how many forward quantizations its backward ran."""
    compiled = _compiled(model, options)
    torch.manual_seed(1)
    loss = _loss(compiled, TOKENS[0])
    with _CountForwardQuantizations() as counter:
        loss.backward()
    return _grads(model), counter.calls


def _model(cls: type[TinyLlama], **kwargs: Any) -> TinyLlama:
    torch.manual_seed(0)
    return cls(**kwargs)


def test_activation_checkpointing_recomputes_the_nvfp4_forward() -> None:
    recomputed, recomputations = _step(_model(CheckpointedLlama, layers=2), FORWARD_ONLY)
    saved, none = _step(_model(TinyLlama, layers=2), FORWARD_ONLY)
    assert recomputations > 0 and none == 0
    # The recomputed forward is the NVFP4 forward (deterministic): equal gradients.
    for name, grad in recomputed.items():
        assert torch.equal(grad, saved[name]), name
    with logged_reports() as reports:
        grads, _ = _step(_model(CheckpointedLlama, layers=2), EAGER)
    _assert_projections_rewritten(reports, layers=2, dtype="float32")
    _assert_close_to_eager(grads, _step(_model(TinyLlama, layers=2), None)[0])


# --- bfloat16 and float32 -----------------------------------------------------------------------


class MixedMLP(nn.Module):
    """A bfloat16 linear layer feeding a float32 one (e.g. a float32 head kept for accuracy)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 256).to(torch.bfloat16)
        self.fc2 = nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x.bfloat16())).float())


def test_bfloat16_and_float32_weights_in_one_model() -> None:
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def grads(options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MixedMLP()
        torch.manual_seed(1)
        _compiled(model, options)(x).pow(2).mean().backward()
        return _grads(model)

    with logged_reports() as reports:
        mixed = grads(EAGER)
    assert {(lin.module, lin.dtype, lin.rewritten()) for lin in reports[0].linears} == {
        ("fc1", "bfloat16", 3),
        ("fc2", "float32", 3),
    }
    _assert_close_to_eager(mixed, grads(None))  # bfloat16 gradients for the bfloat16 weights


def test_float32_weights_under_bfloat16_autocast() -> None:
    def grads(options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        model = _model(TinyLlama)
        compiled = _compiled(model, options)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(compiled, TOKENS[0])
        loss.backward()
        return _grads(model)

    with logged_reports() as reports:
        autocast = grads(EAGER)
    _assert_projections_rewritten(reports, layers=1, dtype="bfloat16")
    _assert_close_to_eager(autocast, grads(None))  # float32 gradients, as autocast gives
