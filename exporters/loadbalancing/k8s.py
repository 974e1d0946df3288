"""The ``k8s`` resolver: the gateways are the ready endpoints of a Kubernetes Service, followed by a list
and a watch of its EndpointSlices (``discovery.k8s.io/v1``, label ``kubernetes.io/service-name``) through
the API, so a change applies when it happens, not at the next interval.

The protocol is the one client-go's reflector speaks, over aiohttp (already a dependency; the official
``kubernetes`` package would add a synchronous client, its own thread pool and some 30 MB of generated
models for two GET requests):

- list, then watch from the list's ``resourceVersion`` with bookmarks; each ADDED / MODIFIED / DELETED
  event recomputes the members and hands them to the exporter (:data:`Apply`), which changes the ring
  exactly as it does for a DNS answer;
- the first list is served from the API server's cache (``resourceVersion=0``, cheap when a thousand
  agents start at once); a watch that is too old (410 Gone, as an HTTP status or an ERROR event) lists
  again, then consistently from etcd;
- a watch that ends (the server's ``timeoutSeconds``, 5-10 minutes spread at random) resumes from the
  last ``resourceVersion`` seen; an error (connection refused, 5xx, 401/403, a broken stream) is counted,
  logged with the API's own message, and retried with exponential back-off and jitter. Through all of
  it the members stay what they were: an unreachable API never empties the ring, and neither does an
  answer with no ready endpoint (the DNS resolver behaves alike: a name with no records keeps them);
- the service-account token is read again when its file changes (``agent.watched_file``: one stat
  a request; the kubelet rotates a projected token); the CA is read once at start.

An endpoint counts when ``conditions.ready`` is true or unset (the API's rule); its first address is
used (the API calls them fungible), with each of ``ports``. A pod in two slices of a dual-stack Service
(IPv4 and IPv6) is one gateway, at its IPv4 address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.component import Tasks
from agent.telemetry import Cell
from agent.watched_file import WatchedFile
from exporters.loadbalancing.config import K8sResolverConfig
from exporters.loadbalancing.resolver import endpoint

Apply = Callable[[frozenset[str]], Awaitable[None]]
"""Makes a set of gateways (host:port each) the members: the exporter's ``set_gateways``."""

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""The label the EndpointSlice controller puts on each slice of a Service."""

WATCH_TIMEOUT_S = (300, 600)
"""A watch asks the server to end it after a time drawn from this range (seconds), as client-go does:
a thousand agents do not reconnect at once."""
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 30.0
"""Retries after an error wait initial × 2^(failures-1), at most max, times a random 0.5-1."""
MAX_EVENT_BYTES = 64 << 20
"""A watch event (one line of JSON) longer than this breaks the stream: it is counted and re-opened."""

_FAMILY_RANK = {"IPv4": 0, "IPv6": 1, "FQDN": 2}


class K8sUnavailable(RuntimeError):
    """The API cannot be reached as configured (not in a cluster, no namespace, no CA): at start."""


class _Gone(Exception):
    """410: the resourceVersion is older than the server keeps; list again."""


class _ApiError(Exception):
    """The API answered with an error, or something that is not a list or a watch event."""


@dataclass(frozen=True)
class ApiAccess:
    """Where the Service's EndpointSlices are, and how to ask for them."""

    url: str
    """The EndpointSlices collection of the namespace: https://host:port/apis/discovery.k8s.io/v1/…"""
    namespace: str
    name: str
    ssl: ssl.SSLContext | bool
    """The context trusting the service account's CA (https), or True (the system's CAs; http)."""
    token_file: str


