"""QuartetConfig: every switch of the quartet2 backend in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quartet_compile.nvfp4 import BackwardMethod, backward_method


@dataclass(frozen=True)
class QuartetConfig:
    """What the quartet2 backend rewrites and how.

    four_over_six: forward scale selection between "max on 6" and "max on 4" (SPEC 2).
    backward_method: BackwardMethod.EDEN ("eden": MS-EDEN, Quartet II) or BackwardMethod.SR
        ("sr": element-wise stochastic rounding with the same rotation: the comparison recipe);
        either spelling is accepted.
    skip: module-name patterns (fnmatch, matched against the dotted module path and its last part)
        whose linears stay in high precision; by default the output projection.
    forward / backward: which matmuls to rewrite.
    keep_output_head / keep_router: keep in high precision, whatever its name, the output head
        (a weight tied to an embedding, or the final vocabulary projection) and a mixture of
        experts' router (its output picks the experts); passes/structure.py says how they are
        recognised.
    min_dim: K and N below this stay in high precision (tiny layers gain nothing).
    inductor: False runs the rewritten AOTAutograd graphs eagerly instead of generating code
        (like backend="aot_eager"): to debug the pass apart from Inductor, and for fast CPU tests.
    regional: compile a model's repeated blocks (``blocks.0``, ``blocks.1``, ...) as separate
        graphs, so that Inductor's cache generates their code once (quartet_compile.regional);
        False compiles the whole graph at once, fusing across block boundaries.
    check_finite: a debugging switch, like ``torch.autograd.detect_anomaly``: check every
        quartet2 op's input and output tensors and raise ``FloatingPointError`` at the first NaN
        or Inf, naming the layer, the matmul (forward / grad-input / grad-weight), the operand and
        whether the value came in or the op made it. Slow: each check syncs with the device
        (a 1-block Llama step on the H200: 7.3 -> 23.5 ms), and CUDA graphs (reduce-overhead)
        stop at each check. On CUDA results match check_finite=False only up to rounding: the
        checks make Inductor write out intermediates that a fused kernel would keep in float32.
    """

    four_over_six: bool = True
    backward_method: BackwardMethod = BackwardMethod.EDEN
    skip: tuple[str, ...] = ("lm_head", "*.lm_head", "output")
    forward: bool = True
    backward: bool = True
    keep_output_head: bool = True
    keep_router: bool = True
    min_dim: int = 128
    inductor: bool = True
    regional: bool = True
    check_finite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backward_method", backward_method(self.backward_method))
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.min_dim < 1:
            raise ValueError(f"min_dim must be >= 1, got {self.min_dim}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> QuartetConfig:
        """Build from torch.compile(..., options={...}); unknown keys name the valid ones."""
        options = dict(options or {})
        config = options.pop("config", None)
        if config is not None and not isinstance(config, QuartetConfig):
            raise TypeError(f"options['config'] must be a QuartetConfig, got {type(config)}")
        valid = set(cls.option_names())
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"unknown quartet2 option(s) {unknown}; valid options are {sorted(valid)} "
                "(or config=QuartetConfig(...)); torch._inductor.config keys go to Inductor"
            )
        base = config or cls()
        return dataclasses.replace(base, **options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keys from_options accepts besides ``config``."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def cache_key(self) -> str:
        """Stable text for Inductor's cache key (CustomGraphPass.uuid)."""
        return repr(dataclasses.astuple(self))


DEFAULT = QuartetConfig()

__all__ = ["QuartetConfig", "DEFAULT"]
