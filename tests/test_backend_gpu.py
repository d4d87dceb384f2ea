"""The backend on CUDA: the Llama block compiles with the quartet2 Triton kernels inside
Inductor's own output code (no opaque op calls), and trains."""

from types import ModuleType

import pytest
import torch
from models import TinyLlama
from torch._inductor.utils import run_and_get_code

import quartet_compile
from quartet_compile.kernels import quantize, rht_eden

pytestmark = pytest.mark.gpu
# Where each quantizer op's CUDA kernels live (ops.py launches them through wrap_triton); the
# gemm op multiplies their bf16 units with cuBLAS.
OPS = {"quantize_fwd": quantize, "rht_eden": rht_eden, "requant": rht_eden}


def kernel_names(module: ModuleType) -> set[str]:
    """Names of the Triton kernels (``*_kernel``; not device helpers) defined in ``module``."""
    names = set()
    for value in vars(module).values():
        kernel = value
        while hasattr(kernel, "fn"):  # Autotuner / Heuristics -> JITFunction -> function
            kernel = kernel.fn
        if kernel is not value and getattr(kernel, "__name__", "").endswith("_kernel"):
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
    for op, module in OPS.items():
        names = kernel_names(module)
        assert names, f"no Triton kernel found in {module.__name__}"
        assert any(name in code for name in names), f"{op}'s kernels {names} not in the code"
    assert "torch.ops.quartet2" not in code  # every op was inlined, none left as a call
    assert "extern_kernels.mm(" in code
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)

    report = quartet_compile.explain(model, tokens)
    assert report.rewritten() == 21


def test_repeated_blocks_with_inlined_kernels_come_from_the_compile_caches(
    tmp_path, monkeypatch
) -> None:
    """On CUDA the blocks' graphs hold our Triton kernels; the later blocks must still be served
    by AOTAutograd's cache (and Inductor's), and train like the first."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = TinyLlama(dim=256, hidden=512, layers=3).cuda()
    tokens = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(model, backend="quartet2")(tokens)
    out.float().square().mean().backward()
    aot = torch._dynamo.utils.counters["aot_autograd"]
    # The embedding, the head and the first block are compiled; the two later blocks are hits.
    assert (aot["autograd_cache_miss"], aot["autograd_cache_hit"]) == (3, 2)
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
