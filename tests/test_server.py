"""`mirrorfast serve` (export/server.py): real uvicorn servers on 127.0.0.1, real HTTP through httpx and
the openai client, vectors checked against OnnxEncoder.encode."""

import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ATOL = 1e-5

SENTENCES = [
    "A man is playing a guitar.",
    "The cat sat on the mat.",
    "hello",
    "Stocks rallied on Friday after the central bank held interest rates steady for a third month.",
    "Two dogs run through a field of tall grass while the sun sets behind the hills.",
    "ok",
    "Quantum computers exploit superposition and entanglement to explore many states at once, "
    "which could make some optimization and simulation problems far easier to solve.",
    "I love this!",
    "Ceci n'est pas une pipe.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Is it raining?",
]


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def encoder(tiny_export):
    from mirrorfast.export.runtime import OnnxEncoder

    return OnnxEncoder(tiny_export, provider="cpu")


@pytest.fixture(scope="session")
def expected(encoder):
    """Direct encodings of SENTENCES, the reference every served vector is compared with."""
    return dict(zip(SENTENCES, encoder.encode(SENTENCES)))


@contextmanager
def live_server(app, graceful_timeout_s: float | None = None):
    """uvicorn on 127.0.0.1 with a free port, in a background thread; yields the base URL."""
    from mirrorfast.export.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=graceful_timeout_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def server(encoder):
    """The strict server: an API key, small limits (8 inputs, 48 tokens, 64 KiB bodies)."""
    from mirrorfast.export.server import ServeConfig, create_app

    app = create_app(encoder, ServeConfig(api_key=KEY, max_inputs=8, max_input_tokens=48,
                                          max_body_bytes=64 * 1024, max_batch_tokens=2048))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as c:
        yield c


