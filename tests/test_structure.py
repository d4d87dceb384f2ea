"""The output head is kept in high precision by structure, whatever it is called
(passes/structure.py): a weight tied to the embedding, or the final vocabulary projection; the
MoE router rule is tested with stock MoE models in tests/test_grouped_experts.py."""

from __future__ import annotations

import pytest
import torch
from models import TinyLlama

import quartet_compile
from quartet_compile.passes.report import Status

EAGER = {"inductor": False}


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))


def sites(model: torch.nn.Module, inputs: torch.Tensor, **options) -> dict:
    report = quartet_compile.explain(model, inputs, **EAGER, **options)
    return {s.module: s for g in report.graphs for s in g.linears}


def test_an_untied_vocabulary_projection_is_kept_by_structure_not_name() -> None:
    """N = 256 is also the MLP's width: only the projection that no matmul reads is the head."""
    torch.manual_seed(0)
    found = sites(TinyLlama(), tokens(), skip=())
    head = found["lm_head"]
    assert head.forward.status is Status.KEPT
    assert "N=256 is the embedding's vocabulary size" in str(head.forward)
    widths_256 = [s for name, s in found.items() if name != "lm_head" and s.n == "256"]
    assert widths_256 and all(s.rewritten() == 3 for s in widths_256)
    released = sites(TinyLlama(), tokens(), skip=(), keep_output_head=False)["lm_head"]
    assert released.rewritten() == 3


def test_bert_tied_decoder_is_kept() -> None:
    """README promises the output head stays in BF16; BERT's is cls.predictions.decoder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config)
    found = sites(model, torch.randint(0, 512, (2, 64)))
    decoder = found["cls.predictions.decoder"]
    assert decoder.forward.status is Status.KEPT
    assert str(decoder.forward) == "output head: its weight is tied to an input embedding"
    assert found["cls.predictions.transform.dense"].rewritten() == 3
