"""`mirrorfast serve`: an OpenAI-compatible embedding server for an export directory.

Shape of a request:

    HTTP (uvicorn) -> _Edge (metrics, auth, body-size limit) -> FastAPI route (parse, tokenize once,
    validate) -> Batcher queue -> the one inference thread (OnnxEncoder.encode_ids) -> route (JSON) -> HTTP

* Every request goes through a single inference worker thread that owns the OnnxEncoder. Concurrent
  requests are merged into batches; a batch closes when adding the next input would exceed
  `max_batch_tokens` **padded** tokens (inputs x longest input of the batch, which is what the model
  computes on) or when its oldest input has waited `batch_wait_ms`. One request may be split over
  several batches; each gets back exactly its own vectors, in order.
* The queue is bounded (`max_queue` inputs waiting for the worker); a request that does not fit gets
  503 with Retry-After instead of waiting behind an unbounded queue.
* Each request is tokenized once, with private copies of the tokenizer (inline for small requests, on a
  helper thread for large ones); the token ids travel through the queue, so the worker only runs the model.
* Errors are JSON in the OpenAI shape {"error": {"message", "type", "param", "code"}}.

The server knows only export directories (through OnnxEncoder), never PyTorch models.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mirrorfast.errors import MirrorfastError
from mirrorfast.export.batching import Batcher, QueueFull, Tokenizing

logger = logging.getLogger("mirrorfast.serve")

EMBEDDINGS_ROUTE = "/v1/embeddings"
EMBED_ROUTE = "/embed"
HEALTH_ROUTE = "/health"
METRICS_ROUTE = "/metrics"
PROTECTED_ROUTES = frozenset({EMBEDDINGS_ROUTE, EMBED_ROUTE})
KNOWN_ROUTES = frozenset({EMBEDDINGS_ROUTE, EMBED_ROUTE, HEALTH_ROUTE, METRICS_ROUTE})


# ------------------------------------------------------------------------------------------ config
@dataclass
class ServeConfig:
    """Limits and knobs of one server. `resolve(encoder)` fills the defaults that depend on the model."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_batch_tokens: int = 16384  # padded tokens (inputs x longest input) per model call
    max_inputs: int = 256  # inputs per request
    max_input_tokens: int | None = None  # tokens per input incl. specials; default: the model's max length
    truncate: bool = False  # cut inputs over max_input_tokens instead of answering 422
    max_queue: int = 4096  # inputs waiting for the worker; beyond that: 503 + Retry-After
    batch_wait_ms: float = 2.0  # how long a batch's oldest input may wait for company
    max_body_bytes: int | None = None  # default: derived from max_inputs x max_input_tokens
    graceful_timeout_s: float | None = 60.0  # on SIGTERM/SIGINT, how long in-flight requests may take
    model_name: str | None = None  # the name answered in "model"; default: the encoder's name
    retry_after_s: int = 1

    def resolve(self, encoder) -> "ServeConfig":
        """Check every limit against the model; return a copy with all defaults filled in."""
        cfg = copy.copy(self)
        model_max = int(encoder.max_length)
        for name in ("max_batch_tokens", "max_inputs", "max_queue"):
            if int(getattr(cfg, name)) < 1:
                raise MirrorfastError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        if cfg.max_input_tokens is None:
            cfg.max_input_tokens = model_max
        if cfg.max_input_tokens < 3:
            raise MirrorfastError(f"--max-input-tokens must be at least 3, got {cfg.max_input_tokens}")
        if cfg.max_input_tokens > model_max:
            raise MirrorfastError(
                f"--max-input-tokens {cfg.max_input_tokens} exceeds the model's maximum length of "
                f"{model_max} tokens"
            )
        if cfg.max_batch_tokens < cfg.max_input_tokens:
            raise MirrorfastError(
                f"--max-batch-tokens {cfg.max_batch_tokens} is smaller than one input of --max-input-tokens "
                f"{cfg.max_input_tokens}"
            )
        if cfg.batch_wait_ms < 0:
            raise MirrorfastError(f"--batch-wait-ms must be >= 0, got {cfg.batch_wait_ms}")
        if cfg.max_body_bytes is None:
            # Generous for real text: 32 bytes of JSON per token (4x with --truncate, where inputs may be
            # documents), at least 1 MiB.
            per_input = cfg.max_input_tokens * 32 * (4 if cfg.truncate else 1) + 64
            cfg.max_body_bytes = max(1 << 20, cfg.max_inputs * per_input + (64 << 10))
        if cfg.max_body_bytes < 1024:
            raise MirrorfastError(f"--max-body-bytes must be at least 1024, got {cfg.max_body_bytes}")
        if cfg.api_key is not None and not cfg.api_key:
            cfg.api_key = None
        if cfg.model_name is None:
            cfg.model_name = str(getattr(encoder, "name", None) or "mirrorfast")
        return cfg


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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- ASGI edge layer
async def _send_json(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (headers or {}).items():
        raw_headers.append((k.lower().encode("latin-1"), v.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Edge:
    """Outermost ASGI layer: metrics for every request, API-key check, body-size limit (declared
    Content-Length and streamed bytes), and a JSON 500 for anything that escapes the app."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        key = config.api_key
        self._key = key.encode("utf-8") if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
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
            await self._handle(scope, receive, send_wrapper, path)
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

    async def _handle(self, scope, receive, send, path: str) -> None:
        if path in PROTECTED_ROUTES and not self._authorized(scope):
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
        limit = int(self.config.max_body_bytes)
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
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await _send_json(send, 413, too_large, {"connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -------------------------------------------------------------------------------------------- app
class _State:
    def __init__(self, encoder, config: ServeConfig, metrics: Metrics) -> None:
        self.encoder = encoder
        self.config = config
        self.metrics = metrics
        self.dim = int(encoder.dim)
        # Each request is tokenized once, on the request side; the inference thread only runs the model.
        self.tokenizing = Tokenizing(encoder, config.max_input_tokens if config.truncate else None)
        self.batcher = Batcher(encoder.encode_ids, self.dim, config.max_batch_tokens,
                               config.batch_wait_ms / 1000.0, config.max_queue, metrics)


def _parse_texts(value: Any, param: str, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        texts = [value]
        indexed = False
    elif isinstance(value, list):
        if not value:
            raise ApiError(422, f"'{param}' must not be an empty list", param=param, code="empty_input")
        if len(value) > max_inputs:
            raise ApiError(422, f"'{param}' has {len(value)} items; at most {max_inputs} are allowed per request",
                           param=param, code="too_many_inputs")
        for i, v in enumerate(value):
            if isinstance(v, str):
                continue
            if _is_int(v) or (isinstance(v, list) and all(_is_int(t) for t in v)):
                raise ApiError(422, f"{param}[{i}] is a token array; token arrays are not supported, send text",
                               param=param, code="token_arrays_not_supported", index=i)
            raise ApiError(422, f"{param}[{i}] must be a string, got {_json_type(v)}",
                           param=param, code="invalid_type", index=i)
        texts = value
        indexed = True
    elif value is None:
        raise ApiError(422, f"'{param}' is required: a string or a list of strings", param=param,
                       code="missing_input")
    else:
        raise ApiError(422, f"'{param}' must be a string or a list of strings, got {_json_type(value)}",
                       param=param, code="invalid_type")
    for i, text in enumerate(texts):
        where = f"{param}[{i}]" if indexed else f"'{param}'"
        if not text:
            raise ApiError(422, f"{where} is an empty string", param=param, code="empty_input",
                           index=i if indexed else None)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(422, f"{where} is not valid Unicode (unpaired surrogate at character {exc.start})",
                           param=param, code="invalid_unicode", index=i if indexed else None) from None
    return texts


def create_app(encoder, config: ServeConfig | None = None):
    """The ASGI app serving `encoder` (an OnnxEncoder or anything with the same attributes)."""
    config = (config or ServeConfig()).resolve(encoder)
    metrics = Metrics()
    state = _State(encoder, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.batcher.start()
        try:
            yield
        finally:
            # uvicorn has already waited for the requests in flight; drain whatever is left anyway
            await asyncio.to_thread(state.batcher.stop)
            state.tokenizing.close()

    app = FastAPI(title="mirrorfast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mirrorfast = state

    def json_response(payload: Any, status: int = 200) -> Response:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        return Response(content=body, status_code=status, media_type="application/json")

    def api_error_response(err: ApiError) -> Response:
        return Response(content=error_body(err.message, err.type, err.param, err.code, err.index),
                        status_code=err.status, media_type="application/json", headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError(404, "not found: the routes are POST /v1/embeddings, POST /embed, GET /health, "
                                "GET /metrics", "not_found_error", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"method not allowed: {exc.detail}", "invalid_request_error",
                           code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            err = ApiError(exc.status_code, str(exc.detail), "invalid_request_error")
        return api_error_response(err)

    @app.exception_handler(Exception)
    async def server_error(_request, _exc: Exception):  # Starlette logs and re-raises; _Edge absorbs it
        return api_error_response(ApiError(500, "internal server error", "server_error"))

    async def read_json_object(request: Request) -> dict:
        """The request body as a JSON object (400 for bad JSON or content type, 422 for another JSON type)."""
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(400, f"Content-Type must be application/json, got {ctype or 'none'}",
                           code="invalid_content_type")
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"request body must be a JSON object, got {_json_type(body)}", code="invalid_type")
        return body

    async def embed_texts(texts: list[str], param: str) -> tuple[np.ndarray, int]:
        try:
            rows, counts = await state.tokenizing.tokenize(texts)
        except Exception as exc:  # noqa: BLE001 - a text the tokenizer cannot take is the client's problem
            raise ApiError(422, f"'{param}' could not be tokenized: {exc}", param=param,
                           code="invalid_input") from None
        limit = config.max_input_tokens
        for i, n in enumerate(counts):
            if n > limit and not config.truncate:
                where = f"{param}[{i}]" if len(texts) > 1 or param == "inputs" else f"'{param}'"
                raise ApiError(
                    422, f"{where} is {n} tokens long; the limit is {limit} tokens per input "
                         "(the server was not started with --truncate)",
                    param=param, code="input_too_long", index=i,
                )
        lengths = [len(row) for row in rows]  # after truncation
        try:
            future = state.batcher.submit(rows, lengths)
        except QueueFull:
            metrics.rejected.inc()
            raise ApiError(503, "the server is overloaded (queue full); retry later", "server_overloaded",
                           code="queue_full", headers={"retry-after": str(config.retry_after_s)}) from None
        except RuntimeError:
            raise ApiError(503, "the server is shutting down", "server_overloaded", code="shutting_down",
                           headers={"retry-after": str(config.retry_after_s)}) from None
        try:
            vectors = await future
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception:  # noqa: BLE001
            raise ApiError(500, "inference failed", "server_error", code="inference_failed") from None
        metrics.inputs.inc(len(texts))
        total = int(sum(lengths))
        metrics.tokens.inc(total)
        return vectors, total

    @app.post(EMBEDDINGS_ROUTE)
    async def openai_embeddings(request: Request):
        try:
            body = await read_json_object(request)
            texts = _parse_texts(body.get("input"), "input", config.max_inputs)
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise ApiError(422, f"'model' must be a string, got {_json_type(model)}", param="model",
                               code="invalid_type")
            fmt = body.get("encoding_format")
            if fmt is None:
                fmt = "float"
            if fmt not in ("float", "base64"):
                raise ApiError(422, f"'encoding_format' must be 'float' or 'base64', got {json.dumps(fmt)}",
                               param="encoding_format", code="invalid_value")
            dims = body.get("dimensions")
            if dims is not None and (not _is_int(dims) or dims != state.dim):
                raise ApiError(422, f"'dimensions' must be {state.dim} (this model's size), got {json.dumps(dims)}",
                               param="dimensions", code="invalid_value")
            vectors, total = await embed_texts(texts, "input")
        except ApiError as err:
            return api_error_response(err)
        if fmt == "base64":
            little = vectors.astype("<f4", copy=False)
            data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode("ascii")}
                    for i, v in enumerate(little)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors.tolist())]
        return json_response({
            "object": "list", "data": data, "model": config.model_name,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        })

    @app.post(EMBED_ROUTE)
    async def embed(request: Request):
        try:
            body = await read_json_object(request)
            texts = _parse_texts(body.get("inputs"), "inputs", config.max_inputs)
            vectors, _ = await embed_texts(texts, "inputs")
        except ApiError as err:
            return api_error_response(err)
        return json_response(vectors.tolist())

    @app.get(HEALTH_ROUTE)
    async def health():
        return json_response({"status": "ok", "model": config.model_name, "dim": state.dim,
                              "provider": str(getattr(encoder, "provider", "cpu"))})

    @app.get(METRICS_ROUTE)
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    return _Edge(app, config, metrics)


# ------------------------------------------------------------------------------------ the command
def describe(config: ServeConfig, encoder, address: str) -> str:
    cut = "truncate longer" if config.truncate else "reject longer"
    auth = "on" if config.api_key else "off"
    return (
        f"mirrorfast serve: listening on {address} | model {config.model_name} (dim {int(encoder.dim)}, "
        f"max {int(encoder.max_length)} tokens) | provider {getattr(encoder, 'provider', '?')} | limits: "
        f"{config.max_inputs} inputs/request, {config.max_input_tokens} tokens/input ({cut}), "
        f"{config.max_batch_tokens} padded tokens/batch, queue {config.max_queue} inputs, "
        f"batch wait {config.batch_wait_ms:g} ms, body {config.max_body_bytes} bytes | api key {auth}"
    )


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MirrorfastError(f"cannot resolve --host {host!r}: {exc.strerror or exc}") from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise MirrorfastError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def load_encoder(export_dir: str | Path, provider: str = "auto", int8: bool = False):
    from mirrorfast.export.runtime import OnnxEncoder

    path = Path(export_dir)
    if not path.exists():
        raise MirrorfastError(f"{path} does not exist")
    try:  # OnnxEncoder says exactly what is wrong with a directory that is not an export
        return OnnxEncoder(path, provider=provider, int8=int8)
    except MirrorfastError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MirrorfastError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None


def run(export_dir: str | Path, config: ServeConfig, provider: str = "auto", int8: bool = False,
        log: Callable[[str], None] | None = None) -> int:
    """Load the export once, listen, serve until SIGINT/SIGTERM, finish the requests in flight, return 0."""
    import uvicorn

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    encoder = load_encoder(export_dir, provider=provider, int8=int8)
    app = create_app(encoder, config)
    resolved = app.app.state.mirrorfast.config
    sock = bind_socket(config.host, config.port)
    uv_config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", server_header=False,
        timeout_graceful_shutdown=config.graceful_timeout_s,
    )
    server = uvicorn.Server(uv_config)
    received: list[int] = []

    def remember(sig, _frame) -> None:  # uvicorn re-raises the signal it handled once it has stopped
        received.append(sig)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, remember)
    log(describe(resolved, encoder, _address(sock)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    metrics = app.metrics
    served = sum(
        s.value for m in metrics.registry.collect() if m.name == "mirrorfast_requests"
        for s in m.samples if s.name == "mirrorfast_requests_total"
    )
    why = f" on {signal.Signals(received[0]).name}" if received else ""
    log(f"mirrorfast serve: stopped{why} after {int(served)} requests")
    if not server.started:
        raise MirrorfastError("the server failed to start (see the messages above)")
    return 0
