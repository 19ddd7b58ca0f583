"""Reports say what their measurements show: tune's throughput sentence, the sweep verdict's
noise thresholds and the sweep plots with tune's own run."""

from __future__ import annotations

from batchfit.core.recommend import throughput_sentence
from batchfit.core.sweep_claims import check_claims
from batchfit.core.sweep_inputs import Target
from batchfit.core.sweep_records import SizeSummary
from batchfit.core.sweep_verdict import verdict
from batchfit.report.sweep_plots import plot_time_to_target, time_to_target_points
from batchfit.report.tune_report import reasons_line

#: Throughput that rises to B=64, then falls.
RISES_THEN_FALLS = [(16, 100.0), (32, 190.0), (64, 300.0), (128, 240.0), (256, 200.0)]
GROWS_CLAIM = (
    "Throughput still grows by 10% or more with each doubling up to the largest size measured "
    "(256)."
)


def test_tune_decision_never_claims_growth_beside_a_falling_throughput_table():
    said = throughput_sentence(None, RISES_THEN_FALLS)
    assert "grows by 10%" not in said
    assert "B=64" in said and "fall" in said
    assert "B=128" in said and "B=256" in said
    # Throughput that really grows keeps the claim.
    growing = [(b, 100.0 * b) for b in (16, 32, 64)]
    assert throughput_sentence(None, growing) == GROWS_CLAIM.replace("(256)", "(64)")


def test_tune_reasons_line_says_throughput_falls_after_its_peak():
    report = {
        "throughput_flattens_at": None,
        "throughput": [{"batch_size": b, "samples_per_s": s} for b, s in RISES_THEN_FALLS],
        "noise": {"b_simple": None},
        "memory": {"capped_by": "memory", "max_micro_batch_size": 256},
    }
    line = reasons_line(report)
    assert "still grows" not in line
    assert "peaks at 64" in line


def _size(batch_size: int, val_acc: float, gap: float) -> dict:
    point = {"reached": False, "steps": None, "samples_seen": None, "seconds": None}
    return {
        "batch_size": batch_size,
        "lr": 1e-3,
        "steps": 10,
        "curve": [],
        "best": {"value": val_acc, "step": 10},
        "gap": {"accuracy": gap},
        "sharpness": None,
        "time_to_target": point,
    }


def _records(sizes: list[dict]) -> list[SizeSummary]:
    """The summaries as the claims and the verdict read them (sweep.json keeps the dicts)."""
    return [SizeSummary.from_dict(s) for s in sizes]


def test_sweep_gap_claim_differences_of_a_few_samples_in_360_are_within_noise():
    # Gaps that grow by 2, 3 and 5 samples out of 360 (2x the sampling error is ~11 samples).
    sizes = [_size(b, 0.9, (10 + k) / 360) for b, k in ((32, 0), (64, 2), (128, 5), (256, 7))]
    claims = {c.claim: c for c in check_claims(_records(sizes), "val_accuracy", 360)}
    gap = claims["The train-validation gap grows with batch size"]
    assert gap.outcome == "within noise"
    assert "2x the validation sampling error" in gap.detail
    # A gap that really grows, by 60 samples and more, still holds.
    wide = [_size(b, 0.9, k / 360) for b, k in ((32, 0), (64, 60), (128, 120), (256, 180))]
    claims = {c.claim: c for c in check_claims(_records(wide), "val_accuracy", 360)}
    assert claims["The train-validation gap grows with batch size"].outcome == "holds"


def test_sweep_sizes_claim_never_reads_a_tie_as_does_not_hold():
    target = Target("val_accuracy", 0.99, True)
    # B=8 is best by one sample in 360 over B=32: a tie within noise.
    sizes = [_size(8, 0.9, 0.0), _size(32, 0.9 - 1 / 360, 0.0), _size(1024, 0.8, 0.0)]
    result = verdict(_records(sizes), "val_accuracy", target, val_samples=360)
    claim = next(c for c in result.claims if c.claim.endswith("are the sizes to try"))
    assert claim.outcome == "within noise"
    assert "B=32 inside is within noise" in claim.detail
    # An exact tie with a loss (no sampling error known) is a tie as well.
    losses = [_size(8, 0.5, 0.0), _size(32, 0.5, 0.0), _size(1024, 0.9, 0.0)]
    target = Target("val_loss", 0.01, False)
    result = verdict(_records(losses), "val_loss", target)
    claim = next(c for c in result.claims if c.claim.endswith("are the sizes to try"))
    assert claim.outcome != "does not hold"
    # A clear win outside 32-256 still does not hold.
    clear = [_size(8, 0.95, 0.0), _size(32, 0.8, 0.0), _size(1024, 0.7, 0.0)]
    target = Target("val_accuracy", 0.99, True)
    result = verdict(_records(clear), "val_accuracy", target, val_samples=360)
    claim = next(c for c in result.claims if c.claim.endswith("are the sizes to try"))
    assert claim.outcome == "does not hold"


def test_sweep_time_to_target_plot_data_includes_tunes_own_run(tmp_path):
    target = Target("val_accuracy", 0.85, True)
    curve = [
        {"step": 5, "samples_seen": 480, "train_seconds": 0.5, "val_accuracy": 0.7},
        {"step": 10, "samples_seen": 960, "train_seconds": 1.0, "val_accuracy": 0.9},
    ]
    sizes = [_size(b, 0.8, 0.0) for b in (32, 64, 128, 256)]
    result = {
        "sizes": sizes,
        "runs": [{"batch_size": 96, "lr": 0.01, "curve": curve, "for_tune": True}],
        "target": target.to_dict() | {"source": "given"},
        "settings": {"budget": {"epochs": 1}},
    }
    points = time_to_target_points(result, "seconds")
    assert [p["value"] for p in points if not p["tune"]] == [None] * 4
    assert [p for p in points if p["tune"]] == [
        {"batch_size": 96, "value": 1.0, "diverged": False, "tune": True}
    ]
    # The plot draws from the same data.
    assert plot_time_to_target(result, tmp_path / "t.png")
