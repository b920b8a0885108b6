"""Load test of `mirrorfast serve`: requests/s and p50/p99 latency for single-sentence requests at several
concurrency levels, next to OnnxEncoder.encode called directly one sentence at a time (and in batches of
32, the ceiling), so the gain of the server's dynamic batching is visible.

    python benchmarks/serve_load.py EXPORT_DIR [--levels 1,8,32] [--seconds 3] [--provider cpu]

The server runs as a subprocess (`python -m mirrorfast.cli serve EXPORT_DIR --port 0`); the load comes
from N threads of this process, each with one keep-alive http.client connection, each sending its next
request as soon as the previous one is answered (closed loop). Client and server share the machine: on a small CPU the
client's own cost is part of the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_main import run_main  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The cat sat quietly on the warm mat by the window.",
    "Stocks rallied on Friday after the central bank held interest rates steady.",
    "Two dogs run through a field of tall grass while the sun sets.",
    "How do I reset my password if I no longer have access to my email?",
    "The new vaccine showed strong protection in a large clinical trial.",
    "She finished the marathon in just under three hours.",
    "Heavy rain is expected across the region through the weekend.",
    "The library will be closed on Monday for the public holiday.",
    "A child is riding a red bicycle down a quiet suburban road.",
    "Researchers found that sleep improves long-term memory consolidation.",
    "Please send the quarterly report to the finance team by Thursday.",
]


@dataclass
class Level:
    mode: str  # "direct x1", "direct x32", "serve"
    concurrency: int
    requests: int  # timed calls: HTTP requests, or encode() calls of `per_call` sentences each (the direct rows)
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None = None


def _summary(mode: str, concurrency: int, latencies: list[float], elapsed: float,
             mean_batch: float | None = None, per_call: int = 1) -> Level:
    lat = np.array(latencies) * 1000.0
    return Level(mode, concurrency, len(latencies), round(elapsed, 2),
                 round(len(latencies) * per_call / elapsed, 1),
                 round(float(np.percentile(lat, 50)), 2), round(float(np.percentile(lat, 99)), 2),
                 None if mean_batch is None else round(mean_batch, 2))


# ------------------------------------------------------------------------------------------ direct
def bench_direct(export_dir: Path, seconds: float, provider: str = "cpu") -> list[Level]:
    from mirrorfast.export.runtime import OnnxEncoder

    enc = OnnxEncoder(export_dir, provider=provider)
    for s in SENTENCES:
        enc.encode([s])
    out = []
    for batch in (1, 32):
        latencies, i = [], 0
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < t_end:
            texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(batch)]
            t = time.perf_counter()
            enc.encode(texts, batch_size=batch)
            latencies.append(time.perf_counter() - t)
            i += batch
        out.append(_summary(f"direct encode, {batch}/call", 1, latencies, time.perf_counter() - t0,
                            per_call=batch))
    return out


# ------------------------------------------------------------------------------------------- serve
class ServerProcess:
    def __init__(self, export_dir: Path, provider: str = "cpu", extra: list[str] | None = None):
        cmd = [sys.executable, "-m", "mirrorfast.cli", "serve", str(export_dir), "--port", "0",
               "--provider", provider, *(extra or [])]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url = None
        try:  # a SIGTERM (script_main's Terminated) or Ctrl-C while the model loads: no orphaned server
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on (http://\S+?:\d+)", line)
                if m:
                    self.url = m.group(1)
                    break
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        if self.url is None:
            self.proc.wait()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _batch_stats(metrics_text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("mirrorfast_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("mirrorfast_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


def _load(url: str, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` threads, each with one keep-alive connection, each sending its next request as soon
    as the previous one is answered. http.client, a lighter client than httpx: client CPU matters when
    client and server share a small CPU."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    t_end = [0.0]

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=60)
        headers = {"Content-Type": "application/json"}
        mine: list[float] = []

        def post(text: str) -> None:
            conn.request("POST", "/v1/embeddings", body=json.dumps({"input": text, "model": "bench"}), headers=headers)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                with lock:
                    errors.append(f"{r.status} {body[:200]!r}")

        try:
            post(SENTENCES[k % len(SENTENCES)])  # open the connection
            start.wait()
            i = k
            while time.perf_counter() < t_end[0]:
                t = time.perf_counter()
                post(SENTENCES[i % len(SENTENCES)])
                mine.append(time.perf_counter() - t)
                i += concurrency
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(repr(exc))
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    t_end[0] = time.perf_counter() + seconds + 60  # provisional, set for real once all are connected
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    t0 = time.perf_counter()
    t_end[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return latencies, elapsed


def bench_serve(export_dir: Path, levels: list[int], seconds: float, provider: str = "cpu",
                extra: list[str] | None = None) -> list[Level]:
    import httpx

    server = ServerProcess(export_dir, provider, extra)
    out = []
    try:
        for c in levels:
            before = _batch_stats(httpx.get(f"{server.url}/metrics").text)
            latencies, elapsed = _load(server.url, c, seconds)
            after = _batch_stats(httpx.get(f"{server.url}/metrics").text)
            calls = after[1] - before[1]
            out.append(_summary("serve /v1/embeddings", c, latencies, elapsed,
                                mean_batch=(after[0] - before[0]) / calls if calls else None))
    finally:
        code = server.close()
    if code != 0:
        raise RuntimeError(f"server exited with {code}:\n" + "".join(server.lines[-20:]))
    return out


def table(rows: list[Level]) -> str:
    lines = ["| mode | concurrency | calls | sentences/s | p50 ms | p99 ms | mean batch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        batch = "" if r.mean_batch is None else f"{r.mean_batch:g}"
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.rps:g} | {r.p50_ms:g} | {r.p99_ms:g} | {batch} |")
    return "\n".join(lines)


def run(export_dir: str | Path, levels=(1, 8, 32), seconds: float = 3.0, provider: str = "cpu",
        extra: list[str] | None = None) -> list[Level]:
    export_dir = Path(export_dir)
    rows = bench_direct(export_dir, seconds, provider)
    rows += bench_serve(export_dir, list(levels), seconds, provider, extra)
    return rows


def _levels(text: str) -> list[int]:
    """--levels: comma-separated positive integers."""
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 1,8,32")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--levels", type=_levels, default="1,8,32", help="client concurrency levels (default: 1,8,32)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per level (default: 3)")
    ap.add_argument("--provider", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--serve-args", default="", help="extra `mirrorfast serve` flags, e.g. '--batch-wait-ms 0'")
    args = ap.parse_args(argv)
    if not 0 < args.seconds < math.inf:  # nan: no latencies; inf: never ends
        ap.error("--seconds must be positive")
    rows = run(args.export_dir, args.levels, args.seconds, args.provider, shlex.split(args.serve_args))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "serve_load"))
