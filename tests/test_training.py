"""Training through the backend: a loop without recompiles, saved NVFP4 triples, and every
situation issue 4 lists (autocast, bf16, no_grad, frozen, tied, checkpointed, dynamic,
max-autotune, graph breaks, no linear layers). Activation checkpointing is tested with the other
trainer features in test_training_edge_cases.py."""

import functools

import pytest
import torch
import torch.nn.functional as F
from models import MLP, TinyLlama
from torch import nn

import quartet_compile
from quartet_compile.backend import compile_graph, quartet2
from quartet_compile.config import QuartetConfig
from quartet_compile.passes.report import Report

EAGER = {"inductor": False}  # the rewritten graphs run eagerly: fast, same pass


def train(model: nn.Module, tokens: torch.Tensor, steps: int, **options) -> tuple[list, int]:
    """Losses of ``steps`` AdamW steps on one batch, and how many graphs Dynamo compiled."""
    compiles = 0

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        nonlocal compiles
        compiles += 1
        return quartet2(gm, example_inputs, **options)

    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = compiled(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, compiles


def test_ten_steps_learn_without_recompiling_and_repeat_exactly() -> None:
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyLlama()
        tokens = torch.randint(0, 256, (2, 65))
        runs.append(train(model, tokens, steps=10))
    (losses, compiles), (again, _) = runs
    assert compiles == 1
    assert losses[-1] < 0.8 * losses[0], losses
    assert losses == again


def saved_bytes(model: nn.Module, x: torch.Tensor, backend: str, **options) -> dict:
    """Bytes that autograd keeps for backward, by dtype (parameters themselves excluded)."""
    compiled = torch.compile(model, backend=backend, options=options or None)
    compiled(x)  # compile outside the hooks
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[t.dtype] = saved.get(t.dtype, 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(x).sum().backward()
    return saved


def test_backward_keeps_nvfp4_triples_not_bf16_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False))
    model = model.bfloat16()
    x = torch.randn(256, 512, dtype=torch.bfloat16)
    bf16 = saved_bytes(model, x, "aot_eager")
    nvfp4 = saved_bytes(model, x, "quartet2", **EAGER)
    assert bf16 == {torch.bfloat16: 2 * 256 * 512 * 2}  # the two layers' inputs
    assert set(nvfp4) == {torch.uint8, torch.float8_e4m3fn, torch.float32}
    # Two activation triples and two weight triples (the weights are not kept in BF16 either).
    assert nvfp4[torch.uint8] == 4 * 256 * 512 // 2
    assert nvfp4[torch.float8_e4m3fn] == 4 * 256 * 512 // 16
    print(f"saved for backward: BF16 {bf16}, quartet2 {nvfp4}")


def explain_and_step(model: nn.Module, *inputs: torch.Tensor, **options) -> str:
    """Compile ``model``, run one forward (+ backward when it needs grad) and return the report."""
    config = QuartetConfig.from_options({**EAGER, **options})
    report = Report()

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        caches_off = {"force_disable_caches": True}
        return compile_graph(gm, example_inputs, config, report.graphs.append, caches_off)

    out = torch.compile(model, backend=backend)(*inputs)
    if out.requires_grad:
        out.float().sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    return str(report)


def tokens() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 64))


def test_bf16_autocast_over_fp32_params() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = explain_and_step(TinyLlama(), tokens())
    assert "21 matmul(s) rewritten" in report and "(bfloat16)" in report
    assert "(float32)" not in report


def test_bf16_params() -> None:
    report = explain_and_step(TinyLlama().bfloat16(), tokens())
    assert "21 matmul(s) rewritten" in report and "(float32)" not in report


def test_no_grad_eval_rewrites_the_forward_only() -> None:
    model = TinyLlama().eval()
    with torch.no_grad():
        report = explain_and_step(model, tokens())
    assert "forward (inference) graph, 8 linear layer(s), 7 matmul(s) rewritten" in report


def test_frozen_layer_gets_forward_and_grad_input_only() -> None:
    model = TinyLlama()
    model.layers[0].attn.requires_grad_(False)
    report = explain_and_step(model, tokens())
    frozen = "forward: nvfp4; grad-input: nvfp4; grad-weight: absent (the weight does not"
    assert report.count(frozen) == 4
    assert model.layers[0].attn.q_proj.weight.grad is None
    assert model.layers[0].mlp.up_proj.weight.grad is not None