def _metric(text: str, name: str, labels: dict | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def _good(client) -> None:
    r = client.post("/embed", json={"inputs": "still alive"})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1


# ----------------------------------------------------------------------------------- happy paths
def test_health(client, encoder):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["dim"] == encoder.dim
    assert body["provider"] == "cpu" and body["file"] == "model.onnx"  # which file is served
    assert client.head("/health").status_code == 200  # load-balancer probes that send HEAD


def test_both_routes_match_direct_encoding(client, encoder, expected):
    r = client.post("/embed", json={"inputs": SENTENCES[:8]})
    assert r.status_code == 200, r.text
    got = np.array(r.json(), dtype=np.float32)
    assert got.shape == (8, encoder.dim)
    np.testing.assert_allclose(got, np.stack([expected[s] for s in SENTENCES[:8]]), atol=ATOL)

    r = client.post("/embed", json={"inputs": SENTENCES[3]})  # a bare string -> a list of one vector
    np.testing.assert_allclose(np.array(r.json()), expected[SENTENCES[3]][None], atol=ATOL)

    r = client.post("/v1/embeddings", json={"input": SENTENCES[4:12], "model": "whatever"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and isinstance(body["model"], str)
    assert [d["index"] for d in body["data"]] == list(range(8))
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([expected[s] for s in SENTENCES[4:12]]), atol=ATOL)
    tokens = sum(encoder.count_tokens(SENTENCES[4:12]))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_base64_is_little_endian_float32(client, expected):
    r = client.post("/v1/embeddings", json={"input": SENTENCES[:3], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for d, s in zip(r.json()["data"], SENTENCES[:3]):
        vec = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vec, expected[s], atol=ATOL)


def test_openai_client(server, encoder, expected):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    for kwargs in ({}, {"encoding_format": "float"}, {"encoding_format": "base64"}):
        res = client.embeddings.create(input=SENTENCES[:5], model="mirrorfast", **kwargs)
        vectors = [d.embedding for d in res.data]
        if kwargs.get("encoding_format") == "base64":  # asked for explicitly: the client leaves it encoded
            vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors]
        np.testing.assert_allclose(np.array(vectors, dtype=np.float32),
                                   np.stack([expected[s] for s in SENTENCES[:5]]), atol=ATOL)
        assert res.usage.prompt_tokens > 0
    single = client.embeddings.create(input=SENTENCES[0], model="m")  # default: base64 on the wire
    np.testing.assert_allclose(single.data[0].embedding, expected[SENTENCES[0]], atol=ATOL)

    served = client.models.list().data  # what clients read to find the model's name
    assert [m.id for m in served] == [encoder.name] and served[0].owned_by == "mirrorfast"
    assert served[0].created == int((encoder.export_dir / "export.json").stat().st_mtime)
    assert client.models.retrieve(encoder.name) == served[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")

    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(input="x", model="m")
    with pytest.raises(openai.AuthenticationError):  # /v1/models asks for the key, as OpenAI's does
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="empty list"):  # as OpenAI's API: 400, not 422
        client.embeddings.create(input=[], model="m")


# The server's tokenizing modes: (max_tokens, truncate). (16, False) is a server that refuses longer texts.
TOKENIZING_MODES = [(None, False), (16, True), (16, False)]
# Over 16 tokens: a long text (cut before tokenizing: 17 x 16 characters tried first), and under 16 tokens
# though far over 17 x 16 characters (a WordPiece word over 100 characters is one [UNK]): its row must be whole.
LONG_TEXTS = ["word " * 300, "x" * 150 + " " + "y" * 700 + " ok " + "z" * 400]


def _rows_of(tokenizing_encoder, texts, max_tokens, truncate):
    from mirrorfast.export.batching import Tokenizing

    tokenizing = Tokenizing(tokenizing_encoder, max_tokens, truncate=truncate)
    try:
        return tokenizing.tokenize_sync(texts)
    finally:
        tokenizing.close()


@pytest.mark.parametrize("max_tokens,truncate", TOKENIZING_MODES)
def test_request_tokenizing_matches_the_encoder(encoder, max_tokens, truncate, monkeypatch):
    """The server's one tokenization (private Rust-tokenizer copies) gives the encoder's own token ids,
    truncated as the encoder's tokenizer truncates (special tokens kept); a server that does not truncate
    gets every row within the limit whole, and a longer text's row cut one token past the limit, from cuts
    of the text a few hundred characters long (the 400,000-character one was tokenized whole)."""
    from mirrorfast import truncation

    texts = SENTENCES + LONG_TEXTS + ["🙂 e\u0301 שלום", "a " * 200_000]
    cuts = []
    real_cut = truncation.cut_for_tokenizing
    monkeypatch.setattr(truncation, "cut_for_tokenizing", lambda *a: cuts.extend(out := real_cut(*a)) or out)
    rows = _rows_of(encoder, texts, max_tokens, truncate)
    if max_tokens is not None and not truncate:
        assert 0 < max(map(len, cuts)) < 2_000  # (max_tokens + 1) x 16 = 272 characters tried first
    whole = encoder.count_tokens(texts)
    long_words, unknown_words = whole[len(SENTENCES):len(SENTENCES) + 2]
    assert unknown_words < 16 < long_words  # the cases are what they claim
    if max_tokens is None:
        assert rows == encoder.token_ids(texts, None)
    elif truncate:
        assert rows == encoder.token_ids(texts, max_tokens)
    else:  # whole within the limit, cut only past it
        assert rows == encoder.token_ids(texts, max_tokens + 1)
        assert [len(r) for r in rows] == [min(n, max_tokens + 1) for n in whole]


@pytest.mark.parametrize("max_tokens,truncate", TOKENIZING_MODES)
def test_request_tokenizing_with_a_python_tokenizer(encoder, max_tokens, truncate, tmp_path):
    """Tokenizing's other branch: a slow (Python) tokenizer of the same vocabulary gives what that
    tokenizer gives on its own, truncated the same way (at the limit + 1 for a server that refuses)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = sorted(encoder.tokenizer.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    texts = SENTENCES + LONG_TEXTS + ["🙂 e\u0301 שלום"]
    rows = _rows_of(SimpleNamespace(tokenizer=slow), texts, max_tokens, truncate)
    cut = None if max_tokens is None else max_tokens if truncate else max_tokens + 1
    options = {"truncation": True, "max_length": cut} if cut else {"truncation": False}
    assert rows == [slow(t, **options)["input_ids"] for t in texts]
    assert max(map(len, rows)) == (cut or len(slow("word " * 300)["input_ids"]))


# ------------------------------------------------------------------------------------ bad inputs
LONG = "supercalifragilistic " * 40  # far over 48 tokens

BAD_REQUESTS = [
    # (name, route, kwargs for client.post, status, substring of the message)
    ("malformed json", "/v1/embeddings", {"content": b'{"input": ["a",', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("invalid utf-8", "/embed", {"content": b'{"inputs": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("empty body", "/embed", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty"),
    ("declared too large", "/embed", {"content": b"[" * 100000 + b"]" * 100000, "headers": {"content-type": "application/json"}}, 413, "larger than"),
    ("nested json", "/embed", {"content": b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("text/plain", "/v1/embeddings", {"content": b'{"input": "a"}', "headers": {"content-type": "text/plain"}}, 400, "Content-Type"),
    ("form", "/embed", {"data": {"inputs": "a"}}, 400, "Content-Type"),
    ("not an object", "/v1/embeddings", {"json": ["a", "b"]}, 400, "JSON object"),
    ("missing input", "/v1/embeddings", {"json": {"model": "m"}}, 400, "'input' is required"),
    ("wrong type", "/v1/embeddings", {"json": {"input": {"text": "a"}}}, 400, "must be a string or a list of strings"),
    ("number", "/embed", {"json": {"inputs": 3.5}}, 422, "must be a string or a list"),
    ("null item", "/embed", {"json": {"inputs": ["a", None]}}, 422, "inputs[1] must be a string, got null"),
    ("bool item", "/v1/embeddings", {"json": {"input": ["a", "b", True]}}, 400, "input[2] must be a string, got boolean"),
    ("empty list", "/v1/embeddings", {"json": {"input": []}}, 400, "empty list"),
    ("empty string", "/v1/embeddings", {"json": {"input": ""}}, 400, "empty string"),
    ("empty string item", "/embed", {"json": {"inputs": ["a", "b", ""]}}, 422, "inputs[2] is an empty string"),
    ("too many", "/v1/embeddings", {"json": {"input": ["a"] * 9}}, 400, "at most 8"),
    ("too long", "/v1/embeddings", {"json": {"input": ["short", LONG]}}, 400, "input[1] is longer than the limit"),
    ("too long single", "/embed", {"json": {"inputs": LONG}}, 422, "longer than the limit of 48 tokens"),
    ("token ids", "/v1/embeddings", {"json": {"input": [101, 2023, 102]}}, 400, "token arrays are not supported"),
    ("token id lists", "/v1/embeddings", {"json": {"input": [[101, 2023, 102]]}}, 400, "token arrays are not supported"),
    ("int among texts", "/v1/embeddings", {"json": {"input": ["a", 7]}}, 400, "input[1] must be a string, got"),
    ("token ids on /embed", "/embed", {"json": {"inputs": [101, 2023, 102]}}, 422, "'inputs' is a token array"),
    ("bad encoding_format", "/v1/embeddings", {"json": {"input": "a", "encoding_format": "int8"}}, 400, "encoding_format"),
    ("bad model type", "/v1/embeddings", {"json": {"input": "a", "model": 7}}, 400, "'model' must be a string"),
    ("bad dimensions", "/v1/embeddings", {"json": {"input": "a", "dimensions": 3}}, 400, "dimensions"),
    ("oversized body", "/embed", {"json": {"inputs": ["x" * 70_000]}}, 413, "larger than"),
    ("get on post route", "/embed", {"method": "GET"}, 405, "not allowed"),
]


@pytest.mark.parametrize("name,route,kwargs,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_json_error(client, name, route, kwargs, status, message):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    r = client.request(method, route, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert message in err["message"], err
    if "[" in message:  # the index of the bad input is named
        assert isinstance(err.get("index"), int)
    _good(client)


def test_streamed_oversized_body_is_413(client):
    def chunks():
        for _ in range(40):
            yield b" " * 4096  # 160 KiB, chunked: no Content-Length to check up front

    r = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "larger than" in r.json()["error"]["message"]
    _good(client)


def test_auth(server, client):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{server}/v1/embeddings", json={"input": "a"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{server}/embed", json={"inputs": "a"}, headers=headers)
        assert r.status_code == 401
        for path in ("/v1/models", "/v1/models/x", "/v1/models/"):  # the served name only with the key
            assert httpx.get(f"{server}{path}", headers=headers).status_code == 401, (path, headers)
    assert httpx.post(f"{server}/embed", json={"inputs": "a"}, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{server}/metrics").status_code == 200
    _good(client)


def test_unknown_route_is_json_404(client):
    for method, path in (("GET", "/"), ("POST", "/v1/completions"), ("GET", "/v1/embeddings/x")):
        r = client.request(method, path)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"
    _good(client)


UNICODE = [
    "🙂👍🏽 family: 👨‍👩‍👧‍👦",
    "e\u0301 n\u0303 a\u030a combining",
    "Z\u0351\u0308\u0342\u0306" * 30,  # zalgo: one very long "word"
    "שלום עולם",
    "مرحبا بالعالم \u200f\u202e reversed",
    "ctrl \x00\x01\x07\x1b\x7f\x9f chars",
    "\u200b\u200c\u200d\ufeff",
    "   \t\n  ",
    "line\u2028sep\u2029para",
    "\ue000\uffff\U0010ffff noncharacters",
    "漢字かなカナ한국어",
    "\ud83d\ude00 escaped pair",
    "lone \ud800 high",
    "lone \udfff low",
    "\udc00",
    "end \ud83d",
]


def test_unicode_of_every_kind_embeds_or_is_refused(client, encoder):
    for text in UNICODE:
        body = json.dumps({"input": [text]}, ensure_ascii=True).encode()  # lone surrogates as \\udXXX
        r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (text, r.status_code, r.text)
        if r.status_code == 200:
            got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
            as_served = json.loads(body)["input"][0]  # JSON joins an escaped surrogate pair into one char
            np.testing.assert_allclose(got, encoder.encode([as_served])[0], atol=ATOL)
        else:
            assert "input[0]" in r.json()["error"]["message"]
        # the same as raw UTF-8 (where it can be encoded at all)
        raw = json.dumps({"inputs": text}, ensure_ascii=False).encode("utf-8", "surrogatepass")
        r = client.post("/embed", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 422), (text, r.status_code, r.text)
        if r.status_code == 200:  # valid UTF-8: the vector of exactly this text
            np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), encoder.encode([text]), atol=ATOL)
    _good(client)
    valid = [t for t in UNICODE if not re.search(r"[\ud800-\udfff]", t)]
    r = client.post("/embed", json={"inputs": valid[:8]})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------ concurrency
def test_load_16_clients_x_50_requests(server, expected):
    rng = random.Random(0)
    plans = [[rng.sample(SENTENCES, rng.randint(1, 8)) for _ in range(50)] for _ in range(16)]

    def client_run(k: int) -> int:
        done = 0
        with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
            for j, texts in enumerate(plans[k]):
                kind = (k + j) % 3
                if kind == 0:
                    r = c.post("/embed", json={"inputs": texts})
                    assert r.status_code == 200, r.text
                    got = np.array(r.json(), dtype=np.float32)
                elif kind == 1:
                    r = c.post("/v1/embeddings", json={"input": texts})
                    assert r.status_code == 200, r.text
                    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                else:
                    r = c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
                    assert r.status_code == 200, r.text
                    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                                    for d in r.json()["data"]])
                np.testing.assert_allclose(got, np.stack([expected[s] for s in texts]), atol=ATOL)
                done += 1
        return done

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client_run, range(16))) == 800
    metrics = httpx.get(f"{server}/metrics").text
    # requests were really merged: fewer model calls than requests
    assert _metric(metrics, "mirrorfast_batch_size_count") < _metric(metrics, "mirrorfast_requests_total",
                                                                      {"status": "200"})


class _GatedEncoder:
    """The real encoder behind a gate, so a test can hold the inference worker busy."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        for name in ("tokenizer", "max_length", "dim", "provider", "name", "normalized"):
            setattr(self, name, getattr(inner, name))

    def encode_ids(self, rows, **options):
        self.entered.set()
        self.gate.wait(30)
        return self.inner.encode_ids(rows, **options)


def test_full_queue_is_503_with_retry_after(encoder, expected):
    from mirrorfast.export.server import ServeConfig, create_app

    gated = _GatedEncoder(encoder)
    app = create_app(gated, ServeConfig(max_queue=2, max_inputs=2, batch_wait_ms=0))
    state = app.app.state.mirrorfast
    with live_server(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/embed", json={"inputs": SENTENCES[0]}, timeout=30)
        assert gated.entered.wait(10)  # the worker holds request 1
        second = pool.submit(httpx.post, f"{url}/embed", json={"inputs": SENTENCES[1:3]}, timeout=30)
        deadline = time.monotonic() + 10
        while state.batcher.queued < 2:  # request 2 waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(f"{url}/embed", json={"inputs": "one more"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        gated.gate.set()
        np.testing.assert_allclose(np.array(first.result().json()), expected[SENTENCES[0]][None], atol=ATOL)
        np.testing.assert_allclose(np.array(second.result().json()),
                                   np.stack([expected[s] for s in SENTENCES[1:3]]), atol=ATOL)
        assert httpx.post(f"{url}/embed", json={"inputs": "one more"}).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, "mirrorfast_requests_total", {"route": "/embed", "status": "503"}) == 1
        assert _metric(metrics, "mirrorfast_rejected_total") == 1


def test_inference_failure_is_a_json_500_and_the_worker_goes_on(encoder, expected):
    from mirrorfast.export.server import ServeConfig, create_app

    boom = encoder.token_ids(["boom"])[0]

    class Flaky(_GatedEncoder):
        def encode_ids(self, rows, **options):
            if boom in rows:
                raise RuntimeError("simulated onnxruntime failure")
            return self.inner.encode_ids(rows, **options)

    flaky = Flaky(encoder)
    with live_server(create_app(flaky, ServeConfig(batch_wait_ms=0))) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["fine", "boom"]})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        r = httpx.post(f"{url}/embed", json={"inputs": SENTENCES[0]})
        assert r.status_code == 200
        np.testing.assert_allclose(np.array(r.json()), expected[SENTENCES[0]][None], atol=ATOL)


