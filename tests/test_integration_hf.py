"""The Hugging Face Trainer integration: tuned TrainingArguments on a tiny BERT built from a
config (no download), a real Trainer run with them, and the optional dependency kept optional."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import subprocess_env


def _tiny_bert_task(n: int = 384, length: int = 12):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, length), generator=g)
    labels = (ids[:, 0] >= 50).long()
    mask = torch.ones(length, dtype=torch.long)
    data = [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]
    return transformers, model, data


def test_tuned_arguments_set_the_measured_sizes_and_lr_and_a_trainer_trains_with_them(tmp_path):
    transformers, model, data = _tiny_bert_task()
    from batchfit.integrations.hf import tuned_arguments

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        learning_rate=5e-5,
        max_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    lines: list[str] = []
    tuned, result = tuned_arguments(
        model, data, args, time_budget=8, max_batch_size=64, log=lines.append
    )
    r = result.recommended
    assert tuned is not args
    assert tuned.per_device_train_batch_size == r.micro_batch_size
    assert tuned.gradient_accumulation_steps == r.accumulation
    assert tuned.learning_rate == r.lr
    assert r.micro_batch_size * r.accumulation == r.batch_size <= 64
    assert r.optimizer == "adamw"  # the Trainer's default optimizer family
    # The user's arguments are untouched, and the reasons are said.
    assert (args.per_device_train_batch_size, args.learning_rate) == (8, 5e-5)
    assert any(f"batch size {r.batch_size}" in line for line in lines)
    assert any(line.startswith("batchfit: Memory") for line in lines)
    # A real Trainer runs with the returned arguments, at that batch size.
    trainer = transformers.Trainer(model=model, args=tuned, train_dataset=data)
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[0] == r.micro_batch_size
    out = trainer.train()
    assert out.global_step == 3
    assert torch.isfinite(torch.tensor(out.training_loss))


IMPORT_CHECK = """
import sys
import batchfit
batchfit.tune
print("transformers" in sys.modules)
"""


def test_importing_batchfit_and_its_tune_does_not_import_transformers():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if it were not installed
from batchfit.errors import BatchfitError
try:
    import batchfit.integrations.hf
except BatchfitError as exc:
    print(exc)
"""


def test_the_hf_integration_without_transformers_names_the_extra_in_one_line():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRANSFORMERS],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message
    assert "transformers" in message and "batchfit[hf]" in message


def test_samples_of_different_lengths_are_measured_at_the_longest_and_a_padding_trainer_trains(
    tmp_path,
):
    """Tokenized without padding (lengths 3-12), as for a collator that pads each batch: tune
    measures at the longest, and a Trainer with such a collator trains at the answer."""
    transformers, model, fixed = _tiny_bert_task(n=256)
    from batchfit.integrations.hf import tuned_arguments

    lengths = torch.randint(3, 13, (len(fixed),), generator=torch.Generator().manual_seed(1))
    data = [
        {
            "input_ids": s["input_ids"][:n],
            "attention_mask": s["attention_mask"][:n],
            "labels": s["labels"],
        }
        for s, n in zip(fixed, lengths.tolist(), strict=True)
    ]

    def pad_each_batch(samples):
        longest = max(len(s["input_ids"]) for s in samples)
        batch = {
            key: torch.stack([F.pad(s[key], (0, longest - len(s[key]))) for s in samples])
            for key in ("input_ids", "attention_mask")
        }
        batch["labels"] = torch.stack([s["labels"] for s in samples])
        return batch

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    lines: list[str] = []
    tuned, result = tuned_arguments(
        model, data, args, time_budget=8, max_batch_size=64, log=lines.append
    )
    assert any("measured at the longest, 12 tokens" in line for line in lines)
    assert result.recommended.micro_batch_size * result.recommended.accumulation <= 64
    trainer = transformers.Trainer(
        model=model, args=tuned, train_dataset=data, data_collator=pad_each_batch
    )
    assert trainer.train().global_step == 3


