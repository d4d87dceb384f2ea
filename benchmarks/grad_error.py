"""Gradient error of MS-EDEN vs stochastic rounding on the real backward operands of a stock LM.

Why: benchmarks/quant_error.py compares the backward quantizers on Gaussian and Student-t data;
real gradients have structure (outlier channels, near-zero rows of late tokens) that synthetic
data lacks, and the paper's claim (MS-EDEN's MSE more than 2x below SR's) should hold on them.

This script trains a stock Hugging Face model (benchmarks/real_models.py's builders, corpus
batches, loss and bf16 autocast) eagerly, without any torch.compile backend, and captures with
plain module hooks the operands of a few linears' backward: x, W and the output gradient dy of
every projection (attention q/k/v/o, MLP gate/up/down) of the first, middle and last block, at a
few steps. It forms the backward operands as the quartet2 backend does (SPEC 3): the forward
NVFP4 of x and W (RTN, four-over-six); grad-input from dy rotated along N and requant(W);
grad-weight from dy.T rotated along T and requant(x); one set of random signs per GEMM. For
MS-EDEN ("eden") and SR with the same rotation ("sr"), from the same signs and seeds, it measures

- each operand's relative quantization MSE |R^T deq(Q(v R)) - v|^2 / |v|^2 (v: dy, dy.T and the
  dequantized forward W and x that requant reads), and
- the relative error |G_q - G|_F / |G|_F of the dX and dW GEMMs against the float32 products of
  the unquantized operands; "forward NVFP4 alone" is that error with dy exact and only W or x
  NVFP4-quantized by the forward: the floor that no backward quantizer removes.

Prints a table; ``--json PATH`` saves every per-layer, per-seed number (e.g. under
benchmarks/data/); ``--results`` writes the "Gradient error on real gradients" section of
RESULTS.md (``--from-json PATH``: only that, from a saved run). CPU test mode: ``--tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import real_models
import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from quartet_compile import nvfp4
from results import RESULTS, markdown_table, write_section

SECTION = "Gradient error on real gradients"
# (key, label, metric) in table order: the operands of grad-input, its GEMM, then grad-weight's.
QUANTITIES = (
    ("dy", "dX: dy rotated along N", "MSE"),
    ("W", "dX: requant(W)", "MSE"),
    ("dX", "dX = dy @ W", "GEMM error"),
    ("dyT", "dW: dy.T rotated along T", "MSE"),
    ("x", "dW: requant(x)", "MSE"),
    ("dW", "dW = dy.T @ x", "GEMM error"),
)
OPERANDS = tuple(key for key, _, metric in QUANTITIES if metric == "MSE")
# --tiny: T = 2 x 96 = 192 tokens, not a multiple of 128, so the padding along T is exercised.
DEFAULTS = {
    False: {"batch": 16, "seq": 1024, "steps": "0,100", "seeds": 4},
    True: {"batch": 2, "seq": 96, "steps": "0,3", "seeds": 2},
}


@dataclass
class Capture:
    """One linear's backward operands at one step, in the dtype its matmul ran in (bf16)."""

    name: str
    block: int
    kind: str  # "attention" or "mlp"
    x: torch.Tensor  # [T, K]
    w: torch.Tensor  # [N, K]
    dy: torch.Tensor | None = None  # [T, N], set by the backward


