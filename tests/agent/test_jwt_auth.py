"""agent.jwt_auth: the ``jwt`` auth block and its verifier, with tokens made by PyJWT and keys made by
``cryptography`` here (the receiver end to end: tests/receivers/test_http_jwt.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from agent.jwt_auth import FAILURE_REASONS, JwtConfig, JwtRefused, JwtVerifier

SECRET = "s3cret-of-at-least-thirty-two-bytes!"
LOG = logging.getLogger("test.jwt_auth")


# -- keys and tokens (used by tests/receivers/test_http_jwt.py too) ----------------------------------------
@dataclass(frozen=True)
class KeyPair:
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, kid: str | None, **extra: str) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        data: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        if kid is not None:
            data["kid"] = kid
        return {**data, **extra}

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": kid} if kid else None)


@cache
def rsa_key(n: int = 0, bits: int = 2048) -> KeyPair:
    """RSA keys, made once per (n, bits) per test session: generating one takes tens of milliseconds."""
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=bits), "RS256")


@cache
def ec_key(n: int = 0) -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), "ES256")


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid claim set (tenant acme, audience headwater, issuer idp); ``None`` values drop a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "svc",
        "iat": now,
        "exp": now + 300,
        "aud": "headwater",
        "iss": "https://idp.test",
        "tenant": "acme",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    """Writes a JWKS file the way a mounted Secret changes: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(keys)}))
    os.replace(tmp, path)


def verifier(**cfg: Any) -> JwtVerifier:
    config = JwtConfig(**{"audience": "headwater", "issuer": "https://idp.test", **cfg})
    assert config.validate() == []
    v = JwtVerifier(config, LOG)
    v.load()
    return v


def hs_verifier(**cfg: Any) -> JwtVerifier:
    return verifier(**{"algorithms": ["HS256"], "secret": SECRET, **cfg})


def refusal(v: JwtVerifier, token: str) -> JwtRefused:
    with pytest.raises(JwtRefused) as info:
        v.verify(token)
    assert not token or token not in str(info.value)  # never echoed
    assert info.value.reason in FAILURE_REASONS
    return info.value


# -- accepted tokens ------------------------------------------------------------------------------------
def test_hs256_token_gives_its_tenant() -> None:
    assert hs_verifier().verify(hs256(claims())) == "acme"


@pytest.mark.parametrize(
    ("tenant_claim", "payload", "tenant"),
    [
        ("org.id", {"org": {"id": "team-7"}}, "team-7"),
        ("https://example.com/org", {"https://example.com/org": "team-8"}, "team-8"),
        ("org.id", {"org.id": "flat", "org": {"id": "nested"}}, "flat"),  # the literal name wins
        ("org_id", {"org_id": 42}, "42"),  # a numeric id names the tenant as its decimal text
    ],
)
def test_tenant_claim_may_be_a_dotted_path(tenant_claim: str, payload: dict[str, Any], tenant: str) -> None:
    token = hs256(claims(tenant=None) | payload)
    assert hs_verifier(tenant_claim=tenant_claim).verify(token) == tenant


@pytest.mark.parametrize("key", [rsa_key, ec_key])
def test_rs256_and_es256_verify_with_a_pem_key_file(tmp_path: Path, key: Callable[[], KeyPair]) -> None:
    pair = key()
    path = tmp_path / "key.pem"
    path.write_bytes(pair.public_pem)
    v = verifier(algorithms=[pair.alg], key_file=str(path))
    assert v.verify(pair.sign(claims(tenant="team-b"))) == "team-b"
    other = rsa_key(1) if pair.alg == "RS256" else ec_key(1)
    assert refusal(v, other.sign(claims())).reason == "bad_signature"


def test_key_file_may_be_a_certificate(tmp_path: Path) -> None:
    pair = rsa_key()
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "idp.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pair.private.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(pair.private, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = tmp_path / "idp.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert verifier(algorithms=["RS256"], key_file=str(path)).verify(pair.sign(claims())) == "acme"


