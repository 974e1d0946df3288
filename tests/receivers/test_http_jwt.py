"""JWT bearer tokens at the ``http`` receiver, end to end: PyJWT-made tokens posted by a real aiohttp client
to a running receiver (the verifier itself: tests/agent/test_jwt_auth.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from agent.component import ComponentKind, Signal
from agent.config import expand_values, load_yaml
from agent.confmodel import Decoder
from agent.jwt_auth import FAILURE_REASONS, JwtConfig
from agent.telemetry import Telemetry
from receivers.http import HttpAuthConfig, HttpConfig, HttpReceiver, HttpTokenConfig
from tests.agent.test_jwt_auth import SECRET, claims, ec_key, hs256, rsa_key, write_jwks
from tests.conftest import Sink, component_settings
from tests.receivers.conftest import Running

POINT = {"name": "requests", "value": 1}


@dataclass
class Harness:
    receiver: HttpReceiver
    sink: Sink
    tel: Telemetry
    session: aiohttp.ClientSession

    async def post(self, token: str | None) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{self.receiver.port}/v1/metrics"
        async with self.session.post(url, json=[POINT, POINT], headers=headers) as resp:
            return resp.status, await resp.json(), resp

    def failures(self, reason: str) -> float:
        return self.tel.value("receiver_auth_failures_total", reason=reason)

    def tenants(self) -> list[str | None]:
        return [b.context.get("auth.tenant") for b in self.sink.batches]


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(running: Running) -> AsyncIterator[Make]:

    async def build(auth: HttpAuthConfig) -> Harness:
        config = HttpConfig(endpoint="127.0.0.1:0", auth=auth)
        assert config.validate() == [] and config.environment_problems() == []
        tel = Telemetry()
        sink = Sink()
        receiver = HttpReceiver(
            component_settings(tel, ComponentKind.RECEIVER, "http"), config, {Signal.METRICS: sink}
        )
        return Harness(receiver, sink, tel, await running.start(receiver))

    yield build


def hs_auth(**jwt_cfg: Any) -> HttpAuthConfig:
    cfg = {"algorithms": ["HS256"], "secret": SECRET, "audience": "headwater", "issuer": "https://idp.test"}
    return HttpAuthConfig(jwt=JwtConfig(**{**cfg, **jwt_cfg}))


async def test_a_valid_token_delivers_the_points_with_the_claims_tenant(make: Make) -> None:
    h = await make(hs_auth(tenant_claim="org.id"))
    status, body, _ = await h.post(hs256(claims(tenant=None, org={"id": "org-42"})))
    assert (status, body["accepted"]) == (200, 2)
    assert h.tenants() == ["org-42"] and len(h.sink.points()) == 2
    assert "authorization" not in h.sink.batches[0].context
    assert all(h.failures(r) == 0 for r in FAILURE_REASONS)


def _none_token() -> str:
    return jwt.encode(claims(), None, algorithm="none")


REFUSED: list[tuple[str, Callable[[], str], str]] = [
    ("expired", lambda: hs256(claims(exp=int(time.time()) - 3600)), "expired"),
    ("not yet valid", lambda: hs256(claims(nbf=int(time.time()) + 3600)), "not_yet_valid"),
    ("wrong audience", lambda: hs256(claims(aud="billing")), "wrong_audience"),
    ("wrong issuer", lambda: hs256(claims(iss="https://evil.test")), "wrong_issuer"),
    ("bad signature", lambda: hs256(claims(), "another-secret-of-thirty-two-bytes!"), "bad_signature"),
    ("alg none", _none_token, "algorithm_not_allowed"),
    ("alg not allowed", lambda: rsa_key().sign(claims()), "algorithm_not_allowed"),
    ("missing tenant claim", lambda: hs256(claims(tenant=None)), "missing_tenant"),
    ("invalid tenant claim", lambda: hs256(claims(tenant="team/a")), "invalid_tenant"),
    ("no exp", lambda: hs256(claims(exp=None)), "missing_claim"),
    ("not a JWT", lambda: "some-opaque-token", "malformed"),
]


@pytest.mark.parametrize(("token", "reason"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_a_refused_token_answers_401_naming_the_reason(
    make: Make, token: Callable[[], str], reason: str
) -> None:
    h = await make(hs_auth())
    text = token()
    status, body, resp = await h.post(text)
    assert status == 401 and body["code"] == "unauthorized"
    assert body["error"].startswith(f"{reason}: ")
    assert resp.headers["WWW-Authenticate"] == (
        f'Bearer realm="headwater", error="invalid_token", error_description="{reason}"'
    )
    assert text not in body["error"] and text not in str(resp.headers)
    assert h.sink.calls == 0
    assert h.failures(reason) == 1
    assert sum(h.failures(r) for r in FAILURE_REASONS) == 1
    assert h.tel.value("receiver_refused_points_total", reason="unauthorized") == 1
    assert h.tel.value("receiver_requests_total", status="401") == 1


async def test_a_request_without_a_token_is_counted_as_missing(make: Make) -> None:
    h = await make(hs_auth())
    status, body, resp = await h.post(None)
    assert status == 401 and body["error"] == "send Authorization: Bearer <token>"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="headwater"'
    assert h.failures("missing_token") == 1 and h.sink.calls == 0


@pytest.mark.parametrize("key", [rsa_key, ec_key])
async def test_rs256_and_es256_tokens_verify_with_a_key_file(
    make: Make, tmp_path: Path, key: Callable[[], Any]
) -> None:
    pair = key()
    path = tmp_path / "idp.pem"
    path.write_bytes(pair.public_pem)
    h = await make(
        HttpAuthConfig(jwt=JwtConfig(algorithms=[pair.alg], key_file=str(path), audience="headwater"))
    )
    status, _, _ = await h.post(pair.sign(claims(tenant=f"team-{pair.alg.lower()}")))
    assert status == 200 and h.tenants() == [f"team-{pair.alg.lower()}"]
    status, body, _ = await h.post(hs256(claims()))
    assert status == 401 and body["error"].startswith("algorithm_not_allowed: ")


async def test_a_rotated_jwks_file_takes_effect_while_the_receiver_runs(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key().jwk("2026-11"))
    auth = HttpAuthConfig(
        jwt=JwtConfig(algorithms=["RS256", "ES256"], jwks_file=str(path), audience="headwater")
    )
    h = await make(auth)
    old = rsa_key().sign(claims(tenant="before"), kid="2026-11")
    new = ec_key().sign(claims(tenant="after"), kid="2026-12")
    assert (await h.post(old))[0] == 200
    status, body, _ = await h.post(new)
    assert status == 401 and body["error"] == "unknown_key: no ES256 key with kid '2026-12' in the JWKS file"
    write_jwks(path, ec_key().jwk("2026-12"), rsa_key(1).jwk("2026-12-rsa"))  # the new key, new kid
    assert (await h.post(new))[0] == 200
    status, body, _ = await h.post(old)
    assert status == 401 and body["error"].startswith("unknown_key: ")
    assert h.tenants() == ["before", "after"] and h.failures("unknown_key") == 2


async def test_static_tokens_still_work_beside_jwt(make: Make, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text("file-token-1: from-file\n")
    auth = HttpAuthConfig(
        tokens=[HttpTokenConfig("static-token-1", "from-list")],
        tokens_file=str(tokens_file),
        jwt=hs_auth().jwt,
    )
    h = await make(auth)
    for token in ("static-token-1", "file-token-1", hs256(claims(tenant="from-jwt"))):
        assert (await h.post(token))[0] == 200
    assert h.tenants() == ["from-list", "from-file", "from-jwt"]
    status, body, _ = await h.post("static-token-2")  # neither a static token nor a JWT
    assert status == 401 and body["error"].startswith("malformed: ")
    assert h.failures("malformed") == 1 and h.failures("unknown_token") == 0


async def test_a_static_token_matching_wins_over_its_claims(make: Make) -> None:
    # A JWT listed as a static token takes the listed tenant: static entries are looked up first.
    token = hs256(claims(tenant="from-claim"))
    h = await make(HttpAuthConfig(tokens=[HttpTokenConfig(token, "from-list")], jwt=hs_auth().jwt))
    assert (await h.post(token))[0] == 200 and h.tenants() == ["from-list"]


async def test_static_tokens_alone_count_unknown_tokens(make: Make) -> None:
    h = await make(HttpAuthConfig(tokens=[HttpTokenConfig("static-token-1", "t")]))
    status, body, _ = await h.post(hs256(claims()))
    assert status == 401 and body["error"] == "the bearer token is not valid"
    assert h.failures("unknown_token") == 1


# -- config ------------------------------------------------------------------------------------------------
def test_jwt_config_comes_through_the_loader_with_the_secret_from_the_environment() -> None:
    text = """
