"""Stock Hugging Face causal LMs trained under torch.compile: bf16 (Inductor) vs backend="quartet2".

Why: the other benchmarks train the project's own Llama; a stock ``LlamaForCausalLM`` once got
NaN gradients after 17-71 steps under quartet2 (since fixed). This script trains
unmodified transformers models (random init, byte vocabulary 256, SDPA attention) on real text
(the Python standard library's sources, quartet_demo.corpus) with each backend from the same
weights and the same batches, and checks after every backward, with one host sync, that the loss
and every parameter's gradient are finite. The first non-finite step stops that run (before the
optimizer applies it) and names the parameters; the script then exits with status 1, so a
regression shows in every GPU session that runs it.

The loss is the mean next-byte cross-entropy over every position of the window, computed by a
small wrapper compiled together with the model (not HF's ``labels=`` path, which scores one
position fewer). Dropout is off, so the model stays in train mode for validation too.

Writes the "Real models" section of benchmarks/RESULTS.md (``--no-write``: print only) and, with
``--json PATH``, every number of every run. ``--time-budget`` caps the whole script's wall time:
each run gets an even share of what is left and stops early past it (never before
``warmup + 20`` steps), and the model's later backends then run the same number of steps.
CPU smoke run (no Inductor code generation): ``--device cpu --tiny --eager --steps 3 --no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch._inductor import list_mode_options
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from quartet_compile.passes.report import GraphReport
from quartet_demo import corpus
from quartet_demo.training import BACKENDS
from results import markdown_table, write_section

SECTION = "Real models"
DTYPES = ("autocast", "bf16-params")
TRAIN_LOSS_STEPS = 20  # the reported train loss is the mean of this many last steps
SHOWN_NAMES = 4  # non-finite parameters named in the table (the JSON has them all)


def llama(tiny: bool) -> PretrainedConfig:
    """The configuration that went NaN under quartet2 (103M parameters)."""
    from transformers import LlamaConfig

    if tiny:
        size = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2}
        heads = 2
    else:
        size = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8}
        heads = 16
    return LlamaConfig(
        vocab_size=256,
        max_position_embeddings=1024,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        **size,
    )


def gpt2(tiny: bool) -> PretrainedConfig:
    """GPT-2 small's body (86M parameters): Conv1D linears (weights stored [K, N]), tied lm_head."""
    from transformers import GPT2Config

    size = {"n_embd": 128, "n_layer": 2, "n_head": 2} if tiny else {}
    return GPT2Config(
        vocab_size=256,
        n_positions=1024,
        **({"n_embd": 768, "n_layer": 12, "n_head": 12} | size),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,  # the corpus's document separator (GPT-2's 50256 is outside the vocab)
        eos_token_id=0,
    )


def qwen3(tiny: bool) -> PretrainedConfig:
    """Qwen3 (97M parameters): grouped-query attention with 256-wide k/v projections, q/k norms."""
    from transformers import Qwen3Config

    if tiny:
        size = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2}
        heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    else:
        size = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8}
        heads = {"num_attention_heads": 16, "num_key_value_heads": 4}
    return Qwen3Config(vocab_size=256, head_dim=64, max_position_embeddings=1024, **size, **heads)


def gpt2_6l(tiny: bool) -> PretrainedConfig:
    """GPT-2 small with 6 layers (43M parameters): one of issue 16's small, launch-bound models."""
    config = gpt2(tiny)
    if not tiny:
        config.n_layer = 6
    return config


def qwen3_768(tiny: bool) -> PretrainedConfig:
    """Qwen3, 768 wide and 6 layers (42M parameters; GQA 12/4 heads): issue 16's other small
    model."""
    from transformers import Qwen3Config

    if tiny:
        return qwen3(tiny)
    return Qwen3Config(
        vocab_size=256,
        head_dim=64,
        max_position_embeddings=1024,
        hidden_size=768,
        intermediate_size=2304,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
    )


