"""Pieces of the pass that the end-to-end tests cannot reach on a CPU machine."""

import pytest
import torch
from models import TinyLlama
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

import quartet_compile
from quartet_compile.passes import emitter, inline
from quartet_compile.passes.inline import inline_body
from quartet_compile.passes.operands import dotted, resolve, value_key

q2 = torch.ops.quartet2


@pytest.mark.filterwarnings("error::UserWarning")
def test_inline_body_replaces_op_calls_by_their_traced_bodies() -> None:
    """The CUDA path inlines each quartet2 op's body (its Triton kernels there); on CPU the same
    machinery inlines the reference body, which must compute exactly what the op computes. A
    body's constants (lookup tables) become buffers: FX warned, once per constant of every
    compiled graph, on a get_attr of a plain attribute (seen in every GPU benchmark log)."""

    def program(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq = q2.quantize_fwd(x, x.abs().amax(), True)
        wq = q2.quantize_fwd(w, w.abs().amax(), True)
        return q2.gemm(xq[3], xq[2], wq[3], wq[2], torch.float32)

    x, w = torch.randn(128, 128), torch.randn(256, 128)
    gm = make_fx(program, tracing_mode="fake")(x, w)
    fake_mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
    for node in [n for n in gm.graph.nodes if str(n.target).startswith("quartet2.")]:
        inline_body(gm.graph, node, fake_mode)
    gm.graph.lint()
    gm.recompile()
    assert not [n for n in gm.graph.nodes if str(n.target).startswith("quartet2.")]
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(x, w), program(x, w), rtol=0, atol=0)


def test_inline_body_reuses_a_trace_per_call_signature_with_fresh_fake_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repeated layers trace each (op, constants, tensor metadata) once; the copies still get
    their own fake values, so no two nodes look like views of one storage."""

    def program(x1: torch.Tensor, x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wq = q2.quantize_fwd(w, w.abs().amax(), True)
        xqs = [q2.quantize_fwd(x, x.abs().amax(), True) for x in (x1, x2)]
        outs = [q2.gemm(xq[3], xq[2], wq[3], wq[2], torch.float32) for xq in xqs]
        return outs[0] + outs[1]

    x1, x2, w = torch.randn(128, 128), torch.randn(128, 128), torch.randn(256, 128)
    monkeypatch.setattr(inline, "_TRACES", {})
    # Two graphs of the same program: the second (as the next block, compiled on its own) only
    # reuses traces, under its own fake mode.
    for _ in range(2):
        gm = make_fx(program, tracing_mode="fake")(x1, x2, w)
        placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        fake_mode = detect_fake_mode(placeholders)
        for node in [n for n in gm.graph.nodes if str(n.target).startswith("quartet2.")]:
            inline_body(gm.graph, node, fake_mode)
        gm.graph.lint()
        gm.recompile()
        assert len(inline._TRACES) == 3  # quantize_fwd of [128, 128] and [256, 128], one gemm
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        vals = [n.meta["val"] for n in nodes if isinstance(n.meta["val"], torch.Tensor)]
        assert len({id(v) for v in vals}) == len(vals)
        assert all(detect_fake_mode([v]) is fake_mode for v in vals)
        torch.testing.assert_close(gm(x1, x2, w), program(x1, x2, w), rtol=0, atol=0)


def test_resolve_follows_layout_ops_to_the_parameter() -> None:
    def program(w: torch.Tensor) -> torch.Tensor:
        return w.to(torch.bfloat16).t().unsqueeze(0).permute(0, 2, 1).view(1, 256, 128)

    gm = make_fx(program, tracing_mode="fake")(torch.randn(256, 128))
    weight = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    operand = resolve(out)
    assert operand.root is weight and operand.labels == (None, 0, 1)


def test_value_key_matches_equal_merging_views_of_one_tensor_only() -> None:
    def program(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.view(8, 128), x.reshape(8, 128), x.view(4, 256), y.view(8, 128), x.view(8, 128).t()

    gm = make_fx(program, tracing_mode="fake")(torch.randn(2, 4, 128), torch.randn(2, 4, 128))
    q, k, wider, other, transposed = (value_key(n) for n in gm.graph.output_node().args[0])
    assert q == k  # two linears' views of one x: one forward quantization
    assert len({q, wider, other, transposed}) == 4


def test_the_linears_reading_one_batched_x_share_its_forward_quantization() -> None:
    # q/k/v (and gate/up) each view x[B, S, H] as [B * S, H]; with B = 1 the views only drop a
    # size-1 dim and were always shared, with B = 2 each linear used to quantize x again.
    torch.manual_seed(0)
    model = TinyLlama()

    def quantizers(batch: int) -> int:
        tokens = torch.randint(0, 256, (batch, 128))
        (graph,) = quartet_compile.explain(model, tokens, inductor=False).graphs
        return graph.graph.count("quartet2.quantize_fwd.default(")

    # 7 weights (lm_head stays BF16) and 4 activations: x for q/k/v, attention out, x for
    # gate/up, down's input.
    assert quantizers(2) == quantizers(1) == 11


def test_inlining_keeps_a_forward_quantization_that_later_layers_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA each quartet2 op call is replaced by its body, and the call's getitem nodes with
    it. k and v reuse q's quantization of x: inlined before they were rewritten, they referenced
    erased nodes (on the H200, TinyLlama with batch 4 failed to compile: "Argument 'getitem_15'
    ... was used before it has been defined"). Here the reference bodies are inlined on CPU the
    same way, and must train exactly as the op calls do."""
    torch.manual_seed(0)
    model = TinyLlama()
    tokens = torch.randint(0, 256, (2, 64))

    def grads() -> list[torch.Tensor]:
        torch._dynamo.reset()
        torch.manual_seed(1)  # the backward's random signs and rounding draws
        model.zero_grad()
        compiled = torch.compile(model, backend="quartet2", options={"inductor": False})
        compiled(tokens).float().square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls = grads()

    def inline_on_any_device(graph, node, fake_mode, constants) -> None:
        if node.target not in inline._OPAQUE:
            inline_body(graph, node, fake_mode, constants)

    monkeypatch.setattr(emitter, "decompose_on_cuda", inline_on_any_device)
    for inlined, called in zip(grads(), calls, strict=True):
        torch.testing.assert_close(inlined, called, rtol=0, atol=0)


def test_dotted_names() -> None:
    assert dotted("L['self']._modules['layers']._modules['0']._parameters['weight']") == (
        "layers.0.weight"
    )
    assert dotted("L['self'].layers.0.attn.q_proj") == "layers.0.attn.q_proj"
    assert dotted("L['self'].blocks[3].fc") == "blocks.3.fc"