def test_metrics_count_what_was_sent(encoder):
    from mirrorfast.export.server import ServeConfig, create_app

    app = create_app(encoder, ServeConfig(max_inputs=8))
    with live_server(app) as url, httpx.Client(base_url=url) as c:
        for _ in range(3):
            assert c.post("/embed", json={"inputs": SENTENCES[:2]}).status_code == 200
        for _ in range(2):
            assert c.post("/v1/embeddings", json={"input": SENTENCES[2]}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": []}).status_code == 400
        assert c.post("/embed", json={"inputs": []}).status_code == 422
        assert c.get("/nowhere").status_code == 404
        assert c.get("/v1/models").status_code == 200
        for model in (encoder.name, "a", "b/c"):  # one label for every id asked for
            assert c.get(f"/v1/models/{model}").status_code == (200 if model == encoder.name else 404)
        text = c.get("/metrics").text
    assert text.startswith("# HELP")
    assert _metric(text, "mirrorfast_requests_total", {"route": "/embed", "status": "200"}) == 3
    assert _metric(text, "mirrorfast_requests_total", {"route": "/v1/embeddings", "status": "200"}) == 2
    assert _metric(text, "mirrorfast_requests_total", {"route": "/v1/embeddings", "status": "400"}) == 1
    assert _metric(text, "mirrorfast_requests_total", {"route": "/embed", "status": "422"}) == 1
    assert _metric(text, "mirrorfast_requests_total", {"route": "other", "status": "404"}) == 1
    assert _metric(text, "mirrorfast_requests_total", {"route": "/v1/models", "status": "200"}) == 1
    assert _metric(text, "mirrorfast_requests_total", {"route": "/v1/models/{model}", "status": "200"}) == 1
    assert _metric(text, "mirrorfast_requests_total", {"route": "/v1/models/{model}", "status": "404"}) == 2
    assert _metric(text, "mirrorfast_request_duration_seconds_count", {"route": "/embed"}) == 4
    assert _metric(text, "mirrorfast_inputs_total") == 8
    assert _metric(text, "mirrorfast_batch_size_sum") == 8
    assert _metric(text, "mirrorfast_batch_size_count") == 5
    tokens = 3 * sum(encoder.count_tokens(SENTENCES[:2])) + 2 * encoder.count_tokens([SENTENCES[2]])[0]
    assert _metric(text, "mirrorfast_prompt_tokens_total") == tokens
    assert _metric(text, "mirrorfast_batch_tokens_count") == 5
    assert _metric(text, "mirrorfast_queue_depth") == 0
    assert _metric(text, "mirrorfast_truncated_inputs_total") == 0
    assert "mirrorfast_requests_in_progress" in text


def test_truncate(encoder):
    from mirrorfast.export.server import ServeConfig, create_app

    long_text = "the quick brown fox jumps over the lazy dog " * 40  # ~360 tokens > 128
    app = create_app(encoder, ServeConfig(truncate=True))
    with live_server(app) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [long_text, "short"]})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, encoder.encode([long_text, "short"]), atol=ATOL)
        assert r.json()["usage"]["prompt_tokens"] == encoder.max_length + encoder.count_tokens(["short"])[0]
        assert _metric(httpx.get(f"{url}/metrics").text, "mirrorfast_truncated_inputs_total") == 1
    # a limit below the model's: cut to 16 tokens, as the encoder's tokenizer cuts (special tokens kept)
    app = create_app(encoder, ServeConfig(truncate=True, max_input_tokens=16))
    with live_server(app) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [long_text, "short"]})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, encoder.encode_ids(encoder.token_ids([long_text, "short"], 16)), atol=ATOL)
        assert not np.allclose(got[0], encoder.encode([long_text])[0], atol=1e-3)  # really cut shorter
        assert r.json()["usage"]["prompt_tokens"] == 16 + encoder.count_tokens(["short"])[0]