def test_a_tiny_gpt2_language_model_is_measured_on_its_own_loss_and_trains_at_the_answer(tmp_path):
    """Labels per token (a causal language model, GPT-2 built from a config): tune measures the
    model's own loss on samples of different lengths, and a Trainer trains at its answer."""
    transformers = pytest.importorskip("transformers")
    from batchfit.integrations.hf import tuned_arguments

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(192):
        n = int(torch.randint(4, 17, (), generator=g))
        start = int(torch.randint(0, 40, (), generator=g))
        ids = (torch.arange(n) + start) % 50  # counting: learnable
        data.append(
            {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long), "labels": ids}
        )

    def pad_each_batch(samples):
        longest = max(len(s["input_ids"]) for s in samples)
        pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {
            key: torch.stack([F.pad(s[key], (0, longest - len(s[key])), value=v) for s in samples])
            for key, v in pads.items()
        }

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    lines: list[str] = []
    tuned, result = tuned_arguments(
        model, data, args, time_budget=8, max_batch_size=64, log=lines.append
    )
    r = result.recommended
    assert any("measured at the longest, 16 tokens" in line for line in lines)
    assert tuned.per_device_train_batch_size == r.micro_batch_size
    assert tuned.learning_rate == r.lr
    report = result.to_report()
    assert report["throughput"] and report["memory"]  # measured on the model's own loss
    trainer = transformers.Trainer(
        model=model, args=tuned, train_dataset=data, data_collator=pad_each_batch
    )
    out = trainer.train()
    assert out.global_step == 3 and math.isfinite(out.training_loss)


def _args(transformers, tmp_path, **given):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        **{"max_steps": 3, **given},
    )


def _warmup(lines: list[str]) -> tuple[int, float]:
    """``(batch, lr)`` of tune's noise warm-up line."""
    (line,) = [s for s in lines if s.startswith("noise: warm-up from the initial weights")]
    match = re.search(r"batch (\d+) = .* lr ([0-9.e+-]+)$", line)
    assert match, line
    return int(match[1]), float(match[2])


