"""The quartet2 ops' reference path: schemas, fake shapes, checks and agreement with nvfp4.py."""

import pytest
import torch

from quartet_compile import nvfp4 as q
from quartet_compile import ops  # noqa: F401  (registers the ops)

OPS = torch.ops.quartet2


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 256, generator=g).to(torch.bfloat16)  # 200 rows: padding exercised
    w = torch.randn(128, 256, generator=g)
    return {
        "x": x,
        "w": w,
        "signs": q.random_signs(g),
        "seed": torch.tensor(1234, dtype=torch.int64),
    }


def _opcheck_cases():
    i = _inputs()
    wq = q.quantize_rtn(i["w"])
    xq = q.quantize_rtn(i["x"].float()[:128])
    return [
        (OPS.quantize_fwd.default, (i["x"], i["x"].float().abs().amax(), True)),
        (OPS.rht_eden.default, (i["x"], i["signs"], i["seed"], False, "eden")),
        (OPS.rht_eden.default, (i["x"], i["signs"], i["seed"], True, "sr")),
        (OPS.requant.default, (*wq, i["signs"], i["seed"], "eden")),
        (OPS.gemm.default, (q.units(xq), xq[2], q.units(wq), wq[2], torch.bfloat16)),
    ]


@pytest.mark.parametrize(("op", "args"), _opcheck_cases())
def test_opcheck_schema_and_fake_implementation(op, args):
    # opcheck runs the op for real and under FakeTensorMode and compares shapes/dtypes/strides.
    # Its schema check does arithmetic on every input, which float8 tensors do not support.
    has_fp8 = any(getattr(a, "dtype", None) == torch.float8_e4m3fn for a in args)
    checks = ("test_faketensor",) if has_fp8 else ("test_schema", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=checks)


def test_ops_equal_the_reference_functions():
    i = _inputs(1)
    amax = i["x"].float().abs().amax()
    fwd = OPS.quantize_fwd(i["x"], amax, True)
    ref = q.quantize_rtn(i["x"], True)
    assert torch.equal(fwd[0], ref.codes) and torch.equal(fwd[2], ref.tensor_scale)
    assert fwd[3].dtype == torch.bfloat16 and torch.equal(fwd[3], q.units(ref))

    bwd = OPS.rht_eden(i["x"], i["signs"], i["seed"], True, "eden")
    ref = q.rht_quantize(i["x"], i["signs"], i["seed"], transpose=True)
    assert bwd[0].shape == (256, 128)  # 200 tokens padded to 256, packed two per byte
    assert torch.equal(bwd[1].view(torch.uint8), ref.scales.view(torch.uint8))
    assert bwd[3].shape == (256, 256) and torch.equal(bwd[3], q.units(ref))

    wq = q.quantize_rtn(i["w"])
    req = OPS.requant(*wq, i["signs"], i["seed"], "sr")
    ref = q.requant(wq, i["signs"], i["seed"], method="sr")
    assert torch.equal(req[0], ref.codes)

    out = OPS.gemm(fwd[3], fwd[2], q.units(wq), wq.tensor_scale, torch.float32)
    ref = q.gemm(q.NVFP4Tensor(*fwd[:3]), wq, torch.float32)
    # Tensor scales on the accumulator vs. folded into the operands: float32 rounding apart.
    assert (out - ref).norm() / ref.norm() < 1e-6


def test_ops_trace_into_inductor_cpu_code_and_match_eager():
    i = _inputs(2)

    def f(x, w, signs, seed):
        xq = OPS.quantize_fwd(x, x.float().abs().amax(), True)
        wq = OPS.quantize_fwd(w, w.abs().amax(), True)
        y = OPS.gemm(xq[3], xq[2], wq[3], wq[2], torch.bfloat16)
        wt = OPS.requant(*wq[:3], signs, seed, "eden")
        dyq = OPS.rht_eden(y, signs, seed, False, "eden")
        return y, OPS.gemm(dyq[3], dyq[2], wt[3], wt[2], torch.float32)

    args = (i["x"], i["w"], i["signs"], i["seed"])
    eager = f(*args)
    compiled = torch.compile(f, backend="inductor", fullgraph=True)(*args)
    assert torch.equal(eager[0], compiled[0])
    torch.testing.assert_close(eager[1], compiled[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda i: OPS.quantize_fwd(i["x"][:, :40], i["seed"].float(), True), ValueError, "16"),
        (
            lambda i: OPS.rht_eden(i["x"], i["signs"][:64], i["seed"], False, "eden"),
            ValueError,
            "signs",
        ),
        (
            lambda i: OPS.rht_eden(i["x"], i["signs"], i["seed"].float(), False, "eden"),
            ValueError,
            "seed",
        ),
        (lambda i: OPS.rht_eden(i["x"], i["signs"], i["seed"], False, "rtn"), ValueError, "method"),
        (
            lambda i: OPS.requant(i["w"], i["w"], i["seed"], i["signs"], i["seed"], "eden"),
            TypeError,
            "triple",
        ),
        (
            lambda i: OPS.gemm(i["w"], i["seed"].float(), i["w"], i["seed"].float(), torch.float32),
            TypeError,
            "bfloat16 units of a quantizer op",
        ),
        (
            lambda i: OPS.gemm(
                i["x"], i["seed"].float(), i["x"][:, :128], i["seed"].float(), torch.float32
            ),
            ValueError,
            "disagree on K",
        ),
    ],
)
def test_bad_op_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_inputs())