# ------------------------------------------------------------------------------------- the batcher
def test_batcher_respects_the_token_budget_and_keeps_order():
    import asyncio

    from mirrorfast.export.server import Batcher

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.array([[float(t.split(":")[0]), float(t.split(":")[1])] for t in texts], dtype=np.float32)

    async def main():
        b = Batcher(encode, dim=2, max_batch_tokens=100, batch_wait_s=0.01, max_queue=1000)
        b.start()
        jobs = []
        for r in range(20):
            n = 1 + r % 7
            texts = [f"{r}:{i}" for i in range(n)]
            lengths = [5 + 7 * ((r + i) % 4) for i in range(n)]
            jobs.append((r, n, b.submit(texts, lengths), lengths))
        results = await asyncio.gather(*(f for _, _, f, _ in jobs))
        b.stop()
        return jobs, results

    jobs, results = asyncio.run(main())
    for (r, n, _, _), vectors in zip(jobs, results):
        assert vectors.tolist() == [[float(r), float(i)] for i in range(n)]
    lengths = {f"{r}:{i}": lens[i] for r, n, _, lens in jobs for i in range(n)}
    assert sum(len(c) for c in calls) == sum(n for _, n, _, _ in jobs)
    for batch in calls:
        assert len(batch) * max(lengths[t] for t in batch) <= 100
    assert len(calls) < 20 * 4  # merged across requests, not one call per input


