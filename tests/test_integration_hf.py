"""The Hugging Face Trainer integration: tuned TrainingArguments on a tiny BERT built from a
config (no download), a real Trainer run with them, and the optional dependency kept optional."""

from __future__ import annotations

import math
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
