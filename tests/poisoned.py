"""A model builder whose model gets a NaN in one parameter's second gradient: how the benchmark
tests check that a non-finite gradient stops the run and names the parameter."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

POISONED = "model.layers.1.mlp.down_proj.weight"


def poisoned_builder(
    build: Callable[[str, bool, int], torch.nn.Module],
) -> Callable[[str, bool, int], torch.nn.Module]:
    """``build`` (real_models.build_model's signature), with NaN written into element [0, 0] of
    ``POISONED``'s gradient when it is accumulated for the second time."""

    def build_poisoned(name: str, tiny: bool, seed: int) -> torch.nn.Module:
        model = build(name, tiny, seed)
        calls = []

        def poison_second_gradient(param: torch.Tensor) -> None:
            calls.append(None)
            if len(calls) == 2:
                param.grad[0, 0] = math.nan

        model.get_parameter(POISONED).register_post_accumulate_grad_hook(poison_second_gradient)
        return model

    return build_poisoned
