"""TLS for the agent's servers (the ``http`` and ``otlp`` receivers) and its clients (the network
exporters): one config each, one way to build the context, one check of the settings."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerTLSConfig:
    cert_file: str = ""
    """Server certificate (PEM); with key_file, the receiver's endpoints serve TLS only."""
    key_file: str = ""
    """Private key of cert_file (PEM)."""
    client_ca_file: str = ""
    """CA bundle that client certificates must chain to (mutual TLS); empty: no client certificate asked."""

    def validate(self) -> list[tuple[str, str]]:
        if bool(self.cert_file) != bool(self.key_file):
            return [("", "cert_file and key_file go together")]
        if self.client_ca_file and not self.cert_file:
            return [("client_ca_file", "needs cert_file and key_file (mutual TLS runs over TLS)")]
        return []

    def file_problems(self) -> list[tuple[str, str]]:
        """For ``headwater validate``: every configured file must be readable."""
        return [
            (name, f"{path} is not a readable file")
            for name in ("cert_file", "key_file", "client_ca_file")
            if (path := getattr(self, name)) and not os.access(path, os.R_OK)
        ]

    def server_context(self) -> ssl.SSLContext | None:
        """The server-side context, or None when TLS is off; client certificates required with a CA."""
        if not self.cert_file:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class ClientTLSConfig:
    """The ``tls`` block of every network exporter (remote-write, otlp, otlp_http)."""

    insecure: bool = False
    """gRPC exporters only: plaintext, no TLS (an in-cluster collector). Over HTTP the URL scheme decides."""
    ca_file: str = ""
    """CA bundle to verify the server with (default: the system's, or gRPC's bundled roots)."""
    cert_file: str = ""
    """Client certificate for mutual TLS."""
    key_file: str = ""
    """Client key for mutual TLS."""
    insecure_skip_verify: bool = False
    """HTTP exporters only: do not verify the server's certificate (testing only). gRPC cannot skip it."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if bool(self.cert_file) != bool(self.key_file):
            problems.append(("", "cert_file and key_file go together"))
        if self.insecure and (self.ca_file or self.cert_file or self.insecure_skip_verify):
            problems.append(("insecure", "insecure turns TLS off: the other tls settings would be ignored"))
        return problems

    def http_problems(self, exporter: str) -> list[tuple[str, str]]:
        """What an HTTP exporter (named ``exporter`` in the message) cannot honour."""
        if self.insecure:
            return [("insecure", f"not used by {exporter}: write an http:// URL for plaintext")]
        return []

    def grpc_problems(self) -> list[tuple[str, str]]:
        """What a gRPC exporter cannot honour."""
        if self.insecure_skip_verify:
            return [("insecure_skip_verify", "not supported by gRPC: give the server's CA in ca_file")]
        return []

    def ssl_context(self) -> ssl.SSLContext:
        """The context of an HTTPS client: the system roots or ``ca_file``, an optional client
        certificate, and verification off only when the user asked for it by name."""
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def pem_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA bundle, client key, client certificate) as bytes, None where unset: what gRPC's
        ``ssl_channel_credentials`` takes. Read at start; an unreadable file fails the start."""
        return _read(self.ca_file), _read(self.key_file), _read(self.cert_file)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()
