"""The demo's training loop: one backend, AdamW with warmup + cosine, CSV log, exact resume.

Everything that decides the loss curve is a function of the config and the step (data windows,
learning rate) or lives in the checkpoint (weights, optimizer moments, RNG states), so a resumed
run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quartet_demo import corpus
from quartet_demo import distributed as dist_training
from quartet_demo.distributed import SINGLE_PROCESS, World
from quartet_demo.models.llama import Llama, LlamaConfig
from quartet_demo.run_log import CsvLog
from quartet_demo.sources import STDLIB

# torch.compile arguments of each backend the demo compares; all run under BF16 autocast with
# FP32 master weights, so the only difference is how the linear layers' matmuls are computed.
BACKENDS: dict[str, dict[str, Any]] = {
    "bf16": {"backend": "inductor"},
    "quartet2": {"backend": "quartet2"},
    # NVIDIA-style baseline from our own ops: RTN forward, rotation + stochastic-rounding backward.
    "sr-recipe": {
        "backend": "quartet2",
        "options": {"four_over_six": False, "backward_method": "sr"},
    },
}
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class TrainConfig:
    """One training run; the defaults are the demo's tiny CPU preset.

    Fields after ``out_dir`` only steer this invocation, not the loss curve.
    """

    model: LlamaConfig = field(default_factory=LlamaConfig)
    backend: str = "bf16"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    corpus: str = STDLIB  # quartet_demo.sources.find_sources
    eval_batches: int = 8
    out_dir: Path = Path("runs/demo")
    eval_every: int = 50
    save_every: int = 50
    resume: bool = False
    stop_step: int | None = None
    max_minutes: float | None = None
    device: str | None = None
    progress: bool = True
    distributed: str = "none"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds max_seq_len={self.model.max_seq_len}")
        if self.steps < 1 or self.eval_every < 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("steps and eval_every must be >= 1, warmup_fraction in [0, 1)")
        if self.distributed not in dist_training.MODES:
            raise ValueError(
                f"distributed must be one of {dist_training.MODES}, got {self.distributed!r}"
            )

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)

    def curve_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpointed one."""
        names = [f.name for f in dataclasses.fields(self)]
        curve = names[: names.index("out_dir")]
        return {name: _plain(getattr(self, name)) for name in curve}


@dataclass(frozen=True)
class TrainResult:
    """Summary of one invocation of :func:`train` (a resumed run reports its own session)."""

    step: int
    tokens: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    elapsed: float
    peak_memory_gib: tuple[float, ...] = ()  # per rank, CUDA only (max_memory_allocated)

    def summary(self) -> str:
        return (
            f"final: step {self.step}  tokens {self.tokens:,}  train loss {self.train_loss:.4f}  "
            f"val loss {self.val_loss:.4f}  {self.tokens_per_s:,.0f} tokens/s  "
            f"{self.elapsed:.1f}s elapsed"
        )


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    warmup = config.warmup_steps
    if step <= warmup:
        return config.lr * step / max(warmup, 1)
    progress = (step - warmup) / max(config.steps - warmup, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_model(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``torch.compile`` with the demo backend's arguments (static shapes: one graph per mode)."""
    return torch.compile(model, dynamic=False, **BACKENDS[backend])


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused)


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on CPU, so a resumed run matches an uninterrupted one bit for bit.

    Without them Inductor compiles the embedding gradient (a scatter-add) with parallel atomic
    adds, whose order varies between runs. GPUs keep their fast defaults.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(previous or device.type == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) one run; writes ``log.csv``, ``checkpoint.pt`` and ``summary.json``.

    Prints what the corpus holds (files, bytes, content hash), which ``log.csv``'s header repeats.

    With ``distributed`` "ddp" or "fsdp2" (under torchrun) every rank trains on its slice of the
    global ``batch_size``; rank 0 alone writes the files and shows progress.
    """
    device = pick_device(config.device)
    world = dist_training.init(config.distributed, device.type)
    try:
        with deterministic_on_cpu(device):
            return _train(config, dist_training.device_of(world, device), world)
    finally:
        dist_training.shutdown(world)


def _train(config: TrainConfig, device: torch.device, world: World) -> TrainResult:
    data = corpus.load_corpus(config.corpus, config.val_fraction)
    if world.is_main:
        print(data.fingerprint.describe(), flush=True)
    val_batches = [
        dist_training.local_rows(batch, world)
        for batch in corpus.eval_batches(
            data.val, config.batch_size, config.seq_len, config.eval_batches
        )
    ]
    torch.manual_seed(config.seed)
    model = Llama(config.model).to(device)
    if world.distributed:
        # Same weights on every rank, independent backward randomness (random signs, stochastic
        # scale rounding) per rank: the averaged gradient then averages independent estimates.
        torch.manual_seed(config.seed + 1 + world.rank)
    wrapped = dist_training.wrap(model, world)
    optimizer = make_optimizer(model, config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_step, elapsed_before = (
        load_checkpoint(out_dir, config, model, optimizer, world) if config.resume else (0, 0.0)
    )
    last_step = min(config.steps, config.stop_step or config.steps)
    if start_step >= last_step:
        raise ValueError(f"--resume: the checkpoint is already at step {start_step} of {last_step}")
    log = (
        CsvLog(out_dir / LOG_NAME, data.fingerprint.metadata(), keep_through_step=start_step)
        if world.is_main
        else None
    )
    loss_fn = next_byte_loss(compile_model(wrapped, config.backend), device)

    tokens_per_step = config.batch_size * config.seq_len
    session_start = time.perf_counter()
    train_time, timed_steps = 0.0, 0
    step, val_loss = start_step, math.nan
    bar = tqdm(
        total=config.steps,
        initial=step,
        disable=not (config.progress and world.is_main),
        desc=config.backend,
    )
    while step < last_step:
        step += 1
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch = corpus.train_batch(data.train, config.batch_size, config.seq_len, config.seed, step)
        loss = loss_fn(*dist_training.local_rows(batch, world))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = dist_training.mean(loss, world)
        if step > start_step + 1:  # the first step of a session includes compilation
            train_time += time.perf_counter() - step_start
            timed_steps += 1

        session_time = time.perf_counter() - session_start
        out_of_time = config.max_minutes is not None and session_time > 60 * config.max_minutes
        if world.distributed:  # clocks differ between ranks; all of them must stop at one step
            flag = torch.tensor(float(out_of_time), device=device)
            out_of_time = dist_training.mean(flag, world) > 0
        final = step == last_step or out_of_time
        evaluated = step % config.eval_every == 0 or final
        if evaluated:
            val_loss = evaluate(loss_fn, val_batches, world)
        elapsed = elapsed_before + time.perf_counter() - session_start
        if log is not None:
            log.write(
                step, step * tokens_per_step, train_loss, val_loss if evaluated else None, elapsed
            )
        if final or (config.save_every and step % config.save_every == 0):
            save_checkpoint(out_dir, config, model, optimizer, step, elapsed, world)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if out_of_time:
            break
    bar.close()
    if log is not None:
        log.close()
    result = TrainResult(
        step=step,
        tokens=step * tokens_per_step,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens_per_s=timed_steps * tokens_per_step / train_time if train_time else math.nan,
        elapsed=elapsed_before + time.perf_counter() - session_start,
        peak_memory_gib=tuple(dist_training.gather(_peak_memory_gib(device), world)),
    )
    if world.is_main:
        summary = json.dumps(dataclasses.asdict(result), indent=2) + "\n"
        (out_dir / SUMMARY_NAME).write_text(summary)
    return result


def next_byte_loss(
    model: torch.nn.Module, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean cross-entropy of ``model`` under BF16 autocast, logits upcast for the softmax."""

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(inputs.to(device))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())

    return loss_fn


