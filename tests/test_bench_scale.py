"""The cost curve's arithmetic (benchmarks/bench_scale.py): exponent fits and extrapolation."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.bench_scale import STAGES, extrapolate, fit_affine, fit_exponent, report


def test_exponent_fit_recovers_a_known_power_law():
    users = [20, 60, 200, 600]
    b, a = fit_exponent(users, [3.0 * u**1.5 for u in users])
    assert b == pytest.approx(1.5) and math.exp(a) == pytest.approx(3.0)
    assert extrapolate((b, a), 10**6) == pytest.approx(3.0 * 1e9)
    flat = fit_exponent(users, [28.0, 28.0, 28.0, 28.0])  # a fixed cost grows with exponent 0
    assert flat[0] == pytest.approx(0.0, abs=1e-12)
    # Least squares, not two-point: b of noisy data is the slope of the log-log regression line.
    assert fit_exponent([1, 10, 100], [1.0, 10.0 * 1.1, 100.0])[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_exponent([100, 100], [1.0, 2.0])


def test_affine_fit_separates_fixed_from_per_user_cost():
    users = [10, 30, 100, 300]
    fixed, per_user = fit_affine(users, [120.0 + 0.5 * u for u in users])
    assert fixed == pytest.approx(120.0) and per_user == pytest.approx(0.5)
    assert fit_affine(users, [0.5 * u - 3 for u in users])[0] == 0.0  # never a negative fixed cost


def test_report_writes_the_documented_keys(tmp_path):
    figures = tmp_path / "runs" / "figures"
    figures.mkdir(parents=True)
    for users in (10, 100):
        stages = {n: {"seconds": users * (i + 1) * 0.2, "cpu_seconds": users * (i + 1) * 0.1, "peak_rss_mb": 100.0 + users}
                  for i, n in enumerate(STAGES)}
        (figures / f"size-{users}.json").write_text(json.dumps({
            "users": users, "stages": stages, "llm_calls": 9 * users, "llm_tokens": 2000 * users,
            "llm_prompt_tokens": 1500 * users, "llm_completion_tokens": 500 * users, "batch_rounds": 40,
            "memories": 90 * users, "simulate_timing": {"scored": 50 * users}}))
    result = report(tmp_path / "runs", tmp_path / "docs")
    written = json.loads((tmp_path / "docs" / "results" / "scale.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert [s["users"] for s in written["sizes"]] == [10, 100]
    assert set(written["sizes"][0]) >= {"users", "stages", "llm_calls", "llm_tokens"}
    assert set(written["exponents"]) == set(STAGES) and written["exponents"]["embed"] == pytest.approx(1.0)
    top = written["extrapolated"]["1000000"]
    assert top["dominant"] == STAGES[-1] and top["llm_calls"] == 9_000_000
    assert top["stages"]["embed"]["cpu_seconds"] == pytest.approx(0.3 * 1e6, rel=1e-6)
    assert top["gpu_estimates"]["simulate_agent_seconds"] == pytest.approx(50 * 1e6 / 1000)
    assert (tmp_path / "docs" / "scale.png").stat().st_size > 0