def test_leeway_allows_clock_skew_and_no_more() -> None:
    token = hs256(claims(exp=int(time.time()) - 10))
    assert hs_verifier(leeway=30.0).verify(token) == "acme"
    assert refusal(hs_verifier(leeway=0.0), token).reason == "expired"


def test_no_audience_configured_accepts_tokens_without_one_and_refuses_tokens_naming_one() -> None:
    v = hs_verifier(audience="", issuer="")
    assert v.verify(hs256(claims(aud=None, iss=None))) == "acme"
    assert v.verify(hs256(claims(aud=None, iss="anyone"))) == "acme"  # no issuer configured: not checked
    assert refusal(v, hs256(claims())).reason == "wrong_audience"


def test_a_token_may_name_several_audiences() -> None:
    assert hs_verifier().verify(hs256(claims(aud=["billing", "headwater"]))) == "acme"


# -- refused tokens -------------------------------------------------------------------------------------
def _none_token() -> str:
    return jwt.encode(claims(), None, algorithm="none")


REFUSALS: list[tuple[str, Callable[[], str], str, str]] = [
    ("expired", lambda: hs256(claims(exp=int(time.time()) - 3600)), "expired", "expired at"),
    ("nbf ahead", lambda: hs256(claims(nbf=int(time.time()) + 3600)), "not_yet_valid", "(nbf at"),
    ("iat ahead", lambda: hs256(claims(iat=int(time.time()) + 3600)), "not_yet_valid", "(iat at"),
    ("wrong audience", lambda: hs256(claims(aud="other")), "wrong_audience", "not 'headwater'"),
    ("no audience", lambda: hs256(claims(aud=None)), "wrong_audience", "names no audience"),
    (
        "wrong issuer",
        lambda: hs256(claims(iss="https://evil.test")),
        "wrong_issuer",
        "not 'https://idp.test'",
    ),
    ("no issuer", lambda: hs256(claims(iss=None)), "wrong_issuer", "names no issuer"),
    (
        "other secret",
        lambda: hs256(claims(), "another-secret-of-thirty-two-bytes!"),
        "bad_signature",
        "signature",
    ),
    ("alg none", _none_token, "algorithm_not_allowed", "'none'"),
    (
        "alg HS512",
        lambda: jwt.encode(claims(), SECRET * 2, algorithm="HS512"),
        "algorithm_not_allowed",
        "'HS512'",
    ),
    ("alg RS256", lambda: rsa_key().sign(claims()), "algorithm_not_allowed", "allowed: HS256"),
    ("no exp", lambda: hs256(claims(exp=None)), "missing_claim", "'exp'"),
    ("exp not a number", lambda: hs256(claims(exp="tomorrow")), "malformed", "(exp) must be an integer"),
    ("no tenant", lambda: hs256(claims(tenant=None)), "missing_tenant", "no 'tenant' claim"),
    ("tenant with a slash", lambda: hs256(claims(tenant="a/b")), "invalid_tenant", "'a/b': bad_character"),
    ("reserved tenant", lambda: hs256(claims(tenant="..")), "invalid_tenant", "reserved"),
    ("empty tenant", lambda: hs256(claims(tenant="")), "invalid_tenant", "empty"),
    ("tenant too long", lambda: hs256(claims(tenant="t" * 151)), "invalid_tenant", "too_long"),
    ("tenant a list", lambda: hs256(claims(tenant=["a"])), "invalid_tenant", "not a string"),
    ("not a JWT", lambda: "opaque-static-looking-token", "malformed", "not a well-formed JWT"),
]


