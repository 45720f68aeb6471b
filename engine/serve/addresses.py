"""Addresses and ports, decided once for t2f-serve's command, its front and its Triton.

is_loopback(host)               whether a --host, or a Host header's name, is this machine's loopback
bind_port(host, port, option)   a TCP socket bound to host:port, or one line naming the option whose port is taken
"""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback: localhost, 127.0.0.0/8 or ::1 (an IPv6 address with or without the
    brackets of a URL or Host header). Any other name is not, whatever it resolves to: a name is looked up by others."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_port(host: str, port: int, option: str) -> socket.socket:
    """A TCP socket bound to `host`:`port` (SO_REUSEADDR, not yet listening); OSError, one line naming `option`, where
    the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    try:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind((host, port))
    except OSError as e:
        bound.close()
        raise OSError(f"port {port} on {host} is in use ({option}): {e.strerror}") from None
    return bound
