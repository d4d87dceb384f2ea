"""The backend on CUDA: the Llama block compiles with the quartet2 Triton kernels inside
Inductor's own output code (no opaque op calls), and trains."""

import pytest
import torch
from models import TinyLlama
from torch._inductor.utils import run_and_get_code
from torch._library.triton import get_triton_kernels_for_op

import quartet_compile

pytestmark = pytest.mark.gpu
OPS = ("quantize_fwd", "rht_eden", "requant", "gemm")


def kernel_names(op: str) -> set[str]:
    """Python names of the Triton kernels that ops.py launches for ``quartet2::op``."""
    names = set()
    for kernel in get_triton_kernels_for_op(f"quartet2::{op}"):
        while hasattr(kernel, "fn"):  # Autotuner / Heuristics -> JITFunction -> function
            kernel = kernel.fn
        names.add(kernel.__name__)
    return names


def test_llama_block_runs_the_quartet2_triton_kernels_from_inductor_code() -> None:
    torch.manual_seed(0)
    model = TinyLlama(dim=256, hidden=512).cuda()
    tokens = torch.randint(0, 256, (4, 128), device="cuda")
    options = {"force_disable_caches": True}
    compiled = torch.compile(model, backend="quartet2", options=options)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(tokens)
        out.float().square().mean().backward()
        return out

    out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert len(codes) == 2  # forward and backward
    for op in OPS:
        names = kernel_names(op)
        assert names, f"ops.py registers no Triton kernel for quartet2::{op}"
        assert any(name in code for name in names), f"{op}'s kernels {names} not in the code"
    assert "torch.ops.quartet2" not in code  # every op was inlined, none left as a call
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)

    report = quartet_compile.explain(model, tokens)
    assert report.rewritten() == 21