@pytest.mark.parametrize(("token", "reason", "text"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refusals_name_what_failed(token: Callable[[], str], reason: str, text: str) -> None:
    refused = refusal(hs_verifier(), token())
    assert refused.reason == reason
    assert text in refused.message


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (f"{_b64(b'[' * 5000 + b']' * 5000)}.{_b64(b'{}')}.", "malformed"),
        (jwt.api_jws.PyJWS().encode(b"[" * 100_000 + b"]" * 100_000, SECRET, algorithm="HS256"), "malformed"),
        (f"{_b64(json.dumps({'alg': ['HS256']}).encode())}.{_b64(b'{}')}.", "algorithm_not_allowed"),
        (f"{_b64(json.dumps({'alg': 'HS256', 'kid': {'k': 1}}).encode())}.{_b64(b'{}')}.", "malformed"),
        (hs256(claims(exp=float("inf"))), "malformed"),
        ("a.b.c.d", "malformed"),
        ("", "malformed"),
    ],
    ids=[
        "deep header",
        "deep signed payload",
        "alg a list",
        "kid an object",
        "infinite exp",
        "four parts",
        "empty",
    ],
)
def test_hostile_tokens_are_refused_not_raised(token: str, reason: str) -> None:
    assert refusal(hs_verifier(), token).reason == reason


def test_required_claims_are_enforced() -> None:
    v = hs_verifier(required_claims=["exp", "sub"])
    refused = refusal(v, hs256(claims(sub=None)))
    assert (refused.reason, refused.message) == ("missing_claim", "the token lacks the required claim 'sub'")


def test_a_bad_signature_is_found_before_the_claims_are_read() -> None:
    # An expired token signed with the wrong key is a forgery first: nothing in it is believed.
    token = hs256(claims(exp=int(time.time()) - 3600), "another-secret-of-thirty-two-bytes!")
    assert refusal(hs_verifier(), token).reason == "bad_signature"


def test_an_hs256_token_keyed_with_the_public_key_does_not_pass(tmp_path: Path) -> None:
    # Algorithm confusion: HS256 tokens are checked against secret only, never against a public key.
    pair = rsa_key()
    path = tmp_path / "key.pem"
    path.write_bytes(pair.public_pem)
    v = verifier(algorithms=["RS256", "HS256"], secret=SECRET, key_file=str(path))
    assert v.verify(hs256(claims())) == "acme"
    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{_b64(header)}.{_b64(json.dumps(claims()).encode())}"
    signature = hmac.new(pair.public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert refusal(v, f"{signing_input}.{_b64(signature)}").reason == "bad_signature"


def test_an_es256_token_is_not_checked_against_an_rsa_key(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_key().public_pem)
    v = verifier(algorithms=["RS256"], key_file=str(path))
    assert refusal(v, ec_key().sign(claims())).reason == "algorithm_not_allowed"


# -- JWKS -------------------------------------------------------------------------------------------------
def test_jwks_key_is_chosen_by_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key().jwk("r1"), rsa_key(1).jwk("r2"), ec_key().jwk("e1"))
    v = verifier(algorithms=["RS256", "ES256"], jwks_file=str(path))
    assert v.verify(rsa_key(1).sign(claims(tenant="two"), kid="r2")) == "two"
    assert v.verify(ec_key().sign(claims(tenant="ec"), kid="e1")) == "ec"
    assert refusal(v, rsa_key(1).sign(claims(), kid="r1")).reason == "bad_signature"
    refused = refusal(v, rsa_key().sign(claims(), kid="r9"))
    assert (refused.reason, refused.message) == ("unknown_key", "no RS256 key with kid 'r9' in the JWKS file")
    refused = refusal(v, rsa_key().sign(claims()))  # no kid and two RSA keys could fit
    assert refused.reason == "unknown_key" and "names no kid" in refused.message
    # kid e1 is an EC key: an RS256 token naming it finds no RS256 key.
    assert refusal(v, rsa_key().sign(claims(), kid="e1")).reason == "unknown_key"


def test_jwks_without_kids_serves_tokens_without_kid_when_one_key_fits(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key().jwk(None), ec_key().jwk(None))
    v = verifier(algorithms=["RS256", "ES256"], jwks_file=str(path))
    assert v.verify(rsa_key().sign(claims())) == "acme"
    assert v.verify(ec_key().sign(claims())) == "acme"


