"""What the bench measures and how it reports it: percentiles, failed requests, swap errors, timing."""

from __future__ import annotations

import pytest

from bench.common import percentile, wrk_latencies


def test_load_generator_percentiles_interpolate_like_every_other_percentile() -> None:
    samples = [float(x) for x in range(1, 101)]
    figures = wrk_latencies(samples[::-1])
    assert figures["p50_us"] == pytest.approx(50.5)  # not the 51st value
    for q in (50, 90, 99, 99.9):
        assert figures[f"p{str(q).replace('.', '')}_us"] == pytest.approx(percentile(samples, q))
    assert figures["max_us"] == 100.0 and figures["mean_us"] == pytest.approx(50.5)
