"""The front's limits below the app: request heads, idle and slow connections, and how many connections are open.

uvicorn bounds none of this by itself: httptools (the parser `uvicorn[standard]` picks) ignores
`h11_max_incomplete_event_size`, buffering a never-ending header without bound and parsing it in
quadratic time, and a half-sent head is never timed out. So the front runs its HTTP parser (h11 by
default, which also bounds a head by itself) inside `Guard`, an asyncio protocol that sees every
byte before the parser does and holds, whatever parser runs:

- a request head (request line and headers) gets at most `max_head_bytes`: the parser is never
  given more; past it the answer is 431 and the connection closes (closes at once where the head
  comes pipelined while an earlier request is answered);
- a head must be complete `head_timeout_s` after its first byte (408), and a connection with no
  request under way (new, or kept alive) closes after `idle_timeout_s`, also where the client has
  stopped reading its answer (what is still unsent is dropped);
- at most `max_connections` connections are open at once (WebSockets included), and at most
  `max_connections_per_client` from one address; one more is answered 503 and closed;
- a response sent while the client is still sending a body nobody reads (a refusal before the body)
  is followed by a short lingering close instead of reading the rest.

Bodies are bounded in the app, where a refusal can be an answer (kserve.py read_body: size,
bytes held across all requests, stalls and slow bodies), with the same `FrontLimits`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import resource
import time

PARSERS = {"h11": "uvicorn.protocols.http.h11_impl:H11Protocol", "httptools": "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"}


@dataclasses.dataclass(frozen=True)
class FrontLimits:
    max_head_bytes: int = 64 * 1024             # request line and headers of one request (431 past it)
    head_timeout_s: float = 10.0                # from a head's first byte to its end (408 past it)
    idle_timeout_s: float = 30.0                # a connection with no request under way, new or kept alive, then closes
    max_connections: int = 1024                 # open at once, WebSockets included; one more is answered 503 and closed
    max_connections_per_client: int = 256       # the same, from one client address
    max_body_memory: int = 256 * 2**20          # request body bytes held at once across all requests (503 past it)
    body_stall_s: float = 10.0                  # longest pause inside a request body (408 past it)
    min_body_rate: int = 64 * 1024              # bytes/s a body must average once it has taken body_stall_s (408 below it)
    linger_s: float = 2.0                       # after a refusal: how long the rest of a request is read and dropped
    parser: str = "h11"                         # uvicorn's HTTP parser: h11 or httptools (these limits hold for both)


def fit_descriptors(limits: FrontLimits, reserve: int = 256) -> tuple[FrontLimits, str | None]:
    """`limits` with max_connections within this process's file descriptors (raising the soft limit where the hard one
    allows), and a line saying so where they had to be lowered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
        if soft < wanted:
            fitted = max(1, soft - reserve)           # one client's share stays the same fraction of the whole
            per_client = max(1, min(fitted, limits.max_connections_per_client * fitted // limits.max_connections))
            return (dataclasses.replace(limits, max_connections=fitted, max_connections_per_client=per_client),
                    f"--max-connections lowered to {fitted}: this process may open {soft} files (ulimit -n)")
    return limits, None


def plain_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, the body {"error": message} as the app's refusals."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class Throttled:
    """Log lines of one kind at most once per `every_s` seconds, with a count of those left out."""

    def __init__(self, say, every_s: float = 10.0):
        self.say, self.every_s = say, every_s
        self.last: dict[str, float] = {}
        self.skipped: collections.Counter = collections.Counter()

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.every_s) < self.every_s:
            self.skipped[kind] += 1
            return
        more = self.skipped.pop(kind, 0)
        self.last[kind] = now
        self.say(message + (f" (and {more} more like it in the last {self.every_s:.0f} s)" if more else ""))


HEAD, REQUEST, LINGER, UPGRADED, REFUSED = "head", "request", "linger", "upgraded", "refused"


class ParserTransport:
    """The connection's transport as the parser sees it. A close while the parser reads what the client sent (a malformed
    head it answers 400, say) becomes the Guard's lingering close: closing with the rest of the request unread resets the
    connection, and the client may lose the answer. Everything else is the transport's own."""

    def __init__(self, transport, guard):
        self._transport, self._guard = transport, guard

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        guard = self._guard
        if guard.feeding and guard.state in (HEAD, REQUEST) and not self._transport.is_closing():
            guard._linger(time.monotonic())
        else:
            self._transport.close()


def guarded_protocol(limits: FrontLimits, say) -> type[asyncio.Protocol]:
    """An asyncio protocol class for uvicorn's `http=`: limits.parser behind `Guard`. `say(line)` logs a refusal."""
    from uvicorn.importer import import_from_string

    if limits.parser not in PARSERS:
        raise ValueError(f"parser must be one of {', '.join(PARSERS)}, got {limits.parser!r}")
    parser = import_from_string(PARSERS[limits.parser])
    live: set = set()
    per_client: collections.Counter = collections.Counter()
    log = Throttled(say)
    tick_s = min(1.0, limits.head_timeout_s / 4, limits.idle_timeout_s / 4, limits.linger_s / 2)
    ticking = []

    def tick(loop) -> None:
        now = time.monotonic()
        for guard in list(live):
            guard.check(now)
        if live:
            loop.call_later(tick_s, tick, loop)
        else:
            ticking.clear()

    class Guard(asyncio.Protocol):
        """One connection: the parser's protocol (`inner`, later the WebSocket protocol it hands over to), with the limits."""

        def __init__(self, config, server_state, app_state, _loop=None):
            self.loop = _loop or asyncio.get_event_loop()
            self.inner = parser(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
            self.transport = self.cycle = None
            self.client = "?"
            self.state = HEAD
            self.since = self.head_started = None
            self.head_bytes = self.unsent = 0                           # unsent: bytes of answers the client has not read yet
            self.feeding = False                                        # the parser is reading what the client sent

        # -- the transport's calls, passed on to the parser
        def connection_made(self, transport) -> None:
            self.transport = transport
            peer = transport.get_extra_info("peername")
            self.client = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "local"
            if len(live) >= limits.max_connections or per_client[self.client] >= limits.max_connections_per_client:
                self.state = REFUSED
                mine = per_client[self.client] >= limits.max_connections_per_client
                message = (f"{self.client} has {per_client[self.client]} connections open, the most one client may"
                           if mine else f"{len(live)} connections are open, the most this server takes")
                log("connections", f"refused a connection from {self.client}: {message}")
                transport.write(plain_response(503, "Service Unavailable", f"too many connections: {message}"))
                transport.close()
                return
            live.add(self)
            per_client[self.client] += 1
            self._enter_head(time.monotonic())
            self.inner.connection_made(ParserTransport(transport, self))
            if not ticking:
                ticking.append(True)
                self.loop.call_later(tick_s, tick, self.loop)

        def connection_lost(self, exc) -> None:
            if self.state == REFUSED:
                return
            live.discard(self)
            per_client[self.client] -= 1
            if per_client[self.client] <= 0:
                del per_client[self.client]
            self.inner.connection_lost(exc)

        def eof_received(self):
            return None if self.state == REFUSED else self.inner.eof_received()

        def pause_writing(self) -> None:
            if self.state != REFUSED:
                self.inner.pause_writing()

        def resume_writing(self) -> None:
            if self.state != REFUSED:
                self.inner.resume_writing()

        def data_received(self, data: bytes) -> None:
            now = time.monotonic()
            self._update(now)
            if self.state in (LINGER, REFUSED):
                return                                                  # the rest of a request nobody reads: dropped
            if self.state == UPGRADED or (self.state == REQUEST and self.cycle.more_body):
                return self._feed(data, now)                            # a WebSocket's frames, or a body: bounded by the app
            # A head: the next request's, or (REQUEST) one sent while this request is answered (pipelining).
            if self.head_started is None:
                self.head_started = now
            room = limits.max_head_bytes - self.head_bytes
            piece = data if len(data) <= room else data[:room]          # the parser never sees more of a head than the limit
            self.head_bytes += len(piece)
            cycle = self.cycle
            self._feed(piece, now)
            if len(piece) == len(data) or self.state in (LINGER, REFUSED, UPGRADED):
                return
            if self.cycle is not cycle or (self.state == REQUEST and self.cycle.more_body):
                return self._feed(data[len(piece):], now)               # the head ended inside the piece: the rest is the request's
            message = f"the request head is more than {limits.max_head_bytes} bytes"
            if self.state == HEAD:
                return self.refuse(431, "Request Header Fields Too Large", message)
            log("head-431", f"closed a connection from {self.client}: {message} (sent while a request was answered)")
            self.state = LINGER
            self.transport.abort()                                      # an answer under way cannot be followed by another

        # -- state
        def _feed(self, data: bytes, now: float) -> None:
            self.feeding = True
            try:
                self.inner.data_received(data)
            finally:
                self.feeding = False
            self._update(now)

        def _enter_head(self, now: float) -> None:
            self.state, self.since, self.head_started, self.head_bytes = HEAD, now, None, 0

        def _update(self, now: float) -> None:
            """Follow the parser: a new request cycle (its head was parsed), its response complete, or a WebSocket handover."""
            if self.state in (UPGRADED, LINGER, REFUSED) or self.transport is None:
                return
            protocol = self.transport.get_protocol()
            if protocol is not self:                                    # the parser handed the connection to a WebSocket protocol
                self.inner, self.state = protocol, UPGRADED
                self.transport.set_protocol(self)
                return
            cycle = getattr(self.inner, "cycle", None)
            if cycle is not None and cycle is not self.cycle:          # a new request: its head is complete
                self.cycle, self.state, self.head_bytes, self.head_started = cycle, REQUEST, 0, None
            if self.state == REQUEST and cycle.response_complete:
                if cycle.more_body and not cycle.disconnected:          # answered before its body was read: read no more of it
                    self._linger(now)
                else:                                                   # the next head, what of it came already counted
                    self.state, self.since = HEAD, now

        def check(self, now: float) -> None:
            """The clock: idle connections, slow heads, and lingering closes that are over."""
            self._update(now)
            if self.state == HEAD:
                unsent = self.transport.get_write_buffer_size()
                if unsent != self.unsent:                               # the client reads what it was sent: not idle
                    self.unsent, self.since = unsent, now
                if self.head_started is None and now - self.since > limits.idle_timeout_s:
                    self.transport.abort() if unsent else self.transport.close()   # a client that stopped reading
                elif self.head_started is not None and now - self.head_started > limits.head_timeout_s:
                    self.refuse(408, "Request Timeout", f"the request head took more than {limits.head_timeout_s:g} s")
            elif self.state == LINGER and now - self.since > limits.linger_s:
                self.transport.abort() if self.transport.get_write_buffer_size() else self.transport.close()

        def refuse(self, status: int, reason: str, message: str) -> None:
            if self.transport.is_closing():
                return
            log(f"head-{status}", f"refused a request from {self.client}: {message}")
            self.transport.write(plain_response(status, reason, message))
            self._linger(time.monotonic())

        def _linger(self, now: float) -> None:
            """Close after the answer, reading and dropping what the client still sends for a moment (a close with unread
            data resets the connection, and the client may lose the answer)."""
            self.state, self.since = LINGER, now
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()

    return Guard
