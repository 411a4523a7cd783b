"""Free ports on 127.0.0.1 for brokers and servers, outside the kernel's ephemeral range."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from fleetbus.bus.errors import ConfigError

EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ephemeral_ports() -> range:
    """The kernel's range of ephemeral (client source) ports."""
    try:
        low, high = (int(v) for v in EPHEMERAL_PORT_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(low: int = 10000, high: int = 19000) -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range (see ``find_free_base_port``)
    and below the ports this module's clusters use."""
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port_is_free(port):
            return port
    raise ConfigError(f"no free port between {low} and {high}")


def find_free_base_port(count: int, start: int = 29092, stop: int = 32768) -> int:
    """A base port such that ``count`` consecutive ports from it are free on 127.0.0.1, outside
    the ephemeral range: a port that is free now is bound only seconds later, when the broker
    has started, and meanwhile any client connection could take an ephemeral one as its source
    port (a three-broker start in CI failed with "Address already in use" that way)."""
    ephemeral = ephemeral_ports()
    for base in range(start, stop, 10):
        if base <= ephemeral[-1] and ephemeral[0] < base + count:
            continue
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise ConfigError(
        f"no {count} consecutive free ports between {start} and {stop} outside the ephemeral "
        f"range {ephemeral[0]}-{ephemeral[-1]}"
    )


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
