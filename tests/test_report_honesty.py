"""Reports say what their measurements show: tune's throughput sentence, the sweep verdict's
noise thresholds and the sweep plots with tune's own run."""

from __future__ import annotations

from batchfit.report.tune_report import honest_decision, reasons_line

#: Throughput that rises to B=64, then falls.
RISES_THEN_FALLS = [(16, 100.0), (32, 190.0), (64, 300.0), (128, 240.0), (256, 200.0)]
GROWS_CLAIM = (
    "Throughput still grows by 10% or more with each doubling up to the largest size measured "
    "(256)."
)


def test_tune_decision_never_claims_growth_beside_a_falling_throughput_table():
    lines = honest_decision(["Left out B=1: ...", GROWS_CLAIM], RISES_THEN_FALLS)
    assert lines[0] == "Left out B=1: ..."
    said = lines[1]
    assert "grows by 10%" not in said
    assert "B=64" in said and "fall" in said
    assert "B=128" in said and "B=256" in said
    # Throughput that really grows keeps the claim.
    growing = [(b, 100.0 * b) for b in (16, 32, 64)]
    assert honest_decision([GROWS_CLAIM], growing) == [GROWS_CLAIM]


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
