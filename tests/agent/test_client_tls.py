"""agent.tls.ClientTLSConfig: the one ``tls`` block of the network exporters, and what each transport
refuses of it."""

from __future__ import annotations

import ssl
import typing

import pytest

from agent.tls import ClientTLSConfig
from exporters.otlp.config import OtlpConfig, OtlpHttpConfig
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig


@pytest.mark.parametrize("config", [PrometheusRemoteWriteConfig, OtlpConfig, OtlpHttpConfig])
def test_every_network_exporter_has_the_one_client_tls_block(config: type) -> None:
    assert typing.get_type_hints(config)["tls"] is ClientTLSConfig


@pytest.mark.parametrize(
    ("tls", "problems"),
    [
        (ClientTLSConfig(), []),
        (ClientTLSConfig(cert_file="c.pem", key_file="k.pem", ca_file="ca.pem"), []),
        (ClientTLSConfig(cert_file="c.pem"), [""]),
        (ClientTLSConfig(key_file="k.pem"), [""]),
        (ClientTLSConfig(insecure=True), []),
        (ClientTLSConfig(insecure=True, ca_file="ca.pem"), ["insecure"]),
        (ClientTLSConfig(insecure=True, insecure_skip_verify=True), ["insecure"]),
    ],
)
def test_validate(tls: ClientTLSConfig, problems: list[str]) -> None:
    assert [path for path, _ in tls.validate()] == problems


def test_http_exporters_refuse_insecure_and_name_the_url_scheme() -> None:
    for cfg, name in (
        (PrometheusRemoteWriteConfig(tls=ClientTLSConfig(insecure=True)), "prometheus_remote_write"),
        (OtlpHttpConfig(tls=ClientTLSConfig(insecure=True)), "otlp_http"),
    ):
        problems = dict(cfg.validate())
        assert problems == {"tls::insecure": f"not used by {name}: write an http:// URL for plaintext"}
    assert PrometheusRemoteWriteConfig(tls=ClientTLSConfig(insecure_skip_verify=True)).validate() == []


def test_grpc_exporter_refuses_skip_verify() -> None:
    problems = dict(OtlpConfig(tls=ClientTLSConfig(insecure_skip_verify=True)).validate())
    assert list(problems) == ["tls::insecure_skip_verify"]
    assert OtlpConfig(tls=ClientTLSConfig(insecure=True)).validate() == []


def test_ssl_context_verifies_unless_told_not_to() -> None:
    strict = ClientTLSConfig().ssl_context()
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    loose = ClientTLSConfig(insecure_skip_verify=True).ssl_context()
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


def test_pem_files_are_read_as_given(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ca.pem").write_bytes(b"ca")
    (tmp_path / "c.pem").write_bytes(b"cert")
    (tmp_path / "k.pem").write_bytes(b"key")
    tls = ClientTLSConfig(
        ca_file=str(tmp_path / "ca.pem"), cert_file=str(tmp_path / "c.pem"), key_file=str(tmp_path / "k.pem")
    )
    assert tls.pem_files() == (b"ca", b"key", b"cert")
    assert ClientTLSConfig().pem_files() == (None, None, None)
