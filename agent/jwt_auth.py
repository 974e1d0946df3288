"""JWT bearer tokens at the push receivers: the ``jwt`` block of a receiver's ``auth`` and its verifier.

A token is verified with PyJWT against key material read from files only (never fetched over the
network, so verifying never waits on I/O): HS256 with ``secret``, RS256 and ES256 with ``key_file``
(a PEM public key or certificate) or ``jwks_file`` (a JWKS document, the key chosen by the token's
``kid``). The key files are re-read when they change (inode, mtime and size, checked with one
``stat`` a request, as ``tokens_file`` is), so a rotated JWKS takes effect without a restart; a file
that breaks keeps the keys read before, with a warning.

The checks, in order: the header parses and names an allowed algorithm (``none`` is never allowed,
and an HS256 token is only ever checked against ``secret``, an RS256/ES256 token only against a
public key of its type, so one algorithm cannot pass for another); a key fits; the signature
verifies; ``required_claims`` are present; ``iat``/``nbf`` are not in the future and ``exp`` is not
past (each with ``leeway``); ``iss`` and ``aud`` are the configured ones; the ``tenant_claim`` (a
claim name or a dotted path, ``org.id``) holds a tenant name valid by Mimir's rules
(:func:`agent.tenancy.tenant_problem`). A failure raises :class:`JwtRefused` with a short reason from
:data:`FAILURE_REASONS` and a message naming what failed; neither ever contains the token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.confmodel import Duration, format_duration, short_repr
from agent.tenancy import tenant_problem
from agent.watched_file import WatchedFile

ALGORITHMS = ("HS256", "RS256", "ES256")
"""The signing algorithms a token may use."""
_ASYMMETRIC = ("RS256", "ES256")
MIN_SECRET_BYTES = 32
"""HS256 secrets at least this long: RFC 7518 section 3.2 asks for a key as long as the hash."""
MIN_RSA_BITS = 2048

FAILURE_REASONS = (
    "missing_token",
    "unknown_token",
    "malformed",
    "algorithm_not_allowed",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_audience",
    "wrong_issuer",
    "missing_claim",
    "missing_tenant",
    "invalid_tenant",
)
"""Why a bearer token was refused (``receiver_auth_failures_total{reason}``). The first two belong to
the receiver: no bearer token at all, and (no ``jwt`` block) a token matching no static entry."""

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class JwtConfig:
    algorithms: list[str] = field(default_factory=list)
    """Algorithms tokens may be signed with: HS256, RS256, ES256 (never none); empty = JWT off."""
    secret: str = field(default="", repr=False)
    """HS256 shared secret, at least 32 bytes: write ${env:VAR}, never the secret itself."""
    key_file: str = ""
    """PEM public key (or certificate) verifying RS256 or ES256 tokens; re-read when it changes."""
    jwks_file: str = ""
    """JWKS file ({"keys": [...]}) verifying RS256/ES256 tokens by their kid; re-read when it changes."""
    audience: str = ""
    """Required aud claim (one of the token's audiences); empty = a token naming an audience is refused."""
    issuer: str = ""
    """Required iss claim; empty = not checked."""
    tenant_claim: str = "tenant"
    """Claim naming the tenant (auth.tenant), dotted paths allowed (org.id); tokens without it are refused."""
    leeway: Duration = Duration(30.0)
    """Clock skew allowed when checking exp, nbf and iat."""
    required_claims: list[str] = field(default_factory=lambda: ["exp"])
    """Claims every token must carry (exp by default: a token that never expires is refused)."""

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def validate(self) -> list[tuple[str, str]]:
        # Messages never quote the secret: they end up in logs.
        problems: list[tuple[str, str]] = []
        if not self.algorithms:
            if self.secret or self.key_file or self.jwks_file or self.audience or self.issuer:
                problems.append(("algorithms", f"list the algorithms tokens are signed with ({_ALG_LIST})"))
            return problems
        for i, alg in enumerate(self.algorithms):
            if not isinstance(alg, str) or alg.lower() == "none":
                problems.append(
                    (f"algorithms::{i}", "none is never accepted: an unsigned token proves nothing")
                )
            elif alg not in ALGORITHMS:
                problems.append((f"algorithms::{i}", f"unknown algorithm {short_repr(alg)}; use {_ALG_LIST}"))
        algs = set(self.algorithms)
        if "HS256" in algs:
            if not self.secret:
                problems.append(
                    ("secret", "HS256 needs a secret (write ${env:VAR}); is its environment variable set?")
                )
            elif len(self.secret.encode()) < MIN_SECRET_BYTES:
                problems.append(("secret", f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes long"))
        elif self.secret:
            problems.append(("secret", "a secret is set but HS256 is not in algorithms"))
        asymmetric = sorted(algs & set(_ASYMMETRIC))
        if asymmetric and not (self.key_file or self.jwks_file):
            names = " and ".join(asymmetric)
            problems.append(
                ("key_file", f"{names} verify with key_file (a PEM public key) or jwks_file: give one")
            )
        if self.key_file and self.jwks_file:
            problems.append(("jwks_file", "give key_file or jwks_file, not both"))
        for name in ("key_file", "jwks_file"):
            if getattr(self, name) and not asymmetric:
                problems.append((name, "set but neither RS256 nor ES256 is in algorithms"))
        if self.key_file and len(asymmetric) > 1:
            problems.append(
                ("key_file", "one key verifies RS256 or ES256, not both: list one of them, or use jwks_file")
            )
        if not self.tenant_claim or "" in self.tenant_claim.split("."):
            problems.append(("tenant_claim", "name the claim holding the tenant, e.g. tenant or org.id"))
        if self.leeway < 0:
            problems.append(("leeway", "must not be negative"))
        for i, claim in enumerate(self.required_claims):
            if not isinstance(claim, str) or not claim:
                problems.append((f"required_claims::{i}", "a claim name must not be empty"))
        return problems

    def file_problems(self) -> list[tuple[str, str]]:
        """(field, message) for a key file that cannot be read or holds no key for ``algorithms``."""
        if not self.enabled:
            return []
        try:
            if self.key_file:
                _key_file_keys(self.key_file, self.algorithms)
            elif self.jwks_file:
                _jwks_file_keys(self.jwks_file, self.algorithms)
        except (OSError, ValueError) as exc:
            return [("key_file" if self.key_file else "jwks_file", str(exc))]
        return []


_ALG_LIST = ", ".join(ALGORITHMS)


class JwtRefused(Exception):
    """A token that failed: ``reason`` is one of :data:`FAILURE_REASONS`, ``message`` says what failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Key:
    kid: str | None
    alg: str | None
    """The JWK's own alg, when it names one: the key then verifies that algorithm only."""
    key: PublicKey


def _fits(alg: str, key: PublicKey) -> bool:
    if alg == "RS256":
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def _checked_key(key: Any, where: str) -> PublicKey:
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError(f"{where} holds a private key: give the public key only")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{where} holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise ValueError(f"{where} holds an EC key on {key.curve.name}; ES256 needs P-256")
        return key
    raise ValueError(f"{where} holds a {type(key).__name__}, not an RSA or EC P-256 public key")


def _key_file_keys(path: str, algorithms: list[str]) -> tuple[_Key, ...]:
    """The one key in a PEM file; raises OSError or ValueError when it is unusable for ``algorithms``."""
    with open(path, "rb") as f:
        pem = f.read()
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        if b"PRIVATE KEY-----" in pem:
            raise ValueError(f"{path} holds a private key: give the public key only") from None
        raise ValueError(f"{path} holds no PEM public key or certificate") from None
    checked = _checked_key(key, path)
    wanted = [a for a in algorithms if a in _ASYMMETRIC]
    if wanted and not any(_fits(a, checked) for a in wanted):
        raise ValueError(f"{path} holds a key that cannot verify {' or '.join(wanted)}")
    return (_Key(None, None, checked),)


def _jwks_file_keys(path: str, algorithms: list[str]) -> tuple[_Key, ...]:
    """The signing keys in a JWKS file usable for ``algorithms``; raises OSError or ValueError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ValueError(f'{path} must be a JWKS document: {{"keys": [...]}}')
    keys = []
    skipped = []  # an identity provider's JWKS may also hold keys of other types: skipped, not fatal
    for i, data in enumerate(doc["keys"]):
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue  # encryption keys and junk: not ours to verify with
        if data.get("kty") == "oct":
            skipped.append(f"keys::{i} is a symmetric key (HS256 takes its secret from secret)")
            continue
        try:
            jwk = jwt.PyJWK(data)
        except jwt.PyJWTError as exc:
            skipped.append(f"keys::{i} is not a usable key ({exc.__class__.__name__})")
            continue
        if isinstance(jwk.key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise ValueError(f"{path}: keys::{i} is a private key: publish the public key only")
        try:
            key = _checked_key(jwk.key, f"keys::{i}")
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        alg = data.get("alg")
        keys.append(_Key(jwk.key_id, alg if isinstance(alg, str) else None, key))
    wanted = [a for a in algorithms if a in _ASYMMETRIC]
    if not any(_usable(k, a) for k in keys for a in wanted):
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"{path} holds no signing key for {' or '.join(wanted) or 'RS256 or ES256'}{why}")
    return tuple(keys)


def _usable(key: _Key, alg: str) -> bool:
    return (key.alg is None or key.alg == alg) and _fits(alg, key.key)


class JwtVerifier:
    """Verifies bearer JWTs by a :class:`JwtConfig`. Call :meth:`load` once at start (raises OSError or
    ValueError on unusable key files), then :meth:`verify` per request on the event loop: it costs one
    ``stat`` of the key file and one signature check (tens of microseconds), never a network call."""

    def __init__(self, config: JwtConfig, logger: logging.Logger) -> None:
        self.config = config
        self._log = logger
        self._allowed = frozenset(config.algorithms)
        self._secret = config.secret.encode()
        path = config.key_file or config.jwks_file
        self._file = WatchedFile(path, self._read, "JWT keys", logger) if path else None
        self._options: dict[str, Any] = {"require": list(config.required_claims)}
        self._tenant_path = tuple(config.tenant_claim.split("."))

    def load(self) -> None:
        """Read the key file now; raises OSError or ValueError (start fails) when it is unusable."""
        if self._file is not None:
            self._file.load()

    def _read(self, path: str) -> tuple[_Key, ...]:
        cfg = self.config
        if cfg.key_file:
            return _key_file_keys(path, cfg.algorithms)
        return _jwks_file_keys(path, cfg.algorithms)

    def _key_for(self, alg: str, kid: Any) -> bytes | PublicKey:
        if alg == "HS256":
            return self._secret
        keys = self._file.value if self._file is not None else None
        candidates = [k for k in keys or () if _usable(k, alg)]
        if self.config.jwks_file:
            if kid is not None:
                candidates = [k for k in candidates if k.kid == kid]
                if not candidates:
                    raise JwtRefused(
                        "unknown_key", f"no {alg} key with kid {short_repr(kid)} in the JWKS file"
                    )
            elif len(candidates) > 1:
                raise JwtRefused(
                    "unknown_key", f"the token names no kid and {len(candidates)} keys could fit"
                )
        if not candidates:
            raise JwtRefused("unknown_key", f"no {alg} key is configured")
        return candidates[0].key

    def verify(self, token: str) -> str:
        """The tenant the token names; raises :class:`JwtRefused` saying what failed."""
        if self._file is not None:
            self._file.refresh()
        try:
            header = jwt.get_unverified_header(token)
        # json raises RecursionError, not ValueError, on deeply nested input: caught here whatever the
        # PyJWT release does with it (as below).
        except (jwt.PyJWTError, RecursionError):
            raise JwtRefused("malformed", "the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            allowed = ", ".join(sorted(self._allowed))
            raise JwtRefused(
                "algorithm_not_allowed", f"the token is signed with {short_repr(alg)}; allowed: {allowed}"
            )
        key = self._key_for(alg, header.get("kid"))
        cfg = self.config
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience or None,
                issuer=cfg.issuer or None,
                leeway=cfg.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as exc:
            raise self._refusal(exc, token) from None
        except RecursionError:
            raise JwtRefused("malformed", "the token's claims are nested too deeply") from None
        return self._tenant(payload)

    def _refusal(self, exc: jwt.PyJWTError, token: str) -> JwtRefused:
        cfg = self.config
        leeway = format_duration(cfg.leeway)
        if isinstance(exc, jwt.InvalidSignatureError):
            return JwtRefused("bad_signature", "the token's signature does not verify")
        if isinstance(exc, jwt.ExpiredSignatureError):
            return JwtRefused("expired", f"the token expired{_when(token, 'exp')} (leeway {leeway})")
        if isinstance(exc, jwt.ImmatureSignatureError):
            claim = "nbf" if "nbf" in str(exc) else "iat"
            return JwtRefused("not_yet_valid", f"the token is not valid yet ({claim}{_when(token, claim)})")
        if isinstance(exc, jwt.MissingRequiredClaimError):
            if exc.claim == "aud":
                return JwtRefused("wrong_audience", f"the token names no audience; expected {cfg.audience!r}")
            if exc.claim == "iss":
                return JwtRefused("wrong_issuer", f"the token names no issuer; expected {cfg.issuer!r}")
            return JwtRefused("missing_claim", f"the token lacks the required claim {exc.claim!r}")
        if isinstance(exc, jwt.InvalidAudienceError):
            if not cfg.audience:
                return JwtRefused("wrong_audience", "the token names an audience but none is configured")
            return JwtRefused("wrong_audience", f"the token's audience is not {cfg.audience!r}")
        if isinstance(exc, jwt.InvalidIssuerError):
            return JwtRefused("wrong_issuer", f"the token's issuer is not {cfg.issuer!r}")
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return JwtRefused("algorithm_not_allowed", "the token's algorithm is not allowed")
        # PyJWT's own texts say which claim or part is malformed ("... (exp) must be an integer.",
        # "Invalid header padding"); none quotes the token.
        return JwtRefused("malformed", f"the token is not well-formed: {exc}")

    def _tenant(self, payload: dict[str, Any]) -> str:
        claim = self.config.tenant_claim
        value: Any = payload
        if claim in payload:  # a claim whose own name has dots (``https://example.com/org``) wins
            value = payload[claim]
        else:
            for part in self._tenant_path:
                if not isinstance(value, Mapping) or part not in value:
                    raise JwtRefused("missing_tenant", f"the token has no {claim!r} claim naming the tenant")
                value = value[part]
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise JwtRefused("invalid_tenant", f"the tenant claim {claim!r} is not a string")
        problem = tenant_problem(value)
        if problem:
            raise JwtRefused(
                "invalid_tenant", f"the tenant claim {claim!r} holds {short_repr(value, 60)}: {problem}"
            )
        return value


def _when(token: str, claim: str) -> str:
    """`` at <time>`` from the (verified) token's ``claim``, or "" when it is not a plain number."""
    try:
        value = jwt.decode(token, options={"verify_signature": False}).get(claim)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f" at {datetime.fromtimestamp(value, UTC).isoformat(timespec='seconds')}"
    except (jwt.PyJWTError, ValueError, OverflowError, OSError, RecursionError):
        pass
    return ""
