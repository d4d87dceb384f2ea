"""Regional compilation: a model's repeated blocks become separate graphs, the second and later
served by AOTAutograd's and Inductor's caches, with the numbers of the whole-graph compile."""

import torch
import torch.nn.functional as F
from models import MLP, TinyLlama

import quartet_compile
from quartet_compile import regional

EAGER = {"inductor": False}


def dynamo_graph(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(*inputs)
    (gm,) = graphs
    return gm


def test_partition_gives_each_block_a_piece_between_the_head_and_the_tail() -> None:
    gm = dynamo_graph(TinyLlama(layers=3), torch.randint(0, 256, (2, 64)))
    pieces = regional.partition(gm)
    blocks: dict[int, set] = {}
    for node, piece in pieces.items():
        blocks.setdefault(piece, set()).add(regional.block_of(node))
    assert blocks == {0: {None}, 1: {"layers.0"}, 2: {"layers.1"}, 3: {"layers.2"}, 4: {None}}


def test_a_graph_without_repeated_blocks_is_compiled_whole() -> None:
    assert (
        regional.partition(dynamo_graph(TinyLlama(layers=1), torch.randint(0, 256, (2, 64))))
        is None
    )
    assert regional.partition(dynamo_graph(MLP(), torch.randn(4, 128))) is None


def _step(model: torch.nn.Module, tokens: torch.Tensor, **options) -> tuple[float, list]:
    torch._dynamo.reset()
    torch.manual_seed(1)  # the same random signs and seeds in both compiles
    compiled = torch.compile(model, backend="quartet2", options=options)
    logits = compiled(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.item(), grads


def test_regional_compile_computes_what_the_whole_graph_computes() -> None:
    torch.manual_seed(0)
    model, tokens = TinyLlama(layers=3), torch.randint(0, 256, (2, 65))
    # Backward matmuls in high precision: MS-EDEN's random signs are drawn per backward graph,
    # in another order when each block has its own.
    whole = _step(model, tokens, regional=False, backward=False, **EAGER)
    pieces = _step(model, tokens, regional=True, backward=False, **EAGER)
    assert pieces[0] == whole[0]
    for a, b in zip(pieces[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    report = quartet_compile.explain(model, tokens[:, :-1])
    # A graph per block, one for the embedding and one for the head (lm_head stays BF16).
    assert len(report.graphs) == 5
    assert [g.rewritten() for g in report.graphs] == [0, 21, 21, 21, 0]


def test_repeated_blocks_train_with_the_nvfp4_backward() -> None:
    torch.manual_seed(0)
    model, tokens = TinyLlama(layers=3), torch.randint(0, 256, (2, 65))
    whole = _step(model, tokens, regional=False, **EAGER)
    pieces = _step(model, tokens, regional=True, **EAGER)
    assert pieces[0] == whole[0]  # the forward is deterministic
    for a, b in zip(pieces[1], whole[1], strict=True):  # other random signs: close, not equal
        assert (a - b).norm() <= 0.5 * b.norm()


def test_later_blocks_come_from_the_compile_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, tokens = TinyLlama(layers=3), torch.randint(0, 256, (2, 65))
    _step(model, tokens)
    aot = torch._dynamo.utils.counters["aot_autograd"]
    # Head, tail and the first block are compiled; the two later blocks are cache hits.
    assert (aot["autograd_cache_miss"], aot["autograd_cache_hit"]) == (3, 2)
