"""The ``quartet2`` torch.compile backend (arrives with the backend issue)."""

from __future__ import annotations

from typing import Any

import torch


def quartet2(gm: torch.fx.GraphModule, example_inputs: list[Any], **options: Any):
    raise NotImplementedError(
        "the quartet2 backend's graph pass is not implemented yet; use backend='inductor' "
        "for now (tracked by the backend issue)"
    )
