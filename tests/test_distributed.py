"""DDP and FSDP2 on CPU: 2 gloo processes against the single-process run of the same global batch.

The point is the distributed plumbing, so the graphs run without Inductor's code generation:
``bf16`` uses ``aot_eager`` and ``quartet2`` its ``inductor=False`` option (the same rewritten
graphs, run eagerly). Tolerances: step-1 losses see the same weights and tokens, so they agree to
float rounding (1e-5); later steps differ by the reduction order of the gradients (all-reduce,
reduce-scatter) amplified by BF16 autocast, hence 2e-2. quartet2's forward is deterministic, but
its per-tensor FP32 scale is an amax over the tokens it sees: a rank's step-1 loss equals the
single-process loss of that rank's rows, not of the whole batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from logged_reports import logged_messages
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from quartet_compile.explain import explain
from quartet_demo import corpus, distributed, training
from quartet_demo.demo import main
from quartet_demo.models.llama import Llama, LlamaConfig
from quartet_demo.run_log import read_log
from quartet_demo.training import LOG_NAME, TrainConfig, next_byte_loss, train

WORLD_SIZE = 2
FAST_BACKENDS = {
    "bf16": {"backend": "aot_eager"},
    "quartet2": {"backend": "quartet2", "options": {"inductor": False}},
}
CONFIG = TrainConfig(
    model=LlamaConfig(max_seq_len=64),
    steps=4,
    batch_size=8,
    seq_len=64,
    eval_every=2,
    save_every=2,
    eval_batches=1,
    device="cpu",
    progress=False,
)
LINEARS = {"attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, ports: list[int], configs: list[TrainConfig], explain_to: Path | None
) -> None:
    """One rank, in the environment torchrun would give it (one thread, as torchrun sets): the
    runs of ``configs`` one after the other, each in a process group of its own, then the
    reports of ``_explain_sharded`` when ``explain_to`` is given."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
    )
    training.BACKENDS.update(FAST_BACKENDS)
    free = iter(ports)
    for config in configs:
        # A fresh store per group: a rank reconnecting to the old port could reach the closing one.
        os.environ["MASTER_PORT"] = str(next(free))
        torch._dynamo.reset()
        train(config)
    if explain_to is not None:
        os.environ["MASTER_PORT"] = str(next(free))
        _explain_sharded(rank, configs[0].distributed, explain_to)


def _explain_sharded(rank: int, mode: str, path: Path) -> None:
    """The pass's reports on the wrapped model (DDP with small buckets, so that DDPOptimizer
    splits the graph, or FSDP2 as the demo shards it) and on a linear whose weight is a sharded
    DTensor, with the warnings logged meanwhile."""
    world = distributed.init(mode, "cpu")
    try:
        with logged_messages(logging.WARNING) as warnings:
            torch.manual_seed(0)
            model = Llama(CONFIG.model)
            wrapped = (
                DistributedDataParallel(model, bucket_cap_mb=1)
                if mode == "ddp"
                else distributed.wrap(model, world)
            )
            report = explain(wrapped, torch.randint(0, 256, (2, 64)), inductor=False)
            model_warnings = warnings[:]
            warnings.clear()
            mesh = init_device_mesh("cpu", (WORLD_SIZE,))
            linear = torch.nn.Linear(256, 256, bias=False)
            weight = distribute_tensor(linear.weight.detach(), mesh, [Shard(1)])
            linear.weight = torch.nn.Parameter(weight)
            x = DTensor.from_local(torch.randn(128, 256), mesh, [Replicate()])
            sharded = explain(linear, x, inductor=False)
        if world.is_main:
            reports = (report, model_warnings, sharded, warnings)
            path.write_bytes(pickle.dumps(reports))
    finally:
        distributed.shutdown(world)


