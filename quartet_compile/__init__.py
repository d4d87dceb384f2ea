"""quartet-compile: Quartet II NVFP4 training as a torch.compile backend.

``torch.compile(model, backend="quartet2")`` rewrites every eligible linear layer's forward and
backward matmuls into NVFP4 ``quartet2::*`` ops; see docs/ for the numerics and the design.
"""

from quartet_compile import ops  # noqa: F401  (registers the quartet2 ops)
from quartet_compile.backend import quartet2
from quartet_compile.config import QuartetConfig
from quartet_compile.explain import explain
from quartet_compile.nvfp4 import NVFP4Tensor

__all__ = ["NVFP4Tensor", "QuartetConfig", "explain", "quartet2"]
__version__ = "0.1.0"
