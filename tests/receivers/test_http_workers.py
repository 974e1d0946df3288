"""``workers: N`` on the ``http`` JSON receiver (agent/workers.py): N processes share the port, each
authenticating and parsing its clients' requests and handing the points to this process's pipeline;
what leaves equals what one process passes on, auth and quota answers are the same, a killed worker is
restarted and counted.

24 aiohttp sessions (one connection each) leave a worker without any with odds ~1e-7; the tests check
each worker took some."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from typing import Any

import aiohttp

from agent.component import ComponentKind, Signal
from agent.confmodel import Size
from agent.model import Batch
from agent.quota import QuotaExceeded
from agent.telemetry import Telemetry
from receivers.http import HttpAuthConfig, HttpConfig, HttpReceiver, HttpTLSConfig
from tests.agent.test_jwt_auth import claims, hs256
from tests.conftest import Certs, Sink, component_settings, free_port, wait_until
from tests.receivers.conftest import Running
from tests.receivers.test_http_jwt import hs_auth

CLIENTS = 24
NOW_MS = int(time.time() * 1000)


def _receiver(consumer: Any, workers: str = "1", **cfg: Any) -> tuple[HttpReceiver, Telemetry]:
    tel = Telemetry()
    config = HttpConfig(endpoint=f"127.0.0.1:{free_port()}", workers=workers, **cfg)
    assert config.validate() == []
    settings = component_settings(tel, ComponentKind.RECEIVER, "http")
    return HttpReceiver(settings, config, {Signal.METRICS: consumer}), tel


def _items(client: int) -> list[dict[str, Any]]:
    """Every kind of item a client sends, with timestamps, and one bad item."""
    return [
        {"name": "orders", "type": "counter", "value": client + 1, "labels": {"client": str(client)},
         "timestamp": NOW_MS},
        {"name": "temperature", "type": "gauge", "value": client / 4, "timestamp": NOW_MS},
        {"name": "latency", "type": "histogram", "value": [client, 2 * client + 1, 250], "unit": "ms",
         "timestamp": NOW_MS},
        {"name": "", "value": 1},  # refused: names what is wrong, the others go through
    ]  # fmt: skip


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int | str, Any]:
    """One request on its own connection: (status, JSON answer), or the error the client saw."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                return resp.status, await resp.json()
        except aiohttp.ClientError as exc:
            return type(exc).__name__, None


async def test_two_workers_pass_on_what_one_process_does(running: Running) -> None:
    one_sink, two_sink = Sink(), Sink()
    one, one_tel = _receiver(one_sink)
    two, two_tel = _receiver(two_sink, workers="2")
    await running.start(one)
    await running.start(two)
    assert two.pool is not None and len(two.pool.pids) == 2
    answers: dict[int, list[Any]] = {}
    for r in (one, two):
        url = f"http://127.0.0.1:{r.port}/v1/metrics"
        answers[r.port or 0] = await asyncio.gather(*(_post(url, _items(i)) for i in range(CLIENTS)))
    assert all(n > 0 for n in two.pool.batches), two.pool.batches  # both workers took a share
    assert answers[one.port or 0] == answers[two.port or 0]
    status, body = answers[two.port or 0][0]
    assert status == 200 and body["accepted"] == 3 and body["errors"][0]["index"] == 3
    assert "name" in body["errors"][0]["reason"]
    assert one_sink.points() and sorted(map(repr, two_sink.points())) == sorted(map(repr, one_sink.points()))
    assert [dict(b.context).get("content-type") for b in two_sink.batches] == ["application/json"] * CLIENTS
    for name in (
        "receiver_accepted_points_total",
        "receiver_refused_points_total",
        "receiver_requests_total",
    ):
        await wait_until(lambda n=name: two_tel.value(n) == one_tel.value(n), f"{name} handed in")


async def test_tokens_are_checked_in_the_worker(running: Running) -> None:
    sink = Sink()
    r, tel = _receiver(sink, workers="2", auth=hs_auth(tenant_claim="org.id"))
    await running.start(r)
    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    token = hs256(claims(tenant=None, org={"id": "org-42"}))
    status, body = await _post(url, _items(1)[:2], {"Authorization": f"Bearer {token}"})
    assert (status, body["accepted"]) == (200, 2)
    assert [b.context.get("auth.tenant") for b in sink.batches] == ["org-42"]
    assert "authorization" not in sink.batches[0].context
    expired = hs256(claims(exp=int(time.time()) - 60))
    status, body = await _post(url, _items(1), {"Authorization": f"Bearer {expired}"})
    assert status == 401 and body["code"] == "unauthorized" and "expired" in body["error"]
    await wait_until(lambda: tel.value("receiver_auth_failures_total", reason="expired") == 1, "counted")