def test_tied_output_projection() -> None:
    report = str(quartet_compile.explain(TinyLlama(tie=True), tokens(), **EAGER))
    assert "lm_head: x[128, 128] @ embed.weight[256, 128].T" in report
    assert "all: skipped by pattern 'lm_head'" in report
    # Without the name pattern, the structure still keeps it: its weight is the embedding's.
    report = str(quartet_compile.explain(TinyLlama(tie=True), tokens(), skip=(), **EAGER))
    assert "all: output head: its weight is tied to an input embedding" in report
    model = TinyLlama(tie=True)
    report = explain_and_step(model, tokens(), skip=(), keep_output_head=False)
    assert "24 matmul(s) rewritten" in report and model.lm_head.weight.grad is not None


def test_dynamic_shapes_rewrite_with_symbolic_tokens() -> None:
    torch.manual_seed(0)
    model = MLP()
    backend = functools.partial(quartet2, **EAGER, force_disable_caches=True)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for rows in (128, 200):  # 200: not a multiple of 128, padded inside the ops
        x = torch.randn(rows, 128, requires_grad=True)
        compiled(x).sum().backward()
        assert torch.isfinite(x.grad).all()
        expected = torch.compile(model, backend="quartet2", options=EAGER)(x.detach())
        torch.testing.assert_close(compiled(x.detach()), expected)


def test_dynamic_report_shows_symbolic_tokens() -> None:
    torch._dynamo.mark_dynamic(x := torch.randn(200, 128, requires_grad=True), 0)
    report = explain_and_step(MLP(), x)
    assert "x[s" in report and "6 matmul(s) rewritten" in report, report


def test_max_autotune_mode() -> None:
    torch.manual_seed(0)
    model = nn.Linear(128, 128)
    x = torch.randn(128, 128, requires_grad=True)
    y = torch.compile(model, backend="quartet2", mode="max-autotune")(x)
    y.sum().backward()
    expected = torch.compile(model, backend="quartet2", options=EAGER)(x)
    torch.testing.assert_close(y, expected)
    assert torch.isfinite(model.weight.grad).all()


def test_inductor_gets_the_users_inductor_options_beside_modes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inductor keys among the options and mode's options reach compile_fx's patches, next to
    the pass; the backend adds no Inductor settings of its own."""
    seen = []

    def compile_fx(gm, inputs, config_patches, **kwargs):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(quartet_compile.backend, "compile_fx", compile_fx)
    model = nn.Linear(128, 128)
    options = {"epilogue_fusion": False}
    backend = functools.partial(quartet2, mode="max-autotune", options=options)
    torch.compile(model, backend=backend)(torch.randn(128, 128))
    (patches,) = seen
    expected = {**torch._inductor.list_mode_options("max-autotune"), **options}
    assert {k: v for k, v in patches.items() if k != "joint_custom_pre_pass"} == expected


class GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(128, 128)
        self.second = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def test_graph_break_gives_one_report_per_graph() -> None:
    report = quartet_compile.explain(GraphBreak(), torch.randn(128, 128), **EAGER)
    assert [g.rewritten() for g in report.graphs] == [2, 3]  # first: no grad-input needed
    explain_and_step(GraphBreak(), torch.randn(128, 128))


def test_model_without_linear_layers_is_unchanged() -> None:
    model = nn.Sequential(nn.LayerNorm(128), nn.GELU())
    x = torch.randn(4, 128, requires_grad=True)
    report = quartet_compile.explain(model, x, **EAGER)
    assert report.graphs[0].linears == [] and "quartet2" not in report.graphs[0].graph
    y = torch.compile(model, backend="quartet2", options=EAGER)(x)
    torch.testing.assert_close(y, model(x))


@pytest.mark.parametrize("method", ["eden", "sr"])
def test_backward_method_reaches_the_ops(method: str) -> None:
    options = {"backward_method": method, "four_over_six": method == "eden"}
    graph = quartet_compile.explain(MLP(), torch.randn(128, 128), **EAGER, **options).graphs[0]
    assert graph.graph.count(f"'{method}')") == 6  # 3 backward GEMMs x 2 operands


@pytest.mark.parametrize("switch", ["forward", "backward"])
def test_forward_or_backward_alone(switch: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(128, 128, requires_grad=True)
    report = explain_and_step(model, x, **{switch: False})
    disabled = f"disabled ({switch}=False)"
    assert report.count(disabled) == (2 if switch == "forward" else 4)
    assert report.count("nvfp4") == (4 if switch == "forward" else 2)
    assert torch.isfinite(x.grad).all()
