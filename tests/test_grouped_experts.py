"""Mixture-of-experts expert GEMMs (``aten._grouped_mm``) under quartet2: which matmuls the
grouped form rewrites, the forward against a per-expert NVFP4 reference, the backward's
unbiasedness per expert (padding keeps every 128-block rotation inside one expert), and stock
Hugging Face MoE models."""

from __future__ import annotations

import pytest
import torch
from models import Experts

from quartet_compile import nvfp4
from quartet_compile.backend import compile_graph
from quartet_compile.config import QuartetConfig
from quartet_compile.passes.report import Report, Status

E, K, N, S = 3, 128, 128, 256
# Expert 1 is empty; rows 230..255 belong to no expert (dropped tokens): their outputs are 0.
OFFS = torch.tensor([100, 100, 230], dtype=torch.int32)


def compiled(model: torch.nn.Module, **options) -> tuple[torch.nn.Module, Report]:
    """``model`` under quartet2 (reference bodies, no codegen) and the reports of its graphs."""
    report = Report()
    config = QuartetConfig.from_options({"inductor": False, **options})

    def backend(gm, inputs):
        return compile_graph(
            gm, inputs, config, report.graphs.append, {"force_disable_caches": True}
        )

    return torch.compile(model, backend=backend), report


def experts_and_input() -> tuple[Experts, torch.Tensor]:
    """bf16, as torch's grouped_mm requires."""
    x = torch.randn(S, K, dtype=torch.bfloat16, requires_grad=True)
    return Experts(E, K, N).to(torch.bfloat16), x


def forward_operands(model: Experts, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deq(Q(x)) and deq(Q(W)) per expert: one tensor scale for all experts' weights (SPEC 2 on
    W as [E*N, K])."""
    xd = nvfp4.dequantize(nvfp4.quantize_rtn(x.detach(), True))
    wd = nvfp4.dequantize(nvfp4.quantize_rtn(model.weight.detach().reshape(E * N, K), True))
    return xd, wd.view(E, N, K)


def segments() -> list[slice]:
    starts = [0, *OFFS.tolist()[:-1]]
    return [slice(a, b) for a, b in zip(starts, OFFS.tolist(), strict=True)]


def test_all_three_expert_matmuls_are_rewritten_and_the_forward_matches_the_reference() -> None:
    torch.manual_seed(0)
    model, x = experts_and_input()
    fn, report = compiled(model)
    y = fn(x, OFFS)
    (site,) = report.graphs[0].linears
    assert site.experts == E and (site.t, site.k, site.n) == (str(S), str(K), str(N))
    assert [getattr(site, r).status for r in ("forward", "grad_input", "grad_weight")] == [
        Status.NVFP4
    ] * 3
    assert "e < 3 experts" in str(site) and not report.graphs[0].others
    xd, wd = forward_operands(model, x)
    want = torch.zeros(S, N)
    for e, rows in enumerate(segments()):
        want[rows] = xd[rows] @ wd[e].T
    torch.testing.assert_close(y, want.bfloat16())
    assert (y[230:] == 0).all()


def test_the_backward_is_unbiased_per_expert() -> None:
    """The mean of many backward draws converges to the per-expert products of the forward's
    NVFP4 operands; a rotation block that mixed two experts' tokens would bias dW."""
    torch.manual_seed(0)
    model, x = experts_and_input()
    dy = torch.randn(S, N, dtype=torch.bfloat16)
    dy[230:] = 0  # rows of no expert get no gradient from the model (HF masks them)
    fn, _ = compiled(model)
    xd, wd = forward_operands(model, x)
    dy32 = dy.float()
    want_dx, want_dw = torch.zeros(S, K), torch.zeros(E, N, K)
    for e, rows in enumerate(segments()):
        want_dx[rows] = dy32[rows] @ wd[e]
        want_dw[e] = dy32[rows].T @ xd[rows]
    draws = 24
    sum_dx, sum_dw, single = torch.zeros(S, K), torch.zeros(E, N, K), []
    for _ in range(draws):
        x.grad = model.weight.grad = None
        fn(x, OFFS).backward(dy)
        sum_dx += x.grad
        sum_dw += model.weight.grad
        single.append((x.grad - want_dx).norm() / want_dx.norm())
    assert (sum_dw[1] == 0).all()  # the empty expert
    one = torch.stack(single).mean()
    for mean, want in ((sum_dx / draws, want_dx), (sum_dw / draws, want_dw)):
        # Unbiased: the error of the mean shrinks like 1/sqrt(24) = 0.2 of one draw's.
        assert (mean - want).norm() / want.norm() < 0.35 * one


def hf_moe(family: str) -> torch.nn.Module:
    """A tiny stock Hugging Face MoE (4 experts, top-2) with bf16 weights: with those the experts
    run torch's grouped_mm (fp32 ones fall back to a Python loop with a host sync, which
    graph-breaks under torch.compile)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(
        vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=256, moe_intermediate_size=128, num_experts=4, **common
        )
        return transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    config = transformers.MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
    return transformers.MixtralForCausalLM(config).to(torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_stock_hugging_face_moe_trains_with_every_expert_matmul_rewritten(family: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = hf_moe(family)
    config = model.config
    reference = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 64))
    fn, report = compiled(model)
    loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    want = reference(input_ids=ids, labels=ids).loss
    want.backward()

    (graph,) = report.graphs
    experts = [s for s in graph.linears if s.experts is not None]
    assert sorted(s.weight.rsplit(".", 1)[-1] for s in experts) == ["down_proj", "gate_up_proj"]
    assert all(s.rewritten() == 3 and s.experts == 4 for s in experts)
    (router,) = [s for s in graph.linears if s.module.endswith("mlp.gate")]
    assert router.forward.status is Status.KEPT and "router" in str(router.forward)
    assert not [o for o in graph.others if "weight" in o.reason or "not a handled" in o.reason]
    assert loss.item() == pytest.approx(want.item(), rel=1e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if "experts" in name:
            error = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()
            assert torch.isfinite(p.grad).all() and error < 0.6, (name, error)


def test_batched_mm_experts_are_reported_as_kept_with_the_way_out() -> None:
    model = hf_moe("qwen3_moe")
    model.set_experts_implementation("batched_mm")
    fn, report = compiled(model)
    fn(torch.randint(0, 256, (2, 64))).logits.sum().backward()
    (graph,) = report.graphs
    assert not [s for s in graph.linears if s.experts is not None]
    gathered = [o for o in graph.others if "batched_mm" in o.reason]
    assert len(gathered) == 4  # gate_up and down, forward and backward
    assert all('set_experts_implementation("grouped_mm")' in o.reason for o in gathered)
