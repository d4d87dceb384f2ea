"""Shared pytest set-up: ``gpu`` tests run only where CUDA is present."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the gpu suite on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
