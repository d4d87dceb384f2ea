"""Memoize Inductor's mutation analysis of this package's Triton kernels.

Every ``wrap_triton`` call in a graph is analysed by lowering its kernel to TTIR to find the
arguments it stores to, and that analysis runs again for each call node at several compile
stages. A model repeats the same few kernel calls per linear layer, so on the H100 a 2-layer
Llama spent 33 of its 85 compile seconds in 384 such analyses. The analysis compiles the kernel
for stand-in arguments (every tensor becomes a 2-element tensor of its dtype), so its answer
depends only on what Triton specializes on: tensor dtypes, constexpr values, and for integers
whether they are 1, divisible by 16 and 32-bit. It is cached per (kernel, that signature) for
kernels of ``quartet_compile`` only, so layers of different widths share one analysis; other
kernels in the same process are analysed exactly as before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import sympy
import torch
from torch._higher_order_ops import triton_kernel_wrap

# torch 2.11 names the analysis identify_mutated_tensors; later versions identify_accessed_tensors.
_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")
# Arguments Triton sees by value (bool before int: a bool is an int).
_EXACT = (bool, str, type(None), torch.dtype)


def install() -> None:
    """Wrap the analysis in torch with the cache (once per process; a no-op afterwards)."""
    for name in _NAMES:
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is not None and not getattr(analysis, "_quartet2_cached", False):
            setattr(triton_kernel_wrap, name, _cached(analysis))


def _cached(analysis: Callable[..., Any]) -> Callable[..., Any]:
    results: dict[Hashable, Any] = {}
    signature = inspect.signature(analysis)

    @functools.wraps(analysis)
    def cached(*args: Any, **kwargs: Any) -> Any:
        key = _key(signature.bind(*args, **kwargs).arguments)
        if key is None:
            return analysis(*args, **kwargs)
        if key not in results:
            results[key] = analysis(*args, **kwargs)
        result = results[key]
        return list(result) if isinstance(result, list) else result

    cached._quartet2_cached = True  # type: ignore[attr-defined]
    return cached


def _key(arguments: dict[str, Any]) -> Hashable | None:
    """(kernel, argument signature), or None when the call is not ours or not describable."""
    kernel, kwargs = arguments.get("kernel"), arguments.get("kwargs")
    fn = getattr(kernel, "fn", kernel)
    if not isinstance(kwargs, dict) or not getattr(fn, "__module__", "").startswith(
        "quartet_compile"
    ):
        return None
    constexprs = {p.name for p in getattr(kernel, "params", ()) if p.is_constexpr}
    rest = {k: v for k, v in arguments.items() if k not in ("kernel", "kwargs")}
    try:
        described = tuple(
            sorted((name, _describe(value, name in constexprs)) for name, value in kwargs.items())
        )
        key = (kernel, described, repr(rest))
        hash(key)
    except (TypeError, NotImplementedError, AttributeError):
        return None
    return key


def _describe(value: Any, constexpr: bool) -> Hashable:
    """What Triton specializes on for one argument (see the module docstring)."""
    if constexpr or isinstance(value, _EXACT):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    if isinstance(value, float):
        return ("float",)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbolic",)  # the analysis replaces these by the constant 2
    # Inductor's IR nodes (TensorBox and friends) at lowering time.
    return ("tensor", value.get_dtype())
