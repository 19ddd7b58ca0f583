"""torchrun / DistributedDataParallel: real processes, gloo on the CPU, tiny data.

Each test launches ``python -m torch.distributed.run ... -m batchfit train`` (or a script that
calls the library) in a subprocess and compares what it wrote with one plain process given the
same global batch and seed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli, subprocess_env

MODEL = '''
import os
import torch


class Net(torch.nn.Module):
    """A small non-linear net; with BREAK_AT set, rank 1 raises at that forward call."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == int(os.environ.get("BREAK_AT", 0)):
            raise RuntimeError("rank 1 broke on purpose")
        return self.body(x)


def make():
    return Net()
'''

# B=63 over 2 ranks: shares 32 and 31, micro-batches of 8 (accumulation 4, a remainder of 7).
ARGS = ["train", "--example", "linreg", "--model", "ddpnet:make", "--batch-size", "63"]
ARGS += ["--micro-batch-size", "8", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _setup(tmp_path: Path) -> Path:
    (tmp_path / "ddpnet.py").write_text(MODEL)
    return tmp_path


def _launcher(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra, "-m", "batchfit"]


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2, timeout: float = 90, **env: str):
    cmd = _launcher(["--nproc-per-node", str(nproc), "--master-port", str(_free_port())])
    return subprocess.run(
        [*cmd, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(tmp_path, **env),
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def _losses(folder: Path) -> list[float]:
    rows = (folder / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("loss")
    return [float(r.split(",")[column]) for r in rows[1:]]


def test_two_ranks_train_the_weights_of_one_process_and_only_rank_0_writes(tmp_path):
    _setup(tmp_path)
    one = run_cli([*ARGS, "--max-steps", "20", "--out", "one", "--quiet"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path, [*ARGS, "--max-steps", "20", "--out", "two", "--quiet", "--json"])
    assert two.returncode == 0, two.stderr
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    # metrics.csv: the global batch's mean loss, written once (one header, 20 rows)
    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.csv", "model.pt"]
    # one result printed, by rank 0; its counts are what `batchfit plan --world-size 2` says
    assert two.stdout.count('"steps"') == 1

    result = json.loads(two.stdout[two.stdout.index("{") :])
    assert result["world_size"] == 2  # how many processes trained, in the result itself
    plan = run_cli(
        ["plan", "--samples", "8192", "--batch-size", "63", "--micro-batch-size", "8"]
        + ["--world-size", "2", "--max-steps", "20", "--json"]
    )
    planned = json.loads(plan.stdout)
    assert (result["steps"], result["iterations"], result["samples_seen"]) == (
        planned["total_steps"],
        planned["total_iterations"],
        planned["total_samples"],
    )


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_two_ranks_in_a_mixed_precision_train_the_weights_of_one_process(tmp_path, precision):
    _setup(tmp_path)
    mixed = ["--precision", precision, "--max-steps", "12", "--quiet"]
    one = run_cli([*ARGS, *mixed, "--out", "one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path, [*ARGS, *mixed, "--out", "two", "--json"])
    assert two.returncode == 0, two.stderr
    assert f'"precision": "{precision}"' in two.stdout
    # each rank's forward rounds on its own share: equal within the precision's tolerance
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in wa:
        assert wa[key].dtype == torch.float32
        torch.testing.assert_close(wa[key], wb[key], rtol=2e-2, atol=2e-3)


def test_a_checkpoint_resumes_exactly_on_the_same_world_size_and_refuses_another(tmp_path):
    _setup(tmp_path)
    full = _torchrun(tmp_path, [*ARGS, "--max-steps", "16", "--out", "full", "--quiet"])
    assert full.returncode == 0, full.stderr
    first = [*ARGS, "--max-steps", "8", "--checkpoint-dir", "ck", "--quiet"]
    assert _torchrun(tmp_path, first).returncode == 0
    resumed = [*ARGS, "--max-steps", "16", "--checkpoint-dir", "ck", "--resume", "--out", "res"]
    done = _torchrun(tmp_path, [*resumed, "--quiet"])
    assert done.returncode == 0, done.stderr
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "res")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise: same world size, same order
    alone = run_cli([*resumed, "--max-steps", "24"], cwd=tmp_path)
    assert alone.returncode == 2
    message = alone.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "made by 2 training processes, not 1" in message
    assert "under torchrun with 2 processes" in message


def test_a_rank_that_fails_ends_the_job_without_a_hang(tmp_path):
    _setup(tmp_path)
    started = time.monotonic()
    run = _torchrun(tmp_path, [*ARGS, "--max-steps", "50", "--quiet"], timeout=60, BREAK_AT="12")
    assert run.returncode != 0
    assert time.monotonic() - started < 60
    assert "rank 1 broke on purpose" in run.stderr


def test_two_nodes_on_one_machine_train_like_one_process(tmp_path):
    _setup(tmp_path)
    one = run_cli([*ARGS, "--max-steps", "12", "--out", "one", "--quiet"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rdzv += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "batchfit-test"]
    args = [*ARGS, "--max-steps", "12", "--out", "nodes", "--quiet", "--json"]
    nodes = [
        subprocess.Popen(
            [*_launcher([*rdzv, "--node-rank", str(rank)]), *args],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=90) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    _assert_same_weights(tmp_path / "one", tmp_path / "nodes")
    # trained together: node 0's rank alone reports, 4 micro-batches of its 32 per step, not 8
    assert '"iterations": 48' in outputs[0][0] and outputs[1][0].strip() == "", outputs


STREAM_SCRIPT = """
import json, os, sys
import torch
import batchfit
from batchfit.data.stream import open_stream


class Logs(torch.nn.Module):
    # records the row ids (feature 0) of every row it trains on

    def __init__(self):
        super().__init__()
        self.body, self.seen = torch.nn.Linear(2, 1), []

    def forward(self, x):
        if self.training:
            self.seen += x[:, 0].long().tolist()
        return self.body(x / 1000)


if "RANK" in os.environ:
    torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
source = open_stream(sys.argv[1], target="y", shuffle_buffer=100, seed=5)
model = Logs()
args = dict(batch_size=64, micro_batch_size=16, optimizer="sgd", lr=0.001, seed=5)
result = batchfit.train(model, source, **args, **json.loads(sys.argv[3]))
rank = int(os.environ.get("RANK", 0))
out = dict(rank=rank, decoded=source.rows_decoded, seen=model.seen, steps=result.steps)
if len(sys.argv) > 4:  # then: 20 steps straight, or 12 and a resume to 20, on the same ranks
    runs = [dict(max_steps=20), dict(max_steps=12, checkpoint_dir="ck"),
            dict(max_steps=20, checkpoint_dir="ck", resume=True)]
    weights = []
    for extra in runs:
        torch.manual_seed(1)
        model = Logs()
        batchfit.train(model, open_stream(sys.argv[1], target="y", shuffle_buffer=100, seed=5),
                       **args, **extra)
        weights.append(model.state_dict())
    out["resumed_exactly"] = all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    out["resumed_moved"] = not torch.equal(weights[0]["body.weight"], weights[1]["body.weight"])
with open(f"{sys.argv[2]}.{rank}.json", "w") as f:
    json.dump(out, f)
"""


def _stream_file(tmp_path: Path, n: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.arange(n, dtype=np.float32)
    rng = np.random.default_rng(0)
    table = pa.table({"id": ids, "x": rng.normal(size=n).astype(np.float32), "y": ids / n})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=50)
    return path


def _stream_run(
    tmp_path: Path, name: str, nproc: int, *resume: str, **options: object
) -> list[dict]:
    """Train on rows.parquet with ``nproc`` processes; what each rank saw and decoded (and with
    ``resume``, whether 12 steps and a resume to 20 trained the weights of 20 straight)."""
    script = tmp_path / "stream_train.py"
    script.write_text(STREAM_SCRIPT)
    data, out = tmp_path / "rows.parquet", str(tmp_path / name)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        launcher += ["--master-port", str(_free_port())]
    run = subprocess.run(
        [*launcher, str(script), str(data), out, json.dumps(options), *resume],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        env=_env(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


def _batch_sizes(folder: Path) -> list[int]:
    rows = (folder / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("batch_size")
    return [int(r.split(",")[column]) for r in rows[1:]]


def test_a_stream_is_read_once_across_two_ranks_every_row_once_per_epoch_resumes_exactly(
    tmp_path,
):
    # 961 rows at batch 64: 16 steps, the last of 1 row; 2 ranks take 32+32 per step, then 1+0
    # (rank 1 holds no row of the last step and still takes part in its all-reduces)
    n = 961
    _stream_file(tmp_path, n)
    one = _stream_run(tmp_path, "one", 1, epochs=1)[0]
    two = _stream_run(tmp_path, "two", 2, "resume", epochs=2, out_dir="out")
    # decoded: each epoch, plus up to 200 rows (2 windows) read once to check the model
    assert n <= one["decoded"] <= n + 200 and sorted(one["seen"]) == list(range(n))
    assert [r["steps"] for r in two] == [32, 32]  # 2 epochs of 16 steps on every rank
    for r, own in zip(two, (481, 480), strict=True):
        assert len(r["seen"]) == 2 * own  # this rank's rows, each epoch
        # each rank decodes about half: its rows plus at most the 100-row window it shares
        assert 2 * own <= r["decoded"] <= 2 * (own + 100) + 200, r["decoded"]
    for epoch in range(2):
        rows = two[0]["seen"][epoch * 481 : (epoch + 1) * 481]
        rows += two[1]["seen"][epoch * 480 : (epoch + 1) * 480]
        assert sorted(rows) == list(range(n))  # every row exactly once per epoch
    # another grouping than one process: the first global batch holds other rows
    assert sorted(two[0]["seen"][:32] + two[1]["seen"][:32]) != sorted(one["seen"][:64])
    # rank 0 alone wrote metrics.csv, with the global batch sizes of one process
    assert _batch_sizes(tmp_path / "out") == ([64] * 15 + [1]) * 2
    # a checkpoint at step 12 (mid-epoch, each rank part way through its rows) resumed on 2
    # ranks to step 20 (across the epoch's end) gives the weights of 20 steps straight, bitwise
    assert all(r["resumed_exactly"] and r["resumed_moved"] for r in two)


def test_stream_shares_resume_exactly_and_every_rank_takes_the_same_steps(tmp_path):
    from batchfit.data.stream import open_stream

    n = 961
    path = _stream_file(tmp_path, n)
    for world, drop_last in ((2, False), (3, True)):
        end = n - n % 64 if drop_last else n
        shares = []
        for rank in range(world):
            source = open_stream(path, target="y", shuffle_buffer=100, seed=2)
            batches = source.batches(1, 64, drop_last=drop_last, rank=rank, world_size=world)
            shares.append([x[:, 0].long().tolist() for x, _ in batches])
            assert source.rows_decoded <= end / world + 200  # its rows and at most 2 windows
            for step in (1, 7, len(shares[-1]) - 1):  # resumed at a step: the same shares on
                again = source.batches(
                    1, 64, start=64 * step, drop_last=drop_last, rank=rank, world_size=world
                )
                assert [x[:, 0].long().tolist() for x, _ in again] == shares[-1][step:]
        assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
        assert sorted(i for s in shares for b in s for i in b) == sorted(
            i
            for x, _ in open_stream(path, target="y", shuffle_buffer=100, seed=2).batches(
                1, 64, drop_last=drop_last
            )
            for i in x[:, 0].long().tolist()
        )


TUNE_SCRIPT = """
import dataclasses, json, os, sys
import torch
import batchfit

torch.distributed.init_process_group("gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(rank)  # each rank its own model: rank 0's weights count
# rank r runs out of memory training above caps[r] rows (inference, without gradients, fits)
caps = json.loads(os.environ.get("CAPS", "[64, 8]"))


class Capped(torch.nn.Linear):
    def forward(self, x):
        if torch.is_grad_enabled() and len(x) > caps[rank]:
            torch.empty(2**60)  # fails as the allocator does when memory runs out
        return super().forward(x)


data = torch.Generator().manual_seed(3)  # the same data set on every rank, as in training
x = torch.randn(512, 8, generator=data)
y = x @ torch.randn(8, 1, generator=data) + 0.5 * torch.randn(512, 1, generator=data)
lines = []
try:
    result = batchfit.tune(
        Capped(8, 1), (x, y), lr=1e-3, time_budget=6, max_batch_size=128, out_dir="rep",
        log=lines.append,
    )
    out = dataclasses.asdict(result.recommended)
    out["noise_steps"] = result.noise.start_steps + result.noise.steps if result.noise else None
except batchfit.BatchfitError as exc:
    out = {"error": str(exc)}
with open(f"rec.{rank}.json", "w") as f:
    json.dump({**out, "log": lines}, f)
torch.distributed.destroy_process_group()  # left to exit, gloo may abort the process
"""


def _tune_script(tmp_path: Path, **env: str) -> list[dict]:
    """tune_script.py under torchrun on 2 ranks: what each rank returned (or raised) and logged."""
    cmd = _launcher(["--nproc-per-node", "2", "--master-port", str(_free_port())])[:-2]
    run = subprocess.run(
        [*cmd, "tune_script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=90,
        env=_env(tmp_path, **env),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return [json.loads((tmp_path / f"rec.{r}.json").read_text()) for r in (0, 1)]


def test_tune_under_two_ranks_decides_once_writes_once_and_every_rank_holds_the_answer(tmp_path):
    (tmp_path / "tune_script.py").write_text(TUNE_SCRIPT)
    recs = _tune_script(tmp_path)
    logs = [rec.pop("log") for rec in recs]
    assert recs[0] == recs[1] and recs[0]["batch_size"] >= 1
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["recommended"]["batch_size"] == recs[0]["batch_size"]
    # every rank searched its own memory ceiling (rank 1 runs out above 8, rank 0 above 64 and
    # reached at least 32, the doublings made whatever the budget); the minimum won on every rank
    per_rank = report["memory"]["per_rank"]
    assert per_rank[1] == 8 and 32 <= per_rank[0] <= 64, per_rank
    assert report["memory"]["max_micro_batch_size"] == 8 and recs[0]["micro_batch_size"] <= 8
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "minimum of the 2 ranks' ceilings" in md and "rank 1: 8)" in md
    # each rank searched once; rank 0 alone measured throughput on, within the combined ceiling
    assert [sum("memory: micro-batch 1:" in line for line in log) for log in logs] == [1, 1]
    assert any(line.startswith("throughput") for line in logs[0])
    assert not any(line.startswith("throughput") for line in logs[1])
    # the noise scale came from both ranks' gradients (b each) and their all-reduce (2b): rank 1
    # took every joint step rank 0 did (those at the initial weights, the warm-up, the measured)
    noise = report["noise"]
    assert "Measured from 2 ranks' gradients and their all-reduce." in noise["notes"], noise
    assert not any("ranks' gradients" in s for s in report["skipped"])  # a fact, not a shortfall
    assert noise["batch_size"] == 2 * noise["micro_batch_size"] <= 16, noise
    assert 0 < noise["b_simple"] < float("inf") and noise["steps_averaged"] >= 2, noise
    joint = [line for line in logs[1] if line.startswith("noise")]
    assert joint == [f"noise: rank 1 of 2 took {recs[0]['noise_steps']} joint gradient steps"]
    assert any("batch 16 = 2 ranks x 8" in line for line in logs[0]), logs[0]
    # and agrees with one process's probe (batches of 8 x 8) on the same data and weights
    assert 1 / 3 < noise["b_simple"] / _one_process_b_simple() < 3, noise
    # nothing fits on rank 1 (out of memory at 1): every rank raises its one-line error
    failed = _tune_script(tmp_path, CAPS="[64, 0]")
    assert failed[0]["error"] == failed[1]["error"], failed
    assert failed[0]["error"].startswith("On rank 1 of 2: The memory limit"), failed[0]
    assert "\n" not in failed[0]["error"]
    assert not (tmp_path / "rep" / "report.json").exists()  # no earlier report left as its answer
    # the command line: one result printed, by rank 0
    args = ["tune", "--example", "linreg", "--time-budget", "10", "--out", "cli", "--json"]
    cli = _torchrun(tmp_path, args)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.count('"recommended"') == 1, cli.stdout
    written = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert json.loads(cli.stdout)["recommended"] == written["recommended"]
    # on the CPU the default memory limit is rank 0's share of the RAM the 2 processes will use
    assert "shared by the 2 processes" in written["memory"]["limit_source"]
    # rank 0's error (a budget too short to measure) ends every rank, said once
    failed = _torchrun(tmp_path, ["tune", "--example", "linreg", "--time-budget", "2", "--quiet"])
    assert failed.returncode != 0
    assert failed.stderr.count("batchfit tune: error: The time budget") == 1, failed.stderr


def _one_process_b_simple() -> float:
    """TUNE_SCRIPT's task tuned by one process within rank 1's ceiling: its ``B_simple``."""
    import torch

    import batchfit

    data = torch.Generator().manual_seed(3)
    x = torch.randn(512, 8, generator=data)
    y = x @ torch.randn(8, 1, generator=data) + 0.5 * torch.randn(512, 1, generator=data)
    torch.manual_seed(0)  # rank 0's weights
    result = batchfit.tune(torch.nn.Linear(8, 1), (x, y), lr=1e-3, time_budget=3, max_batch_size=8)
    assert result.noise is not None and result.noise.estimate.big_batch_size == 64
    return result.noise.estimate.b_simple


def test_the_error_of_the_ranks_is_reported_by_rank_0_alone(monkeypatch):
    from batchfit import distributed
    from batchfit.errors import BatchfitError, ReportedByRank0

    failed = [(1, "Out of memory.")]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    on_0 = distributed._error_of_ranks(failed, 2)
    assert type(on_0) is BatchfitError and str(on_0) == "On rank 1 of 2: Out of memory."
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    on_1 = distributed._error_of_ranks(failed, 2)
    assert isinstance(on_1, ReportedByRank0) and str(on_1) == str(on_0)
