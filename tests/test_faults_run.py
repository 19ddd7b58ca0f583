"""Reliability suite: runs that never lose work (issue 17).

Each test walks one fault for real: folders that cannot be written, a checkpoint damaged on disk,
two runs on one folder, a full disk, a foreign metrics log, user code that raises, a NaN loss, and
Ctrl-C during tune. Real files, real processes, real signals; nothing is mocked.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

import pytest
import torch

from batchfit import NonFiniteLossError, TensorSource, train
from batchfit.data.torch_dataset import DatasetSource
from helpers import blobs, run_cli, subprocess_env

#: A short run of the built-in linreg example: one epoch, a checkpoint at its end.
SHORT = ["train", "--example", "linreg", "--batch-size", "64", "--epochs", "1", "--quiet"]


def _short(epochs: int, *extra: str) -> list[str]:
    """:data:`SHORT` for ``epochs`` epochs, then ``extra``."""
    return [*SHORT[:6], str(epochs), *SHORT[7:], *extra]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _unwritable_folder() -> Path:
    """A folder that exists and takes no new file, even for root (sysfs)."""
    folder = Path("/sys")
    try:
        (folder / "batchfit-probe").touch()
    except OSError:
        return folder
    pytest.skip("/sys takes files here")


@pytest.mark.parametrize("option", ["--checkpoint-dir", "--out"])
def test_an_unwritable_folder_is_refused_before_training(option, tmp_path):
    other = "--out" if option == "--checkpoint-dir" else "--checkpoint-dir"
    argv = [*SHORT, option, str(_unwritable_folder()), other, str(tmp_path / "other")]
    got = run_cli(argv, cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    line = _one_line(got.stderr)
    assert f"Cannot write to {option} '/sys'" in line and "choose a folder" in line
    assert not (tmp_path / "other" / "last.pt").exists()  # refused before any training


def test_a_folder_under_a_regular_file_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    got = run_cli([*SHORT, "--checkpoint-dir", str(tmp_path / "afile" / "ck")], cwd=tmp_path)
    assert got.returncode == 2 and "Cannot create --checkpoint-dir" in _one_line(got.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_dir_is_refused_before_training(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        got = run_cli([*SHORT, "--checkpoint-dir", str(folder)], cwd=tmp_path)
    finally:
        folder.chmod(0o700)
    assert got.returncode == 2 and "Cannot write to --checkpoint-dir" in _one_line(got.stderr)


def _flip_tensor_bytes(path: Path) -> None:
    """Flip bytes in the middle of the largest tensor's storage inside the checkpoint's zip."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert entry.compress_type == zipfile.ZIP_STORED
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[entry.header_offset + 26 : entry.header_offset + 30]
    )
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    for i in range(start, start + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_resume_with_a_typo_in_the_checkpoint_folder_is_refused_not_started_over(tmp_path):
    """A typo in the folder of a long run must not silently train it again from step 0. A
    folder that does not exist with no checkpoint of a close name beside it starts a new run
    (the same command launches and relaunches a job), and says so."""
    first = run_cli([*SHORT, "--checkpoint-dir", "ckpt"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    got = run_cli([*SHORT, "--checkpoint-dir", "ckpy", "--resume"], cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    line = _one_line(got.stderr)
    assert "--resume: the checkpoint folder 'ckpy' does not exist, but 'ckpt' beside it" in line
    assert "leave out --resume to start a new run in 'ckpy'" in line
    assert not (tmp_path / "ckpy").exists()
    started = run_cli([*SHORT[:-1], "--checkpoint-dir", "other", "--resume"], cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "No checkpoint in other yet; starting from the beginning." in started.stderr


def test_a_checkpoint_with_flipped_tensor_bytes_is_refused_on_resume(tmp_path):
    folders = ["--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "o")]
    assert run_cli(_short(1, *folders)).returncode == 0
    _flip_tensor_bytes(tmp_path / "ck" / "last.pt")
    got = run_cli(_short(2, *folders, "--resume"))
    assert got.returncode == 2, got.stderr
    line = _one_line(got.stderr)
    assert "last.pt' is damaged" in line and "checksum" in line


def _start_training(tmp_path: Path, out: str, *extra: str) -> subprocess.Popen:
    args = ["train", "--example", "linreg", "--batch-size", "2", "--epochs", "2", "--quiet"]
    args += ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args, "--out", str(tmp_path / out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_second_run_on_a_checkpoint_dir_in_use_is_refused_naming_the_holder(tmp_path):
    first = _start_training(tmp_path, "a")
    try:
        _wait_for(lambda: (tmp_path / "ck" / "last.pt").exists(), first)
        second = run_cli(
            ["train", "--example", "linreg", "--batch-size", "2", "--epochs", "2", "--quiet"]
            + ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1", "--resume"]
            + ["--out", str(tmp_path / "b")]
        )
        assert first.poll() is None  # the first run is unharmed
    finally:
        first.kill()  # SIGKILL: no exit handler runs, the lock dies with its holder
        first.communicate(timeout=60)
    assert second.returncode == 2, second.stderr
    line = _one_line(second.stderr)
    assert f"--checkpoint-dir '{tmp_path / 'ck'}' is in use by process {first.pid}" in line
    # The first run is gone, and so is its lock (the lock file itself stays): a resume there
    # takes the folder and writes checkpoints again.
    last = tmp_path / "ck" / "last.pt"
    assert (tmp_path / "ck" / ".batchfit.lock").exists()
    written = last.stat().st_mtime_ns
    resumed = _start_training(tmp_path, "c", "--resume")
    try:
        _wait_for(lambda: last.stat().st_mtime_ns != written, resumed)
    finally:
        resumed.send_signal(signal.SIGTERM)
        resumed.communicate(timeout=60)


def test_a_full_disk_under_metrics_csv_is_one_line_naming_the_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.csv").symlink_to("/dev/full")
    got = run_cli([*SHORT, "--out", str(out)])
    assert got.returncode == 2, got.stderr
    assert f"No space left on '{out}'" in _one_line(got.stderr)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_checkpoint_that_does_not_fit_is_one_line_and_the_previous_one_is_kept(tmp_path):
    ck = tmp_path / "ck"
    assert run_cli(_short(1, "--checkpoint-dir", str(ck)), cwd=tmp_path).returncode == 0
    before = (ck / "last.pt").read_bytes()
    metrics = tmp_path / "batchfit-run" / "metrics.csv"
    assert metrics.stat().st_size < len(before) // 2
    resumed = _short(2, "--checkpoint-dir", str(ck), "--resume")
    got = run_cli(resumed, cwd=tmp_path, preexec_fn=_limit_file_size(len(before) // 2))
    assert got.returncode == 2, got.stderr
    line = _one_line(got.stderr)
    assert f"No space left on '{ck}'" in line and "the previous checkpoint there was kept" in line
    assert (ck / "last.pt").read_bytes() == before
    assert not list(ck.glob(".last.pt.*.tmp"))


def test_an_empty_metrics_csv_is_started_over_on_resume(tmp_path):
    folders = ["--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "o")]
    assert run_cli(_short(1, *folders)).returncode == 0
    (tmp_path / "o" / "metrics.csv").write_text("")
    got = run_cli(_short(2, *folders, "--resume"))
    assert got.returncode == 0, got.stderr
    lines = (tmp_path / "o" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,batch_size") and len(lines) > 1


def test_a_metrics_csv_from_something_else_is_one_line_naming_it_on_resume(tmp_path):
    folders = ["--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "o")]
    assert run_cli(_short(1, *folders)).returncode == 0
    (tmp_path / "o" / "metrics.csv").write_text("a,b\n1,2\n")
    got = run_cli(_short(2, *folders, "--resume"))
    assert got.returncode == 2, got.stderr
    line = _one_line(got.stderr)
    assert f"'{tmp_path / 'o' / 'metrics.csv'}' is not the metrics log" in line
    assert "--out" in line


class _FailsAt(torch.utils.data.Dataset):
    """A dataset whose item ``bad`` raises, as a user's dataset might."""

    def __init__(self, bad: int) -> None:
        self.x, self.y = blobs(64)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise KeyError(f"no such record: {i}")
        return self.x[i], self.y[i]


def test_a_user_dataset_that_raises_saves_a_checkpoint_and_reraises_its_own_error(tmp_path):
    model = torch.nn.Linear(4, 3)
    data = _FailsAt(bad=40)
    with pytest.raises(KeyError, match="no such record: 40") as info:
        train(
            model,
            DatasetSource(data, shuffle=False),
            batch_size=8,
            epochs=1,
            checkpoint_dir=tmp_path,
        )
    exc = info.value
    assert exc.batchfit_step == 5 and exc.checkpoint_path == str(tmp_path / "last.pt")
    assert "training stopped at step 6 (epoch 1)" in exc.__notes__[0]
    assert "resume=True" in exc.__notes__[0]
    files = [f.f_code.co_filename for f, _ in traceback.walk_tb(exc.__traceback__)]
    ours = [f for f in files if "/batchfit/" in f]
    assert files[0] == __file__ and ours == [files[1]]
    assert ours[0].endswith("orchestrate/train_auto.py")  # batchfit.train, the call they made
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["position"]["step"] == 5


def test_a_user_forward_that_raises_is_their_traceback_and_how_to_resume_on_the_cli(tmp_path):
    (tmp_path / "bad_model.py").write_text(
        "import torch\n\n"
        "class Flaky(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(32, 1)\n"
        "        self.calls = 0\n\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.calls == 8:\n"
        "            raise RuntimeError('the user model broke')\n"
        "        return self.lin(x)\n\n"
        "def flaky():\n"
        "    return Flaky()\n"
    )
    argv = ["train", "--model", f"{tmp_path / 'bad_model.py'}:flaky", "--example", "linreg"]
    argv += [
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--quiet",
        "--checkpoint-dir",
        str(tmp_path / "c2"),
    ]
    got = run_cli(argv, cwd=tmp_path)
    err = got.stderr
    assert got.returncode == 1, err
    assert "bad_model.py" in err and "RuntimeError: the user model broke" in err
    assert "/batchfit/" not in err and "src/batchfit" not in err
    assert "training stopped at step" in err and "Resume with: batchfit train" in err
    assert (tmp_path / "c2" / "last.pt").exists()


def test_a_nan_loss_without_a_checkpoint_dir_does_not_claim_one_was_kept():
    x, y = blobs(100)
    x[3] = float("nan")
    source = TensorSource(x, y, shuffle=False)
    with pytest.raises(NonFiniteLossError) as info:
        train(torch.nn.Linear(4, 3), source, batch_size=10, epochs=1)
    message = str(info.value)
    assert "last good checkpoint" not in message
    assert "no checkpoint was saved, as no 'checkpoint_dir' was given" in message


def test_a_nan_loss_before_the_first_save_says_none_was_written(tmp_path):
    x, y = blobs(100)
    x[3] = float("nan")
    source = TensorSource(x, y, shuffle=False)
    with pytest.raises(NonFiniteLossError) as info:
        train(torch.nn.Linear(4, 3), source, batch_size=10, epochs=1, checkpoint_dir=tmp_path)
    assert "before any checkpoint was saved" in str(info.value)
    assert not (tmp_path / "last.pt").exists()


def test_ctrl_c_during_tune_leaves_the_previous_report_intact(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    old = {"report.json": '{"recommended": {"batch_size": 64}}\n', "report.md": "# old\n"}
    for name, text in old.items():
        (out / name).write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", "tune", "--example", "linreg", "--lr", "0.01"]
        + ["--time-budget", "30", "--seed", "1", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    seen = []
    for line in proc.stderr:  # the first progress line of the memory probe: measuring has begun
        seen.append(line)
        if "] memory:" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0, seen
    for name, text in old.items():
        assert (out / name).read_text() == text
    assert not list(out.glob(".report.*"))


def test_ctrl_c_during_sweep_leaves_the_previous_report_intact(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    old = {"sweep.json": '{"runs": []}\n', "sweep.md": "# old sweep\n"}
    for name, text in old.items():
        (out / name).write_text(text)
    # B=1 finishes in a blink, the full batch takes seconds: the signal lands in the second run.
    args = ["sweep", "--batch-sizes", "1,N", "--steps", "20", "--eval-points", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    _wait_for(lambda: bool(list((out / "runs").glob("b*.json"))), proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    for name, text in old.items():
        assert (out / name).read_text() == text
    assert not list(out.glob(".report.*"))


def test_an_auto_run_killed_while_tuning_resumes_by_tuning_again(tmp_path):
    """SIGKILL while tune measures (before auto.json or any checkpoint): the same command with
    --resume tunes again, then trains, instead of refusing a run that trained nothing."""
    argv = ["train", "--example", "linreg", "--batch-size", "auto", "--tune-budget", "30"]
    argv += ["--max-steps", "3", "--seed", "1", "--checkpoint-dir", "ck"]  # progress shown
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchfit", *argv],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    seen = []
    for line in proc.stderr:  # the memory probe's first progress line: tune is measuring
        seen.append(line)
        if "memory:" in line:
            break
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen
    assert not [p.name for p in (tmp_path / "ck").glob("*.*") if p.suffix in (".json", ".pt")]
    resumed = run_cli([*argv, "--tune-budget", "6", "--resume", "--quiet"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    said = [s for s in resumed.stderr.splitlines() if s.startswith("batchfit train: ")]
    assert "stopped before it trained" in said[0] and "tuning again" in said[0], said
    assert said[1].startswith("batchfit train: tune chose "), said
    assert (tmp_path / "ck" / "auto.json").exists() and (tmp_path / "ck" / "last.pt").exists()
