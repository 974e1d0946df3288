"""TLS for the agent's servers (the ``http`` and ``otlp`` receivers): one config, one way to build
the context, one check of the files."""

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


def client_context(
    ca_file: str = "", cert_file: str = "", key_file: str = "", insecure_skip_verify: bool = False
) -> ssl.SSLContext:
    """The context an exporter's HTTPS client uses: the system roots or ``ca_file``, an optional client
    certificate, and verification off only when the user asked for it by name."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
