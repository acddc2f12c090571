"""Paired PASSION-minus-baseline statistics used by benchmarks/accuracy.py and the demo report."""
from __future__ import annotations

import math

import pytest

from passion.report.paired import paired_comparison, paired_line, rarest_modality, t_interval


def test_t_interval_matches_the_textbook_formula():
    out = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert out["mean"] == pytest.approx(3.0) and out["sd"] == pytest.approx(math.sqrt(2.5))
    assert out["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    single = t_interval([0.2])
    assert single["n"] == 1 and single["ci95"] is None and single["mean"] == pytest.approx(0.2)


def _results(values: dict[str, float]) -> dict:
    subsets = [{"modalities": name.split("+"), "dice": {"WT": v}} for name, v in values.items()]
    return {"subsets": subsets, "mean": {"dice": {"WT": sum(values.values()) / len(values)}}}


def test_paired_differences_and_rarest_modality_groups():
    present = {"a": 10, "b": 2}  # b is the rare modality
    assert rarest_modality(["a", "b"], present) == "b"
    base = [_results({"a": 0.5, "b": 0.2, "a+b": 0.6}), _results({"a": 0.4, "b": 0.3, "a+b": 0.7})]
    pas = [_results({"a": 0.5, "b": 0.4, "a+b": 0.8}), _results({"a": 0.5, "b": 0.3, "a+b": 0.7})]
    out = paired_comparison(base, pas, ["WT"], [present, present])
    assert out["n_seeds"] == 2
    assert out["full_subset"]["WT"]["mean"] == pytest.approx((0.2 + 0.0) / 2)
    assert out["mean_over_subsets"]["WT"]["mean"] == pytest.approx(((0.4 / 3) + (0.1 / 3)) / 2)
    # group b holds the subsets b and a+b: seed 1 mean diff 0.2, seed 2 mean diff 0.0
    assert out["by_rarest_modality"]["b"]["WT"]["mean"] == pytest.approx(0.1)
    assert out["by_rarest_modality"]["a"]["WT"]["mean"] == pytest.approx(0.05)
    assert "2 paired seeds" in paired_line(out)
    one = paired_comparison(base[:1], pas[:1], ["WT"])
    assert "One seed decides nothing" in paired_line(one) and "by_rarest_modality" not in one
    with pytest.raises(ValueError):
        paired_comparison(base, pas[:1], ["WT"])