def weight_nk(module: nn.Module) -> torch.Tensor:
    """The weight as [N, K] (GPT-2's Conv1D stores it as [K, N])."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def select_layers(model: PreTrainedModel) -> dict[str, tuple[int, str, nn.Module]]:
    """name -> (block, kind, module) of the first, middle and last block's linears that quartet2
    rewrites (K and N multiples of 128, SPEC 6)."""
    n = model.config.num_hidden_layers
    blocks = {0, n // 2, n - 1}
    layers = {}
    for name, module in model.named_modules():
        match = re.search(r"\.(\d+)\.", name)
        if not isinstance(module, (nn.Linear, Conv1D)) or not match or int(match[1]) not in blocks:
            continue
        if any(size % nvfp4.HADAMARD_BLOCK for size in weight_nk(module).shape):
            continue
        layers[name] = (int(match[1]), "mlp" if ".mlp." in name else "attention", module)
    if not layers:
        raise ValueError(f"no block linear of {type(model).__name__} has K and N multiples of 128")
    return layers


class Recorder:
    """Forward hooks that, while ``armed``, keep each selected linear's input and weight (cast to
    its output's dtype, as autocast does for the matmul) and hook its output for dy."""

    def __init__(self, layers: dict[str, tuple[int, str, nn.Module]]) -> None:
        self.armed = False
        self.captures: dict[str, Capture] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name, block, kind))
            for name, (block, kind, module) in layers.items()
        ]

    def _hook(self, name: str, block: int, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.armed:
                return
            x = args[0].detach().to(output.dtype, copy=True).flatten(0, -2)
            w = weight_nk(module).detach().to(output.dtype, copy=True)
            capture = self.captures[name] = Capture(name, block, kind, x, w)

            def keep_dy(grad: torch.Tensor) -> None:
                capture.dy = grad.detach().flatten(0, -2)

            output.register_hook(keep_dy)

        return hook

    def take(self) -> list[Capture]:
        """The captures of the last armed step, which the recorder then forgets."""
        captures, self.captures = list(self.captures.values()), {}
        return captures

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def captured_steps(
    model: PreTrainedModel,
    settings: real_models.Settings,
    steps: list[int],
    data: real_models.corpus.Corpus,
) -> Iterator[tuple[int, float, list[Capture]]]:
    """Train ``model`` eagerly (AdamW, real_models' batches and loss under bf16 autocast) and yield
    ``(step, loss, captures)`` at each of ``steps``: the backward after that many optimizer
    steps."""
    device = torch.device(settings.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, fused=True)
    loss_fn = real_models.NextByteLoss(model)
    recorder = Recorder(select_layers(model))
    try:
        for step in range(max(steps) + 1):
            batch = real_models.corpus.train_batch(
                data.train, settings.batch, settings.seq, settings.seed, step + 1
            )
            inputs, targets = (t.to(device) for t in batch)
            recorder.armed = step in steps
            values = real_models.forward_backward(
                loss_fn, params, inputs, targets, settings, device
            )
            if not values.isfinite().all():
                raise FloatingPointError(f"non-finite loss or gradient at step {step}")
            if recorder.armed:
                yield step, values[0].item(), recorder.take()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        recorder.remove()


def relative_mse(restored: torch.Tensor, v: torch.Tensor) -> float:
    """|restored - v|^2 / |v|^2, the sums in float64 (gradients can be tiny)."""
    return ((restored - v).double().square().sum() / v.double().square().sum()).item()


def relative_error(product: torch.Tensor, reference: torch.Tensor) -> float:
    """|product - reference|_F / |reference|_F."""
    return math.sqrt(relative_mse(product.float(), reference))


def operand_mse(q: nvfp4.NVFP4Tensor, v: torch.Tensor, signs: torch.Tensor) -> float:
    """Relative MSE of R^T deq(q) against the operand v that q quantized rotated (cropping the
    zero padding of the reduction dimension)."""
    return relative_mse(nvfp4.unrotate(q.dequantize(), signs)[:, : v.shape[1]], v)


def gemm(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> torch.Tensor:
    """The backend's NVFP4 GEMM (from units and tensor scales, bf16 output)."""
    return nvfp4.gemm_units(
        nvfp4.units(a), a.tensor_scale, nvfp4.units(b), b.tensor_scale, torch.bfloat16
    )


def measure(capture: Capture, seeds: int, base_seed: int) -> dict[str, Any]:
    """Every quantity of QUANTITIES for each method and seed, and the forward-only floor.

    Seed s draws the signs of the two GEMMs and the four quantizers' seeds once; both methods use
    them, so the comparison is paired.
    """
    if capture.dy is None:
        raise RuntimeError(f"{capture.name}: no gradient reached its output")
    x, w, dy = (t.float() for t in (capture.x, capture.w, capture.dy))
    xq, wq = nvfp4.quantize_rtn(x), nvfp4.quantize_rtn(w)
    x_fwd, w_fwd = xq.dequantize(), wq.dequantize()
    dx_ref, dw_ref = dy @ w, dy.T @ x
    result: dict[str, Any] = {
        "forward_only": {
            "dX": relative_error(dy @ w_fwd, dx_ref),
            "dW": relative_error(dy.T @ x_fwd, dw_ref),
        }
    }
    for method in nvfp4.BACKWARD_METHODS:
        values: dict[str, list[float]] = {key: [] for key, _, _ in QUANTITIES}
        for s in range(seeds):
            generator = torch.Generator().manual_seed(base_seed * 1_000_003 + s)
            signs_dx, signs_dw = (nvfp4.random_signs(generator).to(dy.device) for _ in range(2))
            # In the range of the backend's in-graph seeds (passes/layer.py).
            seed_dy, seed_w, seed_dyt, seed_x = (
                torch.randint(2**31 - 1, (4,), generator=generator).to(dy.device).unbind()
            )
            dyq = nvfp4.rht_quantize(dy, signs_dx, seed_dy, False, method)
            wr = nvfp4.requant(wq, signs_dx, seed_w, method)
            dytq = nvfp4.rht_quantize(dy, signs_dw, seed_dyt, True, method)
            xr = nvfp4.requant(xq, signs_dw, seed_x, method)
            values["dy"].append(operand_mse(dyq, dy, signs_dx))
            values["W"].append(operand_mse(wr, w_fwd.T, signs_dx))
            values["dX"].append(relative_error(gemm(dyq, wr), dx_ref))
            values["dyT"].append(operand_mse(dytq, dy.T, signs_dw))
            values["x"].append(operand_mse(xr, x_fwd.T, signs_dw))
            values["dW"].append(relative_error(gemm(dytq, xr), dw_ref))
        result[method] = values
    return result


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Train, capture at each of ``args.steps`` and measure each capture right away (so only one
    step's operands are held at a time); returns the JSON record."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = real_models.Settings(
        device=device,
        batch=args.batch,
        seq=args.seq,
        lr=args.lr,
        seed=args.seed,
        tiny=args.tiny,
    )
    steps = sorted({int(s) for s in args.steps.split(",")})
    start = time.perf_counter()
    data = real_models.corpus.load_corpus()
    model = real_models.build_model(args.model, args.tiny, args.seed).to(device)
    record: dict[str, Any] = {
        "argv": argv,
        "device": real_models.machine_name(settings),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "architecture": real_models.architecture(model),
        "settings": {k: getattr(settings, k) for k in ("batch", "seq", "lr", "seed", "tiny")},
        "steps": steps,
        "seeds": args.seeds,
        "layers": [],
        "losses": {},
    }
    measuring = 0.0
    for step, loss, captures in captured_steps(model, settings, steps, data):
        begin = time.perf_counter()
        record["losses"][str(step)] = loss
        for capture in captures:
            shapes = {k: list(getattr(capture, k).shape) for k in ("x", "w", "dy")}
            layer = {"step": step, "name": capture.name, "block": capture.block}
            layer |= {"kind": capture.kind, "shapes": shapes}
            record["layers"].append(layer | measure(capture, args.seeds, args.seed))
        measuring += time.perf_counter() - begin
        print(
            f"[step {step}] loss {loss:.4f}: {len(captures)} layers measured in "
            f"{time.perf_counter() - begin:.1f} s",
            flush=True,
        )
    total = time.perf_counter() - start
    record["timings_s"] = {"total": total, "measure": measuring, "train": total - measuring}
    print(f"{total:.1f} s in all, {measuring:.1f} s of it measuring", flush=True)
    return record


def summary_rows(record: dict[str, Any]) -> list[list[str]]:
    """Per step, layer kind and quantity: the mean over layers (of each layer's mean over seeds)
    for each method, their ratio, and the forward-only floor of the GEMM rows."""
    rows = []
    for step in record["steps"]:
        for kind in ("attention", "mlp"):
            layers = [r for r in record["layers"] if r["step"] == step and r["kind"] == kind]
            if not layers:
                continue
            for key, label, metric in QUANTITIES:
                eden, sr = (
                    statistics.fmean(statistics.fmean(r[method][key]) for r in layers)
                    for method in nvfp4.BACKWARD_METHODS
                )
                floor = "-"
                if key in ("dX", "dW"):
                    floor = f"{statistics.fmean(r['forward_only'][key] for r in layers):.4f}"
                row = [str(step), f"{kind} ({len(layers)})", label, metric]
                rows.append(row + [f"{eden:.4f}", f"{sr:.4f}", f"{sr / eden:.2f}", floor])
    return rows


def operand_ratios(record: dict[str, Any]) -> list[float]:
    """SR/EDEN mean-MSE ratio of every captured operand (layer, step, operand)."""
    return [
        statistics.fmean(r["sr"][key]) / statistics.fmean(r["eden"][key])
        for r in record["layers"]
        for key in OPERANDS
    ]


def headline(record: dict[str, Any]) -> str:
    ratios = operand_ratios(record)
    geomean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    above = sum(r > 2 for r in ratios)
    return (
        f"SR/MS-EDEN operand MSE ratio on real gradients: geometric mean {geomean:.2f} over "
        f"{len(ratios)} operands (min {min(ratios):.2f}, max {max(ratios):.2f}; {above} above 2)"
    )


def table(record: dict[str, Any]) -> str:
    header = ["step", "layers", "quantity", "metric", "MS-EDEN", "SR", "SR/EDEN"]
    return markdown_table(header + ["forward NVFP4 alone"], summary_rows(record))


def describe(record: dict[str, Any]) -> str:
    """The section's text above the table."""
    s = record["settings"]
    command = " ".join(["python benchmarks/grad_error.py", *record["argv"]])
    losses = ", ".join(f"step {k}: {v:.3f}" for k, v in record["losses"].items())
    blocks = sorted({r["block"] for r in record["layers"]})
    return (
        f"`{command}` on {record['device']}, torch {record['torch']}, transformers "
        f"{record['transformers']}: {record['architecture']} trained eagerly (no torch.compile "
        f"backend; fp32 parameters, bf16 autocast, AdamW lr {s['lr']:g}, batch {s['batch']} x "
        f"seq {s['seq']}, real_models.py's corpus batches; loss {losses}). Plain module hooks "
        f"captured x, W and dy of every linear that quartet2 rewrites (K and N multiples of 128) "
        f"in blocks {blocks} at steps {record['steps']} (the backward after that many optimizer "
        f"steps), and the backward operands were formed "
        f"as quartet2 does (SPEC 3, float32 reference nvfp4.py): forward NVFP4 of x and W (RTN "
        f"four-over-six), dy rotated along N with requant(W) for dX, dy.T rotated along T with "
        f"requant(x) for dW, one set of random signs per GEMM, MS-EDEN or SR (same rotation) "
        f"from the same signs and seeds, {record['seeds']} seeds.\n\nMSE: relative quantization "
        f"MSE |R^T deq(Q(v R)) - v|^2 / |v|^2 of the operand (requant: v is the dequantized "
        f"forward NVFP4 tensor it reads); GEMM error: |G_q - G|_F / |G|_F against the float32 "
        f"product of the unquantized bf16 operands; forward NVFP4 alone: that error with dy "
        f"exact and only the forward's NVFP4 W (dX) or x (dW), the floor no backward quantizer "
        f"removes. Each value is the mean over the layers (count in parentheses) of the mean "
        f"over seeds. Raw numbers: `--json`."
    )


def section(record: dict[str, Any]) -> str:
    return f"{describe(record)}\n\n{table(record)}\n\n{headline(record)}\n"


def write_results(record: dict[str, Any], path: Path = RESULTS) -> None:
    """Write the "Gradient error on real gradients" section of RESULTS.md from a JSON record."""
    write_section(SECTION, section(record), path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=list(real_models.MODELS))
    parser.add_argument("--steps", help="comma-separated capture steps (default 0,100; tiny 0,3)")
    parser.add_argument("--seeds", type=int, help="draws per quantizer (default 4; tiny 2)")
    parser.add_argument("--batch", type=int, help="default 16; tiny 2")
    parser.add_argument("--seq", type=int, help="default 1024; tiny 96")
    parser.add_argument("--lr", type=float, default=real_models.Settings.lr)
    parser.add_argument("--seed", type=int, default=real_models.Settings.seed)
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    parser.add_argument("--tiny", action="store_true", help="2-layer, 128-wide model (CPU tests)")
    parser.add_argument("--json", type=Path, help="save every number here")
    parser.add_argument("--results", action="store_true", help="write the RESULTS.md section")
    parser.add_argument(
        "--from-json", type=Path, help="no run: print (and with --results write) a saved record"
    )
    args = parser.parse_args(argv)
    for option, default in DEFAULTS[args.tiny].items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json:
        record = json.loads(args.from_json.read_text())
    else:
        record = run(args, argv)
    print(section(record), flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    if args.results:
        write_results(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
