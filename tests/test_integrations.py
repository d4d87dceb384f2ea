"""The trainers people already use, with quartet2 switched on and nothing else changed: the
recipes of docs/integrations.md, on tiny Hugging Face models on the CPU.

Each recipe compiles the model in place (``model.compile(backend="quartet2")``): the module keeps
its class, its ``forward`` signature (which Hugging Face's Trainer reads to pick dataset columns)
and its parameter names (so checkpoints are the model's own).
"""

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from logged_reports import logged_reports

from quartet_compile.passes.report import GraphReport

transformers = pytest.importorskip("transformers")

# inductor=False: the rewritten graphs run eagerly (CPU-fast); regional=False: one graph, and one
# report, for the whole model.
OPTIONS = {"inductor": False, "regional": False}
LAYERS, LINEARS_PER_LAYER = 2, 7  # q, k, v, o, gate, up, down


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class _Bytes(torch.utils.data.Dataset):
    """Random byte windows as Hugging Face batches (the labels are the inputs: the model shifts)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def reports() -> Iterator[list[GraphReport]]:
    """The training-graph reports the quartet2 backend logs while the test runs."""
    with logged_reports() as found:
        yield found


def _assert_every_projection_rewritten(reports: list[GraphReport]) -> None:
    assert sum(r.rewritten() for r in reports) == 3 * LAYERS * LINEARS_PER_LAYER
    lm_head = [lin for r in reports for lin in r.linears if lin.module == "lm_head"]
    assert lm_head and not any(lin.rewritten() for lin in lm_head)


def test_hf_trainer_trains_a_model_compiled_in_place(tmp_path: Path, reports):
    model = _tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.compile(backend="quartet2", options=OPTIONS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Bytes())
    # The columns Trainer keeps are the model's forward arguments: a model compiled with
    # torch.compile(model) shows (*args, **kwargs) instead, and every column was dropped.
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "labels"} <= set(trainer._signature_columns)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    _assert_every_projection_rewritten(reports)
    trained = dict(model.named_parameters())
    assert trained.keys() == initial.keys()  # no "_orig_mod." prefix
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert not torch.equal(trained["model.layers.0.mlp.down_proj.weight"], initial[
        "model.layers.0.mlp.down_proj.weight"])  # fmt: skip

    # Checkpoints hold the model's ordinary float32 tensors under its own names.
    trainer.save_model(str(tmp_path / "checkpoint"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "checkpoint"))
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, trained[name]), name


def test_lightning_trains_a_model_compiled_in_place(reports):
    lightning = pytest.importorskip("lightning")

    class ByteLM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_llama()
            self.model.compile(backend="quartet2", options=OPTIONS)
            self.losses: list[float] = []

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    module = ByteLM()
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(_Bytes(), batch_size=2))
    assert len(module.losses) == 2 and all(math.isfinite(loss) for loss in module.losses)
    _assert_every_projection_rewritten(reports)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_hf_gradient_checkpointing_recomputes_the_nvfp4_forward(reports):
    """``gradient_checkpointing_enable()`` (torch's non-reentrant checkpoint around each decoder
    layer): the layers are still rewritten, and the backward's recomputed forward is the NVFP4
    forward it replaces (deterministic: equal gradients when the backward is high precision)."""
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing: bool, **options) -> dict[str, torch.Tensor]:
        torch._dynamo.reset()
        model = _tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train().compile(backend="quartet2", options={**OPTIONS, **options})
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    recomputed, saved = grads(True, backward=False), grads(False, backward=False)
    for name, grad in recomputed.items():
        assert torch.equal(grad, saved[name]), name
    reports.clear()
    trained = grads(True)
    _assert_every_projection_rewritten(reports)
    assert all(torch.isfinite(g).all() for g in trained.values())
