"""The CUDA paths, run for real where a GPU is present (skipped everywhere else, CI included).

What only a GPU can show: the memory search meeting real ``torch.cuda.OutOfMemoryError``s (at
``--memory-limit`` through the allocator's own cap, and at the card's full memory) and backing off
without growth; every command running on the device end to end; exact resume with the CUDA
random state (dropout); the noise scale agreeing with the CPU's.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import TensorSource, noise_scale, sweep, train
from batchfit.probe.memory import find_max_micro_batch_size
from helpers import blobs, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GiB = 1 << 30


def _wide(hidden: int, seed: int = 0) -> nn.Module:
    """Few parameters, much activation memory per sample: the memory search reaches its limit
    at a size whose step is quick."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).cuda()


def _data(n: int) -> TensorSource:
    g = torch.Generator().manual_seed(0)
    return TensorSource(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fraction() -> float | None:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return None if getter is None else float(getter(0))


def test_a_memory_limit_on_cuda_meets_real_out_of_memory_errors_and_backs_off():
    model, data = _wide(65536), _data(16384)
    before, fraction = _state(model), _fraction()

    def search():
        return find_max_micro_batch_size(model, data, F.cross_entropy, limit_bytes=2 * GiB)

    search()  # the first one also allocates cuBLAS's workspaces, once per process
    allocated = torch.cuda.memory_allocated()
    ceiling = search()
    ooms = [t for t in ceiling.trials if t.out_of_memory]
    assert ooms and all("CUDA out of memory" in (t.error or "") for t in ooms)
    assert ceiling.capped_by == "memory" and 1 < ceiling.max_micro_batch_size < 16384
    assert all(t.peak_bytes <= 0.9 * 2 * GiB for t in ceiling.trials if t.fits)
    tried_sizes = {t.micro_batch_size for t in ceiling.trials if t.fits}
    assert ceiling.max_micro_batch_size in tried_sizes
    # Nothing grew across trials, the model is as it was, the allocator's cap is lifted.
    assert torch.cuda.memory_allocated() == allocated
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _fraction() == fraction


def test_the_memory_search_meets_the_cards_own_limit():
    """No --memory-limit: the limit is the GPU's whole memory and the error the device's own."""
    total = torch.cuda.get_device_properties(0).total_memory
    hidden = 262144  # about 3 MiB of activations and gradients per sample
    n = 1 << max(12, (4 * total // (3 << 20)).bit_length())  # room for 4x what can fit
    ceiling = find_max_micro_batch_size(_wide(hidden), _data(n), F.cross_entropy)
    assert ceiling.limit_bytes == total and ceiling.limit_source == "the GPU's total memory"
    assert any(t.out_of_memory for t in ceiling.trials)
    assert ceiling.capped_by == "memory" and ceiling.max_micro_batch_size < n
    fitted = max(t.peak_bytes for t in ceiling.trials if t.fits)
    assert 0.4 * total < fitted <= 0.9 * total
    torch.cuda.empty_cache()


def test_a_cpu_model_on_a_gpu_machine_is_searched_without_the_child_check():
    """After a backward, autograd has GPU threads and a forked child cannot train: the check is
    reported as not run, and the in-process trials stand."""
    x, y = blobs(200)
    ceiling = find_max_micro_batch_size(nn.Linear(4, 3), TensorSource(x, y), F.cross_entropy)
    assert ceiling.device == "cpu" and ceiling.max_micro_batch_size == 200
    assert ceiling.confirmed is None
    assert ceiling.confirmation.startswith("not run: on a machine with GPUs")


def test_train_on_cuda_resumes_bitwise_with_dropout(tmp_path):
    x, y = blobs(400)

    def run(folder, stop_at=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 3))
        kwargs = dict(batch_size=32, epochs=3, seed=3, checkpoint_dir=folder, device="cuda")
        if stop_at:
            torch.manual_seed(0)
            first = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 3))
            train(first, (x, y), max_steps=stop_at, resume=True, **kwargs)
        return train(model, (x, y), resume=True, **kwargs)

    whole = run(tmp_path / "a")
    resumed = run(tmp_path / "b", stop_at=17)
    assert resumed.resumed_from_step == 17 and resumed.steps == whole.steps == 39
    assert resumed.params_sha256 == whole.params_sha256


def test_noise_scale_on_cuda_agrees_with_the_cpu():
    from batchfit.examples.linreg import load, make_model

    data = load()
    torch.manual_seed(0)
    model = make_model()
    on_cpu = noise_scale(model, (data.x_train, data.y_train), None, 32, 20)
    on_gpu = noise_scale(model.cuda(), (data.x_train, data.y_train), None, 32, 20)
    assert on_gpu.b_simple == pytest.approx(on_cpu.b_simple, rel=1e-3)
    assert next(model.parameters()).is_cuda


def test_sweep_on_cuda_measures_sharpness_on_the_device(tmp_path):
    x, y = blobs(600)
    xv, yv = blobs(200, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    result = sweep(
        model, (x, y), val_data=(xv, yv), batch_sizes=[16, 128], epochs=2, lr=0.01,
        device="cuda", out_dir=tmp_path,
    )  # fmt: skip
    for size in result.sizes:
        assert size["sharpness"]["eigenvalue"] > 0 and size["final"]["val_accuracy"] > 0.5
    assert (tmp_path / "sweep.json").exists()


def test_cli_tune_on_cuda_end_to_end(tmp_path):
    out = tmp_path / "report"
    args = ["tune", "--device", "cuda", "--time-budget", "60", "--json", "--out", str(out)]
    proc = run_cli(args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["device"].startswith("cuda")
    assert report["memory"]["peak_measure"] == "torch.cuda.max_memory_allocated"
    assert report["recommended"]["batch_size"] >= 1
    assert (out / "report.md").exists() and (out / "report.json").exists()
