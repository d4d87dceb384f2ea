"""A stock Hugging Face Llama trained through HF's Trainer and through Lightning: bf16 vs quartet2.

Why: docs/integrations.md's recipes (compile the model in place, hand it to the trainer) were
tested on the CPU only, and the GPU runs of stock models (benchmarks/real_models.py) use a plain
training loop. Here the ~100M-parameter ``LlamaForCausalLM`` of real_models.py (its config, its
weights for a seed, its corpus and batches) trains through

- Hugging Face ``Trainer`` (``TrainingArguments(bf16=True)``: accelerate's autocast), and
- PyTorch Lightning (``lightning.Trainer(precision="bf16-mixed")``, a small LightningModule
  around the HF model),

each with ``model.compile()`` (Inductor, "bf16") and ``model.compile(backend="quartet2")``, from
the same initial weights and the same batches in the same order. The loss is the model's own
``labels=`` loss, as these trainers compute it. Both trainers get the same optimizer (fused
AdamW where available, constant learning rate, no clipping: real_models.py's settings).

The trainers' own hook points (callbacks; for HF's gradients, an override of its
``training_step``) drive one shared :class:`Monitor`: it times every step, checks the loss and
every parameter's gradient after each backward, before the optimizer applies them (one host sync,
as in real_models.py; the first non-finite step stops that run, names the parameters and sets
the exit status to 1), stops a run past its share of ``--time-budget``, and at the end of
training computes the validation loss on held-out batches through the trainer's own training
forward. Every run
starts from an empty Inductor cache, so no run reuses an earlier run's code and each quartet2
run reports its own rewritten matmuls.

A trainer whose package is missing (``lightning``; ``accelerate``, which HF's Trainer needs) is
reported as skipped and the other runs still happen. ``--tiny``: a 2-layer model for 3 steps on
the CPU without Inductor code generation (bf16 under aot_eager, quartet2 with inductor=False).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import real_models
import torch
import transformers
from real_models import RunResult, StepTimer, nvfp4_cell
from torch import nn
from torch._inductor.utils import fresh_cache

from quartet_demo import corpus
from results import markdown_table, write_section

if TYPE_CHECKING:
    import lightning

SECTION = "Trainers (HF Trainer, Lightning)"
MODEL = "llama"  # real_models.MODELS entry: the 103M LlamaForCausalLM that once went NaN
TRAINERS = {"hf": "HF Trainer", "lightning": "Lightning"}
BACKENDS = ("quartet2", "bf16")
# What each trainer needs beyond transformers: (module, why it is named).
REQUIRES = {"hf": ("accelerate", " (the HF Trainer needs it)"), "lightning": ("lightning", "")}
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings(real_models.Settings):
    """real_models' settings (float32 parameters under bf16 autocast) with this script's
    defaults: 200 steps, the first 20 (compilation) untimed."""

    steps: int = 200
    warmup: int = 20


TINY = Settings(
    device="cpu", steps=3, batch=2, seq=64, warmup=1, val_batches=1, log_every=1, tiny=True,
    eager=True,
)  # fmt: skip


@dataclass
class TrainerRun(RunResult):
    """One (trainer, backend) run: real_models' record plus the trainer and why it was skipped."""

    trainer: str = ""
    skipped: str | None = None  # "lightning not installed": the run did not happen
    fused_adamw: bool | None = None


class NonFiniteStep(Exception):
    """Raised by the step's finite check, before the optimizer would apply the step."""


def labelled(inputs: torch.Tensor) -> Batch:
    """A Hugging Face causal-LM batch: the labels are the inputs (the model shifts them), a
    copy, as a collator makes them (one tensor under both names fails a graph's guards)."""
    return {"input_ids": inputs, "labels": inputs.clone()}


class StepWindows(torch.utils.data.IterableDataset):
    """The rows of real_models' training batches for steps 1..``settings.steps``, in order: with
    a DataLoader of ``batch_size=settings.batch`` every trainer and backend sees the same batches
    (``corpus.train_batch`` is a pure function of seed and step; no sampler reorders them)."""

    def __init__(self, stream: torch.Tensor, settings: Settings) -> None:
        self.stream, self.settings = stream, settings

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        for step in range(1, s.steps + 1):
            inputs, _ = corpus.train_batch(self.stream, s.batch, s.seq, s.seed, step)
            yield from (labelled(row) for row in inputs)


