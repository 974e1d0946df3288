"""A Kubernetes API server for the EndpointSlices of one namespace, on 127.0.0.1, speaking the wire format
of the real one for what the loadbalancing exporter's k8s resolver asks (no cluster can run here):

- ``GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=…`` answers an
  ``EndpointSliceList`` with ``metadata.resourceVersion``;
- the same with ``watch=1&resourceVersion=<rv>`` streams ``WatchEvent`` objects, one JSON document per
  line (``{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": …}``) of every change after
  ``rv``, then of each new change; a resourceVersion older than the history kept gets an ERROR event
  carrying a 410 ``Status`` (``reason: Expired``), or an HTTP 410 with that Status when asked;
- ``Authorization: Bearer <token>`` is checked against :attr:`tokens` (401 ``Status`` otherwise);
- only ``kubernetes.io/service-name=<name>`` selectors are understood, as the resolver sends.

Shapes follow the API reference of ``discovery.k8s.io/v1`` (EndpointSlice, Endpoint, EndpointConditions)
and ``meta/v1`` (WatchEvent, Status, ListMeta).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A meta/v1 Status object, as the API sends with an error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Pod:
    """One endpoint of a slice: a pod's address and its ready condition (None: the field is left out)."""

    address: str
    ready: bool | None = True
    name: str = ""
    uid: str = ""


@dataclass
class Request:
    path: str
    query: dict[str, str]
    token: str


@dataclass
class KubeApi:
    namespace: str = "obs"
    tokens: set[str] = field(default_factory=lambda: {"token-1"})
    gone_as_status: bool = False
    """A too-old watch: HTTP 410 (True) or HTTP 200 and an ERROR event (False)."""
    requests: list[Request] = field(default_factory=list)
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = 100
    history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    oldest: int = 100
    """Watches from a resourceVersion older than this are answered 410 Gone."""
    open_watches: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._generation = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ssl: ssl.SSLContext | None = None

    # -- the cluster's side ------------------------------------------------------------------------
    async def _event(self, kind: str, obj: dict[str, Any]) -> None:
        async with self._changed:
            self.history.append((self.version, {"type": kind, "object": obj}))
            self._changed.notify_all()

    async def put(
        self,
        name: str,
        pods: list[Pod],
        service: str = "gw",
        address_type: str = "IPv4",
        port: int = 4317,
        silent: bool = False,
    ) -> None:
        """Create or replace the EndpointSlice ``name`` of ``service`` (ADDED or MODIFIED); ``silent``: a
        change whose event is compacted away before any watch sends it (only a list shows it)."""
        self.version += 1
        endpoints = []
        for pod in pods:
            ep: dict[str, Any] = {"addresses": [pod.address], "conditions": {}}
            if pod.ready is not None:
                ep["conditions"]["ready"] = pod.ready
                ep["conditions"]["serving"] = pod.ready
                ep["conditions"]["terminating"] = False
            if pod.name:
                ep["targetRef"] = {
                    "kind": "Pod",
                    "namespace": self.namespace,
                    "name": pod.name,
                    "uid": pod.uid,
                }
            endpoints.append(ep)
        obj = {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "resourceVersion": str(self.version),
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": [{"name": "otlp-grpc", "protocol": "TCP", "port": port}],
        }
        kind = "MODIFIED" if name in self.slices else "ADDED"
        self.slices[name] = obj
        if not silent:
            await self._event(kind, obj)

    async def delete(self, name: str) -> None:
        self.version += 1
        obj = json.loads(json.dumps(self.slices.pop(name)))
        obj["metadata"]["resourceVersion"] = str(self.version)
        await self._event("DELETED", obj)

    async def bookmark(self) -> int:
        """A BOOKMARK to the open watches at a new resourceVersion (as if other objects changed)."""
        self.version += 1
        obj = {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.version)},
        }
        await self._event("BOOKMARK", obj)
        return self.version

    async def malformed(self, name: str, service: str = "gw") -> None:
        """ADDED for a slice whose ``endpoints`` holds a string where the API has an Endpoint object (not
        kept in :attr:`slices`: a list does not show it)."""
        self.version += 1
        meta = {
            "name": name,
            "namespace": self.namespace,
            "resourceVersion": str(self.version),
            "labels": {"kubernetes.io/service-name": service},
        }
        obj = {"kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4", "endpoints": ["10.0.0.9"]}
        await self._event("ADDED", obj)

    async def compact(self) -> None:
        """Other objects change and the history is compacted past every client: the open watches end,
        and a watch from any resourceVersion seen so far gets 410 Gone."""
        self.version += 1
        self.oldest = self.version
        await self.end_watches()

    async def end_watches(self) -> None:
        """End every open watch, as the server does at its timeoutSeconds."""
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def watches(self) -> list[Request]:
        return [r for r in self.requests if r.query.get("watch") in ("1", "true")]

    def lists(self) -> list[Request]:
        return [r for r in self.requests if r.query.get("watch") not in ("1", "true")]

    # -- the server ----------------------------------------------------------------------------------
    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self._ssl = ssl_context
        await self._listen()
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_get(PREFIX + "{namespace}/endpointslices", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl)
        await self._site.start()
        server: Any = self._site._server
        self.port = server.sockets[0].getsockname()[1]

    async def outage(self) -> None:
        """End the open watches, close every connection and stop listening: connections are refused."""
        await self.end_watches()
        assert self._runner is not None
        await self._runner.cleanup()

    async def recover(self) -> None:
        """Listen again, on the same port."""
        await self._listen()

    async def stop(self) -> None:
        await self.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def _selected(self, obj: dict[str, Any], selector: str) -> bool:
        key, _, value = selector.partition("=")
        return bool(obj["metadata"].get("labels", {}).get(key) == value)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        query = dict(request.query)
        self.requests.append(Request(request.path, query, token))
        if token not in self.tokens:
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        namespace = request.match_info["namespace"]
        if namespace != self.namespace:
            return web.json_response(
                status(
                    403,
                    "Forbidden",
                    f'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:{namespace}:'
                    f'agent" cannot list resource "endpointslices" in API group "discovery.k8s.io" in the '
                    f'namespace "{namespace}"',
                ),
                status=403,
            )
        selector = query.get("labelSelector", "")
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, selector, int(query["resourceVersion"]))
        items = [obj for obj in self.slices.values() if self._selected(obj, selector)]
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, selector: str, since: int) -> web.StreamResponse:
        gone = status(410, "Expired", f"too old resource version: {since} ({self.oldest})")
        if since < self.oldest and self.gone_as_status:
            return web.json_response(gone, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self.oldest:
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await response.write_eof()
            return response
        generation = self._generation
        sent = 0
        self.open_watches += 1
        try:
            while True:
                async with self._changed:
                    pending = self.history[sent:]
                    sent = len(self.history)
                    if not pending and self._generation == generation:
                        await self._changed.wait()
                        continue
                bookmarks = request.query.get("allowWatchBookmarks") == "true"
                for version, event in pending:
                    if version <= since:
                        continue
                    if (event["type"] == "BOOKMARK" and bookmarks) or (
                        event["type"] != "BOOKMARK" and self._selected(event["object"], selector)
                    ):
                        await response.write(json.dumps(event).encode() + b"\n")
                if self._generation != generation:
                    break
        except ConnectionError:  # the client went away
            return response
        finally:
            self.open_watches -= 1
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