def test_a_cancelled_requests_inputs_leave_the_queue_during_the_batch_wait():
    """A request cancelled while its inputs wait out --batch-wait-ms (its client gone): they leave the queue
    at once, so a live request that needs their room is admitted (it got 503 queue_full until the wait was
    over), and the live request's batch waits from its own arrival, without the dead inputs."""
    import asyncio

    from mirrorfast.export.server import Batcher

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.zeros((len(texts), 2), dtype=np.float32)

    async def main():
        b = Batcher(encode, dim=2, max_batch_tokens=100, batch_wait_s=0.5, max_queue=4)
        b.start()
        try:
            dead = b.submit(["x", "y", "z"], [3, 3, 3])
            await asyncio.sleep(0.05)  # the worker waits for company
            dead.cancel()  # its done callback has not run yet: submit must see the cancellation itself
            start = time.monotonic()
            live = b.submit(["a", "b"], [3, 3])  # 3 + 2 > 4 while the dead inputs were counted
            assert b.queued == 2
            vectors = await live
            return vectors, time.monotonic() - start
        finally:
            b.stop()

    vectors, waited = asyncio.run(main())
    assert vectors.shape == (2, 2) and calls == [["a", "b"]]
    assert waited >= 0.45, waited  # its own wait, not what was left of the dead request's


