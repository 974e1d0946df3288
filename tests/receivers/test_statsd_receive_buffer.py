"""The StatsD receiver's UDP receive buffer: what ``receive_buffer`` asks past net.core.rmem_max is
granted with SO_RCVBUFFORCE when the process holds CAP_NET_ADMIN (the buffer absorbs bursts and the
moments the process is descheduled); without it the kernel's cap stands and a warning says how to
lift it. No sysctl is changed (rmem_max is only read)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

import receivers.statsd as statsd_receiver
from tests.conftest import free_port
from tests.receivers.conftest import Make

RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text()) if Path("/proc/sys/net/core").exists() else 0


def _may_force() -> bool:
    """This process can pass rmem_max (Linux, CAP_NET_ADMIN, a known option number)."""
    if statsd_receiver._SO_RCVBUFFORCE is None or not RMEM_MAX:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, statsd_receiver._SO_RCVBUFFORCE, 4 * RMEM_MAX)
        except OSError:
            return False
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 > RMEM_MAX


def _buffer(r: statsd_receiver.StatsdReceiver) -> int:
    (reader,) = r._readers
    assert isinstance(reader, statsd_receiver._DatagramReader)
    return reader.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


@pytest.mark.skipif(not _may_force(), reason="needs Linux and CAP_NET_ADMIN to pass net.core.rmem_max")
async def test_a_buffer_above_rmem_max_is_granted_with_cap_net_admin(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    wanted = 2 * RMEM_MAX
    r, _, _ = make(udp=f"127.0.0.1:{free_port()}", receive_buffer=wanted)
    with caplog.at_level(logging.INFO):
        await r.start()
    assert _buffer(r) >= wanted
    assert "SO_RCVBUFFORCE" in caplog.text
    assert "not the" not in caplog.text  # no warning: the asked size was granted


@pytest.mark.skipif(not RMEM_MAX, reason="needs /proc/sys/net/core/rmem_max (Linux)")
async def test_without_the_force_the_cap_stands_and_a_warning_says_how_to_lift_it(
    make: Make, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statsd_receiver, "_SO_RCVBUFFORCE", None)  # as on a system without the option
    wanted = 2 * RMEM_MAX
    r, _, _ = make(udp=f"127.0.0.1:{free_port()}", receive_buffer=wanted)
    with caplog.at_level(logging.INFO):
        await r.start()
    assert _buffer(r) == RMEM_MAX
    assert f"is {RMEM_MAX} bytes, not the {wanted} asked for" in caplog.text
    assert "net.core.rmem_max" in caplog.text and "CAP_NET_ADMIN" in caplog.text


async def test_a_buffer_within_rmem_max_is_set_as_asked(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    wanted = 64 * 1024
    r, _, _ = make(udp=f"127.0.0.1:{free_port()}", receive_buffer=wanted)
    with caplog.at_level(logging.INFO):
        await r.start()
    assert _buffer(r) == wanted
    assert "receive buffer" not in caplog.text
