"""benchmarks/linear.py's bookkeeping on the CPU (the timing itself needs a GPU): every quartet2
variant gets one row per shape with its ratio against the one BF16 run of that shape, kernel
tables appear for the --breakdown shapes only, the host profile names every run at the last
shape, the headline is the first variant's at 16384x4096x4096, and the command line names the
TORCHINDUCTOR_* environment it ran in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import linear  # noqa: E402

VARIANTS = '{"quartet2": {}, "rtn 6 only": {"four_over_six": false}}'


def test_variants_share_one_bf16_run_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, written = [], {}
    # ms per backend/variant: the ratios below can only come out right against the shared BF16.
    ms = {"inductor": 2.0, "quartet2": 3.0, "rtn 6 only": 4.0}

    def measure(backend, shape, options, kernels, host):
        name = "rtn 6 only" if options else backend
        calls.append((name, shape, kernels, host))
        result = dict(ms=ms[name], compile_s=1.0, peak=1.0, graph_ms=ms[name] / 2)
        if kernels:
            result["kernels"] = [[f"kernel of {shape}", "0.1", "3", "10%"]]
        if host:
            result["host_ms"], result["hot"] = ms[name] / 4, [["f (x.py:1)", "0.1", "1"]]
        return result

    monkeypatch.setattr(linear, "measure", measure)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU")
    monkeypatch.setattr(linear, "write_section", lambda title, body: written.update({title: body}))
    shapes = "16384x4096x4096,8192x768x768"
    argv = ["linear.py", "--shapes", shapes, "--breakdown", "8192x768x768", "--variants", VARIANTS]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS", "1")
    linear.main()

    assert [c[0] for c in calls] == ["inductor", "quartet2", "rtn 6 only"] * 2
    assert [c[2] for c in calls] == [False, False, False, False, True, False]  # kernels
    assert [c[3] for c in calls] == [False, False, False, True, True, True]  # host profile
    (body,) = written.values()
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| 16384x")]
    assert [(r[1], r[4]) for r in rows] == [("quartet2", "1.50x"), ("rtn 6 only", "2.00x")]
    assert "kernel of (8192, 768, 768)" in body and "kernel of (16384" not in body
    assert "rtn 6 only host time per step at T=8192, K=768, N=768: 1.000 ms" in body
    assert body.rstrip().endswith("(T=16384, K=4096, N=4096): 1.50x on GPU")
    command = body.splitlines()[0]
    assert (
        "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 python benchmarks/linear.py"
        in command
    )
