"""A real S3 endpoint on localhost for the object-storage tests, and a fault-injecting proxy.

``S3Server`` runs moto's ``ThreadedMotoServer`` (it speaks the S3 HTTP API; the code under test
uses the real ``pyarrow.fs.S3FileSystem`` client against it) behind ``FaultProxy``, a small HTTP
proxy that forwards each request to moto and counts it by method and path; on a chosen fraction
of requests it answers ``503 SlowDown`` or closes the connection without an answer instead,
and it answers ``403 AccessDenied`` for the paths in ``deny``.
Both run in threads of the test process. ``env()`` gives the standard AWS variables that point
the SDK at the proxy with dummy credentials (no real account, no network).
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Dummy credentials (moto takes any), distinctive so a test can grep saved files for them.
ACCESS_KEY, SECRET_KEY = "AKIAVLSCALEDUMMYKEY7", "vlscale-dummy-secret-Qx81"


class FaultProxy(ThreadingHTTPServer):
    """Forward HTTP to ``upstream``; fail ``fault_rate`` of the requests (seeded, so reproducible)."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], fault_rate: float = 0.0, seed: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.fault_rate = fault_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (method, path) -> count, faults included
        self.faults: Counter = Counter()  # "503" / "drop" -> count
        self.deny: set[str] = set()  # paths answered 403 AccessDenied

    def pick_fault(self) -> str | None:
        with self.lock:
            if self.fault_rate and self.rng.random() < self.fault_rate:
                fault = self.rng.choice(["503", "drop"])
                self.faults[fault] += 1
                return fault
        return None

    def count(self, method: str, path: str) -> None:
        with self.lock:
            self.requests[(method, path)] += 1

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        """The request body as sent: a Content-Length body, or the raw chunked encoding (the
        SDK streams uploads as ``aws-chunked`` with trailers), forwarded byte for byte."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""
        raw = bytearray()
        while True:
            line = self.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            raw += self.rfile.read(size + 2)
        while True:  # trailers, then the blank line
            line = self.rfile.readline()
            raw += line
            if line in (b"\r\n", b"\n", b""):
                return bytes(raw)

    def _forward(self) -> None:
        body = self._read_body()
        self.server.count(self.command, urlsplit(self.path).path)
        fault = "403" if urlsplit(self.path).path in self.server.deny else self.server.pick_fault()
        if fault == "drop":  # the connection dies before any answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("503", "403"):
            payload = (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                       if fault == "503" else b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in ("connection", "keep-alive", "expect"):
                conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # a HEAD answer carries the object's length, not its (empty) body's
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class S3Server:
    """moto behind a ``FaultProxy``; ``start()`` / ``stop()`` or use as a context manager."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.proxy: FaultProxy | None = None

    def start(self) -> S3Server:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        self.moto.start()
        self.proxy = FaultProxy(self.moto.get_host_and_port())
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        self.moto.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self.proxy.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def make_bucket(self, name: str) -> None:
        conn = http.client.HTTPConnection(*self.moto.get_host_and_port(), timeout=30)
        conn.request("PUT", f"/{name}")
        resp = conn.getresponse()
        resp.read()
        if resp.status not in (200, 409):
            raise RuntimeError(f"could not create bucket {name}: HTTP {resp.status}")
