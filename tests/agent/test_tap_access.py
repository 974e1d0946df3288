"""Who may see what flows: the telemetry endpoint bound beyond loopback needs a bearer token for the
tap, the page and /api/* (403 without one configured, the rest open as before), and with a token the
tap and the status answer 401 to a request without it or with another one, while /metrics, /healthz
and /readyz stay open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.admin import AdminServer
from agent.config import ConfigError, build_config
from agent.registry import builtin_factories
from agent.service import Agent


def _config(telemetry: dict[str, Any]) -> Any:
    cfg = yaml.safe_load(
        """
        receivers: {http: {endpoint: "127.0.0.1:0"}}
        exporters: {debug: {}}
        service: {pipelines: {metrics: {receivers: [http], exporters: [debug]}}}
        """
    )
    cfg["service"]["telemetry"] = telemetry
    return build_config(cfg, builtin_factories())


@pytest.mark.parametrize("endpoint", ["0.0.0.0:8888", "[::]:8888", "10.1.2.3:8888", "agent.example:8888"])
def test_a_wider_bind_without_a_token_still_loads(endpoint: str) -> None:
    # The image binds 0.0.0.0 for the kubelet's probes: an observability feature must not stop the start.
    assert _config({"endpoint": endpoint}).service.telemetry.endpoint == endpoint


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8888", "[::1]:8888", "localhost:8888", "127.0.0.2:1", ""])
def test_loopback_needs_no_token(endpoint: str) -> None:
    assert _config({"endpoint": endpoint}).service.telemetry.endpoint == endpoint


def test_a_wider_bind_with_a_token_loads() -> None:
    config = _config({"endpoint": "0.0.0.0:8888", "auth": {"bearer_token": "s3cret"}})
    assert config.service.telemetry.auth.bearer_token == "s3cret"


def test_token_and_token_file_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"auth.*only one of bearer_token, bearer_token_file"):
        _config({"auth": {"bearer_token": "a", "bearer_token_file": "/x"}})


def test_tap_limits_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        _config({"tap": {"buffer": 0, "rate_limit_per_s": 0, "max_subscribers": -1}})
    text = "\n".join(err.value.problems)
    for key in ("tap::buffer", "tap::rate_limit_per_s", "tap::max_subscribers"):
        assert key in text


async def _statuses(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return r.status


async def test_with_a_token_requests_without_it_or_with_another_get_401() -> None:
    agent = Agent(_config({"auth": {"bearer_token": "s3cret"}}))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    try:
        port = admin.port
        assert await _statuses(port, "/status") == 401
        assert await _statuses(port, "/status", {"Authorization": "Bearer nope"}) == 401
        assert await _statuses(port, "/status", {"Authorization": "Basic czNjcmV0"}) == 401
        assert await _statuses(port, "/status", {"Authorization": "Bearer s3cret"}) == 200
        assert await _statuses(port, "/status?access_token=s3cret") == 200
        assert await _statuses(port, "/status?access_token=s3cre") == 401
        for open_path in ("/metrics", "/healthz"):
            assert await _statuses(port, open_path) == 200
        assert await _statuses(port, "/readyz") in (200, 503)  # answered, not refused
    finally:
        await admin.shutdown()


async def test_a_token_file_is_read_at_start_and_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    agent = Agent(_config({"auth": {"bearer_token_file": str(token)}}))
    admin = AdminServer(agent, "127.0.0.1:0")
    await admin.start()
    try:
        assert await _statuses(admin.port, "/status", {"Authorization": "Bearer first"}) == 200
        token.write_text("second-token\n")  # another size: the change is seen by the next stat
        assert await _statuses(admin.port, "/status", {"Authorization": "Bearer first"}) == 401
        assert await _statuses(admin.port, "/status", {"Authorization": "Bearer second-token"}) == 200
    finally:
        await admin.shutdown()


async def test_a_missing_token_file_stops_the_start(tmp_path: Path) -> None:
    agent = Agent(_config({"auth": {"bearer_token_file": str(tmp_path / "absent")}}))
    admin = AdminServer(agent, "127.0.0.1:0")
    with pytest.raises(OSError):
        await admin.start()
    await admin.shutdown()


async def test_a_wider_bind_without_a_token_locks_the_data(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(_config({"endpoint": "0.0.0.0:0"}))
    admin = AdminServer(agent, "0.0.0.0:0")
    await admin.start()
    try:
        port = admin.port
        for locked in ("/", "/api/overview", "/api/tap"):
            url = f"http://127.0.0.1:{port}{locked}"
            async with aiohttp.ClientSession() as http, http.get(url) as r:
                assert r.status == 403, locked
                assert "bearer_token" in await r.text()
        for open_path in ("/metrics", "/healthz", "/status"):
            assert await _statuses(port, open_path) == 200, open_path
        assert any("reachable beyond this machine" in m for m in caplog.messages)
    finally:
        await admin.shutdown()
