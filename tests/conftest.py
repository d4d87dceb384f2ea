"""Shared pytest set-up: ``gpu`` tests run only where CUDA is present; every test compiles from
a clean Dynamo state, so recompile limits and compile counters are per test."""

import os
import tempfile

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's interpreter (tests/test_kernels.py).
# triton.jit reads the switch when a kernel is defined, so it is set before any test module
# imports quartet_compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh Inductor cache per session: a triton_op's body is not part of Inductor's FX-graph
# cache key, so a test compiling the ops with backend="inductor" replayed C++ built from an
# older checkout of nvfp4.py (seen). The quartet2 backend keys its pass on those sources.
# Held for the whole session and removed at exit, so test runs do not pile up in /tmp.
_INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="quartet2-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the gpu suite on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