def qwen3_moe(tiny: bool) -> PretrainedConfig:
    """Qwen3-MoE (165M parameters, 28M active per token): 8 experts, top-2, in every layer; the
    experts are 3-D parameters multiplied by grouped_mm (passes/forms/grouped.py)."""
    from transformers import Qwen3MoeConfig

    if tiny:
        size = {"hidden_size": 128, "moe_intermediate_size": 128, "num_hidden_layers": 2}
        heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    else:
        size = {"hidden_size": 768, "moe_intermediate_size": 1024, "num_hidden_layers": 8}
        heads = {"num_attention_heads": 12, "num_key_value_heads": 4}
    return Qwen3MoeConfig(
        vocab_size=256,
        head_dim=64,
        max_position_embeddings=1024,
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=size["moe_intermediate_size"],
        **size,
        **heads,
    )


# name -> config factory (tiny=True: a 2-layer, 128-wide variant for CPU tests). The factories
# import their config classes, so a transformers release without one fails only that model.
MODELS: dict[str, Callable[[bool], PretrainedConfig]] = {
    "llama": llama,
    "gpt2": gpt2,
    "qwen3": qwen3,
    "gpt2_6l": gpt2_6l,
    "qwen3_768": qwen3_768,
    "qwen3_moe": qwen3_moe,
}
DEFAULT_MODELS = ("llama", "gpt2", "qwen3")
# Hugging Face runs experts through torch's grouped_mm only for bf16 weights under
# torch.compile; with float32 ones it falls back to a loop that reads the offsets on the host
# (aten._local_scalar_dense), which graph-breaks. These models need --dtype bf16-params.
NEEDS_BF16_PARAMS = ("qwen3_moe",)


@dataclass(frozen=True)
class Settings:
    """What every run shares (the CLI's options)."""

    device: str = "cuda"
    steps: int = 300
    batch: int = 16
    seq: int = 1024
    lr: float = 1e-3
    lr_warmup: int = 0
    dtype: str = "autocast"
    seed: int = 0
    warmup: int = 10
    val_batches: int = 8
    log_every: int = 50
    tiny: bool = False
    eager: bool = False
    mode: str = "default"

    @property
    def min_steps(self) -> int:
        """A run stopped by the time budget still takes this many steps."""
        return self.warmup + TRAIN_LOSS_STEPS


@dataclass
class RunResult:
    """One (model, backend) training run."""

    model: str
    backend: str
    architecture: str
    params: int
    weights_digest: str  # sha256 of the initial weights: equal across one model's backends
    steps: int = 0  # optimizer steps taken
    losses: list[float] = field(default_factory=list)  # train loss of each step taken
    val_loss: float | None = None
    val_s: float | None = None  # wall time of the validation, its compilation included
    compile_s: float | None = None  # wall time of the first step, compilation included
    step_ms: float | None = None  # median over the steps after the warm-up
    peak_gib: float | None = None  # max_memory_allocated over the steps after the warm-up
    nvfp4_matmuls: int = 0  # matmuls the quartet2 reports say were rewritten
    cached_graphs: int = 0  # graphs from the compile caches, whose matmuls are not reported
    failure: str | None = None  # "NaN at step k in <params>" or "error: ..."
    non_finite: list[str] = field(default_factory=list)  # "loss" and parameter names
    stopped_early: bool = False  # by the time budget

    @property
    def train_loss(self) -> float | None:
        tail = self.losses[-TRAIN_LOSS_STEPS:]
        return statistics.fmean(tail) if tail else None