endpoint: 127.0.0.1:9999
auth:
  jwt:
    algorithms: [HS256]
    secret: ${env:JWT_SECRET}
    audience: headwater
    tenant_claim: org.id
    leeway: 1m
    required_claims: [exp, sub]
"""
    data, env_problems = expand_values(load_yaml(text)[0], {"JWT_SECRET": SECRET})
    decoder = Decoder(lambda _: None)
    cfg = decoder.decode(HttpConfig, data, ("receivers", "http"))
    assert env_problems == [] and decoder.errors == [] and cfg.validate() == []
    jwt_cfg = cfg.auth.jwt
    assert cfg.auth.enabled and jwt_cfg.secret == SECRET and jwt_cfg.leeway == 60.0
    assert list(jwt_cfg.required_claims) == ["exp", "sub"] and jwt_cfg.tenant_claim == "org.id"
    assert SECRET not in repr(cfg)
    data, env_problems = expand_values(load_yaml(text)[0], {})
    cfg = Decoder(lambda _: None).decode(HttpConfig, data, ("receivers", "http"))
    assert [p for p, _ in env_problems] == [("auth", "jwt", "secret")]
    assert [p for p, _ in cfg.validate()] == ["auth::jwt::secret"]  # unset variable: refused, not open


def test_bad_jwt_settings_are_problems_under_auth_jwt(tmp_path: Path) -> None:
    cfg = HttpConfig(auth=HttpAuthConfig(jwt=JwtConfig(algorithms=["none", "HS256"])))
    assert [p for p, _ in cfg.validate()] == ["auth::jwt::algorithms::0", "auth::jwt::secret"]
    missing = tmp_path / "missing-jwks.json"
    cfg = HttpConfig(
        endpoint="127.0.0.1:0",
        auth=HttpAuthConfig(jwt=JwtConfig(algorithms=["RS256"], jwks_file=str(missing))),
    )
    assert cfg.validate() == []
    problems = dict(cfg.environment_problems())
    assert list(problems) == ["auth::jwt::jwks_file"] and str(missing) in problems["auth::jwt::jwks_file"]


async def test_start_fails_on_an_unusable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "idp.pem"
    path.write_text("not a key")
    config = HttpConfig(
        endpoint="127.0.0.1:0", auth=HttpAuthConfig(jwt=JwtConfig(algorithms=["ES256"], key_file=str(path)))
    )
    receiver = HttpReceiver(
        component_settings(Telemetry(), ComponentKind.RECEIVER, "http"), config, {Signal.METRICS: Sink()}
    )
    with pytest.raises(ValueError, match="holds no PEM public key"):
        await receiver.start()
    await receiver.shutdown()