def run_ranks(*configs: TrainConfig, explain_to: Path | None = None) -> None:
    """Run the ranks (each rank trains ``configs`` in turn, in one process: a process start costs
    as much as a tiny run); a rank killed by a signal is retried once, on fresh ports.

    A rank once died of SIGABRT ("terminate called without an active exception") two seconds
    into a DDP run in a fresh-clone CI run (1 of 9 runs of this module that day; no Python
    traceback), which looks like gloo's TCP setup aborting (pytorch/pytorch#188266). A Python
    error in a rank is never retried.
    """
    for attempt in range(2):
        try:
            ports = [_free_port() for _ in range(len(configs) + 1)]
            mp.spawn(
                _worker,
                args=(ports, list(configs), explain_to),
                nprocs=WORLD_SIZE,
                join=True,
            )
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.signal_name is None:
                raise
            warnings.warn(f"retrying the ranks once: {exc}", stacklevel=1)


def losses(out: Path, column: str = "train_loss") -> list[float]:
    return [float(row[column]) for row in read_log(out / LOG_NAME).rows if row[column]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output directories of the single-process and the 2-rank runs, trained once per module."""
    outs: dict[str, Path] = {}
    saved = dict(training.BACKENDS)
    training.BACKENDS.update(FAST_BACKENDS)
    try:
        for backend in ("bf16", "quartet2"):
            torch._dynamo.reset()
            outs[f"none-{backend}"] = out = tmp_path_factory.mktemp(f"none-{backend}")
            # quartet2's single-process run only serves its first step.
            stop = 1 if backend == "quartet2" else None
            train(dataclasses.replace(CONFIG, backend=backend, out_dir=out, stop_step=stop))
    finally:
        training.BACKENDS.clear()
        training.BACKENDS.update(saved)
    for mode in ("ddp", "fsdp2"):
        configs = []
        for backend in ("bf16", "quartet2"):
            outs[f"{mode}-{backend}"] = out = tmp_path_factory.mktemp(f"{mode}-{backend}")
            configs.append(
                dataclasses.replace(CONFIG, backend=backend, out_dir=out, distributed=mode)
            )
        if mode == "fsdp2":
            # The first session of test_fsdp2_resume_reproduces_the_uninterrupted_run: a zero
            # time budget stops after step 1 on every rank (the ranks agree on when to stop).
            outs["fsdp2-stopped"] = out = tmp_path_factory.mktemp("fsdp2-stopped")
            configs.append(
                dataclasses.replace(CONFIG, out_dir=out, distributed=mode, max_minutes=0.0)
            )
        run_ranks(*configs, explain_to=outs[f"{mode}-quartet2"] / "report.pkl")
    return outs


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_bf16_matches_the_single_process_run(mode: str, runs: dict[str, Path]):
    single, ranks = losses(runs["none-bf16"]), losses(runs[f"{mode}-bf16"])
    assert len(ranks) == CONFIG.steps
    assert ranks[0] == pytest.approx(single[0], abs=1e-5)
    assert ranks == pytest.approx(single, abs=2e-2)
    assert losses(runs[f"{mode}-bf16"], "val_loss") == pytest.approx(
        losses(runs["none-bf16"], "val_loss"), abs=2e-2
    )


@pytest.fixture(scope="module")
def quartet2_rank_losses() -> float:
    """Mean over ranks of quartet2's step-1 loss on each rank's rows, computed in one process."""
    torch.manual_seed(CONFIG.seed)
    model = Llama(CONFIG.model)
    loss_fn = next_byte_loss(
        torch.compile(model, backend="quartet2", options={"inductor": False}),
        torch.device("cpu"),
    )
    return mean_rank_loss(loss_fn, CONFIG, WORLD_SIZE)


def mean_rank_loss(loss_fn, config: TrainConfig, world_size: int) -> float:
    """Mean over ``world_size`` ranks of the loss of each rank's rows of the first batch."""
    data = corpus.load_corpus(config.corpus, config.val_fraction)
    batch = corpus.train_batch(data.train, config.batch_size, config.seq_len, config.seed, 1)
    with torch.no_grad():
        per_rank = [
            loss_fn(*distributed.local_rows(batch, distributed.World("ddp", rank, world_size)))
            for rank in range(world_size)
        ]
    return torch.stack(per_rank).mean().item()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_quartet2_forward_is_the_mean_of_the_ranks_single_process_losses(
    mode: str, runs: dict[str, Path], quartet2_rank_losses: float
):
    """Same weights and a deterministic forward: a rank's step-1 loss is the single-process loss
    of its rows."""
    assert losses(runs[f"{mode}-quartet2"])[0] == pytest.approx(quartet2_rank_losses, abs=1e-5)
    # The whole batch's loss differs only through the per-tensor scales' amax.
    assert losses(runs["none-quartet2"])[0] == pytest.approx(quartet2_rank_losses, abs=2e-2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", ["bf16", "quartet2"])
def test_distributed_runs_train(mode: str, backend: str, runs: dict[str, Path]):
    curve = losses(runs[f"{mode}-{backend}"])
    assert all(math.isfinite(loss) for loss in curve)
    assert sum(curve[-2:]) / 2 < curve[0] - 0.5, curve


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_pass_quantizes_full_weights(mode: str, runs: dict[str, Path]):
    """Every rewritten linear has its parameter's full [N, K]: FSDP2's weights arrive gathered,
    DDP's split subgraphs still see them as parameters."""
    report, warnings, _, _ = pickle.loads((runs[f"{mode}-quartet2"] / "report.pkl").read_bytes())
    full = {name: tuple(p.shape) for name, p in Llama(CONFIG.model).named_parameters()}
    rewritten = {}
    for graph in report.graphs:
        for lin in graph.linears:
            if lin.rewritten():
                assert lin.rewritten() == 3, str(lin)
                rewritten[lin.weight] = (int(lin.n), int(lin.k))
    names = [name.removesuffix(".weight") for name in rewritten]
    assert {layer for layer in LINEARS for name in names if name.endswith(layer)} == LINEARS
    for weight, shape in rewritten.items():
        matches = {s for name, s in full.items() if name.endswith(weight)}
        assert matches == {shape}, (weight, shape, matches)
    assert not warnings, warnings
    if mode == "ddp":
        assert len(report.graphs) >= 2, "DDPOptimizer did not split the graph"
        assert len(rewritten) == len(LINEARS) * CONFIG.model.n_layers


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_sharded_weight_stays_in_high_precision_with_a_logged_reason(
    mode: str, runs: dict[str, Path]
):
    """A DTensor weight sharded along K reaching the backend: its local shard is never quantized."""
    *_, sharded, warnings = pickle.loads((runs[f"{mode}-quartet2"] / "report.pkl").read_bytes())
    assert sharded.graphs and sharded.rewritten() == 0, str(sharded)
    assert any("reached the graph as DTensor (Shard(dim=1),)" in m for m in warnings), warnings


def test_fsdp2_resume_reproduces_the_uninterrupted_run(runs: dict[str, Path]):
    stopped = runs["fsdp2-stopped"]  # stopped after step 1 by a zero time budget
    assert len(losses(stopped)) == 1
    # Resumed by new processes: all they know of the first session is in its checkpoint.
    run_ranks(dataclasses.replace(CONFIG, out_dir=stopped, distributed="fsdp2", resume=True))
    assert losses(stopped) == losses(runs["fsdp2-bf16"])


def test_resume_refuses_another_world_size(runs: dict[str, Path]):
    config = dataclasses.replace(CONFIG, out_dir=runs["ddp-bf16"], resume=True)
    with pytest.raises(ValueError, match="written by 2 rank"):
        train(config)


def test_the_demo_names_torchrun_when_launched_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        main(["--distributed", "fsdp2", "--device", "cpu", "--out", str(tmp_path)])
