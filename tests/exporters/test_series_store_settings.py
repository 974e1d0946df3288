"""Both Prometheus exporters check their series-store settings alike (exporters.prometheus_series.
store_problems): remote-write used to accept max_series: 0, which refuses every series."""

from __future__ import annotations

import pytest

from agent.confmodel import Duration
from exporters.prometheus import PrometheusConfig
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig


@pytest.mark.parametrize(
    ("config", "expiration"),
    [
        (
            PrometheusConfig(max_series=0, metric_expiration=Duration(0.0), histogram_buckets=[2.0, 1.0]),
            "metric_expiration",
        ),
        (
            PrometheusRemoteWriteConfig(
                max_series=0, series_expiration=Duration(0.0), histogram_buckets=[2.0, 1.0]
            ),
            "series_expiration",
        ),
    ],
)
def test_series_store_settings_are_checked_alike(
    config: PrometheusConfig | PrometheusRemoteWriteConfig, expiration: str
) -> None:
    problems = dict(config.validate())
    assert problems["max_series"] == "must be at least 1"
    assert problems[expiration] == "must be greater than 0"
    assert "histogram_buckets" in problems
