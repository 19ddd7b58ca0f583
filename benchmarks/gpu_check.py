"""The GPU check: one short script to run when a CUDA device is lent (under 8 minutes on one H100).

For a CNN and a small transformer it runs ``batchfit.tune`` in float32, bf16-mixed and
bf16-mixed + compile, side by side on the same device, and prints for each the memory ceiling,
the throughput knee (where doubling the batch stops paying), the best samples/s, the compile
seconds (apart from step time) and tune's answer; then it runs the suite's CUDA tests (the
out-of-memory back-off against the allocator's real errors among them). Results go to
``benchmarks/results/gpu_check.json``.

    python benchmarks/gpu_check.py                       # on a CUDA device
    python benchmarks/gpu_check.py --device cpu --quick  # the script's own smoke test on a CPU

The ceilings are measured under ``--memory-limit`` (default 8 GiB, the allocator's cap), so that
the search meets a real out-of-memory error on any card rather than the data size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import batchfit

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
MODES = (("32", False), ("bf16-mixed", False), ("bf16-mixed", True))


class SmallCNN(nn.Module):
    """Four conv blocks on 3x32x32 images, ten classes: activations dominate its memory."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i % 2 else []
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """A 4-layer encoder over token ids, classifying each sequence by its mean token state."""

    def __init__(self, vocab: int = 1000, width: int = 256, length: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.position).mean(dim=1))


def tasks(quick: bool) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """The two models and their seeded synthetic data (labels a function of the inputs)."""
    g = torch.Generator().manual_seed(0)
    n_img, n_tok, length = (512, 512, 32) if quick else (32768, 32768, 128)
    images = torch.randn(n_img, 3, 32, 32, generator=g)
    image_labels = (images[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (images[:, 1, 0, 0] > 0)
    tokens = torch.randint(0, 1000, (n_tok, length), generator=g)
    token_labels = tokens[:, 0] % 10
    torch.manual_seed(0)
    width = 16 if quick else 64
    return {
        "cnn": (SmallCNN(width), (images, image_labels)),
        "transformer": (
            TinyTransformer(width=64 if quick else 256, length=length),
            (tokens, token_labels),
        ),
    }


def check_one(name, model, data, precision, compiled, args) -> dict:
    """One tune run: what it measured and chose."""
    started = time.perf_counter()
    result = batchfit.tune(
        model,
        data,
        device=args.device,
        precision=precision,
        compile=compiled,
        time_budget=args.time_budget,
        memory_limit=args.memory_limit,
        seed=0,
    )
    points = result.throughput.points
    best = max(points, key=lambda p: p.samples_per_s)
    return {
        "task": name,
        "precision": precision,
        "compile": compiled,
        "ceiling": result.memory.max_micro_batch_size,
        "capped_by": result.memory.capped_by,
        "knee": result.throughput.flattens_at,
        "best_samples_per_s": round(best.samples_per_s, 1),
        "at_batch_size": best.batch_size,
        "compile_seconds": (result.compile or {}).get("seconds"),
        "recompiled_while_measuring": (result.compile or {}).get("recompiled_while_measuring"),
        "batch_size": result.recommended.batch_size,
        "lr": result.recommended.lr,
        "raced": result.race is not None,
        "tune_seconds": round(time.perf_counter() - started, 1),
    }


def cuda_tests() -> dict:
    """The suite's CUDA tests (skipped off a GPU), the back-off against real CUDA OOM among them."""
    chosen = ["tests/test_cuda.py", "tests/test_backoff.py::test_on_cuda_the_allocator_cap_is_met"
              "_and_every_step_trains"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chosen],
        capture_output=True,
        text=True,
    )
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return {"returncode": done.returncode, "summary": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and data (smoke test)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per tune run")
    parser.add_argument("--memory-limit", type=int, default=8 * 2**30, help="bytes")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it where one is lent, or use --device cpu.")
    if args.time_budget is None:
        args.time_budget = 20.0 if args.quick else 45.0
    if args.device == "cpu":
        args.memory_limit = None  # the process's own default on a CPU
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu_check on {device}, torch {torch.__version__}, budget {args.time_budget:g} s/run")
    rows = []
    for name, (model, data) in tasks(args.quick).items():
        for precision, compiled in MODES:
            row = check_one(name, model, data, precision, compiled, args)
            rows.append(row)
            print(
                f"{name:12s} {precision:10s} compile={compiled!s:5s} ceiling {row['ceiling']:>6} "
                f"({row['capped_by']}) knee {row['knee']} best {row['best_samples_per_s']:>10} "
                f"samples/s at {row['at_batch_size']} compile_s {row['compile_seconds']} "
                f"-> B={row['batch_size']} lr={row['lr']:.3g} raced={row['raced']} "
                f"({row['tune_seconds']} s)",
                flush=True,
            )
    tests = None if args.skip_tests else cuda_tests()
    if tests is not None:
        print(f"CUDA tests: {tests['summary']}")
    out = {"device": device, "torch": torch.__version__, "quick": args.quick, "runs": rows,
           "cuda_tests": tests}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS.with_name("gpu_check_cpu_smoke.json") if args.device == "cpu" else RESULTS
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
