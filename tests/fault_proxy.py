"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the GCS emulator.

Storage that fails the way the real service does, on a deterministic schedule:

- `429` / `503`: the proxy answers with GCS's JSON error body; the request
  never reaches the emulator (throttling, a busy frontend).
- `403`: the same, as GCS answers a caller whose IAM role lacks the
  permission (a worker that may read a bucket but not write it); the
  emulator has no IAM of its own.
- `reset`: the connection is reset before the request is forwarded.
- `lost`: the request is forwarded and takes effect, then the connection is
  reset instead of the answer: the client cannot tell it happened. This is
  where a retried non-idempotent request duplicates work or fails (a copy
  already done, a resumable-upload chunk already stored, a delete already
  applied).
- `cut`: the answer's headers and half its body arrive, then a reset (a
  download broken mid-stream).
- `slow`: the request is forwarded after `delay_ms`.

Each request is classified by the storage operation it performs (`list`,
`stat`, `read`, `write`, `write-start`, `write-chunk`, `copy`, `delete`,
`bucket`), with the objects it names; the sub-requests of a JSON batch
(Beam's rename = batch copy + batch delete) classify the batch. A `Rule`
fires on every `every`-th request matching its operation and object filter,
from the `first`-th on, at most `times` times (None: for ever, a fault that
persists). Counting per rule makes the schedule reproducible: the same run
meets the same number of faults of each kind, whichever thread sends what.

Every injection is recorded (`injected`) and logged, and every request is
counted by operation (`seen`), so a test can prove the faults really fired
on the operations it is about.
"""
from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import json
import logging
import re
import socket
import struct
import threading
import time
import urllib.parse
from typing import Iterator, Optional, Sequence

_LOG = logging.getLogger("fault_proxy")

OPERATIONS = ("list", "stat", "read", "write", "write-start", "write-chunk", "copy", "delete", "bucket", "other")
FAULTS = ("429", "503", "403", "reset", "lost", "cut", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_OBJECT_PATH = re.compile(r"/b/(?P<bucket>[^/?\s]+)/o/(?P<name>[^?\s]+?)(?:/(?P<verb>copyTo|rewriteTo)/b/(?P<dbucket>[^/?\s]+)/o/(?P<dname>[^?\s]+))?(?:\?|\s|$)")
_LIST_PATH = re.compile(r"/b/(?P<bucket>[^/?\s]+)/o(?:\?|$)")
_BUCKET_PATH = re.compile(r"/storage/v1/b/(?P<bucket>[^/?\s]+)(?:\?|$)")
_BATCH_LINE = re.compile(r"^(?P<method>GET|POST|PUT|PATCH|DELETE) (?P<url>\S+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Inject `fault` into every `every`-th request of `op` (from the `first`-th), at most `times` times."""

    op: str
    fault: str
    every: int = 1
    first: int = 1
    times: Optional[int] = None  # None: every matching request from `first` on (a persistent fault)
    object_contains: str = ""  # only requests naming an object whose gs:// URI contains this
    delay_ms: int = 0  # for "slow"

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS and self.op != "*":
            raise ValueError(f"unknown operation {self.op!r}; one of {OPERATIONS} or '*'")
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")
        if self.every < 1 or self.first < 1:
            raise ValueError("every and first count from 1")


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    op: str
    objects: tuple[str, ...]  # gs:// URIs the request is about


@dataclasses.dataclass(frozen=True)
class Injection:
    seq: int  # position of the request among all requests the proxy saw
    rule: int  # index of the rule that fired
    fault: str
    op: str
    method: str
    objects: tuple[str, ...]


def _gs(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{urllib.parse.unquote(name)}"


def classify(method: str, path: str, body: bytes, uploads: dict[str, str]) -> Request:
    """The storage operation an emulator-bound HTTP request performs, and the objects it names."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    if url.path.startswith("/batch/"):
        lines = [m for m in _BATCH_LINE.finditer(body.decode("utf-8", "replace")) if "/b/" in m["url"]]
        ops = {("copy" if "/copyTo/" in m["url"] or "/rewriteTo/" in m["url"] else "delete" if m["method"] == "DELETE" else "other") for m in lines}
        objects = []
        for line in lines:
            match = _OBJECT_PATH.search(urllib.parse.urlsplit(line["url"]).path + " ")
            if match:
                objects.append(_gs(match["bucket"], match["name"]))
                if match["dname"]:
                    objects.append(_gs(match["dbucket"], match["dname"]))
        return Request(method, path, ops.pop() if len(ops) == 1 else "other", tuple(objects))
    if url.path.startswith("/upload/"):
        bucket_match = re.search(r"/b/([^/]+)/o", url.path)
        bucket = bucket_match.group(1) if bucket_match else "?"
        if "upload_id" in query:
            return Request(method, path, "write-chunk", (uploads.get(query["upload_id"][0], f"gs://{bucket}/?"),))
        name = query.get("name", [""])[0] or _name_in_body(body)
        op = "write-start" if query.get("uploadType", [""])[0] == "resumable" else "write"
        return Request(method, path, op, (_gs(bucket, urllib.parse.quote(name)),) if name else ())
    match = _OBJECT_PATH.search(url.path + " ")
    if match:
        objects = (_gs(match["bucket"], match["name"]),)
        if match["verb"]:
            return Request(method, path, "copy", objects + (_gs(match["dbucket"], match["dname"]),))
        if method == "DELETE":
            return Request(method, path, "delete", objects)
        if method == "GET":
            media = url.path.startswith("/download/") or query.get("alt", [""])[0] == "media"
            return Request(method, path, "read" if media else "stat", objects)
        return Request(method, path, "other", objects)
    match = _LIST_PATH.search(url.path)
    if match and method == "GET":
        prefix = query.get("prefix", [""])[0]
        return Request(method, path, "list", (f"gs://{match['bucket']}/{prefix}",))
    if _BUCKET_PATH.search(url.path):
        return Request(method, path, "bucket", ())
    return Request(method, path, "other", ())


def _name_in_body(body: bytes) -> str:
    """Object name of a multipart or resumable-start upload, from its JSON metadata part."""
    match = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body[:65536])
    return json.loads(b'"' + match.group(1) + b'"') if match else ""


class FaultProxy:
    """Forwards HTTP requests to `upstream` (host, port), injecting faults by `rules`."""

    def __init__(self, upstream: tuple[str, int], rules: Sequence[Rule] = ()):
        self.upstream = upstream
        self._lock = threading.Lock()
        self._uploads: dict[str, str] = {}  # resumable upload id -> object URI
        self.set_rules(rules)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client libraries' sessions expect

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
                _LOG.debug("%s " + format, self.client_address, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                proxy._handle(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass  # the proxy reset this connection on purpose

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                _LOG.debug("connection from %s ended abruptly", client_address)  # clients drop pooled connections

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Replace the schedule and forget what was seen and injected (one schedule per scenario)."""
        with self._lock:
            self.rules = tuple(rules)
            self._matched = [0] * len(self.rules)
            self._fired = [0] * len(self.rules)
            self.injected: list[Injection] = []
            self.seen: collections.Counter[str] = collections.Counter()
            self._seq = 0

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def injected_ops(self) -> collections.Counter[tuple[str, str]]:
        """(operation, fault) -> how many were injected."""
        with self._lock:
            return collections.Counter((i.op, i.fault) for i in self.injected)

    # -- request path ---------------------------------------------------------

    def _decide(self, request: Request) -> Optional[tuple[int, Rule]]:
        with self._lock:
            self._seq += 1
            self.seen[request.op] += 1
            chosen = None
            for index, rule in enumerate(self.rules):
                if rule.op not in ("*", request.op):
                    continue
                if rule.object_contains and not any(rule.object_contains in uri for uri in request.objects):
                    continue
                self._matched[index] += 1
                count = self._matched[index]
                due = count >= rule.first and (count - rule.first) % rule.every == 0
                if chosen is None and due and (rule.times is None or self._fired[index] < rule.times):
                    self._fired[index] += 1
                    chosen = (index, rule)
            if chosen:
                injection = Injection(self._seq, chosen[0], chosen[1].fault, request.op, request.method, request.objects)
                self.injected.append(injection)
                _LOG.info("injected %s into %s %s (request %d)", injection.fault, request.op, ", ".join(request.objects), self._seq)
            return chosen

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        request = classify(handler.command, handler.path, body, self._uploads)
        decision = self._decide(request)
        fault = decision[1] if decision else None
        if fault and fault.fault in ("429", "503", "403"):
            _send(handler, int(fault.fault), {"Content-Type": "application/json"}, _error_body(int(fault.fault)))
            return
        if fault and fault.fault == "reset":
            _reset(handler)
            return
        if fault and fault.fault == "slow":
            time.sleep(fault.delay_ms / 1000)
        status, headers, payload = self._forward(handler, body, rewrite_links=request.op != "read")
        if request.op == "write-start" and request.objects:
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(headers.get("Location", "")).query).get("upload_id")
            if upload_id:
                with self._lock:
                    self._uploads[upload_id[0]] = request.objects[0]
        if fault and fault.fault == "lost":
            _reset(handler)
            return
        if fault and fault.fault == "cut" and len(payload) > 1:
            _send(handler, status, headers, payload[: len(payload) // 2], declared_length=len(payload))
            _reset(handler)
            return
        _send(handler, status, headers, payload)

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, body: bytes,
                 rewrite_links: bool) -> tuple[int, dict[str, str], bytes]:
        """Send the request upstream; answer links (mediaLink, upload Location) point back at the proxy.

        The emulator builds links from the Host header and stores mediaLink with
        the object, so requests go upstream under the emulator's own host (stored
        links stay valid after this proxy is gone) and links in answers are
        rewritten to the proxy, as a reverse proxy in front of GCS would: a
        client that follows them stays behind the faults. Object contents
        (`read` answers) are never rewritten.
        """
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length", "host"}}
            headers["Host"] = upstream
            headers["Content-Length"] = str(len(body))
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            answer = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
        finally:
            connection.close()
        if rewrite_links:
            mine = self.endpoint[len("http://"):]
            payload = payload.replace(f"//{upstream}/".encode(), f"//{mine}/".encode())
            answer = {k: v.replace(f"//{upstream}/", f"//{mine}/") for k, v in answer.items()}
        return response.status, answer, payload


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return b"".join(_read_chunks(handler))
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _read_chunks(handler: http.server.BaseHTTPRequestHandler) -> Iterator[bytes]:
    while True:
        size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            handler.rfile.readline()  # the empty line after the last chunk (no trailers are sent)
            return
        yield handler.rfile.read(size)
        handler.rfile.readline()


def _error_body(status: int) -> bytes:
    """GCS's JSON API error shape, so client libraries parse it as they would the real one."""
    reason = {429: "rateLimitExceeded", 503: "backendError", 403: "forbidden"}[status]
    message = f"{http.client.responses[status]} (injected by the test's fault proxy)"
    return json.dumps({"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}).encode()


def _send(handler: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes,
          declared_length: Optional[int] = None) -> None:
    handler.send_response_only(status)
    for key, value in headers.items():
        if key.lower() not in ("content-length", "date", "server"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload) if declared_length is None else declared_length))
    handler.end_headers()
    handler.wfile.write(payload)
    handler.wfile.flush()


def _reset(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Close with RST (SO_LINGER 0): the client sees a connection reset, not an orderly end."""
    try:
        handler.wfile.flush()
    except OSError:
        pass
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    handler.connection.close()
