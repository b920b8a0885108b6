"""`mirrorfast serve`: an OpenAI-compatible embedding server for an export directory.

Shape of a request:

    HTTP (uvicorn) -> Edge (serve_edge.py: metrics, auth, body-size limit) -> FastAPI route (parse,
    tokenize once, validate) -> Batcher queue -> the one inference thread (OnnxEncoder.encode_ids) -> route
    (JSON) -> HTTP

* Every request goes through a single inference worker thread that owns the OnnxEncoder. Concurrent
  requests are merged into batches; a batch closes when adding the next input would exceed
  `max_batch_tokens` **padded** tokens (inputs x longest input of the batch, which is what the model
  computes on) or when its oldest input has waited `batch_wait_ms`. One request may be split over
  several batches; each gets back exactly its own vectors, in order.
* The queue is bounded (`max_queue` inputs waiting for the worker, at least `max_inputs`); a request that does
  not fit gets 503 with Retry-After instead of waiting behind an unbounded queue.
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
import functools
import json
import math
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mirrorfast.errors import MirrorfastError
from mirrorfast.export.batching import Batcher, QueueFull, Tokenizing, WorkerStopped
from mirrorfast.export.runtime import EXPORT_JSON
from mirrorfast.export.serve_edge import (EMBED_ROUTE, EMBEDDINGS_ROUTE, HEALTH_ROUTE, METRICS_ROUTE, MODELS_ROUTE,
                                          ApiError, Edge, Metrics, error_body)
from mirrorfast.tokens import unpaired_surrogate

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
    # How long a batch's oldest input may wait for company. 0: the worker takes what is queued when it is
    # free, so batches form from what arrives while the model runs (NVIDIA Triton's default, too); a wait
    # only delays a lone request (2-core CPU, MiniLM: a 2 ms wait cost a lone client about a third of its
    # throughput and formed no larger batches at 32 clients, benchmarks/RESULTS.md).
    batch_wait_ms: float = 0.0
    max_body_bytes: int | None = None  # default: derived from max_inputs x max_input_tokens
    graceful_timeout_s: float | None = 60.0  # on SIGTERM/SIGINT, how long in-flight requests may take
    # Longest wait for the next piece of a request body: a client that stalls mid-upload gets 408 and its
    # connection closed, rather than holding it (and a SIGTERM's graceful shutdown) for as long as it likes.
    read_timeout_s: float = 15.0
    model_name: str | None = None  # the name answered in "model"; default: the encoder's name
    retry_after_s: int = 1

    def resolve(self, encoder) -> "ServeConfig":
        """Check every limit against the model; return a copy with all defaults filled in."""
        cfg = copy.copy(self)
        model_max = int(encoder.max_length)
        if not 0 <= int(cfg.port) <= 65535:  # the socket layer would wrap 99999 to port 34463
            raise MirrorfastError(f"--port must be 0 to 65535 (0: a free port), got {cfg.port}")
        for name in ("max_batch_tokens", "max_inputs", "max_queue"):
            if int(getattr(cfg, name)) < 1:
                raise MirrorfastError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        if cfg.max_queue < cfg.max_inputs:  # else an empty queue must admit more than --max-queue inputs
            raise MirrorfastError(f"--max-queue {cfg.max_queue} is smaller than one request of --max-inputs "
                                  f"{cfg.max_inputs} (default 256): raise --max-queue or lower --max-inputs")
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
        if not 0 <= cfg.batch_wait_ms < math.inf:  # nan would never start a batch
            raise MirrorfastError(f"--batch-wait-ms must be a finite number >= 0, got {cfg.batch_wait_ms}")
        if cfg.graceful_timeout_s is not None and not 0 <= cfg.graceful_timeout_s < math.inf:
            raise MirrorfastError(f"--graceful-timeout must be a finite number of seconds >= 0, "
                                  f"got {cfg.graceful_timeout_s}")
        if not 0 < cfg.read_timeout_s < math.inf:
            raise MirrorfastError(f"--read-timeout must be a finite number of seconds > 0, got {cfg.read_timeout_s}")
        if cfg.max_body_bytes is None:
            # Generous for real text: 32 bytes of JSON per token (4x with --truncate, where inputs may be
            # documents), at least 1 MiB.
            per_input = cfg.max_input_tokens * 32 * (4 if cfg.truncate else 1) + 64
            cfg.max_body_bytes = max(1 << 20, cfg.max_inputs * per_input + (64 << 10))
        if cfg.max_body_bytes < 1024:
            raise MirrorfastError(f"--max-body-bytes must be at least 1024, got {cfg.max_body_bytes}")
        if cfg.api_key is not None and not cfg.api_key:  # `--api-key "$KEY"` with KEY unset: not "no auth"
            raise MirrorfastError("the API key is empty (--api-key '' or MIRRORFAST_API_KEY=''; an unset shell "
                                  "variable?): give a key, or set neither to serve without one")
        if cfg.model_name is None:
            cfg.model_name = str(getattr(encoder, "name", None) or "mirrorfast")
        return cfg


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


# -------------------------------------------------------------------------------------------- app
class _State:
    def __init__(self, encoder, config: ServeConfig, metrics: Metrics) -> None:
        self.encoder = encoder
        self.config = config
        self.metrics = metrics
        self.dim = int(encoder.dim)
        # Each request is tokenized once, on the request side; the inference thread only runs the model.
        self.tokenizing = Tokenizing(encoder, config.max_input_tokens, truncate=config.truncate,
                                     on_truncated=metrics.truncated.inc)
        # Rows come from the encoder's own tokenizer, each request's lengths checked against --max-input-tokens.
        self.batcher = Batcher(functools.partial(encoder.encode_ids, checked=False), self.dim,
                               config.max_batch_tokens, config.batch_wait_ms / 1000.0, config.max_queue, metrics)


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
        if all(_is_int(v) for v in value):  # OpenAI's one-input token array, [1, 2, 3]
            raise ApiError(422, f"'{param}' is a token array; token arrays are not supported, send text",
                           param=param, code="token_arrays_not_supported")
        for i, v in enumerate(value):
            if isinstance(v, str):
                continue
            if isinstance(v, list) and v and all(_is_int(t) for t in v):
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
        if (at := unpaired_surrogate(text)) is not None:
            raise ApiError(422, f"{where} is not valid Unicode (unpaired surrogate at character {at})",
                           param=param, code="invalid_unicode", index=i if indexed else None)
    return texts


def _created(encoder) -> int:
    """Unix time the export was written (its export.json), as OpenAI's model objects say `created`; 0 if unknown."""
    try:
        return int((Path(encoder.export_dir) / EXPORT_JSON).stat().st_mtime)
    except (AttributeError, TypeError, OSError):  # an encoder that is not an export directory's
        return 0


