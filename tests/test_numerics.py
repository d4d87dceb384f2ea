"""The compiled model computes Quartet II's numerics: forward = the NVFP4 reference, backward =
unbiased estimates of the gradient through the quantized forward, with MS-EDEN's small error."""

import pytest
import torch
import torch.nn.functional as F
from models import MLP
from torch import nn

import quartet_compile
from quartet_compile import nvfp4


def reference_linear(x2d: torch.Tensor, w: torch.Tensor, four_over_six: bool = True):
    """deq(Q(x)) @ deq(Q(W)).T with the oracle quantizer."""
    xq = nvfp4.quantize_rtn(x2d.detach(), four_over_six)
    wq = nvfp4.quantize_rtn(w.detach(), four_over_six)
    return nvfp4.gemm(xq, wq, torch.float32)


def test_forward_matches_reference_through_inductor() -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        y = torch.compile(model, backend="quartet2")(x)
        h = F.gelu(reference_linear(x.view(128, 128), model.fc1.weight) + model.fc1.bias)
        expected = reference_linear(h, model.fc2.weight) + model.fc2.bias
    torch.testing.assert_close(y, expected.view(2, 64, 128), rtol=1e-5, atol=1e-5)
    assert (y - model(x)).abs().max() > 1e-3  # and it is not the float32 model


class Spellings(nn.Module):
    """The same x @ W.T spelled the ways a model may write it."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.w = nn.Parameter(torch.randn(256, 128) / 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "F.linear 4-D":
            return F.linear(x.view(2, 2, 32, 128), self.w).reshape(128, 256)
        if self.spelling == "x @ W.T 3-D":
            return (x.view(2, 64, 128) @ self.w.T).reshape(128, 256)
        if self.spelling == "x @ W, W stored [K, N]":
            return x @ self.w.T.contiguous()
        return torch.einsum("bsk,nk->bsn", x.view(2, 64, 128), self.w).reshape(128, 256)


@pytest.mark.parametrize(
    "spelling", ["F.linear 4-D", "x @ W.T 3-D", "x @ W, W stored [K, N]", "einsum"]
)
def test_every_spelling_is_rewritten_and_exact(spelling: str) -> None:
    torch.manual_seed(0)
    model = Spellings(spelling)
    if spelling == "x @ W, W stored [K, N]":
        model.w = nn.Parameter(model.w.detach().T.contiguous())
        model.forward = lambda x: x @ model.w  # type: ignore[method-assign]
    x = torch.randn(128, 128, requires_grad=True)
    report = quartet_compile.explain(model, x, inductor=False)
    (linear,) = report.graphs[0].linears
    assert linear.rewritten() == 3
    compiled = torch.compile(model, backend="quartet2", options={"inductor": False})
    y = compiled(x)
    w_nk = model.w if model.w.shape == (256, 128) else model.w.T
    torch.testing.assert_close(y, reference_linear(x, w_nk), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(model.w.grad).all()
    assert model.w.grad.shape == model.w.shape


def mean_gradient_errors(options: dict, seeds: int) -> tuple[float, float]:
    """Relative errors of one backward's dW and of the mean over ``seeds`` backward calls,
    against the exact gradient through the quantized forward."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 256, bias=False)
    x = torch.randn(256, 128)
    upstream = torch.randn(256, 256)
    compiled = torch.compile(linear, backend="quartet2", options={"inductor": False, **options})
    xq = nvfp4.quantize_rtn(x, options.get("four_over_six", True)).dequantize()
    exact = upstream.T @ xq
    grads = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        linear.weight.grad = None
        (compiled(x) * upstream).sum().backward()
        grads.append(linear.weight.grad.clone())
    single = torch.stack([(g - exact).norm() / exact.norm() for g in grads]).mean()
    mean = (torch.stack(grads).mean(0) - exact).norm() / exact.norm()
    return single.item(), mean.item()


def test_gradients_are_unbiased_with_ms_eden_error_below_sr() -> None:
    seeds = 32
    eden_single, eden_mean = mean_gradient_errors({}, seeds)
    sr_single, _ = mean_gradient_errors({"four_over_six": False, "backward_method": "sr"}, seeds=4)
    # Unbiased: averaging n estimates shrinks the error like 1/sqrt(n) (here 1/5.7).
    assert eden_mean < eden_single / 3, (eden_single, eden_mean)
    # MS-EDEN's per-step error is well below element-wise stochastic rounding's.
    assert eden_single * 1.3 < sr_single, (eden_single, sr_single)


def test_sr_recipe_routes_into_the_same_ops() -> None:
    options = {"four_over_six": False, "backward_method": "sr", "inductor": False}
    report = quartet_compile.explain(nn.Linear(128, 128), torch.randn(128, 128), **options)
    graph = report.graphs[0].graph
    assert graph.count("quartet2.quantize_fwd.default(") == 2
    assert graph.count(", False)") >= 2 and ", True)" not in graph.split("tangents")[0]
    assert graph.count("'sr')") == 2 and "'eden'" not in graph  # grad-weight's two operands
