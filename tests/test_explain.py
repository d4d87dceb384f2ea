"""explain(): the report users read, the option errors, and the INFO log while compiling."""

import logging

import pytest
import torch
from expecttest import TestCase
from torch import nn

import quartet_compile


class Mixed(nn.Module):
    """One linear of each kind the report distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 256)
        self.odd = nn.Linear(256, 100, bias=False)
        self.frozen = nn.Linear(128, 128, bias=False).requires_grad_(False)
        self.kn = nn.Parameter(torch.randn(128, 256) / 16)  # stored [K, N]: used as x @ kn
        self.lm_head = nn.Linear(128, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen(x)
        scores = h @ h.transpose(-1, -2)  # activation x activation
        return (
            self.proj(x).sum()
            + self.odd(torch.relu(self.proj(x))).sum()
            + (scores @ x @ self.kn).sum()
            + self.lm_head(h).sum()
        )


class Explain(TestCase):
    def test_report_text(self) -> None:
        torch.manual_seed(0)
        x = torch.randn(2, 64, 128, requires_grad=True)
        report = quartet_compile.explain(Mixed(), x, inductor=False)
        self.assertExpectedInline(
            str(report),
            """\
quartet2: joint (training) graph, 6 linear layer(s), 11 matmul(s) rewritten to NVFP4
  frozen: x[128, 128] @ W[128, 128].T (float32)
    forward: nvfp4; grad-input: nvfp4; grad-weight: absent (the weight does not require grad)
  proj: x[128, 128] @ W[256, 128].T + bias (float32)
    all: nvfp4
  proj: x[128, 128] @ W[256, 128].T + bias (float32)
    all: nvfp4
  odd: x[128, 256] @ W[100, 256].T (float32)
    all: N=100 is not a multiple of 128
  <root>: x[128, 128] @ kn[256, 128].T (float32)
    all: nvfp4
  lm_head: x[128, 128] @ W[256, 128].T (float32)
    all: skipped by pattern 'lm_head'
  other matmuls (left as they were):
    bmm [2, 64, 128] @ [2, 128, 64]: activation x activation
    bmm_1 [2, 64, 64] @ [2, 64, 128]: activation x activation
    bmm_2 [2, 64, 64] @ [2, 64, 128]: activation x activation (backward)
    bmm_3 [2, 64, 128] @ [2, 128, 64]: activation x activation (backward)
    bmm_4 [2, 128, 64] @ [2, 64, 64]: activation x activation (backward)
    bmm_5 [2, 64, 64] @ [2, 64, 128]: activation x activation (backward)""",
        )

    def test_no_grad_explains_the_inference_graph(self) -> None:
        with torch.no_grad():
            report = quartet_compile.explain(nn.Linear(128, 128), torch.randn(128, 128))
        self.assertExpectedInline(
            str(report),
            """\
quartet2: forward (inference) graph, 1 linear layer(s), 1 matmul(s) rewritten to NVFP4
  <root>: x[128, 128] @ W[128, 128].T + bias (float32)
    forward: nvfp4; grad-input: absent (inference graph); grad-weight: absent (inference graph)""",
        )


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown quartet2 option\(s\) \['four_over_5'\].*"):
        quartet_compile.explain(nn.Linear(128, 128), torch.randn(128, 128), four_over_5=True)
    compiled = torch.compile(nn.Linear(128, 128), backend="quartet2", options={"bogus": 1})
    with pytest.raises(Exception, match=r"valid options are \[.*'backward_method'.*\]"):
        compiled(torch.randn(128, 128))


def test_compiling_logs_the_report(caplog: pytest.LogCaptureFixture) -> None:
    options = {"inductor": False, "force_disable_caches": True}
    compiled = torch.compile(nn.Linear(128, 256), backend="quartet2", options=options)
    with caplog.at_level(logging.INFO, logger="quartet_compile"):
        compiled(torch.randn(128, 128))
    messages = [r.getMessage() for r in caplog.records if r.name == "quartet_compile"]
    assert len(messages) == 1
    # forward and grad-weight (the input does not require grad)
    assert messages[0].startswith("quartet2: joint (training) graph, 1 linear layer(s), 2 matmul")