async def api_access(config: K8sResolverConfig, environ: Mapping[str, str]) -> ApiAccess:
    """Resolve the API's address, the namespace and the CA; :class:`K8sUnavailable` says what is
    missing. Files are read in a thread."""
    sa = config.service_account_dir
    name, _, namespace = config.service.partition(".")
    if not namespace:
        try:
            namespace = (await asyncio.to_thread(_read_text, os.path.join(sa, "namespace"))).strip()
        except OSError as exc:
            raise K8sUnavailable(
                f"resolver::k8s::service {config.service!r} names no namespace and the pod's own cannot be "
                f"read ({exc}): write the service as name.namespace"
            ) from None
    base = config.api_server.rstrip("/")
    ca_file = os.path.join(sa, "ca.crt")
    token_file = os.path.join(sa, "token")
    if not base:
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise K8sUnavailable(
                "resolver::k8s: not in a Kubernetes cluster (KUBERNETES_SERVICE_HOST and "
                "KUBERNETES_SERVICE_PORT are not set): set resolver::k8s::api_server, or use the dns or "
                "static resolver"
            )
        base = f"https://{endpoint(host, int(port))}"
        for path, what in ((token_file, "token"), (ca_file, "CA certificate")):
            if not await asyncio.to_thread(os.path.isfile, path):
                raise K8sUnavailable(
                    f"resolver::k8s: no service-account {what} at {path} (is automountServiceAccountToken "
                    "off for this pod?)"
                )
    context: ssl.SSLContext | bool = True
    if base.startswith("https://"):
        cafile = ca_file if await asyncio.to_thread(os.path.isfile, ca_file) else None
        try:
            context = await asyncio.to_thread(ssl.create_default_context, cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise K8sUnavailable(f"resolver::k8s: cannot load the CA certificate {ca_file}: {exc}") from None
    url = f"{base}/apis/discovery.k8s.io/v1/namespaces/{urllib.parse.quote(namespace)}/endpointslices"
    return ApiAccess(url, namespace, name, context, token_file)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_token(path: str) -> str:
    return _read_text(path).strip()


Ready = list[tuple[str, int, str]]
"""The ready endpoints of one slice: (identity of the pod, family rank, address) each."""


def ready_endpoints(slice_: Mapping[str, Any]) -> Ready:
    """The endpoints of an EndpointSlice that take traffic: ``conditions.ready`` true or unset."""
    rank = _FAMILY_RANK.get(str(slice_.get("addressType", "IPv4")), 2)
    found: Ready = []
    for ep in slice_.get("endpoints") or ():
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        addresses = ep.get("addresses") or ()
        if not addresses:
            continue
        ref = ep.get("targetRef") or {}
        identity = ref.get("uid") or (f"{ref.get('namespace')}/{ref.get('name')}" if ref else addresses[0])
        found.append((str(identity), rank, str(addresses[0])))
    return found


def gateways(slices: Mapping[str, Ready], ports: list[int]) -> frozenset[str]:
    """host:port of every ready pod with every port; a pod in an IPv4 and an IPv6 slice once, at IPv4."""
    best: dict[str, tuple[int, str]] = {}
    for ready in slices.values():
        for identity, rank, address in ready:
            if identity not in best or (rank, address) < best[identity]:
                best[identity] = (rank, address)
    return frozenset(endpoint(address, port) for _, address in best.values() for port in ports)


class K8sResolver:
    """Lists and watches the Service's EndpointSlices and applies each change (:data:`Apply`).
    ``resolutions``: the exporter's ``loadbalancer_resolutions_total`` cells by outcome."""

    def __init__(
        self,
        config: K8sResolverConfig,
        default_port: int,
        apply: Apply,
        resolutions: Mapping[str, Cell],
        log: logging.Logger,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._ports = list(config.ports) or [default_port]
        self._apply = apply
        self._resolutions = resolutions
        self._log = log
        self._environ = os.environ if environ is None else environ
        self._access: ApiAccess | None = None
        self._token: WatchedFile[str] | None = None
        """The service account's token, read again when the file changes."""
        self._slices: dict[str, Ready] = {}
        self._members: frozenset[str] = frozenset()
        self._version = ""
        """The last resourceVersion seen; empty: list first."""
        self._first = asyncio.Event()
        """Set once the first list has succeeded or failed: start returns then."""

    @property
    def service(self) -> str:
        """namespace/name, once started."""
        a = self._access
        return f"{a.namespace}/{a.name}" if a is not None else self._config.service

    async def start(self, tasks: Tasks) -> None:
        """Find the API (raising :class:`K8sUnavailable` with what is wrong), start listing and watching
        as a task of ``tasks``, and return once the first list has been applied or has failed."""
        self._access = await api_access(self._config, self._environ)
        tasks.spawn(self._run(), "loadbalancing-k8s")
        await self._first.wait()

    async def _run(self) -> None:
        access = self._access
        assert access is not None
        failures = 0
        consistent = False  # the first list comes from the API server's cache; after a 410, from etcd
        try:
            async with aiohttp.ClientSession(headers={"Accept": "application/json"}) as session:
                while True:
                    try:
                        if not self._version:
                            await self._list(session, access, "" if consistent else "0")
                            self._first.set()
                        if not await self._watch(session, access):
                            # Ended with no event, not even a bookmark: do not spin on a server that
                            # closes every watch at once.
                            await asyncio.sleep(BACKOFF_INITIAL_S)
                        failures = 0
                    except _Gone as exc:
                        self._log.info("k8s %s: %s: listing again", self.service, exc)
                        self._version, consistent = "", True
                    except (
                        aiohttp.ClientError,
                        TimeoutError,
                        _ApiError,
                        ValueError,
                        KeyError,
                        TypeError,
                        AttributeError,  # a field of another shape than the API's (a string for an object)
                    ) as exc:
                        failures += 1
                        self._resolutions["failure"].value += 1
                        self._log.warning(
                            "k8s %s: %s: keeping the %d gateways known, trying again",
                            self.service,
                            _describe(exc),
                            len(self._members),
                        )
                        self._first.set()
                        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (failures - 1))
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._first.set()

    async def _headers(self, access: ApiAccess) -> dict[str, str]:
        token = self._token
        if token is None:  # the first request: no token file (an api_server without one) is no token
            token = WatchedFile(access.token_file, _read_token, "service-account token", self._log)
            self._token = token
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(token.load)
        else:
            token.refresh()  # one stat: the kubelet rotates projected tokens
        return {"Authorization": f"Bearer {token.value}"} if token.value else {}

    async def _list(self, session: aiohttp.ClientSession, access: ApiAccess, version: str) -> None:
        params = {"labelSelector": f"{SERVICE_NAME_LABEL}={access.name}"}
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(total=self._config.timeout)
        async with session.get(
            access.url, params=params, headers=await self._headers(access), ssl=access.ssl, timeout=timeout
        ) as response:
            try:
                await _check(response, "list")
            except _Gone as exc:  # a list that is too old cannot be listed again
                raise _ApiError(str(exc)) from None
            body = await response.json(content_type=None)
        if not isinstance(body, dict) or body.get("kind") != "EndpointSliceList":
            raise _ApiError(f"list: not an EndpointSliceList: {str(body)[:200]}")
        self._slices = {item["metadata"]["name"]: ready_endpoints(item) for item in body.get("items") or ()}
        self._version = str(body["metadata"]["resourceVersion"])
        await self._publish()

    async def _watch(self, session: aiohttp.ClientSession, access: ApiAccess) -> int:
        """Follow the watch until the server ends it (returns the events it had) or it breaks (raises)."""
        watch_s = random.randint(*WATCH_TIMEOUT_S)
        params = {
            "labelSelector": f"{SERVICE_NAME_LABEL}={access.name}",
            "watch": "1",
            "resourceVersion": self._version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(watch_s),
        }
        # Bookmarks arrive about once a minute: a stream silent for longer than the watch has died.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._config.timeout,
            sock_connect=self._config.timeout,
            sock_read=watch_s + 30,
        )
        async with session.get(
            access.url, params=params, headers=await self._headers(access), ssl=access.ssl, timeout=timeout
        ) as response:
            await _check(response, "watch")
            buffer = bytearray()
            events = 0
            async for chunk in response.content.iter_any():
                start = len(buffer)
                buffer += chunk
                while (end := buffer.find(b"\n", start)) >= 0:
                    line, start = bytes(buffer[:end]), 0
                    del buffer[: end + 1]
                    if not line.strip():
                        continue
                    events += 1
                    if self._event(json.loads(line)):
                        await self._publish()
                if len(buffer) > MAX_EVENT_BYTES:
                    raise _ApiError(f"watch: an event longer than {MAX_EVENT_BYTES} bytes")
        return events

    def _event(self, event: Any) -> bool:
        """Apply one watch event to the slices; True when the members may have changed."""
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise _ApiError(f"watch: not a watch event: {str(event)[:200]}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(f"watch: {obj.get('message') or '410 Gone'}")
            raise _ApiError(f"watch: error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        version = meta.get("resourceVersion")
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") or not version:
            raise _ApiError(f"watch: not a watch event: {str(event)[:200]}")
        self._version = str(version)
        if kind == "BOOKMARK":
            return False
        if kind == "DELETED":
            self._slices.pop(meta["name"], None)
        else:
            self._slices[meta["name"]] = ready_endpoints(obj)
        return True

    async def _publish(self) -> None:
        members = gateways(self._slices, self._ports)
        if not members:
            self._resolutions["failure"].value += 1
            self._log.warning(
                "k8s %s: no ready endpoint: keeping the %d gateways known", self.service, len(self._members)
            )
            return
        self._resolutions["success"].value += 1
        self._members = members
        await self._apply(members)


async def _check(response: aiohttp.ClientResponse, what: str) -> None:
    """Raise for an error status, with the message of the API's Status object when there is one."""
    if response.status == 200:
        return
    text = (await response.text())[:500]
    try:
        message = json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        message = text
    if response.status == 410:
        raise _Gone(f"{what}: {message}")
    raise _ApiError(f"{what}: HTTP {response.status}: {message}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
