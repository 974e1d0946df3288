"""Paced UDP sender in pure Python: the fallback for ``udp_sender.c`` when no C compiler is found.

Same command line and output as the C sender (see ``udp_sender.c``); it tops out lower (about 80 % of
the C sender's datagrams/s into an unread socket here), which bench/run.py reports as the ceiling.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time


def load(path: str) -> list[tuple[bytes, int]]:
    with open(path, "rb") as f:
        blob = f.read()
    out = []
    off = 0
    while off + 4 <= len(blob):
        length, lines = struct.unpack_from("<HH", blob, off)
        out.append((blob[off + 4 : off + 4 + length], lines))
        off += 4 + length
    return out


def main() -> int:
    if len(sys.argv) != 5:
        print(f"usage: {sys.argv[0]} PORT PAYLOAD_FILE PACKETS_PER_SECOND DURATION_SECONDS", file=sys.stderr)
        return 2
    port, path, rate, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    packets = load(path)
    if not packets:
        print("payload file holds no datagram", file=sys.stderr)
        return 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    send = sock.send
    total = int(rate * duration + 0.5) if rate > 0 else sys.maxsize
    deadline_extra = 2.0 if rate > 0 else 0.0
    sent = lines = nbytes = errors = max_behind = 0
    count = len(packets)
    start = time.monotonic()
    deadline = start + duration + deadline_extra
    while sent < total:
        now = time.monotonic()
        if now >= deadline:
            break
        due = min(total, int((now - start) * rate) + 1) if rate > 0 else sent + 64
        if due <= sent:
            time.sleep(0.00005)
            continue
        max_behind = max(max_behind, due - sent) if rate > 0 else 0
        while sent < due:
            data, n = packets[sent % count]
            try:
                send(data)
                lines += n
                nbytes += len(data)
            except OSError:
                errors += 1
            sent += 1
    elapsed = time.monotonic() - start
    print(
        json.dumps(
            {
                "packets": sent - errors,
                "lines": lines,
                "bytes": nbytes,
                "errors": errors,
                "elapsed": elapsed,
                "max_behind_ms": max_behind / rate * 1000 if rate > 0 else 0.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
