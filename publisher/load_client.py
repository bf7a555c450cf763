"""A closed-loop HTTP/1.1 load generator for the recall service, run in its
own process so that it does not share the server's interpreter.

Each of ``connections`` keep-alive sockets sends one request, reads the whole
response (``Content-Length`` framing, as the service answers), records the
time from the first byte sent to the last byte read, and sends the next; all
sockets are driven by one ``selectors`` loop with the request bytes encoded
in advance, so a request costs the client a few tens of microseconds (its
ceiling, measured against ``canned`` below, is printed beside every figure
that uses it). Bounded in count and time: it stops at ``max_requests`` or
after ``seconds``, whichever comes first.

    python -m freshtower.publisher.load_client run --port 8000 --bodies bodies.jsonl \\
        --connections 4 --seconds 10 --out result.json
    python -m freshtower.publisher.load_client canned --port 9000 --body-bytes 6000

``bodies.jsonl`` holds one JSON body per line, sent in turn to ``--path``
(``POST /v1/recall`` by default). The result (JSON) has the count by status,
transport failures, the latencies (seconds), the wall and CPU time of the
client, so a caller can tell whether the client or the server was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEAD_END = b"\r\n\r\n"


@dataclass
class LoadResult:
    connections: int
    requests: int = 0  # answered (any status)
    statuses: dict[str, int] = field(default_factory=dict)  # status code -> count
    failures: list[str] = field(default_factory=list)  # transport errors (reset, refused, timeout), first 20
    failure_count: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this client's own CPU time over the run

    @property
    def rate(self) -> float:
        return self.requests / self.wall_seconds if self.wall_seconds else 0.0


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _Connection:
    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = bytearray()
        self.started = 0.0
        self.pending = b""

    def close(self) -> None:
        self.sock.close()


def _response_complete(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(status, total length, server closes) of the first full response in ``buffer``, or None."""
    end = buffer.find(HEAD_END)
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length, closes = 0, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            closes = True
    total = end + len(HEAD_END) + length
    return (status, total, closes) if len(buffer) >= total else None


def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    connections: int = 1,
    seconds: float = 10.0,
    max_requests: int = 1_000_000,
    timeout: float = 10.0,
) -> LoadResult:
    """Drive ``connections`` keep-alive sockets until ``max_requests`` are
    answered or ``seconds`` pass; ``requests`` are full HTTP requests sent in turn."""
    return _LoadLoop(host, port, requests, connections, seconds, max_requests, timeout).run()


