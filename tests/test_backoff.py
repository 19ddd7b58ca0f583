"""Out-of-memory back-off in ``train``, met with real out-of-memory errors.

Every run that is limited runs in a child process (its own address space limited by
``memory_limit``, as ``tune`` limits its trials), so the allocator's own error is what the loop
meets; the test process itself is never limited. The model is narrow in and wide inside: a step's
activations grow by tens of KiB per sample while its arithmetic stays cheap, so a few thousand
samples do not fit in a couple of hundred MiB above what the process already holds.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cpu_only_env, run_cli

CHILD = r'''
import csv, json, sys
import torch
from torch import nn
from batchfit import train
from batchfit.memory_limits import rss_bytes
from batchfit.step import evaluate

torch.set_num_threads(1)
MiB = 2**20


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def wide(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))


def micros(out):
    with open(f"{out}/metrics.csv") as f:
        return [int(row["micro_batch_size"]) for row in csv.DictReader(f)]


def weights_gap(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def same_weights(out):
    x, y = data(8192)
    limited = wide()
    kept = train(limited, (x, y), batch_size=4096, epochs=2, memory_limit=rss_bytes() + 200 * MiB,
                 regrow_after=0, out_dir=f"{out}/limited", progress=True)
    used = micros(f"{out}/limited")
    plain = wide()
    train(plain, (x, y), batch_size=4096, epochs=2, micro_batch_size=used[-1], out_dir=f"{out}/b")
    return {"steps": kept.steps, "micros": used, "gap": weights_gap(limited, plain),
            "result_micro": [kept.micro_batch_size, kept.configured_micro_batch_size],
            "bitwise": all(torch.equal(p, q) for p, q in zip(limited.parameters(),
                                                             plain.parameters()))}


def same_weights_bf16(out):
    """same_weights in bf16-mixed: about half the activation memory, so a tighter limit (one at
    which oneDNN's bf16 kernels still find room at a smaller micro-batch). One step: after it,
    Adam's state takes room, and on a machine where the second step then backs off again, bf16
    rounds the two splits differently and Adam magnifies that on weights with tiny gradients."""
    x, y = data(8192)
    limited = wide()
    limit = rss_bytes() + 180 * MiB
    kept = train(limited, (x, y), batch_size=4096, max_steps=1, memory_limit=limit, regrow_after=0,
                 out_dir=f"{out}/limited", precision="bf16-mixed", progress=True)
    used = micros(f"{out}/limited")
    plain = wide()
    train(plain, (x, y), batch_size=4096, max_steps=1, micro_batch_size=used[-1],
          out_dir=f"{out}/b", precision="bf16-mixed")
    return {"steps": kept.steps, "micros": used, "gap": weights_gap(limited, plain),
            "moved": weights_gap(limited, wide())}


class Spiky(nn.Module):
    """The wide model, whose steps need much more memory while ``tanhs`` > 0 (a longer sequence,
    a bigger image): each tanh keeps another activation of 16 KiB per sample for backward."""

    def __init__(self):
        super().__init__()
        self.body, self.tanhs = wide(), 0

    def forward(self, x):
        h = self.body[1](self.body[0](x))
        for _ in range(self.tanhs):
            h = torch.tanh(h)
        return self.body[2](h)


def drop_and_regrow(out):
    x, y = data(2048 * 10)
    model = Spiky()

    def on_eval(record):
        model.tanhs = 16 if record["step"] == 2 else 0  # a spike for steps 3 and 4

    result = train(model, (x, y), batch_size=2048, max_steps=10, eval_every=2, on_eval=on_eval,
                   memory_limit=rss_bytes() + 450 * MiB, regrow_after=1, out_dir=out,
                   progress=True)
    return {"steps": result.steps, "micros": micros(out)}


def eval_backoff(out):
    x, y = data(512)
    vx, vy = data(16384, seed=1)
    model = wide()
    result = train(model, (x, y), val_data=(vx, vy), batch_size=256, epochs=1,
                   eval_batch_size=16384, memory_limit=rss_bytes() + 350 * MiB, out_dir=out,
                   progress=True)
    from batchfit.data import TensorSource
    from batchfit.inputs import loss_for
    source = TensorSource(vx, vy, shuffle=False)
    smaller = evaluate(model, source, loss_for(source, None), 256)
    return {"val_loss": result.final["val_loss"], "small_batch_val_loss": smaller["loss"],
            "micros": micros(out)}


def resume_run(out, steps, resume):
    x, y = data(4096 * 4)
    result = train(wide(), (x, y), batch_size=4096, max_steps=steps, memory_limit=rss_bytes()
                   + 200 * MiB, regrow_after=0, checkpoint_dir=f"{out}/ckpt", out_dir=f"{out}/run",
                   resume=resume, progress=True)
    return {"params": result.params_sha256, "micros": micros(f"{out}/run")}


def resume_first(out):
    return resume_run(out, 2, False)


def resume_second(out):
    """The rest of the run, then (unlimited) the whole run at the micro-batch it ended at."""
    answer = resume_run(out, 4, True)
    x, y = data(4096 * 4)
    whole = train(wide(), (x, y), batch_size=4096, max_steps=4, out_dir=f"{out}/whole",
                  micro_batch_size=answer["micros"][-1])
    return {**answer, "whole_params": whole.params_sha256}


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[scenario](out)))
'''


def _child(tmp_path: Path, scenario: str) -> tuple[dict, str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), scenario, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        # One malloc arena: glibc opens a new one (64 MiB of address space, counted by the
        # limit) when two threads contend for a lock, which on a busy machine happened mid-run
        # and made a micro-batch that fitted run out of memory: a back-off decided by timing.
        env={**cpu_only_env(), "MALLOC_ARENA_MAX": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_step_out_of_memory_is_redone_smaller_and_ends_with_the_smaller_runs_weights(tmp_path):
    answer, log = _child(tmp_path, "same_weights")
    micros = answer["micros"]
    assert answer["steps"] == len(micros) == 4  # every planned step trained
    assert micros[0] < 4096 and len(set(micros)) == 1  # backed off at once, never regrown
    # the same batches, the same steps: the weights of a run at that micro-batch from the start
    assert answer["gap"] < 1e-6, answer
    assert "out of memory at micro-batch 4096; continuing with 2048 (batch size stays 4096)" in log
    # the result (train --json) reports the micro-batch it trained with, beside the configured
    assert answer["result_micro"] == [micros[-1], 4096]


def test_the_back_off_works_in_bf16_mixed_too(tmp_path):
    answer, log = _child(tmp_path, "same_weights_bf16")
    assert answer["steps"] == len(answer["micros"]) == 1  # the planned step trained
    assert answer["micros"][0] < 4096  # a real out-of-memory error, met under autocast
    assert answer["gap"] < 1e-6 < answer["moved"], answer  # a bf16 run's at that micro-batch
    assert "out of memory at micro-batch 4096" in log


def test_a_memory_spike_drops_the_micro_batch_and_it_grows_back_after_clean_steps(tmp_path):
    answer, log = _child(tmp_path, "drop_and_regrow")
    micros = answer["micros"]
    assert answer["steps"] == len(micros) == 10
    assert micros[:2] == [2048, 2048]  # fits until the spike
    assert micros[2] < 2048  # the spike: backed off
    assert micros[-1] == 2048  # the spike gone: grown back to the configured micro-batch
    assert "steps without running out of memory: trying micro-batch" in log


def test_evaluation_backs_off_on_its_own(tmp_path):
    answer, log = _child(tmp_path, "eval_backoff")
    assert "out of memory while evaluating at batch 16384; continuing with 8192" in log
    assert set(answer["micros"]) == {256}  # training itself never ran out of memory
    assert answer["val_loss"] == pytest.approx(answer["small_batch_val_loss"], rel=1e-5)


def test_a_resumed_run_continues_at_the_micro_batch_it_backed_off_to(tmp_path):
    first, first_log = _child(tmp_path, "resume_first")
    second, second_log = _child(tmp_path, "resume_second")
    assert "out of memory at micro-batch 4096" in first_log
    assert "out of memory" not in second_log  # the checkpoint kept the smaller micro-batch
    assert len(second["micros"]) == 4 and len(set(second["micros"])) == 1
    assert second["micros"][:2] == first["micros"]
    # bitwise the run that used that micro-batch from the start
    assert second["params"] == second["whole_params"]
    saved = torch.load(tmp_path / "out" / "ckpt" / "last.pt", weights_only=True)
    assert saved["backoff"] == {
        "micro_batch_size": second["micros"][-1],
        "eval_batch_size": 4096,
        "regrow_step": None,
    }


MODELS = """
import torch
from torch import nn


def hungry():
    # ~40 KiB of activations per sample kept for backward, little arithmetic
    return nn.Sequential(
        nn.Linear(16, 2048), nn.Tanh(), nn.Sigmoid(), nn.Tanh(), nn.Sigmoid(), nn.Linear(2048, 10)
    )


class Hog(nn.Module):
    # From its third training pass on, every pass needs 1.2 GB, whatever the micro-batch.
    def __init__(self):
        super().__init__()
        self.body, self.passes = nn.Linear(16, 10), 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.passes += 1
            if self.passes > 2:
                torch.empty(300_000_000)
        return self.body(x)


def hog():
    return Hog()
"""


def _parquet(path: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 16, generator=g), torch.randint(0, 10, (rows,), generator=g)
    columns = {f"f{i}": x[:, i].numpy() for i in range(16)} | {"y": y.numpy()}
    pq.write_table(pa.table(columns), path)
    return path


def _train_cli(tmp_path: Path, model: str, rows: int, *extra: str):
    (tmp_path / "models.py").write_text(MODELS)
    data = _parquet(tmp_path / "big.parquet", rows)
    args = ["train", "--model", f"{tmp_path / 'models.py'}:{model}", "--data", str(data)]
    args += ["--target", "y", "--device", "cpu", "--out", str(tmp_path / "run"), *extra]
    return run_cli(args, cwd=tmp_path)


def _micro_column(out: Path) -> list[int]:
    with (out / "metrics.csv").open() as f:
        return [int(row["micro_batch_size"]) for row in csv.DictReader(f)]


def test_the_command_line_trains_every_step_of_a_batch_that_does_not_fit(tmp_path):
    """The issue's command: a batch of 32768 under --memory-limit 1500MB trains every step."""
    done = _train_cli(
        tmp_path, "hungry", 32768, "--batch-size", "32768", "--memory-limit", "1500MB",
        "--epochs", "2", "--val-fraction", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    micros = _micro_column(tmp_path / "run")
    assert len(micros) == 2 and micros[0] < 32768  # both steps, at a micro-batch that fits
    log = " ".join(done.stderr.split())  # the progress display wraps long lines
    said = "out of memory at micro-batch 32768; continuing with 16384 (batch size stays 32768)"
    assert said in log


def test_one_sample_that_does_not_fit_stops_with_one_line_and_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    done = _train_cli(
        tmp_path, "hog", 256, "--batch-size", "64", "--epochs", "1", "--memory-limit",
        "1000MB", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--val-fraction", "0",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]  # errors are printed unwrapped, on one line
    assert error.startswith("batchfit") and "Out of memory at micro-batch 1" in error
    assert "raise --memory-limit above" in error and "smaller model" in error
    assert "checkpoint saved to" in error and "Once more memory is allowed, resume with" in error
    assert (ckpt / "last.pt").exists()
    assert "Traceback" not in done.stderr


def test_a_checkpoint_from_before_back_off_resumes_at_the_configured_sizes(tmp_path):
    from batchfit import train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)

    def run(steps: int, folder: str, resume: bool = False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        return train(model, (x, y), batch_size=32, micro_batch_size=16, max_steps=steps,
                     checkpoint_dir=tmp_path / folder, resume=resume)  # fmt: skip

    whole = run(6, "whole")
    run(3, "old")
    path = tmp_path / "old" / "last.pt"
    saved = torch.load(path, weights_only=True)
    del saved["backoff"], saved["checksum"]  # as written before back-off existed
    torch.save(saved, path)
    resumed = run(6, "old", resume=True)
    assert resumed.resumed_from_step == 3
    assert resumed.params_sha256 == whole.params_sha256
    assert torch.load(path, weights_only=True)["backoff"]["micro_batch_size"] == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_allocator_cap_is_met_and_every_step_trains(tmp_path, capfd):
    """The allocator's own OutOfMemoryError at memory_limit (its per-process memory fraction):
    each step of 16384 samples needs several GiB of activations; 2 GiB hold far fewer."""
    from batchfit import train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16384, 64, generator=g), torch.randint(0, 10, (16384,), generator=g)

    def wide() -> torch.nn.Module:
        torch.manual_seed(0)
        layers = (torch.nn.Linear(64, 65536), torch.nn.ReLU(), torch.nn.Linear(65536, 10))
        return torch.nn.Sequential(*layers)

    capped = wide()
    result = train(capped, (x, y), batch_size=16384, max_steps=3, device="cuda",
                   memory_limit=2 * 2**30, regrow_after=0, out_dir=tmp_path / "capped",
                   progress=True)  # fmt: skip
    micros = _micro_column(tmp_path / "capped")
    assert result.steps == len(micros) == 3 and micros[0] < 16384 and len(set(micros)) == 1
    assert "out of memory at micro-batch 16384; continuing with 8192" in capfd.readouterr().err
    plain = wide()
    train(plain, (x, y), batch_size=16384, max_steps=3, device="cuda", micro_batch_size=micros[0])
    for p, q in zip(capped.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_out_of_memory_in_the_optimizers_update_is_not_redone_but_a_one_line_error(tmp_path):
    """Adam's first update allocates two copies of the 4096 x 4096 weights (128 MiB): past the
    limit there, while forward and backward fit. That step cannot be redone (the update may have
    moved some parameters), and a smaller micro-batch would not shrink the optimizer's state."""
    (tmp_path / "models.py").write_text(
        "from torch import nn\n\ndef heavy():\n    return nn.Sequential(nn.Linear(16, 4096), "
        "nn.Linear(4096, 4096), nn.Linear(4096, 10))\n"
    )
    data = _parquet(tmp_path / "small.parquet", 256)
    ckpt = tmp_path / "ckpt"
    args = ["train", "--model", f"{tmp_path / 'models.py'}:heavy", "--data", str(data)]
    args += ["--target", "y", "--device", "cpu", "--batch-size", "64", "--epochs", "1"]
    args += ["--val-fraction", "0", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "o")]
    limit = _baseline_mib(args, tmp_path) + 100  # room for gradients (64 MiB), not Adam's 128
    done = run_cli([*args, "--memory-limit", f"{limit}MiB"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert "Out of memory in the optimizer's update at step 1" in error
    assert "raise --memory-limit above" in error and "Traceback" not in done.stderr
    assert "continuing with" not in done.stderr  # never redone
    assert "without saving this step" in error and not (ckpt / "last.pt").exists()


def _baseline_mib(args: list[str], cwd: Path) -> int:
    """What ``batchfit train`` holds before its first step, in MiB: read from the refusal of a
    limit that leaves no room (the smallest the option takes)."""
    done = run_cli([*args, "--memory-limit", "1MiB"], cwd=cwd)
    assert done.returncode == 2 and "leaves no room" in done.stderr, done.stderr[-2000:]
    held = done.stderr.split("this process holds ")[1].split(" (")[0]
    number, unit = held.split()
    return int(float(number) * {"MiB": 1, "GiB": 1024}[unit]) + 1


def test_a_regrow_due_at_the_checkpointed_step_is_made_before_the_resumed_runs_first_step(
    tmp_path,
):
    """A checkpoint saved at the step a regrow fell due (here written as if the run had backed off
    to 8 of 32 and was due to try 16 after step 3): the resumed run tries 16 from its first step,
    as the uninterrupted run did, then 32 after ``regrow_after`` more steps."""
    from batchfit import train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)

    def run(steps: int, resume: bool = False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        folders = {"checkpoint_dir": tmp_path / "ckpt", "out_dir": tmp_path / "run"}
        return train(model, (x, y), batch_size=32, max_steps=steps, regrow_after=2,
                     resume=resume, **folders)  # fmt: skip

    run(3)
    path = tmp_path / "ckpt" / "last.pt"
    saved = torch.load(path, weights_only=True)
    saved["backoff"] = {"micro_batch_size": 8, "eval_batch_size": 1024, "regrow_step": 3}
    del saved["checksum"]
    torch.save(saved, path)
    run(7, resume=True)
    assert _micro_column(tmp_path / "run") == [32, 32, 32, 16, 16, 32, 32]
