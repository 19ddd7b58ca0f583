"""torch's threads: ``threads`` for tune, train and sweep (set for the run, set back after); on
an oversubscribed CPU tune measures with the count fastest on a reference workload and says so,
and train warns, naming the option."""

from __future__ import annotations

import pytest
import torch

from batchfit import train
from batchfit.errors import BatchfitError
from batchfit.orchestrate.tune import tune
from batchfit.probe.machine import MachineCheck, choose_threads, fastest_threads, thread_counts
from batchfit.report.tune_report import train_command
from batchfit.threads import torch_threads, usable_cores
from helpers import blobs


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


class CountsThreads(torch.nn.Module):
    """Records torch's thread count at each forward pass: what the run trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.seen = mlp(), set()

    def forward(self, x):
        self.seen.add(torch.get_num_threads())
        return self.net(x)


def test_the_fastest_count_wins_and_of_near_ties_the_fewest():
    assert fastest_threads({1: 0.010, 2: 0.006, 8: 0.050}) == 2
    assert fastest_threads({1: 0.0100, 2: 0.0098, 4: 0.0099}) == 1  # within 5%: fewer threads
    assert thread_counts(cores=2, default=8) == [1, 2, 8]


def test_an_oversubscribed_cpu_is_measured_on_the_fastest_count_and_the_answer_says_so():
    cores = usable_cores()
    crowded = MachineCheck(cores, cores + 6, 0.0, 0.01, 0.01, ())  # more threads than cores
    chosen = choose_threads(crowded, given=None)
    assert set(chosen.threads_seconds) == set(thread_counts(cores, cores + 6))
    assert chosen.threads_used == fastest_threads(chosen.threads_seconds)
    assert chosen.threads_how.startswith("the fastest of ")
    assert f"train with threads={chosen.threads_used}." in chosen.warnings[-1]
    quiet = choose_threads(MachineCheck(cores, 1, 0.0, 0.01, 0.01, ()), None)
    assert quiet.threads_used == 1 and not quiet.threads_seconds
    assert choose_threads(crowded, given=3).threads_how == "given"


def test_tune_measures_with_the_threads_given_and_sets_the_callers_back():
    before = torch.get_num_threads()
    model = CountsThreads()
    result = tune(model, blobs(400), lr=1e-3, time_budget=6, threads=1)
    assert model.seen == {1} and torch.get_num_threads() == before
    report = result.to_report()
    assert (report["machine"]["threads_used"], report["machine"]["threads_how"]) == (1, "given")
    assert "--threads 1" in train_command(report)
    with pytest.raises(BatchfitError, match="'threads' option must be an int >= 1"):
        tune(mlp(), blobs(100), threads=0)


def test_train_runs_on_the_threads_given_and_sets_them_back():
    before = torch.get_num_threads()
    model = CountsThreads()
    train(model, blobs(200), batch_size=32, epochs=1, threads=1)
    assert model.seen == {1} and torch.get_num_threads() == before


def test_train_on_more_threads_than_cores_warns_and_names_the_option(capfd):
    crowded = usable_cores() + 2
    with torch_threads(crowded):
        train(mlp(), blobs(200), batch_size=32, epochs=1, progress=True)
        (warning,) = [s for s in capfd.readouterr().err.splitlines() if "threads on" in s]
        assert f"warning: torch runs {crowded} threads on {usable_cores()} usable cores" in warning
        assert "give threads=1 or" in warning
        train(mlp(), blobs(200), batch_size=32, epochs=1, progress=True, threads=1)
        assert "threads on" not in capfd.readouterr().err