def adamw(params: list[nn.Parameter], lr: float) -> tuple[torch.optim.AdamW, bool]:
    """real_models' optimizer (AdamW, torch's defaults), fused where this torch has the kernel
    for the parameters' device; returns it and whether it is fused."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), True
    except RuntimeError:
        return torch.optim.AdamW(params, lr=lr), False


class Monitor:
    """What both trainers' callbacks do at the same points of each optimizer step.

    The trainer-specific parts are set by the runner: ``loss`` (the step's loss, stored by the
    training step) and ``loss_of`` (the trainer's training forward of one batch, for validation).
    """

    def __init__(
        self,
        result: TrainerRun,
        model: nn.Module,
        settings: Settings,
        data: corpus.Corpus,
        deadline: float | None,
    ) -> None:
        self.result, self.settings, self.data, self.deadline = result, settings, data, deadline
        self.device = torch.device(settings.device)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in trained], [p for _, p in trained]
        self.timer = StepTimer(self.device)
        self.loss: torch.Tensor | None = None
        self.loss_of: Callable[[Batch], torch.Tensor] | None = None
        self.values = torch.empty(0)  # [loss, grad norm of each parameter...] of the step
        self.step = 0
        self.start = self.begin = time.perf_counter()

    def train_begin(self) -> None:
        self.start = time.perf_counter()

    def step_begin(self) -> None:
        self.step += 1
        if self.step == self.settings.warmup + 1 and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.begin = self.timer.mark()

    def check_step(self) -> None:
        """Check the step's loss and every gradient (one host sync); raise before the update."""
        assert self.loss is not None, "the training step did not store its loss"
        norms = torch.stack(torch._foreach_norm([p.grad for p in self.params])).float()
        self.values = torch.cat([self.loss.detach().float().view(1), norms]).cpu()
        bad = real_models.non_finite(self.values, self.names)
        if bad:
            self.result.non_finite = bad
            self.result.failure = real_models.failure_message(self.values, bad, self.step)
            raise NonFiniteStep(self.result.failure)

    def step_end(self) -> bool:
        """Record the step; True when the run is past its time share (stop training)."""
        end = self.timer.mark()
        result = self.result
        result.steps = self.step
        result.losses.append(self.values[0].item())
        if self.step > self.settings.warmup:
            self.timer.add(self.begin, end)
        if self.step == 1:
            real_models.synchronize(self.device)
            result.compile_s = time.perf_counter() - self.start
        real_models.log_progress(result, self.settings, self.values, self.start)
        stop = self.step < self.settings.steps and real_models.out_of_time(
            self.step, self.settings, self.deadline
        )
        result.stopped_early = stop
        return stop

    def train_end(self) -> None:
        """Step statistics and the validation loss, while the model is still on the device
        (Lightning moves it to the CPU after ``fit``)."""
        result = self.result
        result.step_ms = self.timer.median_ms()
        if self.device.type == "cuda" and result.steps > self.settings.warmup:
            result.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        assert self.loss_of is not None
        begin = time.perf_counter()
        result.val_loss = validation_loss(self.loss_of, self.data, self.settings, self.device)
        result.val_s = time.perf_counter() - begin
        print(f"[{result.trainer}/{result.backend}] val loss {result.val_loss:.4f}", flush=True)


def validation_loss(
    loss_of: Callable[[Batch], torch.Tensor],
    data: corpus.Corpus,
    settings: Settings,
    device: torch.device,
) -> float:
    """Mean loss over real_models' fixed held-out windows, through the trainer's training
    forward with grad mode on and no backward: the graph training compiled, no new one."""
    batches = corpus.eval_batches(data.val, settings.batch, settings.seq, settings.val_batches)
    # contiguous: the windows are slices of [batch, seq + 1] rows, training batches stacked
    # rows; a different stride would fail a guard and compile a second graph.
    losses = [loss_of(labelled(x.contiguous().to(device))).detach().float() for x, _ in batches]
    return torch.stack(losses).mean().item()


class _HFCallback(transformers.TrainerCallback):
    """The Monitor at HF Trainer's hook points (the check is in :class:`_CheckedTrainer`)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.train_begin()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.step_begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor.step_end():
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.train_end()


class _CheckedTrainer(transformers.Trainer):
    """HF's Trainer, checking each step's loss (no callback receives it) and gradients right
    after its backward (one micro-batch per step: they are the step's).

    Not in ``on_pre_optimizer_step``: that hook comes after HF's gradient-norm computation, which
    even with ``max_grad_norm=0`` multiplies every gradient by min(1, inf / total norm): NaN when
    one gradient is, so all become NaN and the check could no longer name the first (seen: it
    named lm_head instead of the poisoned down_proj).
    """

    monitor: Monitor

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        self.monitor.loss = super().training_step(model, inputs, num_items_in_batch)
        self.monitor.check_step()
        return self.monitor.loss


def train_hf(model: nn.Module, monitor: Monitor, settings: Settings, workdir: str) -> None:
    """``Trainer(model=model, args=TrainingArguments(bf16=True, ...)).train()``."""
    device = torch.device(settings.device)
    model.to(device)  # before the optimizer is built on its parameters
    optimizer, monitor.result.fused_adamw = adamw(monitor.params, settings.lr)
    args = transformers.TrainingArguments(
        output_dir=workdir,
        bf16=True,
        use_cpu=device.type == "cpu",
        per_device_train_batch_size=settings.batch,
        max_steps=settings.steps,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=settings.seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=device.type == "cuda",
    )
    trainer = _CheckedTrainer(
        model=model,
        args=args,
        train_dataset=StepWindows(monitor.data.train, settings),
        optimizers=(optimizer, None),
        callbacks=[_HFCallback(monitor)],
    )
    trainer.monitor = monitor

    def loss_of(batch: Batch) -> torch.Tensor:
        # What training_step does before backward, with the token count HF passes the model.
        count = torch.tensor(batch["labels"][:, 1:].numel(), device=device)
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(trainer.model, batch, num_items_in_batch=count)

    monitor.loss_of = loss_of
    trainer.train()


def train_lightning(model: nn.Module, monitor: Monitor, settings: Settings, workdir: str) -> None:
    """``lightning.Trainer(precision="bf16-mixed").fit(module)`` on a module holding the model."""
    import lightning

    module = _lightning_module(model, monitor, settings.lr)
    trainer = lightning.Trainer(
        accelerator="cuda" if settings.device.startswith("cuda") else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=settings.steps,
        callbacks=[_lightning_callback(monitor)],
        default_root_dir=workdir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    def loss_of(batch: Batch) -> torch.Tensor:
        with trainer.precision_plugin.forward_context():  # the autocast of training_step
            return model(**batch).loss

    monitor.loss_of = loss_of
    loader = torch.utils.data.DataLoader(
        StepWindows(monitor.data.train, settings), batch_size=settings.batch
    )
    trainer.fit(module, loader)


def _lightning_module(model: nn.Module, monitor: Monitor, lr: float) -> lightning.LightningModule:
    """docs/integrations.md's LightningModule (defined here: lightning may be missing)."""
    import lightning

    class CausalLM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            monitor.loss = self.model(**batch).loss
            return monitor.loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer, monitor.result.fused_adamw = adamw(monitor.params, lr)
            return optimizer

    return CausalLM()


def _lightning_callback(monitor: Monitor) -> lightning.Callback:
    """The Monitor at Lightning's hook points (``on_before_optimizer_step``: after backward,
    before clipping and the update)."""
    import lightning

    class Hooks(lightning.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            monitor.train_begin()

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            monitor.step_begin()

        def on_before_optimizer_step(self, trainer: Any, *args: Any) -> None:
            monitor.check_step()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if monitor.step_end():
                trainer.should_stop = True

        def on_train_end(self, trainer: Any, module: Any) -> None:
            monitor.train_end()

    return Hooks()


TRAIN: dict[str, Callable[[nn.Module, Monitor, Settings, str], None]] = {
    "hf": train_hf,
    "lightning": train_lightning,
}


def missing(trainer: str) -> str | None:
    """Why ``trainer`` cannot run here (its package does not import), or None."""
    module, why = REQUIRES[trainer]
    try:
        importlib.import_module(module)
    except ImportError as error:
        if error.name == module:
            return f"{module} not installed{why}"
        return f"{module} not importable{why}: {error}"
    return None


def version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def train_run(
    trainer: str, backend: str, settings: Settings, data: corpus.Corpus, deadline: float | None
) -> TrainerRun:
    """One run from real_models' initial weights, in its own empty Inductor cache; a
    non-finite step or an exception ends it as a failed result."""
    model = real_models.build_model(MODEL, settings.tiny, settings.seed)
    result = TrainerRun(
        MODEL,
        backend,
        real_models.architecture(model),
        params=sum(p.numel() for p in model.parameters()),
        weights_digest=real_models.weights_digest(model),
        trainer=trainer,
    )
    model.compile(**real_models.compile_kwargs(backend, settings.eager))  # in place: the recipe
    monitor = Monitor(result, model, settings, data, deadline)
    try:
        with (
            fresh_cache(),
            real_models.counting_reports() as counter,
            tempfile.TemporaryDirectory() as workdir,
        ):
            try:
                TRAIN[trainer](model, monitor, settings, workdir)
            finally:
                result.nvfp4_matmuls, result.cached_graphs = counter.rewritten, counter.cached
    except NonFiniteStep:
        print(f"[{trainer}/{backend}] {result.failure}", flush=True)
    except Exception as error:  # any error (compile failure, out of memory) is this run's
        traceback.print_exc()
        first_line = f"{type(error).__name__}: {error}".splitlines()[0][:200].replace("|", "/")
        result.failure = f"error: {first_line}"
    finally:
        real_models.release(torch.device(settings.device))
    return result


def run_all(
    settings: Settings,
    trainers: list[str],
    backends: list[str],
    data: corpus.Corpus,
    budget_s: float | None,
) -> list[TrainerRun]:
    """Every (trainer, backend) run, in budget (``real_models.budgeted``); a trainer whose
    package is missing is skipped (its rows come last)."""
    why_not = {trainer: missing(trainer) for trainer in trainers}
    skipped = []
    for trainer, why in why_not.items():
        if why:
            print(f"=== {TRAINERS[trainer]}: {why}; its runs are skipped", flush=True)
            skipped += [
                TrainerRun(MODEL, b, "", 0, "", trainer=trainer, skipped=why) for b in backends
            ]

    def run(trainer: str, backend: str, steps: int, deadline: float | None) -> TrainerRun:
        print(f"=== {TRAINERS[trainer]} / {backend}", flush=True)
        run_settings = dataclasses.replace(settings, steps=steps)
        return train_run(trainer, backend, run_settings, data, deadline)

    available = [trainer for trainer, why in why_not.items() if why is None]
    return real_models.budgeted(available, backends, settings.steps, budget_s, run) + skipped


def table(results: list[TrainerRun]) -> str:
    """One row per run; "vs bf16" compares with the same trainer's bf16 run."""
    baseline = {r.trainer: r for r in results if r.backend == "bf16" and not r.skipped}
    rows = []
    for r in results:
        base = baseline.get(r.trainer) if r.backend != "bf16" else None
        rows.append(
            [
                TRAINERS[r.trainer],
                r.backend,
                "-" if r.skipped else f"{r.steps}{' (time)' if r.stopped_early else ''}",
                *real_models.measured_cells(r, base),
                "-" if r.skipped else nvfp4_cell(r),
                f"skipped: {r.skipped}" if r.skipped else r.failure or "yes",
            ]
        )
    header = ["trainer", "backend", "steps", "val loss", "vs bf16", "train loss", "step ms"]
    header += ["vs bf16", "peak GiB", "vs bf16", "compile s", "NVFP4 mm", "finite"]
    return markdown_table(header, rows)


def headline(results: list[TrainerRun]) -> str:
    ran = [r for r in results if not r.skipped]
    failed = [r for r in ran if r.failure]
    skipped = sorted({r.skipped for r in results if r.skipped})
    skips = f"; {len(results) - len(ran)} skipped ({'; '.join(skipped)})" if skipped else ""
    if not failed:
        return f"trainers: every loss and gradient finite in all {len(ran)} runs{skips}"
    runs = "; ".join(f"{r.trainer}/{r.backend}: {r.failure}" for r in failed)
    return f"trainers: FAILED {len(failed)} of {len(ran)} runs ({runs}){skips}"


def describe(settings: Settings, argv: list[str], results: list[TrainerRun]) -> str:
    """The section's text above the table: machine, versions, settings, what each column is."""
    built = next((r for r in results if r.architecture), None)
    arch = f"{built.params / 1e6:.1f}M parameters, {built.architecture}" if built else "not built"
    fused = {r.fused_adamw for r in results if r.fused_adamw is not None}
    optimizer = {frozenset({True}): "fused AdamW", frozenset({False}): "AdamW (not fused)"}.get(
        frozenset(fused), "AdamW (fused where available)"
    )
    versions = ", ".join(
        f"{m} {version(m) or 'not installed'}" for m in ("transformers", "accelerate", "lightning")
    )
    return (
        f"`python benchmarks/trainers.py {' '.join(argv)}` on "
        f"{real_models.machine_name(settings)}, torch {torch.__version__}, {versions}: "
        f"real_models.py's {MODEL} ({arch}; random init, seed {settings.seed}, byte vocab 256, "
        f"SDPA attention, no dropout), compiled in place (`model.compile()` for bf16, "
        f'`model.compile(backend="quartet2")`) and handed to Hugging Face\'s `Trainer` '
        f'(`TrainingArguments(bf16=True)`) or to `lightning.Trainer(precision="bf16-mixed")` '
        f"through a LightningModule holding it; float32 parameters under bf16 autocast, batch "
        f"{settings.batch} x seq {settings.seq}, {settings.steps} steps of the Python standard "
        f"library's sources in the same order for every run, the model's own `labels=` loss, "
        f"{optimizer} lr {settings.lr:g} (constant, no clipping), every run from an empty "
        f"Inductor cache{', no Inductor code generation (--tiny)' if settings.eager else ''}."
        f"\n\nval loss: the trainer's training forward (grad mode on, no backward) over "
        f"{settings.val_batches} fixed held-out batches after training; train loss: mean of the "
        f"last {real_models.TRAIN_LOSS_STEPS} steps; step ms: median CUDA-event time from the "
        f"trainer's step-begin to its step-end hook over the steps after the first "
        f"{settings.warmup} (forward, backward, the trainer's own per-step work, the finite "
        f"check's one host sync, AdamW); peak GiB: max_memory_allocated over those steps; "
        f"compile s: wall time of the first step; NVFP4 mm: matmuls the quartet2 reports say "
        f"were rewritten (a model's later blocks come from the compile caches); finite: the "
        f"loss and every parameter's gradient are checked after every backward (HF: in "
        f"`Trainer.training_step`, before HF's own gradient norm; Lightning: "
        f"`on_before_optimizer_step`), and a run stops at the first non-finite one, before the "
        f"update; (time): stopped by --time-budget."
    )


def record(settings: Settings, argv: list[str], results: list[TrainerRun]) -> dict[str, Any]:
    """real_models' --json record, with the trainers' versions."""
    versions = {m: version(m) for m in ("accelerate", "lightning")}
    return real_models.record(settings, argv, results) | versions


def runs_of(saved: dict[str, Any]) -> list[TrainerRun]:
    """The runs of a --json record, as objects again."""
    fields = {f.name for f in dataclasses.fields(TrainerRun)}
    return [TrainerRun(**{k: v for k, v in run.items() if k in fields}) for run in saved["runs"]]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated, run in this order for each trainer (the first fixes the step "
        "count when the time budget cuts it short)",
    )
    defaults = TINY if "--tiny" in argv else Settings()
    for name in ("steps", "batch", "seq", "lr", "seed", "warmup", "val_batches", "log_every"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="2-layer model, 3 steps on the CPU, no Inductor code generation (other options "
        "still override)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=300,
        help="seconds for all runs together, compilation included (0: no limit)",
    )
    parser.add_argument("--results", action="store_true", help=f'write "{SECTION}" of RESULTS.md')
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args(argv)
    for option, valid in (("trainers", TRAINERS), ("backends", BACKENDS)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}; choose from {list(valid)}")
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = dataclasses.replace(defaults, **{k: v for k, v in vars(args).items() if k in fields})
    return args, settings


@contextlib.contextmanager
def cpu_threads(settings: Settings) -> Iterator[None]:
    """One intra-op thread for a tiny model on the CPU: its ops gain nothing from threads, and on
    a busy machine the threads wait on each other (seen on a loaded 2-core box: a tiny quartet2
    step took 15 s with 2 threads, 1 s with one)."""
    if not (settings.tiny and settings.device == "cpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Run, print and record; the exit status is 1 when any run that ran failed."""
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    for trainer in args.trainers.split(","):
        module = REQUIRES[trainer][0]
        why = missing(trainer)
        print(f"{module}: {why or f'{version(module)}, importable'}", flush=True)
    data = corpus.load_corpus()
    with cpu_threads(settings):
        results = run_all(
            settings, args.trainers.split(","), args.backends.split(","), data, args.time_budget
        )
    body = f"{describe(settings, argv, results)}\n\n{table(results)}\n\n{headline(results)}\n"
    print(body, flush=True)
    if args.results:
        write_section(SECTION, body)
    if args.json:
        args.json.write_text(json.dumps(record(settings, argv, results), indent=1))
    return 1 if any(r.failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
