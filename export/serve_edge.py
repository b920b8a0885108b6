"""The HTTP edge of `mirrorfast serve`: its routes, Prometheus metrics, OpenAI-shaped errors, and `Edge`, the
outermost ASGI layer (metrics for every request, the API-key check, the body-size limit, a JSON 500 for
anything that escapes the app). The routes themselves are in export/server.py."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any

logger = logging.getLogger("mirrorfast.serve")

EMBEDDINGS_ROUTE = "/v1/embeddings"
EMBED_ROUTE = "/embed"
HEALTH_ROUTE = "/health"
METRICS_ROUTE = "/metrics"
MODELS_ROUTE = "/v1/models"  # OpenAI's model list (client.models.list()); /v1/models/{id}: one model
MODEL_ROUTE = MODELS_ROUTE + "/{model}"
PROTECTED_ROUTES = frozenset({EMBEDDINGS_ROUTE, EMBED_ROUTE, MODELS_ROUTE, MODEL_ROUTE})
KNOWN_ROUTES = frozenset({EMBEDDINGS_ROUTE, EMBED_ROUTE, HEALTH_ROUTE, METRICS_ROUTE, MODELS_ROUTE})
# The status label of a request whose client went away before it was answered (nginx's 499): not a 5xx.
CLIENT_CLOSED_REQUEST = 499
CLIENT_GONE = object()  # what Edge._handle returns when the client disconnected mid-body


def route_label(path: str) -> str:
    """The route a path belongs to, as metrics label it: a few fixed values, whatever clients send."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith(MODELS_ROUTE + "/"):  # every id (and none: the route answers it 404) is one label
        return MODEL_ROUTE
    return "other"


# ----------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics of one app, in its own registry (several apps in one process never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mirrorfast_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "mirrorfast_request_duration_seconds", "HTTP request latency (first byte in to last byte out)",
            ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.in_progress = Gauge("mirrorfast_requests_in_progress", "HTTP requests being handled", registry=r)
        self.inputs = Counter("mirrorfast_inputs", "texts embedded", registry=r)
        self.tokens = Counter("mirrorfast_prompt_tokens", "tokens embedded (incl. special tokens)", registry=r)
        self.batch_size = Histogram(
            "mirrorfast_batch_size", "inputs per model call", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        )
        self.batch_tokens = Histogram(
            "mirrorfast_batch_tokens", "padded tokens (inputs x longest input) per model call", registry=r,
            buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
        )
        self.queue_depth = Gauge("mirrorfast_queue_depth", "inputs waiting for the inference worker", registry=r)
        self.rejected = Counter("mirrorfast_rejected", "requests refused with 503 (queue full)", registry=r)
        self.truncated = Counter("mirrorfast_truncated_inputs", "texts cut to --max-input-tokens (--truncate)",
                                 registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, index: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.index, self.headers = index, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None,
               index: int | None = None) -> bytes:
    err: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if index is not None:
        err["index"] = index
    return json.dumps({"error": err}).encode()


# ---------------------------------------------------------------------------------- ASGI edge layer
async def _send_json(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (headers or {}).items():
        raw_headers.append((k.lower().encode("latin-1"), v.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Edge:
    """Outermost ASGI layer: metrics for every request, API-key check, body-size limit (declared
    Content-Length and streamed bytes), a read timeout on the body, and a JSON 500 for anything that escapes
    the app."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int,
                 read_timeout_s: float) -> None:
        self.app = app
        self.metrics = metrics
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout_s = float(read_timeout_s)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = route_label(path)
        started = False
        status = 500

        async def send_wrapper(message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            if await self._handle(scope, receive, send_wrapper, route) is CLIENT_GONE:
                status = CLIENT_CLOSED_REQUEST
        except asyncio.CancelledError:
            # The graceful shutdown's time is up (uvicorn cancels what is left): answer 503 if nothing was
            # sent yet, and end quietly; uvicorn has logged how many requests it cut off.
            if not started:
                with contextlib.suppress(Exception):
                    await _send_json(send_wrapper, 503, error_body("the server is shutting down; retry",
                                                                   "server_overloaded", code="shutting_down"),
                                     {"connection": "close"})
        except Exception:  # noqa: BLE001 - one bad request never takes the server down
            logger.exception("unhandled error on %s %s", scope.get("method"), path)
            if not started:
                with contextlib.suppress(Exception):
                    await _send_json(send_wrapper, 500, error_body("internal server error", "server_error"))
        finally:
            self.metrics.in_progress.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        if self._key is None:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
                    return True
        return False

    async def _handle(self, scope, receive, send, route: str) -> object:
        """Answer the request (None), or return CLIENT_GONE if the client left before its body arrived.
        route: route_label of its path."""
        if route in PROTECTED_ROUTES and not self._authorized(scope):
            await _send_json(
                send, 401,
                error_body("missing or invalid API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key"),
                {"www-authenticate": "Bearer"},
            )
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = error_body(f"request body is larger than the limit of {limit} bytes",
                               "invalid_request_error", code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, error_body("invalid Content-Length header",
                                                           "invalid_request_error"))
                    return
                if declared > limit:
                    await _send_json(send, 413, too_large, {"connection": "close"})
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                await _send_json(send, 408, error_body(
                    f"the request body stalled: nothing arrived for {self.read_timeout_s:g} s",
                    "invalid_request_error", code="request_timeout"), {"connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return CLIENT_GONE
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await _send_json(send, 413, too_large, {"connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return await self._run_app(scope, b"".join(chunks), receive, send)

    async def _run_app(self, scope, body: bytes, receive, send) -> object:
        """Run the app on the buffered body while watching the connection: a client that disconnects before
        its answer is complete has the app cancelled (its queued inputs are dropped, not computed) and the
        request is CLIENT_GONE. Only the watcher calls `receive`; the app's later calls wait on it."""
        loop = asyncio.get_running_loop()
        after_body = loop.create_future()  # the next message from the server: http.disconnect
        replayed, answered = False, False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.shield(after_body)

        async def send_noting_the_end(message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        app = asyncio.ensure_future(self.app(scope, replay, send_noting_the_end))
        watcher = asyncio.ensure_future(receive())  # also returns once the answer is complete
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done():
                message = watcher.result()
                after_body.set_result(message)
                if message["type"] == "http.disconnect" and not answered:
                    app.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await app
                    return CLIENT_GONE
            return await app  # the app's result, or its exception
        finally:
            for task in (app, watcher):  # when this request is cancelled itself (the graceful timeout)
                task.cancel()
