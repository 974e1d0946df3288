"""examples/drift-retrain.yaml, run as written: a model's score distribution shifts, ``drift``'s PSI
passes the rule's level, and ``threshold/retrain`` POSTs its templated job request to a real local
job API once — a second shift within the cooldown is held back and counted. Simulated time (an
injected clock) stands in for the example's 6 h baseline and 15 min windows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from agent import exphist
from agent.component import ComponentKind
from agent.config import load_config
from agent.model import Kind, MetricBatch, Point, Temporality
from agent.registry import builtin_factories
from agent.telemetry import Telemetry
from processors.drift import DriftProcessor
from processors.threshold import ThresholdProcessor
from tests.conftest import Sink, component_settings, free_port, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "drift-retrain.yaml"
WINDOW_S = 900.0
T0 = (1_700_000_000 // WINDOW_S + 1) * WINDOW_S + 1.0
"""Just after a window boundary."""


class JobApi:
    """A local job API: keeps each request's Authorization header and JSON body."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def create_job(request: web.Request) -> web.Response:
            self.requests.append((request.headers.get("Authorization", ""), json.loads(await request.read())))
            return web.json_response({"id": len(self.requests)}, status=201)

        app = web.Application()
        app.router.add_post("/api/v1/jobs", create_job)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def job_api() -> AsyncIterator[JobApi]:
    api = JobApi()
    await api.start()
    yield api
    await api.stop()


def scores(model: str, values: np.ndarray) -> Point:
    """A StatsD timer flush of prediction scores (a DELTA exponential histogram)."""
    h = exphist.from_values(values, max_buckets=2048, max_scale=8)
    return Point(
        "model.score", Kind.HISTOGRAM, (("model", model),), 0, histogram=h, temporality=Temporality.DELTA
    )


async def test_a_score_shift_starts_one_retraining_job_and_the_cooldown_holds_the_next(
    job_api: JobApi, tmp_path: Path
) -> None:
    environ = {
        "RETRAIN_URL": f"http://127.0.0.1:{job_api.port}/api/v1/jobs",
        "RETRAIN_TOKEN": "t0ken",
        "HEADWATER_STATE_DIR": str(tmp_path),
    }
    config = load_config(str(EXAMPLE), builtin_factories(), environ=environ)
    specs = {str(cid): spec.config for cid, spec in config.processors.items()}
    clock = [T0]
    tel = Telemetry()
    alerting = ThresholdProcessor(
        component_settings(tel, ComponentKind.PROCESSOR, "threshold/retrain", logger="test.retrain"),
        specs["threshold/retrain"],
        Sink(),
        clock=lambda: clock[0],
    )
    drift = DriftProcessor(
        component_settings(tel, ComponentKind.PROCESSOR, "drift"),
        specs["drift"],
        alerting,
        clock=lambda: clock[0],
        run_timer=False,
    )
    rng = np.random.default_rng(17)

    async def window(fraud_mean: float) -> None:
        """One 15 min window of scores of two models (fraud's centred on ``fraud_mean``), then its end."""
        await drift.consume(
            MetricBatch(
                (
                    scores("fraud", np.clip(rng.normal(fraud_mean, 0.1, 2000), 1e-3, 1.0)),
                    scores("churn", np.clip(rng.normal(0.6, 0.1, 2000), 1e-3, 1.0)),
                )
            )
        )
        clock[0] += WINDOW_S
        await drift.tick()

    await alerting.start()
    await drift.start()
    try:
        for _ in range(24):  # the 6 h baseline
            await window(0.3)
        await window(0.3)  # compared with the baseline: no drift
        assert alerting.engine.series and not alerting.engine.firing_counts.get(
            ("model_score_drift", "warning")
        )
        await window(0.5)  # fraud's scores shift
        await wait_until(lambda: len(job_api.requests) == 1, "the retraining job request")
        await window(0.3)  # back: resolved (send_resolved: false, so no request)
        await window(0.5)  # shifts again 30 min after the job started: within the 6 h cooldown
        await alerting.tick()
        assert (
            tel.value("alert_notifications_suppressed_total", rule="model_score_drift", reason="cooldown")
            == 1
        )
        held = alerting.status()["held_notifications"]
        assert [(h["group_labels"], h["reason"]) for h in held] == [({"model": "fraud"}, "cooldown")]
    finally:
        await drift.shutdown()
        await alerting.shutdown()
    assert len(job_api.requests) == 1
    authorization, body = job_api.requests[0]
    assert authorization == "Bearer t0ken"
    assert body["job"] == "retrain" and body["model"] == "fraud"
    assert body["psi"] > 0.25 and body["reason"].startswith(f"score drift: psi {body['psi']!r} since 20")
    assert len(body["alert"]) == 16