@pytest.fixture(scope="module")
def hf_race_skipped(tmp_path_factory):
    """100 samples, too few to hold the race's 32 out: the race is skipped on any machine. The
    user's learning rate 5e-5 at per-device batch 8 and accumulation 2 (a batch of 16)."""
    transformers, model, data = _tiny_bert_task(n=100)
    from batchfit.integrations.hf import tuned_arguments

    args = _args(
        transformers,
        tmp_path_factory.mktemp("hf"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=5e-5,
    )
    lines: list[str] = []
    # A long planned run (tune's horizon, given over the arguments' epochs), so that tuning
    # pays for itself and every phase runs.
    tuned, result = tuned_arguments(
        model, data, args, time_budget=8, max_batch_size=32, log=lines.append, max_steps=100_000
    )
    return lines, result


def test_the_users_learning_rate_is_the_prior_at_the_batch_they_set(hf_race_skipped):
    """The noise probe warms up at the user's lr (5e-5 at their batch of 16, scaled by the AdamW
    rule), not at batchfit's default of 1e-3 at 32; and it is a prior, not a fixed lr."""
    lines, result = hf_race_skipped
    batch, lr = _warmup(lines)
    assert lr == pytest.approx(5e-5 * math.sqrt(batch / 16), rel=1e-2)
    # not frozen (tune's lr= says "rule from 5e-05 at 16"): the range test measures
    assert "rule from 5e-05 at 16" not in result.recommended.lr_rule


def _options_tune_gets(monkeypatch, model, data, runs) -> list[dict]:
    """What ``tuned_arguments`` passes to tune for each ``(arguments, tune options)`` of ``runs``
    (tune itself replaced: what it was given is all these tests need)."""
    import batchfit.integrations.hf as hf

    seen: list[dict] = []

    def record(*_, **options):
        seen.append(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "tune", record)
    for args, given in runs:
        with pytest.raises(KeyboardInterrupt):
            hf.tuned_arguments(model, data, args, **given)
    return seen


def test_the_users_lr_reaches_tune_as_the_prior_unless_tune_options_give_one(
    tmp_path, monkeypatch
):
    transformers, model, data = _tiny_bert_task(n=40)
    args = _args(
        transformers, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3,
        learning_rate=2e-5,
    )  # fmt: skip
    options = ({}, {"lr": 1e-4}, {"warmup_lr": 3e-4, "lr_batch_size": 64})
    seen = _options_tune_gets(monkeypatch, model, data, [(args, given) for given in options])
    plain, own_lr, own_prior = seen
    assert (plain["warmup_lr"], plain["lr_batch_size"]) == (2e-5, 12) and "lr" not in plain
    assert own_lr["lr"] == 1e-4 and "warmup_lr" not in own_lr and "lr_batch_size" not in own_lr
    assert (own_prior["warmup_lr"], own_prior["lr_batch_size"]) == (3e-4, 64)


def test_the_trainers_length_is_tunes_horizon_unless_tune_options_give_one(
    tmp_path, monkeypatch
):
    transformers, model, data = _tiny_bert_task(n=40)
    lengths = [
        ({"num_train_epochs": 2.5, "max_steps": -1}, {}),
        ({"max_steps": 300}, {}),
        ({}, {"epochs": 7}),
    ]
    runs = [
        (_args(transformers, tmp_path, per_device_train_batch_size=4, **length), given)
        for length, given in lengths
    ]
    by_epochs, by_steps, own = _options_tune_gets(monkeypatch, model, data, runs)
    assert by_epochs["epochs"] == 3 and "max_steps" not in by_epochs  # a part epoch counts
    assert by_steps["max_steps"] == 300 and "epochs" not in by_steps  # steps override epochs
    assert own["epochs"] == 7


def test_a_skipped_race_and_every_skipped_phase_are_logged(hf_race_skipped):
    lines, result = hf_race_skipped
    assert result.race is None and result.skipped
    (race,) = [s for s in lines if s.startswith("batchfit: race: ")]
    why = next(s for s in result.skipped if s.startswith("The race"))  # time or samples
    assert race.startswith("batchfit: race: not run") and race.endswith(why)
    for skipped in result.skipped:
        assert f"batchfit: skipped: {skipped}" in lines


def test_a_provisional_answer_says_so_in_the_log(hf_race_skipped):
    from dataclasses import replace

    from batchfit.integrations.tune_log import log_tune_result

    _, result = hf_race_skipped
    cut = replace(
        result,
        batch_size_choice=replace(
            result.batch_size_choice, provisional=("the memory search ran out of time",)
        ),
    )
    info: list[str] = []
    warned: list[str] = []
    log_tune_result(cut, info.append, warned.append)
    assert any(w.startswith("batchfit: PROVISIONAL") for w in warned), warned
    assert any("the memory search ran out of time" in w for w in warned), warned
    quiet: list[str] = []
    log_tune_result(result, quiet.append, warned.append)
    assert not any("PROVISIONAL" in s for s in quiet) or result.provisional


def test_token_ids_beyond_the_vocabulary_are_one_line_naming_the_id_and_the_embedding(tmp_path):
    transformers, model, data = _tiny_bert_task(n=40)
    from batchfit.errors import BatchfitError
    from batchfit.integrations.hf import tuned_arguments

    data[7] = {**data[7], "input_ids": data[7]["input_ids"].clone()}
    data[7]["input_ids"][3] = 150  # the vocabulary holds 100 ids
    with pytest.raises(BatchfitError) as caught:
        tuned_arguments(model, data, _args(transformers, tmp_path), time_budget=5)
    message = str(caught.value)
    assert "\n" not in message and "nn.Embedding" not in message
    assert "150" in message and "100" in message and "input_ids" in message
    assert "resize_token_embeddings" in message


@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_an_empty_dataset_is_one_line_saying_it_is_empty(tmp_path, which):
    transformers, model, data = _tiny_bert_task(n=40)
    from batchfit.errors import BatchfitError
    from batchfit.integrations.hf import tuned_arguments

    given = {"train_dataset": [], "eval_dataset": data} if which == "train_dataset" else {
        "train_dataset": data, "eval_dataset": []}  # fmt: skip
    with pytest.raises(BatchfitError) as caught:
        tuned_arguments(model, args=_args(transformers, tmp_path), time_budget=5, **given)
    message = str(caught.value)
    assert "\n" not in message and "empty" in message and which in message


FLAGS = [({"bf16": True}, "bf16-mixed"), ({"fp16": True}, "16-mixed"), ({}, "32")]


@pytest.mark.parametrize(("flags", "measured"), FLAGS)
def test_tune_measures_in_the_training_arguments_precision(tmp_path, flags, measured):
    transformers = pytest.importorskip("transformers")
    from batchfit.integrations.hf import _arguments_as_tune_options

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          **flags)  # fmt: skip
    options: dict = {}
    _arguments_as_tune_options(options, torch.nn.Linear(2, 2), args, None)
    assert options["precision"] == measured
    given = {"precision": "32"}  # the caller's own choice stands
    _arguments_as_tune_options(given, torch.nn.Linear(2, 2), args, None)
    assert given["precision"] == "32"
    assert "compile" not in options
    compiled = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                              report_to=[], torch_compile=True)  # fmt: skip
    _arguments_as_tune_options(options, torch.nn.Linear(2, 2), compiled, None)
    assert options["compile"] is True