class NextByteLoss(nn.Module):
    """Mean cross-entropy of a causal LM's logits against the corpus's shifted targets."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(name: str, tiny: bool, seed: int) -> PreTrainedModel:
    """A randomly initialized float32 model on the CPU: the same weights for every backend."""
    config = MODELS[name](tiny)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def architecture(model: PreTrainedModel) -> str:
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (
        f"{type(model).__name__} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads}/{kv_heads} q/kv heads)"
    )


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compile_kwargs(backend: str, eager: bool, mode: str = "default") -> dict[str, Any]:
    """torch.compile arguments of a backend (the demo's); ``eager`` drops Inductor's code
    generation (bf16 -> aot_eager, quartet2 -> options inductor=False) for quick CPU runs.

    ``mode`` (e.g. "reduce-overhead") goes to Inductor as ``mode=``, and to the quartet2 backends
    as the mode's Inductor options: torch.compile takes either ``mode`` or ``options``."""
    kwargs = BACKENDS[backend]
    if eager:
        if kwargs["backend"] == "inductor":
            return {"backend": "aot_eager"}
        return {**kwargs, "options": {**kwargs.get("options", {}), "inductor": False}}
    if mode == "default":
        return kwargs
    if kwargs["backend"] == "inductor":
        return {**kwargs, "mode": mode}
    mode_options = list_mode_options(mode)
    return {**kwargs, "options": {**kwargs.get("options", {}), **mode_options}}


class StepTimer:
    """Milliseconds per timed step: CUDA events on a GPU (read at the end), else wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, begin: Any, end: Any) -> None:
        self.spans.append((begin, end))

    def median_ms(self) -> float | None:
        if not self.spans:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return statistics.median(begin.elapsed_time(end) for begin, end in self.spans)
        return statistics.median((end - begin) * 1e3 for begin, end in self.spans)


class ReportCounter(logging.Handler):
    """Sums what the quartet2 backend logs (INFO) while installed: the NVFP4 matmuls of its
    training-graph reports, and the graphs served by the compile caches (which report nothing:
    with Inductor, a model's second and later blocks)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rewritten = 0
        self.cached = 0

    def emit(self, record: logging.LogRecord) -> None:
        arg = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(arg, GraphReport) and arg.kind.startswith("joint"):
            self.rewritten += arg.rewritten()
        elif isinstance(arg, int) and "compile caches" in str(record.msg):
            self.cached += arg


@contextlib.contextmanager
def counting_reports() -> Iterator[ReportCounter]:
    logger = logging.getLogger("quartet_compile")
    counter, level = ReportCounter(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def autocast(settings: Settings, device: torch.device) -> contextlib.AbstractContextManager:
    if settings.dtype == "bf16-params":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def non_finite(values: torch.Tensor, names: list[str]) -> list[str]:
    """What is not finite in the host copy of ``[loss, grad norm of each parameter...]``: "loss"
    and parameter names, in model order. A gradient whose float32 norm overflows (an element
    beyond ~1e19) counts too."""
    if values.isfinite().all():
        return []
    pairs = zip(["loss", *names], values.tolist(), strict=True)
    return [name for name, value in pairs if not math.isfinite(value)]


def failure_message(values: torch.Tensor, bad: list[str], step: int) -> str:
    """``NaN at step k in <names>``; of many names, the last in model order, where a NaN coming
    from the backward pass shows first (it then spreads to every earlier layer)."""
    kind = "NaN" if values.isnan().any() else "Inf"
    if len(bad) <= SHOWN_NAMES:
        return f"{kind} at step {step} in {', '.join(bad)}"
    return (
        f"{kind} at step {step} in {len(bad)} of the loss and gradients, the last in model order: "
        f"{', '.join(bad[-SHOWN_NAMES:])}"
    )


def train_run(
    name: str,
    backend: str,
    settings: Settings,
    data: corpus.Corpus,
    deadline: float | None = None,
) -> RunResult:
    """Train one model with one backend for ``settings.steps`` steps (fewer past ``deadline``,
    a ``time.perf_counter()`` value, or at the first non-finite gradient), then validate."""
    device = torch.device(settings.device)
    model = build_model(name, settings.tiny, settings.seed)
    result = RunResult(
        name,
        backend,
        architecture(model),
        params=sum(p.numel() for p in model.parameters()),
        weights_digest=weights_digest(model),
    )
    if settings.dtype == "bf16-params":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in trained], [p for _, p in trained]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, fused=True)
    loss_fn = torch.compile(
        NextByteLoss(model),
        dynamic=False,
        **compile_kwargs(backend, settings.eager, settings.mode),
    )
    timer = StepTimer(device)
    start = time.perf_counter()
    with counting_reports() as counter:
        for step in range(1, settings.steps + 1):
            batch = corpus.train_batch(
                data.train, settings.batch, settings.seq, settings.seed, step
            )
            inputs, targets = (t.to(device) for t in batch)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * min(1.0, step / max(settings.lr_warmup, 1))
            if step == settings.warmup + 1 and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            begin = timer.mark()
            values = forward_backward(loss_fn, params, inputs, targets, settings, device)
            result.non_finite = non_finite(values, names)
            if result.non_finite:
                result.failure = failure_message(values, result.non_finite, step)
                print(f"[{name}/{backend}] {result.failure}", flush=True)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = timer.mark()
            result.steps = step
            result.losses.append(values[0].item())
            if step > settings.warmup:
                timer.add(begin, end)
            if step == 1:
                synchronize(device)
                result.compile_s = time.perf_counter() - start
            log_progress(result, settings, values, start)
            if step < settings.steps and out_of_time(step, settings, deadline):
                result.stopped_early = True
                break
        result.nvfp4_matmuls, result.cached_graphs = counter.rewritten, counter.cached
    result.step_ms = timer.median_ms()
    if device.type == "cuda" and result.steps > settings.warmup:
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if not result.failure:
        begin = time.perf_counter()
        result.val_loss = evaluate(loss_fn, data, settings, device)
        result.val_s = time.perf_counter() - begin
        print(
            f"[{name}/{backend}] val loss {result.val_loss:.4f} ({result.val_s:.1f} s, "
            "compilation included, if any)",
            flush=True,
        )
    return result


def forward_backward(
    loss_fn: Callable[..., torch.Tensor],
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: Settings,
    device: torch.device,
) -> torch.Tensor:
    """Loss and gradients of one batch; returns ``[loss, grad norm of each parameter...]`` on the
    host: the step's one sync."""
    if settings.mode == "reduce-overhead":  # a new training step: earlier graph outputs are dead
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(settings, device):
        loss = loss_fn(inputs, targets)
    loss.backward()
    norms = torch.stack(torch._foreach_norm([p.grad for p in params])).float()
    return torch.cat([loss.detach().float().view(1), norms]).cpu()


def out_of_time(step: int, settings: Settings, deadline: float | None) -> bool:
    return deadline is not None and step >= settings.min_steps and time.perf_counter() > deadline


def log_progress(result: RunResult, settings: Settings, values: torch.Tensor, start: float) -> None:
    step = result.steps
    if step == 1 or step % settings.log_every == 0 or step == settings.steps:
        grad_norm = values[1:].double().square().sum().sqrt().item()
        print(
            f"[{result.model}/{result.backend}] step {step}/{settings.steps}  "
            f"loss {result.losses[-1]:.4f}  grad norm {grad_norm:.3f}  "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )


def evaluate(
    loss_fn: Callable[..., torch.Tensor],
    data: corpus.Corpus,
    settings: Settings,
    device: torch.device,
) -> float:
    """Mean loss over fixed, evenly spaced validation windows (the same for every run).

    Through the training graph, with grad mode on and no backward: under ``no_grad`` Dynamo
    would compile a second (inference) graph for every run, for the same forward numerics.
    """
    batches = corpus.eval_batches(data.val, settings.batch, settings.seq, settings.val_batches)
    with autocast(settings, device):
        losses = [loss_fn(x.to(device), y.to(device)).detach().float() for x, y in batches]
    return torch.stack(losses).mean().item()


def release(device: torch.device) -> None:
    """Drop the compiled graphs and free the last run's memory before the next run."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded_run(
    name: str, backend: str, settings: Settings, data: corpus.Corpus, deadline: float | None
) -> RunResult:
    """``train_run`` that turns an exception into a failed result, so later runs still happen."""
    try:
        return train_run(name, backend, settings, data, deadline)
    except Exception as error:  # any error (a compile failure, out of memory) is this run's
        traceback.print_exc()
        first_line = f"{type(error).__name__}: {error}".splitlines()[0][:200].replace("|", "/")
        return RunResult(name, backend, "", 0, "", failure=f"error: {first_line}")
    finally:
        release(torch.device(settings.device))


def run_all(
    settings: Settings,
    models: list[str],
    backends: list[str],
    data: corpus.Corpus,
    budget_s: float | None,
) -> list[RunResult]:
    """Every (model, backend) run, in budget (``budgeted``)."""

    def run(name: str, backend: str, steps: int, deadline: float | None) -> RunResult:
        print(f"=== {name} / {backend}", flush=True)
        run_settings = dataclasses.replace(settings, steps=steps)
        return guarded_run(name, backend, run_settings, data, deadline)

    return budgeted(models, backends, settings.steps, budget_s, run)


def budgeted(
    groups: list[str],
    backends: list[str],
    steps: int,
    budget_s: float | None,
    run: Callable[[str, str, int, float | None], RunResult],
) -> list[RunResult]:
    """``run(group, backend, steps, deadline)`` for every (group, backend) in order. With a
    budget, each run's share is what is left divided by the runs left, and a run stopped early
    fixes the step count of its group's later backends (so they compare like with like)."""
    start = time.perf_counter()
    runs_left = len(groups) * len(backends)
    results = []
    for group in groups:
        group_steps = steps
        for backend in backends:
            deadline = None
            if budget_s:
                share = (budget_s - (time.perf_counter() - start)) / runs_left
                deadline = time.perf_counter() + share
            runs_left -= 1
            result = run(group, backend, group_steps, deadline)
            if result.stopped_early:
                group_steps = result.steps
            results.append(result)
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, base: float | None, percent: bool = False) -> str:
    if value is None or base is None:
        return "-"
    return f"{(value / base - 1) * 100:+.2f}%" if percent else f"{value / base:.2f}x"