# ------------------------------------------------------------------------------ requests and responses
def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return Response(content=body, status_code=status, media_type="application/json")


def api_error_response(err: ApiError) -> Response:
    return Response(content=error_body(err.message, err.type, err.param, err.code, err.index),
                    status_code=err.status, media_type="application/json", headers=err.headers)


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


def openai_request(body: dict, max_inputs: int, dim: int) -> tuple[list[str], str]:
    """OpenAI's embeddings request -> (texts, encoding format); `model` is accepted and ignored."""
    texts = _parse_texts(body.get("input"), "input", max_inputs)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(422, f"'model' must be a string, got {_json_type(model)}", param="model", code="invalid_type")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(422, f"'encoding_format' must be 'float' or 'base64', got {json.dumps(fmt)}",
                       param="encoding_format", code="invalid_value")
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims != dim):
        raise ApiError(422, f"'dimensions' must be {dim} (this model's size), got {json.dumps(dims)}",
                       param="dimensions", code="invalid_value")
    return texts, fmt


async def embed_texts(state: _State, texts: list[str], param: str) -> tuple[np.ndarray, int]:
    """The vectors of a request's texts (each tokenized once, checked against --max-input-tokens, queued for
    the inference thread) and their token count; ApiError for what the client can fix, 503 when full."""
    config, metrics = state.config, state.metrics
    try:
        rows = await state.tokenizing.tokenize(texts)  # a row over the limit: cut at limit + 1 (or --truncate)
    except Exception as exc:  # noqa: BLE001 - a text the tokenizer cannot take is the client's problem
        raise ApiError(422, f"'{param}' could not be tokenized: {exc}", param=param,
                       code="invalid_input") from None
    limit = config.max_input_tokens
    lengths = [len(row) for row in rows]
    for i, n in enumerate(lengths):
        if n > limit and not config.truncate:
            where = f"{param}[{i}]" if len(texts) > 1 or param == "inputs" else f"'{param}'"
            raise ApiError(
                422, f"{where} is longer than the limit of {limit} tokens per input "
                     "(the server was not started with --truncate)",
                param=param, code="input_too_long", index=i,
            )
    try:
        future = state.batcher.submit(rows, lengths)
    except QueueFull:
        metrics.rejected.inc()
        raise ApiError(503, "the server is overloaded (queue full); retry later", "server_overloaded",
                       code="queue_full", headers={"retry-after": str(config.retry_after_s)}) from None
    except WorkerStopped:
        raise ApiError(503, "the server is shutting down", "server_overloaded", code="shutting_down",
                       headers={"retry-after": str(config.retry_after_s)}) from None
    try:
        vectors = await future
    except asyncio.CancelledError:  # the client went away, or the graceful timeout ran out
        future.cancel()  # the batcher drops its queued inputs
        raise
    except Exception:  # noqa: BLE001
        raise ApiError(500, "inference failed", "server_error", code="inference_failed") from None
    metrics.inputs.inc(len(texts))
    total = int(sum(lengths))
    metrics.tokens.inc(total)
    return vectors, total


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
        except asyncio.CancelledError:
            # uvicorn's forced exit (a second Ctrl-C) sends no shutdown and cancels us: skip the queue, but let
            # the model call in progress return (a process that exits under a running onnxruntime call can
            # abort: "terminate called without an active exception"), and end without a traceback
            state.batcher.abandon_queue()
            state.batcher.stop()
            state.tokenizing.close()
            return
        # uvicorn has already waited for the requests in flight; drain whatever is left anyway
        await asyncio.to_thread(state.batcher.stop)
        state.tokenizing.close()

    app = FastAPI(title="mirrorfast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mirrorfast = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError(404, "not found: the routes are POST /v1/embeddings, GET /v1/models, POST /embed, "
                                "GET /health, GET /metrics", "not_found_error", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"method not allowed: {exc.detail}", "invalid_request_error",
                           code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            err = ApiError(exc.status_code, str(exc.detail), "invalid_request_error")
        return api_error_response(err)

    @app.exception_handler(Exception)
    async def server_error(_request, _exc: Exception):  # Starlette logs and re-raises; Edge absorbs it
        return api_error_response(ApiError(500, "internal server error", "server_error"))

    @app.post(EMBEDDINGS_ROUTE)
    async def openai_embeddings(request: Request):
        try:
            texts, fmt = openai_request(await read_json_object(request), config.max_inputs, state.dim)
            vectors, total = await embed_texts(state, texts, "input")
        except ApiError as err:
            if err.status == 422:  # OpenAI answers an invalid request with 400 (openai.BadRequestError)
                err.status = 400
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
            vectors, _ = await embed_texts(state, texts, "inputs")
        except ApiError as err:
            return api_error_response(err)
        return json_response(vectors.tolist())

    # OpenAI's model objects: clients list the models to find the name to send (created: when it was exported)
    model_object = {"id": config.model_name, "object": "model", "created": _created(encoder),
                    "owned_by": "mirrorfast"}

    @app.get(MODELS_ROUTE)
    async def list_models():
        return json_response({"object": "list", "data": [model_object]})

    @app.get(MODELS_ROUTE + "/{model:path}")  # serve_edge.MODEL_ROUTE; ids with a slash ("org/name") too
    async def retrieve_model(model: str):
        if model != config.model_name:
            return api_error_response(ApiError(
                404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                param="model", code="model_not_found"))
        return json_response(model_object)

    @app.api_route(HEALTH_ROUTE, methods=["GET", "HEAD"])  # some load-balancer probes send HEAD
    async def health():
        return json_response({"status": "ok", "model": config.model_name, "dim": state.dim,
                              "provider": str(getattr(encoder, "provider", "cpu")), "file": _served_file(encoder)})

    @app.get(METRICS_ROUTE)
    async def prometheus_metrics():
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    return Edge(app, metrics, config.api_key, config.max_body_bytes, config.read_timeout_s)


# ------------------------------------------------------------------------------------ the command
def _served_file(encoder) -> str:
    """Which of the export's files runs (model.onnx, model_fp16.onnx or model_int8.onnx)."""
    path = getattr(encoder, "model_path", None)
    return Path(path).name if path is not None else "?"


def describe(config: ServeConfig, encoder, address: str) -> str:
    cut = "truncate longer" if config.truncate else "reject longer"
    auth = "on" if config.api_key else "off"
    return (
        f"mirrorfast serve: listening on {address} | model {config.model_name} (dim {int(encoder.dim)}, "
        f"max {int(encoder.max_length)} tokens) | {_served_file(encoder)} on provider "
        f"{getattr(encoder, 'provider', '?')} | limits: "
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
    try:  # OnnxEncoder says exactly what is wrong with a path that is not an export directory
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

    def remember(sig, _frame) -> None:
        # Ours until uvicorn installs its own handlers (a signal right after the "listening" line must still
        # stop the server: uvicorn then starts, sees should_exit and shuts down), and again after it restores
        # them and re-raises the signal it handled.
        received.append(sig)
        server.should_exit = True

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
    log(f"mirrorfast serve: stopped{why} after {int(served)} request{'' if served == 1 else 's'}")
    if not server.started:
        raise MirrorfastError("the server failed to start (see the messages above)")
    return 0