class _QuotaOnce:
    """Refuses the first batch for its tenant's quota, two points fitting; takes the rest."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.refused = False

    async def consume(self, batch: Batch) -> None:
        if not self.refused:
            self.refused = True
            raise QuotaExceeded(
                "team-a", "points_per_second", retry_after_s=2, limit_value=10, remaining=2, fits=2
            )
        self.batches.append(batch)


async def test_a_tenants_quota_takes_what_fits_through_a_worker(running: Running) -> None:
    consumer = _QuotaOnce()
    r, tel = _receiver(consumer, workers="2")
    await running.start(r)
    status, body = await _post(f"http://127.0.0.1:{r.port}/v1/metrics", _items(3)[:3])
    assert status == 200 and body["accepted"] == 2
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(2, "tenant_quota")]
    assert [len(b) for b in consumer.batches] == [2]
    await wait_until(
        lambda: tel.value("receiver_refused_points_total", reason="tenant_quota") == 1, "counted"
    )


async def test_a_killed_worker_is_restarted(running: Running) -> None:
    sink = Sink()
    r, tel = _receiver(sink, workers="2")
    await running.start(r)
    assert r.pool is not None
    victim = r.pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(
        lambda: tel.value("receiver_worker_restarts_total") == 1 and len(r.pool.pids) == 2,  # type: ignore[union-attr]
        "the worker restarted",
    )
    assert victim not in r.pool.pids
    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    answers = await asyncio.gather(*(_post(url, _items(i)[:1]) for i in range(CLIENTS)))
    assert [status for status, _ in answers] == [200] * CLIENTS
    assert all(n > 0 for n in r.pool.batches), r.pool.batches  # the new worker serves too
    assert sum(p.value for p in sink.points()) == sum(i + 1 for i in range(CLIENTS))


def test_workers_setting() -> None:
    assert HttpConfig().workers == "1" and HttpReceiver.reuse_port is False
    assert HttpConfig(workers="auto").validate() == []
    for bad in ("0", "many", "257"):
        assert [p for p, _ in HttpConfig(workers=bad).validate()] == ["workers"]
    ((path, _),) = HttpConfig(workers="2", endpoint="127.0.0.1:0").validate()
    assert path == "workers"
    assert HttpConfig(workers="2", auth=HttpAuthConfig()).validate() == []


async def test_tls_and_the_body_cap_hold_in_the_workers(running: Running, tls_certs: Certs) -> None:
    sink = Sink()
    tls = HttpTLSConfig(cert_file=tls_certs.cert, key_file=tls_certs.key)
    r, tel = _receiver(sink, workers="2", tls=tls, max_request_body_size=Size(4096))
    await running.start(r)
    assert r.pool is not None
    url = f"https://127.0.0.1:{r.port}/v1/metrics"
    client_ctx = ssl.create_default_context(cafile=tls_certs.ca)
    statuses = []
    for i in range(CLIENTS):  # each on its own connection: both workers serve TLS
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=_items(i)[:1], ssl=client_ctx) as resp,
        ):
            statuses.append(resp.status)
    assert statuses == [200] * CLIENTS and all(n > 0 for n in r.pool.batches), r.pool.batches
    big = [{"name": "x" * 100, "value": 1}] * 100
    async with aiohttp.ClientSession() as session, session.post(url, json=big, ssl=client_ctx) as resp:
        assert resp.status == 413
        body = await resp.json()
    assert body["code"] == "body_too_large" and "max_request_body_size (4KiB)" in body["error"]
    refused = "receiver_refused_points_total"
    await wait_until(lambda: tel.value(refused, reason="body_too_large") == 1, "counted")


async def test_the_workers_connections_show_in_the_main_process(running: Running) -> None:
    r, tel = _receiver(Sink(), workers="2")
    await running.start(r)
    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    sessions = [aiohttp.ClientSession() for _ in range(CLIENTS)]
    try:
        for session in sessions:  # each keeps its connection open after its request
            async with session.post(url, json=_items(0)[:1]) as resp:
                assert resp.status == 200
        await wait_until(
            lambda: tel.value("receiver_connections") == CLIENTS, "the workers' connections summed"
        )
    finally:
        for session in sessions:
            await session.close()
    await wait_until(lambda: tel.value("receiver_connections") == 0, "closed connections gone from the sum")


async def test_ctrl_c_leaves_stopping_the_workers_to_the_main_process(running: Running) -> None:
    """SIGINT reaches a terminal's whole process group, SIGTERM a systemd unit's every process (its
    default KillMode): the workers ignore both and keep serving."""
    r, tel = _receiver(Sink(), workers="2")
    await running.start(r)
    assert r.pool is not None
    pids = r.pool.pids
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    before = list(r.pool.batches)
    url = f"http://127.0.0.1:{r.port}/v1/metrics"
    answers = await asyncio.gather(*(_post(url, _items(i)[:1]) for i in range(CLIENTS)))
    assert [status for status, _ in answers] == [200] * CLIENTS
    assert all(now > then for now, then in zip(r.pool.batches, before, strict=True)), r.pool.batches
    assert r.pool.pids == pids and tel.value("receiver_worker_restarts_total") == 0