def measured_cells(r: RunResult, base: RunResult | None) -> list[str]:
    """The columns every training table shares, from val loss to compile s (``vs bf16``: against
    the same model's bf16 run ``base``)."""
    return [
        _fmt(r.val_loss, ".4f"),
        _ratio(r.val_loss, base and base.val_loss, percent=True),
        _fmt(r.train_loss, ".4f"),
        _fmt(r.step_ms, ".1f"),
        _ratio(r.step_ms, base and base.step_ms),
        _fmt(r.peak_gib, ".2f"),
        _ratio(r.peak_gib, base and base.peak_gib),
        _fmt(r.compile_s, ".1f"),
    ]


def table(results: list[RunResult]) -> str:
    """One row per run; the "vs bf16" columns compare with the same model's bf16 run."""
    baseline = {r.model: r for r in results if r.backend == "bf16"}
    rows = []
    for r in results:
        base = baseline.get(r.model) if r.backend != "bf16" else None
        rows.append(
            [
                r.model,
                r.backend,
                f"{r.params / 1e6:.1f}M" if r.params else "-",
                f"{r.steps}{' (time)' if r.stopped_early else ''}",
                *measured_cells(r, base),
                nvfp4_cell(r),
                r.failure or "yes",
            ]
        )
    header = ["model", "backend", "params", "steps", "val loss", "vs bf16", "train loss"]
    header += ["step ms", "vs bf16", "peak GiB", "vs bf16", "compile s", "NVFP4 mm", "finite"]
    return markdown_table(header, rows)