def test_jwks_keys_of_other_types_are_skipped(tmp_path: Path) -> None:
    # Identity providers publish every key they have; the ones that cannot verify RS256/ES256 stay unused.
    path = tmp_path / "jwks.json"
    p384 = KeyPair(ec.generate_private_key(ec.SECP384R1()), "ES384")
    odd = [{"kty": "oct", "k": "c2VjcmV0"}, {"kty": "OKP", "crv": "X448", "x": "AA"}, p384.jwk("p384")]
    write_jwks(path, *odd, rsa_key().jwk("r1"))
    v = verifier(algorithms=["RS256"], jwks_file=str(path))
    assert v.verify(rsa_key().sign(claims(), kid="r1")) == "acme"
    assert refusal(v, rsa_key().sign(claims(), kid="p384")).reason == "unknown_key"


def test_a_jwk_naming_its_algorithm_verifies_that_one_only(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key().jwk("k", alg="RS512"), ec_key().jwk("enc", use="enc"), rsa_key(1).jwk("ok"))
    v = verifier(algorithms=["RS256"], jwks_file=str(path))
    assert refusal(v, rsa_key().sign(claims(), kid="k")).reason == "unknown_key"
    assert refusal(v, rsa_key().sign(claims(), kid="enc")).reason == "unknown_key"  # encryption keys skipped
    assert v.verify(rsa_key(1).sign(claims(), kid="ok")) == "acme"


def test_a_rotated_jwks_file_is_used_without_a_new_verifier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_key().jwk("2026-01"))
    v = verifier(algorithms=["RS256", "ES256"], jwks_file=str(path))
    old = rsa_key().sign(claims(), kid="2026-01")
    new = ec_key().sign(claims(tenant="rotated"), kid="2026-02")
    assert v.verify(old) == "acme"
    assert refusal(v, new).reason == "unknown_key"
    write_jwks(path, ec_key().jwk("2026-02"))
    assert v.verify(new) == "rotated"
    assert refusal(v, old).reason == "unknown_key"
    with caplog.at_level(logging.WARNING):
        path.write_text("{not json")  # broken: the keys read before stay
        assert v.verify(new) == "rotated"
        path.unlink()  # gone: the same
        assert v.verify(new) == "rotated"
    assert "keeping the previous JWT keys" in caplog.text
    write_jwks(path, rsa_key().jwk("2026-01"))  # back: read again
    assert v.verify(old) == "acme"


def test_a_changed_key_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_key().public_pem)
    v = verifier(algorithms=["RS256"], key_file=str(path))
    assert v.verify(rsa_key().sign(claims())) == "acme"
    tmp = tmp_path / "key.tmp"
    tmp.write_bytes(rsa_key(1).public_pem)
    os.replace(tmp, path)
    assert v.verify(rsa_key(1).sign(claims())) == "acme"
    assert refusal(v, rsa_key().sign(claims())).reason == "bad_signature"


# -- config -----------------------------------------------------------------------------------------------
def test_the_default_is_off_and_valid() -> None:
    assert JwtConfig().validate() == [] and not JwtConfig().enabled and JwtConfig().file_problems() == []


