"""The grouped expert form on CUDA with Inductor: the inlined Triton quantizers, pad_segments and
torch._grouped_mm on the units give the forward of the CPU reference, and a backward whose
average over draws converges to the per-expert products (as tests/test_grouped_experts.py checks
on the CPU)."""

from __future__ import annotations

import pytest
import torch
from test_grouped_experts import OFFS, E, K, N, S, experts_and_input, forward_operands, segments

from quartet_compile.backend import compile_graph
from quartet_compile.config import QuartetConfig
from quartet_compile.passes.report import Report

pytestmark = pytest.mark.gpu


def test_grouped_experts_under_inductor_on_cuda_match_the_reference() -> None:
    torch.manual_seed(0)
    model, x = experts_and_input()
    xd, wd = forward_operands(model, x)
    dy = torch.randn(S, N, dtype=torch.bfloat16)
    dy[230:] = 0
    want_y, want_dx, want_dw = torch.zeros(S, N), torch.zeros(S, K), torch.zeros(E, N, K)
    for e, rows in enumerate(segments()):
        want_y[rows] = xd[rows] @ wd[e].T
        want_dx[rows] = dy[rows].float() @ wd[e]
        want_dw[e] = dy[rows].float().T @ xd[rows]

    report = Report()
    config = QuartetConfig()

    def backend(gm, inputs):
        return compile_graph(gm, inputs, config, report.graphs.append)

    model, x_cuda = model.cuda(), x.detach().cuda().requires_grad_()
    fn = torch.compile(model, backend=backend)
    draws, sum_dx, sum_dw, single = 32, torch.zeros(S, K), torch.zeros(E, N, K), []
    for _ in range(draws):
        x_cuda.grad = model.weight.grad = None
        y = fn(x_cuda, OFFS.cuda())
        y.backward(dy.cuda())
        sum_dx += x_cuda.grad.float().cpu()
        sum_dw += model.weight.grad.float().cpu()
        single.append((x_cuda.grad.float().cpu() - want_dx).norm() / want_dx.norm())
    assert report.graphs[0].linears[0].rewritten() == 3
    # bf16 tolerance: the CUDA GEMM rounds its bf16 product before the tensor scales apply.
    torch.testing.assert_close(y.cpu(), want_y.bfloat16())
    for mean, want in ((sum_dx / draws, want_dx), (sum_dw / draws, want_dw)):
        # Unbiased: the error of the mean shrinks like 1/sqrt(32) = 0.18 of one draw's.
        assert (mean - want).norm() / want.norm() < 0.35 * torch.stack(single).mean()
