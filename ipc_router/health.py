"""``GET /healthz`` on the sidecar's Unix socket, for exec probes (Kubernetes liveness/readiness, compose).

Standard library only, and importing nothing else of ipc_router: a probe runs every few seconds, so
``python -m ipc_router.health --socket PATH`` starts in ~20 ms of CPU, where ``ipc-router health`` (same check)
first imports the whole sidecar (~130 ms). Exit 0 when the sidecar answers 200, 1 otherwise, with the reason.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

__all__ = ["check", "main"]

_REQUEST = b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\nconnection: close\r\n\r\n"


def check(path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Ask the sidecar at ``path`` for ``/healthz``: (healthy, the answer's body or why it failed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(_REQUEST)
        data = b""
        while chunk := s.recv(4096):  # the sidecar closes after answering (connection: close)
            data += chunk
            if len(data) > 65536:
                break
    except OSError as e:
        return False, f"{path}: {e.strerror or e}"
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not status_line.startswith("HTTP/1.1 200"):
        return False, f"{path}: {status_line or 'no answer'}"
    return True, body.decode("utf-8", "replace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="the sidecar's Unix socket path")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    ok, detail = check(args.socket, args.timeout)
    print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipc_router.health", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