def test_serve_refuses_a_queue_smaller_than_a_request(tiny_export, capsys):
    """--max-queue below --max-inputs could not be a bound: an empty queue must take any valid request."""
    from mirrorfast.cli import main

    assert main(["serve", str(tiny_export), "--port", "0", "--max-queue", "4", "--max-inputs", "10"]) == 2
    assert ("--max-queue 4 is smaller than one request of --max-inputs 10 (default 256): raise --max-queue or "
            "lower --max-inputs") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the command
def test_serve_refuses_a_non_export_dir(tmp_path, capsys):
    from mirrorfast.cli import main

    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "mirrorfast serve: error:" in err and "not an export directory" in err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert f"export directory {tmp_path / 'missing'} not found" in capsys.readouterr().err  # as encode says it


def test_serve_refuses_bad_limits(tiny_export, capsys):
    from mirrorfast.cli import main

    assert main(["serve", str(tiny_export), "--port", "0", "--max-input-tokens", "100000"]) == 2
    assert "exceeds the model's maximum length" in capsys.readouterr().err
    assert main(["serve", str(tiny_export), "--port", "0", "--max-inputs", "0"]) == 2
    assert "--max-inputs must be at least 1" in capsys.readouterr().err
    for option, value, message in [("--batch-wait-ms", "nan", "--batch-wait-ms must be a finite number >= 0"),
                                   ("--batch-wait-ms", "inf", "--batch-wait-ms must be a finite number >= 0"),
                                   ("--graceful-timeout", "-1", "--graceful-timeout must be a finite number of"),
                                   ("--read-timeout", "0", "--read-timeout must be a finite number of seconds > 0"),
                                   ("--read-timeout", "inf", "--read-timeout must be a finite number of seconds")]:
        assert main(["serve", str(tiny_export), "--port", "0", option, value]) == 2
        assert message in capsys.readouterr().err, (option, value)
    for port in ("99999", "-1"):
        assert main(["serve", str(tiny_export), "--port", port]) == 2
        assert f"--port must be 0 to 65535 (0: a free port), got {port}" in capsys.readouterr().err


