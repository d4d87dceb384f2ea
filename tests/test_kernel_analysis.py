"""The memoized Triton mutation analysis: one analysis per (our kernel, argument signature)."""

from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops import triton_kernel_wrap

from quartet_compile import kernel_analysis
from quartet_compile.kernels import quantize


@pytest.fixture
def analysis(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace torch's analysis by a recorder, then install the cache over it (both undone)."""
    calls: list[str] = []

    def record(kernel, kwargs, tma_descriptor_metadata):
        calls.append(getattr(kernel, "fn", kernel).__name__)
        return ["codes_ptr"]

    for name in kernel_analysis._NAMES:
        monkeypatch.setattr(triton_kernel_wrap, name, record, raising=False)
    kernel_analysis.install()
    return calls


def _analyse(kernel, **kwargs):
    analysis = getattr(triton_kernel_wrap, kernel_analysis._NAMES[0])
    return analysis(kernel, kwargs, tma_descriptor_metadata={})


def test_our_kernels_are_analysed_once_per_signature(analysis: list[str]):
    x = torch.empty(64, 256, dtype=torch.bfloat16)
    first = _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=64, FOUR_OVER_SIX=True)
    first.append("caller's own list")  # a caller mutating its result must not poison the cache
    again = _analyse(quantize._quantize_rtn_kernel, x_ptr=x.clone(), rows=64, FOUR_OVER_SIX=True)
    assert again == ["codes_ptr"] and len(analysis) == 1
    # Another layer's width: same dtypes and the same integer specialization (multiple of 16).
    wider = torch.empty(128, 512, dtype=torch.bfloat16)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=wider, rows=4096, FOUR_OVER_SIX=True)
    assert len(analysis) == 1
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x.float(), rows=64, FOUR_OVER_SIX=True)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=64, FOUR_OVER_SIX=False)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=1, FOUR_OVER_SIX=True)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=24, FOUR_OVER_SIX=True)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=2**32, FOUR_OVER_SIX=True)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=64, FOUR_OVER_SIX=True, BLOCK_R=8)
    _analyse(quantize._quantize_rtn_kernel, x_ptr=x, rows=64, FOUR_OVER_SIX=True, BLOCK_R=16)
    # dtype, constexpr value, == 1, not divisible by 16, 64-bit, and each BLOCK_R value
    assert len(analysis) == 8


def test_other_kernels_and_undescribable_arguments_are_always_analysed(analysis: list[str]):
    def foreign_kernel():  # stands in for a user's kernel in the same process
        pass

    foreign_kernel.__module__ = "users_model"
    _analyse(foreign_kernel, n=1)
    _analyse(foreign_kernel, n=1)
    _analyse(quantize._quantize_rtn_kernel, rows=object())
    _analyse(quantize._quantize_rtn_kernel, rows=object())
    assert analysis == ["foreign_kernel"] * 2 + ["_quantize_rtn_kernel"] * 2


def test_install_is_idempotent(analysis: list[str]):
    kernel_analysis.install()
    _analyse(quantize._quantize_rtn_kernel, rows=1)
    _analyse(quantize._quantize_rtn_kernel, rows=1)
    assert len(analysis) == 1