def nvfp4_cell(result: RunResult) -> str:
    if result.backend == "bf16":
        return "-"
    cached = f" (+{result.cached_graphs} cached graphs)" if result.cached_graphs else ""
    return f"{result.nvfp4_matmuls}{cached}"


def headline(results: list[RunResult]) -> str:
    failed = [r for r in results if r.failure]
    if not failed:
        return f"real models: every loss and gradient finite in all {len(results)} runs"
    runs = "; ".join(f"{r.model}/{r.backend}: {r.failure}" for r in failed)
    return f"real models: FAILED {len(failed)} of {len(results)} runs ({runs})"


def machine_name(settings: Settings) -> str:
    device = torch.device(settings.device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def describe(settings: Settings, argv: list[str], results: list[RunResult]) -> str:
    """The section's text above the table: machine, versions, settings, what each column is."""
    dtype = {
        "autocast": "float32 parameters under bf16 autocast",
        "bf16-params": "bfloat16 parameters, no autocast",
    }[settings.dtype]
    models = "; ".join(dict.fromkeys(f"{r.model}: {r.architecture}" for r in results if r.params))
    command = " ".join(["python benchmarks/real_models.py", *argv])
    # --eager ignores --mode (compile_kwargs)
    used_mode = settings.mode != "default" and not settings.eager
    compiled_mode = f", mode={settings.mode!r}" if used_mode else ""
    return (
        f"`{command}` on {machine_name(settings)}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}: stock Hugging Face causal LMs (random init, seed "
        f"{settings.seed}, byte vocab 256, SDPA attention, no dropout) trained on the Python "
        f"standard library's sources, batch {settings.batch} x seq {settings.seq}, "
        f"{settings.steps} steps, {dtype}, fused AdamW lr {settings.lr:g} (linear warm-up "
        f"{settings.lr_warmup} steps); the same initial weights and batches for every backend"
        f"{', --eager (no Inductor code generation)' if settings.eager else ''}"
        f"{compiled_mode}. Models: {models}."
        f"\n\nval loss: mean next-byte cross-entropy over {settings.val_batches} fixed validation "
        f"batches after training (forward only); train loss: mean of the last {TRAIN_LOSS_STEPS} "
        f"steps; step ms: median CUDA-event time of the steps after the first {settings.warmup} "
        f"(forward, backward, the gradient check's one host sync, AdamW); peak GiB: "
        f"max_memory_allocated over those steps (reset after the first {settings.warmup}); "
        f"compile s: wall time of the first step; NVFP4 mm: matmuls the quartet2 reports say were "
        f"rewritten (a model's later blocks come from the compile caches and are not reported "
        f"again); finite: every step checks "
        f"the loss and every parameter's gradient before the optimizer step, and a run stops at "
        f"the first non-finite one; (time): stopped by --time-budget."
    )


def record(settings: Settings, argv: list[str], results: list[RunResult]) -> dict[str, Any]:
    """Everything measured, for --json."""
    return {
        "argv": argv,
        "device": machine_name(settings),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": dataclasses.asdict(settings),
        "runs": [dataclasses.asdict(r) | {"train_loss": r.train_loss} for r in results],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {list(MODELS)}"
    )
    parser.add_argument(
        "--backends",
        default="quartet2,bf16",
        help="comma-separated, run in this order (the first fixes the step count when the "
        f"time budget cuts it short); any of {','.join(BACKENDS)}",
    )
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--seq", type=int, default=Settings.seq)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--lr-warmup", type=int, default=Settings.lr_warmup, help="steps")
    parser.add_argument("--dtype", choices=DTYPES, default=Settings.dtype)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed steps")
    parser.add_argument("--val-batches", type=int, default=Settings.val_batches)
    parser.add_argument("--log-every", type=int, default=Settings.log_every)
    parser.add_argument("--device", default=Settings.device)
    parser.add_argument("--tiny", action="store_true", help="2-layer, 128-wide models")
    parser.add_argument(
        "--eager", action="store_true", help="no Inductor code generation (quick CPU smoke runs)"
    )
    parser.add_argument(
        "--mode",
        choices=["default", "reduce-overhead"],
        default=Settings.mode,
        help="torch.compile mode (reduce-overhead: CUDA graphs, for small models)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=450,
        help="seconds for all runs together, compilation included (0: no limit)",
    )
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md untouched")
    parser.add_argument("--section", default=SECTION, help="the RESULTS.md section to write")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args(argv)
    for option, names, valid in (
        ("models", args.models, MODELS),
        ("backends", args.backends, BACKENDS),
    ):
        unknown = set(names.split(",")) - set(valid)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}; choose from {list(valid)}")
    needs = sorted(set(args.models.split(",")) & set(NEEDS_BF16_PARAMS))
    if needs and args.dtype != "bf16-params":
        parser.error(
            f"{needs} need --dtype bf16-params: transformers multiplies experts with grouped_mm "
            "only for bf16 weights under torch.compile (float32 ones graph-break on a host sync)"
        )
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    fields = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    """Run, print and record; the exit status is 1 when any run failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = settings_of(args)
    data = corpus.load_corpus()
    results = run_all(
        settings, args.models.split(","), args.backends.split(","), data, args.time_budget
    )
    body = f"{describe(settings, argv, results)}\n\n{table(results)}\n\n{headline(results)}\n"
    print(body, flush=True)
    if not args.no_write:
        write_section(args.section, body)
    if args.json:
        args.json.write_text(json.dumps(record(settings, argv, results), indent=1))
    return 1 if any(r.failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