def test_sigterm_finishes_requests_in_flight(tiny_export, encoder):
    """`python -m mirrorfast.cli serve` as a subprocess: heavy requests in flight, SIGTERM, all get 200."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirrorfast.cli", "serve", str(tiny_export), "--port", "0", "--provider", "cpu",
         "--max-inputs", "1024", "--max-batch-tokens", "256", "--max-input-tokens", "48", "--max-queue", "8000"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
    )
    lines: list[str] = []
    m = None
    try:
        for line in proc.stderr:  # the one start-up line names the address (--port 0: a free port)
            lines.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                break
        assert m, "".join(lines)
        url = m.group(1)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        assert "model.onnx on provider cpu" in line and "tokens/input" in line
        texts = [f"{s} number {i}" for i, s in enumerate(SENTENCES * 80)][:1000]  # 1000 inputs, ~125 batches
        want = encoder.encode(texts)
        n = 6
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(httpx.post, f"{url}/embed", json={"inputs": texts}, timeout=120)
                       for _ in range(n)]
            deadline = time.monotonic() + 60
            while True:  # wait until every request is inside the server
                text = httpx.get(f"{url}/metrics").text
                if _metric(text, "mirrorfast_requests_in_progress") >= n + 1:
                    break
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * n
        for r in responses:
            np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), want, atol=ATOL)
        assert proc.wait(60) == 0
        time.sleep(0.1)
        assert any("stopped on SIGTERM" in line for line in lines), lines
        with pytest.raises(httpx.TransportError):  # and it is really gone
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_signal_right_after_the_startup_line_stops_the_server(tiny_export, sig=signal.SIGTERM):
    """A supervisor that waits for the "listening" line and signals at once: the signal lands before uvicorn
    has installed its own handlers (it used to be noted and ignored: the server ran on)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirrorfast.cli", "serve", str(tiny_export), "--port", "0", "--provider", "cpu"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        assert "listening on" in lines[-1], "".join(lines)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert f"stopped on {signal.Signals(sig).name}" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_empty_api_key_is_refused_not_taken_as_no_key(tiny_export, capsys, monkeypatch):
    """`--api-key "$KEY"` with KEY unset (or MIRRORFAST_API_KEY="") must not start a server without auth."""
    from mirrorfast.cli import main

    monkeypatch.setenv("MIRRORFAST_API_KEY", "from-the-environment")
    assert main(["serve", str(tiny_export), "--port", "0", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert "the API key is empty" in err and err.count("\n") == 1
    monkeypatch.setenv("MIRRORFAST_API_KEY", "")
    assert main(["serve", str(tiny_export), "--port", "0"]) == 2
    assert "the API key is empty" in capsys.readouterr().err


def _partial_post(url: str, body: bytes, declared: int) -> socket.socket:
    """A raw connection that sends a POST's headers and the first bytes of its body, then goes quiet."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {declared}\r\n\r\n".encode() + body)
    return conn


def _response_status(conn: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, "the server closed the connection without answering"
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_a_stalled_body_gets_408_and_a_client_that_leaves_is_counted_499(encoder):
    """A client that stops sending mid-body is answered 408 after --read-timeout (it no longer holds the
    connection, or a SIGTERM's graceful shutdown, for as long as it likes); one that disconnects mid-body is
    counted under status 499 (nginx's "client closed request"), not as a server error (500)."""
    from mirrorfast.export.server import ServeConfig, create_app

    app = create_app(encoder, ServeConfig(read_timeout_s=0.3))
    with live_server(app) as url:
        with _partial_post(url, b'{"inputs": ["a', 100) as conn:
            assert _response_status(conn) == 408
        with _partial_post(url, b'{"inputs": ["a', 100) as conn:
            pass  # closed mid-body
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{url}/metrics").text
            if _metric(text, "mirrorfast_requests_total", {"route": "/embed", "status": "499"}) == 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
        assert _metric(text, "mirrorfast_requests_total", {"route": "/embed", "status": "408"}) == 1
        assert _metric(text, "mirrorfast_requests_total", {"status": "500"}) == 0
        assert httpx.post(f"{url}/embed", json={"inputs": "still serving"}).status_code == 200


def test_requests_cut_off_by_the_graceful_timeout_get_503_not_a_traceback(encoder):
    """When the graceful shutdown's time is up uvicorn cancels what is left: the client gets a 503 it can
    retry elsewhere, and the log has uvicorn's one line, not a traceback per request."""
    import logging

    from mirrorfast.export.server import ServeConfig, create_app

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # uvicorn's loggers do not propagate to caplog's root handler
    uvicorn_log = logging.getLogger("uvicorn.error")
    app = create_app(encoder, ServeConfig(read_timeout_s=60))
    try:
        with live_server(app, graceful_timeout_s=0.3) as url:
            uvicorn_log.addHandler(handler)  # after uvicorn's logging set-up, which replaces handlers
            conn = _partial_post(url, b'{"inputs": ["a', 100)
            time.sleep(0.2)  # the request is inside the server, waiting for the rest of its body
        with conn:  # live_server's exit asked the server to stop; it cancelled the stalled request
            assert _response_status(conn) == 503
    finally:
        uvicorn_log.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("Cancel 1 running task" in m for m in messages), messages  # the one line (and the log is seen)
    assert not any("Exception in ASGI application" in m or r.exc_info for m, r in zip(messages, records)), messages


def test_a_forced_exit_drops_the_queue_and_logs_no_traceback(encoder):
    """A second Ctrl-C (uvicorn's force_exit) sends the app no shutdown and cancels its lifespan: that logged
    the CancelledError as a traceback. The model call in progress still returns first (a process that exits
    under a running onnxruntime call can abort); what was queued behind it is dropped, not computed."""
    import logging

    from mirrorfast.export.server import ServeConfig, bind_socket, create_app

    calling, release, calls = threading.Event(), threading.Event(), []

    class ModelCallThatHangs:
        def __getattr__(self, name):
            return getattr(encoder, name)

        def encode_ids(self, rows, checked=True):
            calls.append(len(rows))
            calling.set()
            release.wait(60)
            return encoder.encode_ids(rows, checked=checked)

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(ModelCallThatHangs(), ServeConfig()), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn's logging set-up
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        threading.Thread(target=lambda: _ignore_errors(httpx.post, f"{url}/embed", json={"inputs": "x"}, timeout=60),
                         daemon=True).start()
        assert calling.wait(20), "the request never reached the model"
        with httpx.Client(base_url=url) as c:  # a second request, queued behind the call in progress
            threading.Thread(target=lambda: _ignore_errors(c.post, "/embed", json={"inputs": ["y", "z"]}, timeout=60),
                             daemon=True).start()
            deadline = time.monotonic() + 20
            while _metric(c.get("/metrics").text, "mirrorfast_queue_depth") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        server.should_exit = server.force_exit = True
        threading.Timer(0.5, release.set).start()
        thread.join(20)
        assert not thread.is_alive() and calls == [1]  # the call in progress returned; the queue was dropped
    finally:
        release.set()
        thread.join(20)
        sock.close()
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not [r.getMessage() for r in records if r.exc_info or "lifespan" in r.getMessage()]


def _ignore_errors(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the server went away under it, as it should
        pass


def test_a_client_that_leaves_mid_computation_has_its_inputs_dropped(encoder):
    """A client gone while its request waits for the model (a load balancer's timeout, a killed client):
    the request is cancelled, its queued inputs are dropped instead of computed, and it is counted 499."""
    from mirrorfast.export.server import ServeConfig, create_app

    texts = [f"{s} number {i}" for i, s in enumerate(SENTENCES * 80)][:1000]
    body = json.dumps({"inputs": texts}).encode()
    app = create_app(encoder, ServeConfig(max_inputs=1024, max_batch_tokens=64, max_queue=8000))
    with live_server(app) as url, httpx.Client(base_url=url) as c:
        conn = _partial_post(url, body, len(body))  # the whole request, then wait
        deadline = time.monotonic() + 30
        while _metric(c.get("/metrics").text, "mirrorfast_batch_size_count") == 0:  # the model is on it
            assert time.monotonic() < deadline
            time.sleep(0.002)
        conn.close()
        while True:
            text = c.get("/metrics").text
            if _metric(text, "mirrorfast_requests_total", {"route": "/embed", "status": "499"}) == 1:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.01)
        time.sleep(0.2)  # any batch in flight when it left finishes
        text = c.get("/metrics").text
        computed = _metric(text, "mirrorfast_batch_size_sum")
        assert computed < len(texts) / 2, computed  # not all 1000 computed for nobody
        assert _metric(text, "mirrorfast_queue_depth") == 0 and _metric(text, "mirrorfast_inputs_total") == 0
        assert c.post("/embed", json={"inputs": texts[:3]}).status_code == 200  # and it goes on serving


def test_a_stopped_worker_answers_503_shutting_down(encoder):
    """A request that reaches the app after its inference worker stopped (shutdown under way) gets 503
    shutting_down with Retry-After, on both embedding routes; the server itself goes on answering."""
    from mirrorfast.export.server import ServeConfig, create_app

    app = create_app(encoder, ServeConfig())
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/embed", json={"inputs": ["before"]}).status_code == 200
        app.app.state.mirrorfast.batcher.stop()
        for route, body in (("/v1/embeddings", {"input": "after"}), ("/embed", {"inputs": ["after"]})):
            r = c.post(route, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (route, r.text)
            assert r.json()["error"]["code"] == "shutting_down"
        assert c.get("/health").status_code == 200