@pytest.mark.parametrize(
    ("cfg", "path", "text"),
    [
        ({"algorithms": ["none"]}, "algorithms::0", "none is never accepted"),
        ({"algorithms": ["NONE"]}, "algorithms::0", "none is never accepted"),
        ({"algorithms": ["HS256", "PS256"], "secret": SECRET}, "algorithms::1", "unknown algorithm 'PS256'"),
        ({"algorithms": ["HS256"]}, "secret", "HS256 needs a secret"),
        ({"algorithms": ["HS256"], "secret": "short-secret"}, "secret", "at least 32 bytes"),
        ({"algorithms": ["RS256"], "secret": SECRET, "key_file": "k.pem"}, "secret", "HS256 is not in"),
        ({"algorithms": ["RS256"]}, "key_file", "RS256 verify with key_file"),
        ({"algorithms": ["ES256"]}, "key_file", "ES256 verify with key_file"),
        ({"algorithms": ["RS256"], "key_file": "k", "jwks_file": "j"}, "jwks_file", "not both"),
        ({"algorithms": ["RS256", "ES256"], "key_file": "k"}, "key_file", "not both"),
        (
            {"algorithms": ["HS256"], "secret": SECRET, "jwks_file": "j"},
            "jwks_file",
            "neither RS256 nor ES256",
        ),
        ({"algorithms": ["HS256"], "secret": SECRET, "tenant_claim": ""}, "tenant_claim", "name the claim"),
        (
            {"algorithms": ["HS256"], "secret": SECRET, "tenant_claim": "org."},
            "tenant_claim",
            "name the claim",
        ),
        ({"algorithms": ["HS256"], "secret": SECRET, "leeway": -1.0}, "leeway", "negative"),
        ({"algorithms": ["HS256"], "secret": SECRET, "required_claims": [""]}, "required_claims::0", "empty"),
        ({"secret": SECRET}, "algorithms", "list the algorithms"),
        ({"jwks_file": "j"}, "algorithms", "list the algorithms"),
    ],
)
def test_config_problems(cfg: dict[str, Any], path: str, text: str) -> None:
    problems = dict(JwtConfig(**cfg).validate())
    assert path in problems and text in problems[path], problems
    assert SECRET not in str(problems)


def _jwk_d(pair: KeyPair) -> str:
    return ECAlgorithm.to_jwk(pair.private, as_dict=True)["d"]  # type: ignore[no-any-return]


def _pem_private(pair: KeyPair) -> bytes:
    return pair.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("field", "algs", "content", "text"),
    [
        ("key_file", ["RS256"], None, "No such file"),
        ("jwks_file", ["RS256"], None, "No such file"),
        ("key_file", ["RS256"], b"not a key", "holds no PEM public key or certificate"),
        ("key_file", ["RS256"], lambda: _pem_private(rsa_key()), "holds a private key"),
        ("key_file", ["ES256"], lambda: rsa_key().public_pem, "cannot verify ES256"),
        ("key_file", ["RS256"], lambda: rsa_key(0, 1024).public_pem, "1024-bit RSA key"),
        (
            "key_file",
            ["ES256"],
            lambda: KeyPair(ec.generate_private_key(ec.SECP384R1()), "ES384").public_pem,
            "ES256 needs P-256",
        ),
        ("jwks_file", ["RS256"], b"{not json", "is not JSON"),
        ("jwks_file", ["RS256"], b'{"kty": "RSA"}', "must be a JWKS document"),
        (
            "jwks_file",
            ["RS256"],
            lambda: json.dumps({"keys": [ec_key().jwk("e")]}).encode(),
            "no signing key",
        ),
        ("jwks_file", ["RS256"], b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric key"),
        ("jwks_file", ["RS256"], b'{"keys": [{"kty": "RSA", "n": "x"}]}', "keys::0 is not a usable key"),
        (
            "jwks_file",
            ["ES256"],
            lambda: json.dumps({"keys": [{**ec_key().jwk("e"), "d": _jwk_d(ec_key())}]}).encode(),
            "keys::0 is a private key",
        ),
    ],
)
def test_unusable_key_files_are_problems_naming_the_path(
    tmp_path: Path, field: str, algs: list[str], content: bytes | Callable[[], bytes] | None, text: str
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_bytes(content() if callable(content) else content)
    config = JwtConfig(algorithms=algs, **{field: str(path)})
    assert config.validate() == []
    problems = config.file_problems()
    assert [p for p, _ in problems] == [field]
    assert str(path) in problems[0][1] and text in problems[0][1], problems
    with pytest.raises((OSError, ValueError)):
        JwtVerifier(config, LOG).load()  # the receiver's start fails the same way