@torch.no_grad()
def evaluate(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    world: World = SINGLE_PROCESS,
) -> float:
    """Mean loss over fixed batches and ranks (equal sizes: the mean of means is the token mean)."""
    losses = torch.stack([loss_fn(inputs, targets) for inputs, targets in batches])
    return dist_training.mean(losses.mean(), world)


def save_checkpoint(
    out_dir: Path,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    world: World = SINGLE_PROCESS,
) -> None:
    """Write ``checkpoint.pt`` atomically (a crash mid-save keeps the previous one).

    Every rank takes part (FSDP2 gathers its shards, each rank hands over its RNG state); rank 0
    writes unsharded weights and optimizer moments and one RNG state per rank.
    """
    model_state, optimizer_state = dist_training.full_state(model, optimizer)
    rng = dist_training.gather(_rng_state(), world)
    if not world.is_main:
        return
    state = {
        "step": step,
        "elapsed": elapsed,
        "config": config.curve_fields(),
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": rng,
    }
    tmp = out_dir / (CHECKPOINT_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / CHECKPOINT_NAME)


def load_checkpoint(
    out_dir: Path,
    config: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World = SINGLE_PROCESS,
) -> tuple[int, float]:
    """Restore weights, optimizer and RNG states; returns (step, elapsed) of the checkpoint.

    Every rank reads the file. Refuses a checkpoint whose curve-defining config differs from
    ``config``, or one written by another number of ranks (its per-rank RNG states would not map).
    """
    path = out_dir / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    mismatched = {
        name: (saved, config.curve_fields()[name])
        for name, saved in state["config"].items()
        if config.curve_fields().get(name) != saved
    }
    if mismatched:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items()
        )
        raise ValueError(f"--resume: {path} belongs to a different run ({details})")
    if len(state["rng"]) != world.size:
        raise ValueError(
            f"--resume: {path} was written by {len(state['rng'])} rank(s), this run has "
            f"{world.size}; resume with the same --nproc-per-node"
        )
    dist_training.load_full_state(model, optimizer, state["model"], state["optimizer"])
    _set_rng_state(state["rng"][world.rank])
    return state["step"], state["elapsed"]


def _peak_memory_gib(device: torch.device) -> float:
    """Peak memory the CUDA caching allocator handed out on ``device`` (NaN elsewhere)."""
    if device.type != "cuda":
        return math.nan
    return torch.cuda.max_memory_allocated(device) / 2**30


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: CPU, and the current GPU's when there is one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(value: Any) -> Any:
    """Config values as checkpoint-safe builtins (dataclasses become dicts)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
