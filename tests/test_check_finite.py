# ruff: noqa: E501  (graph printouts are long lines)
"""options={"check_finite": True}: a check after every quartet2 op, raising at the first NaN/Inf
with the layer, the matmul and the operand; absent when off, and changing no result when on.

Regenerate the snapshot with ``EXPECTTEST_ACCEPT=1 pytest tests/test_check_finite.py``.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from models import MLP, TinyLlama
from torch import nn
from torch._inductor.utils import run_and_get_code

import quartet_compile
from quartet_compile.config import QuartetConfig
from quartet_compile.passes.report import Report

q2 = torch.ops.quartet2
CHECK_CALL = "torch.ops.quartet2.check_finite.default("


class PoisonGrad(torch.autograd.Function):
    """Identity whose backward adds ``poison`` to the gradient (zeros: changes nothing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(poison)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (poison,) = ctx.saved_tensors
        return grad + poison, None


class Net(nn.Module):
    """An MLP (module path ``mlp.fc1``, ``mlp.fc2``) whose fc2 input gets ``poison`` added."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.mlp.fc1(x)) + poison
        return self.mlp.fc2(h)


def compiled(model: nn.Module, **options: object) -> nn.Module:
    options = {"inductor": False, "check_finite": True, **options}
    return torch.compile(model, backend="quartet2", options=options)


def test_the_option_is_part_of_the_cache_key() -> None:
    assert QuartetConfig(check_finite=True).cache_key() != QuartetConfig().cache_key()


def test_the_op_names_the_operand_and_where_the_value_came_from() -> None:
    finite, bad = torch.ones(2, 4), torch.ones(2, 4)
    bad[0, :2], bad[1, 3] = float("nan"), float("-inf")
    names = ["dy", "dy (rotated NVFP4)"]
    site = ("layers.0.q_proj", "grad-input", "quartet2::rht_eden")
    q2.check_finite([finite, finite], names, 1, "gradient", *site)  # no error
    # schema, fake implementation, and a trace through AOTAutograd that keeps the call
    torch.library.opcheck(q2.check_finite.default, ([finite, finite], names, 1, "gradient", *site))
    with pytest.raises(FloatingPointError) as raised:
        q2.check_finite([bad, finite], names, 1, "gradient", *site)
    assert str(raised.value).startswith(
        "quartet2 check_finite: non-finite value in grad-input operand dy of layer "
        "'layers.0.q_proj' (quartet2::rht_eden input): 2 NaN, 1 Inf of 8 elements. It entered "
        "this matmul from outside: the gradient reaching the layer's output was already "
        "non-finite"
    )
    with pytest.raises(FloatingPointError, match="the problem is upstream of the layer"):
        q2.check_finite([bad, finite], ["W", "W (NVFP4)"], 1, "model", *site)
    bug = "quartet2 made it from finite values: a quartet_compile bug"
    with pytest.raises(FloatingPointError, match=bug):  # an operand quantized by quartet2
        q2.check_finite([bad, finite], names, 1, "quartet2", *site)
    with pytest.raises(FloatingPointError) as raised:  # an output
        q2.check_finite([finite, bad], names, 1, "gradient", *site)
    message = str(raised.value)
    assert "operand dy (rotated NVFP4) of layer 'layers.0.q_proj' (quartet2::rht_eden output)" in (
        message
    )
    assert bug in message and "options={'skip': ('layers.0.q_proj',)}" in message


def test_checks_change_no_loss_or_gradient() -> None:
    """Same seed, check on and off: bit-identical loss and gradients (two training steps)."""
    results = []
    for check in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyLlama(layers=2)
        tokens = torch.randint(0, 256, (2, 64))
        step = compiled(model, check_finite=check)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = F.cross_entropy(step(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        results.append((losses, [p.grad.clone() for p in model.parameters()]))
    (losses_off, grads_off), (losses_on, grads_on) = results
    assert torch.isfinite(torch.stack(losses_off)).all()
    for a, b in zip([*losses_off, *grads_off], [*losses_on, *grads_on], strict=True):
        assert torch.equal(a, b)


def test_nan_entering_a_forward_matmul_names_the_layer_and_operand_x() -> None:
    torch.manual_seed(0)
    net = compiled(Net())
    x, poison = torch.randn(2, 64, 128), torch.zeros(2, 64, 256)
    net(x, poison).sum().backward()  # finite: no error
    poison[1, 5, 7] = float("nan")
    with pytest.raises(FloatingPointError) as raised:
        net(x, poison)
    assert str(raised.value).startswith(
        "quartet2 check_finite: non-finite value in forward operand x of layer 'mlp.fc2' "
        "(quartet2::quantize_fwd input): 1 NaN, 0 Inf of 32768 elements. It entered this "
        "matmul from outside: the problem is upstream"
    )


def test_nan_in_a_gradient_names_the_layer_and_operand_dy() -> None:
    """A NaN put into the gradient that reaches fc1's output: fc2's backward (earlier) passes,
    fc1's first backward check raises."""
    torch.manual_seed(0)

    class PoisonedGrad(Net):
        def forward(self, x: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
            h = PoisonGrad.apply(self.mlp.fc1(x), poison)
            return self.mlp.fc2(F.gelu(h))

    net = compiled(PoisonedGrad())
    x, poison = torch.randn(2, 64, 128, requires_grad=True), torch.zeros(2, 64, 256)
    net(x, poison).sum().backward()  # finite: no error
    poison[0, 0, 0] = float("inf")
    out = net(x, poison)
    with pytest.raises(FloatingPointError) as raised:
        out.sum().backward()
    assert re.match(
        r"quartet2 check_finite: non-finite value in grad-(input|weight) operand dy of layer "
        r"'mlp\.fc1' \(quartet2::rht_eden input\): 0 NaN, 1 Inf of 32768 elements\. It entered "
        r"this matmul from outside",
        str(raised.value),
    ), str(raised.value)


def check_lines(report: Report) -> str:
    graph = report.graphs[0].graph
    return "\n".join(line for line in graph.splitlines() if "check_finite" in line)


def test_the_rewritten_graph_holds_the_checks_only_when_on() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 128, requires_grad=True)
    off = quartet_compile.explain(nn.Linear(128, 256, bias=False), x, inductor=False)
    assert off.graphs[0].checks == 0 and "check_finite" not in off.graphs[0].graph
    assert "check_finite" not in str(off)
    on = quartet_compile.explain(
        nn.Linear(128, 256, bias=False), x, inductor=False, check_finite=True
    )
    assert on.graphs[0].checks == 9  # 3 ops (2 quantizers, a gemm) per matmul
    assert (
        "check_finite: 9 check(s) of the quartet2 ops' inputs and outputs (each syncs with the "
        "device)" in str(on)
    )
    assert_expected_inline(
        check_lines(on),
        """\
%check_finite_default:  = quartet2.check_finite.default([%primals_2, %getitem_2, %getitem_3], ['x', 'x (NVFP4)', 'x (NVFP4)'], 1, 'model', '<root>', 'forward', 'quartet2::quantize_fwd')
%check_finite_default_1:  = quartet2.check_finite.default([%primals_1, %getitem_6, %getitem_7], ['W', 'W (NVFP4)', 'W (NVFP4)'], 1, 'model', '<root>', 'forward', 'quartet2::quantize_fwd')
%check_finite_default_2:  = quartet2.check_finite.default([%getitem_2, %getitem_3, %getitem_6, %getitem_7, %gemm_default], ['x (NVFP4)', 'x (NVFP4)', 'W (NVFP4)', 'W (NVFP4)', 'y'], 4, 'quartet2', '<root>', 'forward', 'quartet2::gemm')
%check_finite_default_6:  = quartet2.check_finite.default([%tangents_1, %getitem_18, %getitem_19], ['dy', 'dy (rotated NVFP4)', 'dy (rotated NVFP4)'], 1, 'gradient', '<root>', 'grad-weight', 'quartet2::rht_eden')
%check_finite_default_7:  = quartet2.check_finite.default([%getitem_2, %getitem_22, %getitem_23], ['x (NVFP4 of the forward)', 'x (rotated NVFP4)', 'x (rotated NVFP4)'], 1, 'quartet2', '<root>', 'grad-weight', 'quartet2::requant')
%check_finite_default_8:  = quartet2.check_finite.default([%getitem_18, %getitem_19, %getitem_22, %getitem_23, %gemm_default_2], ['dy (rotated NVFP4)', 'dy (rotated NVFP4)', 'x (rotated NVFP4)', 'x (rotated NVFP4)', 'dW'], 4, 'quartet2', '<root>', 'grad-weight', 'quartet2::gemm')
%check_finite_default_3:  = quartet2.check_finite.default([%tangents_1, %getitem_10, %getitem_11], ['dy', 'dy (rotated NVFP4)', 'dy (rotated NVFP4)'], 1, 'gradient', '<root>', 'grad-input', 'quartet2::rht_eden')
%check_finite_default_4:  = quartet2.check_finite.default([%getitem_6, %getitem_14, %getitem_15], ['W (NVFP4 of the forward)', 'W (rotated NVFP4)', 'W (rotated NVFP4)'], 1, 'quartet2', '<root>', 'grad-input', 'quartet2::requant')
%check_finite_default_5:  = quartet2.check_finite.default([%getitem_10, %getitem_11, %getitem_14, %getitem_15, %gemm_default_1], ['dy (rotated NVFP4)', 'dy (rotated NVFP4)', 'W (rotated NVFP4)', 'W (rotated NVFP4)', 'dx'], 4, 'quartet2', '<root>', 'grad-input', 'quartet2::gemm')""",
    )
    with torch.no_grad():
        inference = quartet_compile.explain(
            nn.Linear(128, 256), x, inductor=False, check_finite=True
        )
    assert inference.graphs[0].checks == 3


def test_inductor_keeps_every_check_on_its_side_of_the_partition() -> None:
    """The default path (Inductor generates the code): the checks survive its dead-code
    elimination as extern calls, 3 in the forward and 6 in the backward, each once."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 256)
    x = torch.randn(128, 128, requires_grad=True)
    step = compiled(layer, inductor=True, force_disable_caches=True)
    _, (forward, backward) = run_and_get_code(lambda: step(x).sum().backward())
    assert forward.count(CHECK_CALL) == 3 and backward.count(CHECK_CALL) == 6
    assert "'forward'" in forward and "'forward'" not in backward
    bad = x.detach().clone()
    bad[3, 4] = float("inf")
    with pytest.raises(FloatingPointError, match=r"forward operand x of layer '<root>' \("):
        step(bad)


@pytest.mark.gpu
def test_on_cuda_the_checks_stay_op_calls_also_between_cuda_graphs() -> None:
    """On CUDA the quartet2 ops are inlined, the checks are not. Results match check_finite=False
    up to rounding: the checks make Inductor write out (bf16) intermediates that a fused kernel
    would keep in float32 (seen on the H200: same loss with emulate_precision_casts)."""
    torch.manual_seed(0)
    model = TinyLlama(dim=256, hidden=512).cuda()
    tokens = torch.randint(0, 256, (2, 128), device="cuda")

    def run(step: nn.Module) -> torch.Tensor:
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(step(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        return loss.detach()

    options = {"force_disable_caches": True}
    reference = run(torch.compile(model, backend="quartet2", options=options))
    torch._dynamo.reset()
    checked = torch.compile(model, backend="quartet2", options={**options, "check_finite": True})
    loss, codes = run_and_get_code(run, checked)
    code = "\n".join(codes)
    # 7 linears x 3 matmuls x 3 ops, less the 3 forward quantizations of x that k and v share
    # with q, and up with gate
    assert code.count(CHECK_CALL) == 7 * 9 - 3
    assert "torch.ops.quartet2.rht_eden" not in code  # the kernels are still inlined
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=0)
    # reduce-overhead: Inductor runs the checks between CUDA graphs (or skips them); still raises.
    torch._dynamo.reset()
    graphs = {"check_finite": True, **torch._inductor.list_mode_options("reduce-overhead")}
    step = torch.compile(model, backend="quartet2", options=graphs)
    for _ in range(3):
        run(step)
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"forward operand W of layer 'layers\.0\.attn\.q_proj'"
    ):
        run(step)