class _LoadLoop:
    """One ``selectors`` loop over the sockets of one ``run_load`` call."""

    def __init__(self, host, port, requests, connections, seconds, max_requests, timeout):
        self.host, self.port, self.requests = host, port, requests
        self.connections, self.max_requests, self.timeout = connections, max_requests, timeout
        self.result = LoadResult(connections=connections)
        self.statuses: Counter = Counter()
        self.selector = selectors.DefaultSelector()
        self.sent = 0
        self.seconds = seconds
        self.deadline = 0.0

    def run(self) -> LoadResult:
        cpu_started, started = time.process_time(), time.perf_counter()
        self.deadline = started + self.seconds
        for _ in range(min(self.connections, self.max_requests)):
            self.open_one()
        while self.selector.get_map():
            now = time.perf_counter()
            events = self.selector.select(timeout=max(0.0, min(1.0, self.deadline + self.timeout - now)))
            if not events:
                self.time_out_silent()
            for key, mask in events:
                self.on_event(key.data, mask)
        result = self.result
        result.wall_seconds = time.perf_counter() - started
        result.cpu_seconds = time.process_time() - cpu_started
        result.statuses = dict(self.statuses)
        return result

    def more(self) -> bool:
        return self.sent < self.max_requests and time.perf_counter() < self.deadline

    def send_next(self, connection: _Connection) -> None:
        connection.pending = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        connection.started = time.perf_counter()
        self.flush(connection)

    def flush(self, connection: _Connection) -> None:
        try:
            written = connection.sock.send(connection.pending)
        except BlockingIOError:
            written = 0
        connection.pending = connection.pending[written:]
        self.selector.modify(connection.sock, selectors.EVENT_WRITE if connection.pending else selectors.EVENT_READ, connection)

    def open_one(self) -> None:
        connection = _Connection(self.host, self.port, self.timeout)
        self.selector.register(connection.sock, selectors.EVENT_READ, connection)
        self.send_next(connection)

    def note_failure(self, error: str) -> None:
        self.result.failure_count += 1
        if len(self.result.failures) < 20:
            self.result.failures.append(error)

    def fail(self, connection: _Connection, error: str) -> None:
        self.note_failure(error)
        self.selector.unregister(connection.sock)
        connection.close()
        if self.more():
            try:
                self.open_one()
            except OSError as reconnect_error:
                self.note_failure(f"reconnect: {reconnect_error!r}")

    def time_out_silent(self) -> None:
        for key in list(self.selector.get_map().values()):
            if time.perf_counter() - key.data.started > self.timeout:
                self.fail(key.data, f"no answer within {self.timeout} s")

    def on_event(self, connection: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            try:
                self.flush(connection)
            except OSError as error:
                self.fail(connection, repr(error))
            return
        try:
            chunk = connection.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as error:
            self.fail(connection, repr(error))
            return
        if not chunk:
            self.fail(connection, "connection closed by the server before the answer")
            return
        connection.buffer += chunk
        complete = _response_complete(connection.buffer)
        if complete is not None:
            self.on_answer(connection, *complete)

    def on_answer(self, connection: _Connection, status: int, total: int, closes: bool) -> None:
        self.result.latencies.append(time.perf_counter() - connection.started)
        self.statuses[str(status)] += 1
        self.result.requests += 1
        del connection.buffer[:total]
        more = self.more()
        if closes or not more:
            self.selector.unregister(connection.sock)
            connection.close()
            if closes and more:
                self.open_one()
        else:
            self.send_next(connection)


def serve_canned(host: str, port: int, body_bytes: int) -> None:
    """An HTTP/1.1 server that answers every request at once with the same
    ``body_bytes`` of JSON: the load client's own ceiling is measured against it."""
    body = b'{"pad":"' + b"x" * max(0, body_bytes - 10) + b'"}'
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, bytearray()

        def data_received(self, data):
            self.buffer += data
            while (end := self.buffer.find(HEAD_END)) >= 0:
                head = bytes(self.buffer[:end]).lower()
                length = 0
                if (at := head.find(b"content-length:")) >= 0:
                    length = int(head[at + 15 :].split(b"\r\n", 1)[0])
                if len(self.buffer) < end + 4 + length:
                    return
                del self.buffer[: end + 4 + length]
                self.transport.write(response)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, host, port, reuse_address=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except KeyboardInterrupt:
        pass


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="send load and write the result as JSON")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--path", default="/v1/recall")
    run.add_argument("--bodies", type=Path, required=True, help="one JSON body per line")
    run.add_argument("--connections", type=int, default=1)
    run.add_argument("--seconds", type=float, default=10.0)
    run.add_argument("--max-requests", type=int, default=1_000_000)
    run.add_argument("--warmup", type=int, default=0, help="requests sent (on one connection) and dropped first")
    run.add_argument("--out", type=Path, required=True)
    canned = commands.add_parser("canned", help="answer every request with a fixed body (the client's ceiling)")
    canned.add_argument("--host", default="127.0.0.1")
    canned.add_argument("--port", type=int, required=True)
    canned.add_argument("--body-bytes", type=int, default=6000)
    args = parser.parse_args(argv)
    if args.command == "canned":
        serve_canned(args.host, args.port, args.body_bytes)
        return
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    if not bodies:
        sys.exit(f"{args.bodies}: no request bodies")
    requests = [request_bytes(args.host, args.port, args.path, body) for body in bodies]
    if args.warmup:
        run_load(args.host, args.port, requests, 1, seconds=60, max_requests=args.warmup)
    result = run_load(args.host, args.port, requests, args.connections, args.seconds, args.max_requests)
    args.out.write_text(json.dumps(asdict(result)))


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until something accepts on ``host:port`` (or raise after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as error:
            if error.errno not in (errno.ECONNREFUSED, errno.ECONNRESET) and not isinstance(error, TimeoutError):
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s") from error
            time.sleep(0.05)


if __name__ == "__main__":
    _main()
