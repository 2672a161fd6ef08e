"""A small fault proxy on loopback between an S3 client and a real S3 server.

It forwards each request as it came (the Host header included, so that SigV4 still
holds) and injects, for requests that match a rule, either an error answer (503
SlowDown) without forwarding, or a lost answer: the request is forwarded and carried
out, and the client's connection is closed before the answer, as when a connection
drops, or a stall: the request waits until the test releases it (a server that hangs),
and is then forwarded.  A latency delays every request, as a bucket in a far region would.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)

Match = Callable[[str, str], bool]  # (method, path with query) -> inject here?


def request(method: str, fragment: str) -> Match:
    """Requests of method whose path (with its query) holds fragment."""
    return lambda m, path: m == method and fragment in path


def until(done: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Wait until done() (what a request through the proxy brings about), for a while."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return done()


@dataclass
class Rule:
    match: Match
    action: str  # "slow-down", "lose-answer" or "stall"
    count: int = 1  # requests it still applies to
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: str  # http://host:port
    endpoint: str = ""  # the proxy's own, once started
    rules: list[Rule] = field(default_factory=list)
    latency: float = 0.0  # seconds each request waits before it is forwarded (a far region)
    in_flight: int = 0  # requests being forwarded now
    max_in_flight: int = 0  # the most at once, since started
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)  # ends the stalls

    def inject(self, action: str, match: Match, count: int = 1) -> Rule:
        rule = Rule(match, action, count)
        with self.lock:
            self.rules.append(rule)
        return rule

    def _take(self, method: str, path: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule.count > 0 and rule.match(method, path):
                    rule.count -= 1
                    rule.hits += 1
                    return rule.action
        return None


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    target = urlsplit(proxy.upstream)
    host, port = target.hostname or "127.0.0.1", target.port

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the test reports what matters

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            action = proxy._take(self.command, self.path)
            if action == "slow-down":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
            if action == "stall":
                proxy.released.wait(60)
            with proxy.lock:
                proxy.in_flight += 1
                proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
            if proxy.latency:
                time.sleep(proxy.latency)
            upstream = http.client.HTTPConnection(host, port, timeout=60)
            try:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
                with proxy.lock:
                    proxy.in_flight -= 1
            if action == "lose-answer":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            head = self.command == "HEAD"  # its Content-Length is the object's: keep it
            dropped = ("transfer-encoding", "connection") + (() if head else ("content-length",))
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in dropped:
                    self.send_header(name, value)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
