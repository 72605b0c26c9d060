"""Throughput of ``artifacts.download_file`` against baselines measured in the same run.

A 256 MiB file is served over loopback by a small Range-capable HTTP server running in a separate process (it
sends with ``sendfile``, as cheap as a server gets). Measured, each once per round (see ``benchmarks/stats.py``:
one warm-up round, then ``rounds`` rounds in rotated order; each figure and ratio is the median of the rounds,
with min-max):

- ``httpx_discard``: a plain ``httpx.AsyncClient`` stream, bytes thrown away (no hash, no disk): the ceiling of
  the HTTP client itself with its default 64 KiB reads;
- ``httpx_discard_256k``: the same with the larger reads ``download_file`` asks of its connection;
- ``asyncio_discard``: the body read with plain ``asyncio`` streams (no httpx), thrown away: a reference only;
- ``sha256_memory``: ``hashlib.sha256`` over the same number of bytes already in memory, 1 MiB updates (the
  buffer is made before the clock starts: only hashing is timed);
- ``download_file``: the real thing (256 KiB reads; each 1 MiB batch joined, then hashed and written in one
  worker thread; fsync, rename);
- ``download_file_64k_reads``: the same with httpcore's default 64 KiB reads (``_READ_SIZE = 0``);
- ``download_file_per_chunk``: the same with the batch hashed and written chunk by chunk (no join);
- ``download_file_inline_hash``: the same with hashing and writing on the event loop thread (the alternative);
- ``curl``: ``curl -o /dev/null`` when curl is installed (a reference outside Python).

Every download is timed from its client's creation to its last byte; removing the file afterwards is not timed.
Also reported: the longest the event loop was late for a 1 ms timer while ``download_file`` ran (its worst
blocking stretch, GIL hand-offs to the worker thread included).

Run: ``.venv/bin/python -m benchmarks.bench_download [--size-mib N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.stats import ROUNDS, alternated, ratios, spread
except ImportError:  # run as a file (the --serve child, or python benchmarks/bench_download.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.stats import ROUNDS, alternated, ratios, spread

MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# The server (stdlib only; runs in its own process: python bench_download.py --serve FILE)
# --------------------------------------------------------------------------------------------


def _serve(path: str) -> None:
    import re
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    size = os.path.getsize(path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            start, end = 0, size - 1
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = min(end, int(m.group(2))) if m.group(2) else end
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            with open(path, "rb") as f:
                self.wfile.flush()
                self.connection.sendfile(f, start, end - start + 1)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def _make_file(path: Path, size: int) -> str:
    """Write ``size`` bytes (a random 1 MiB block repeated) and return their SHA-256."""
    block = os.urandom(MIB)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = block if left >= MIB else block[:left]
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


async def _httpx_discard(url: str) -> int:
    import httpx

    n = 0
    async with httpx.AsyncClient(timeout=60) as http, http.stream("GET", url) as resp:
        async for chunk in resp.aiter_raw():
            n += len(chunk)
    return n


def _timed_run(coro_fn: Any, expected: int) -> float:
    """Seconds of ``coro_fn()`` (client creation to last byte, as for ``_download``), which must read
    ``expected`` bytes."""

    async def timed() -> float:
        t0 = time.perf_counter()
        n = await coro_fn()
        took = time.perf_counter() - t0
        if n != expected:
            raise RuntimeError(f"read {n} bytes, expected {expected}")
        return took

    return asyncio.run(timed())


async def _httpx_discard_256k(url: str) -> int:
    import httpx

    from trainorch_jupyter import artifacts

    n = 0
    async with httpx.AsyncClient(timeout=60) as http, http.stream("GET", url) as resp:
        with artifacts._larger_reads(resp):
            async for chunk in resp.aiter_raw():
                n += len(chunk)
    return n


async def _asyncio_discard(url: str) -> int:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname and parts.port
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
    writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept-Encoding: identity\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    n = 0
    while n < length:
        chunk = await reader.read(min(1 << 20, length - n))
        if not chunk:
            break
        n += len(chunk)
    writer.close()
    return n


def _per_chunk_work(self: Any, chunks: list[bytes]) -> None:
    """The sink's work before batching: one hash update and one write per chunk."""
    for c in chunks:
        self.hasher.update(c)
        self.f.write(c)
        self.done += len(c)


async def _loop_lag(stop: asyncio.Event, out: list[float]) -> None:
    worst = 0.0
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - t0 - 0.001)
    out.append(worst)


async def _download(url: str, size: int, sha: str, dest: Path, variant: str = "",
                    lag: list[float] | None = None) -> float:
    """Seconds of one ``download_file`` (client creation included); the file is removed after the clock stops."""
    import httpx

    from trainorch_jupyter import artifacts

    saved = artifacts._HASH_IN_THREAD, artifacts._READ_SIZE, artifacts._Sink._work
    artifacts._HASH_IN_THREAD = variant != "inline"
    if variant == "64k":
        artifacts._READ_SIZE = 0
    if variant == "per_chunk":
        artifacts._Sink._work = _per_chunk_work  # type: ignore[method-assign]
    stop = asyncio.Event()
    monitor = asyncio.create_task(_loop_lag(stop, lag)) if lag is not None else None
    try:
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=60) as http:
            await artifacts.download_file(http, url, headers={}, name="big.bin", expected_size=size,
                                          expected_sha256=sha, dest_dir=dest)
        took = time.perf_counter() - t0
    finally:
        artifacts._HASH_IN_THREAD, artifacts._READ_SIZE, artifacts._Sink._work = saved  # type: ignore[method-assign]
        stop.set()
        if monitor is not None:
            await monitor
    (dest / "big.bin").unlink()
    return took


def _sha_memory(buf: bytes, size: int) -> float:
    """Seconds to hash ``size`` bytes of ``buf`` (cycled) in 1 MiB updates; ``buf`` is made by the caller."""
    view = memoryview(buf)
    h = hashlib.sha256()
    left = size
    t0 = time.perf_counter()
    while left:
        for off in range(0, len(buf), MIB):
            n = min(MIB, left)
            h.update(view[off:off + n])
            left -= n
            if not left:
                break
    return time.perf_counter() - t0


def _curl(curl: str, url: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([curl, "-s", "-o", os.devnull, url], check=True)
    return time.perf_counter() - t0


RATIOS = {  # name: (ours, baseline); each as GB/s over GB/s, i.e. baseline seconds / our seconds
    "download_file / httpx_discard": ("download_file", "httpx_discard"),
    "download_file / httpx_discard_256k": ("download_file", "httpx_discard_256k"),
    "download_file / sha256_memory": ("download_file", "sha256_memory"),
    "download_file / 64k_reads": ("download_file", "download_file_64k_reads"),
    "download_file / per_chunk": ("download_file", "download_file_per_chunk"),
    "download_file / inline_hash": ("download_file", "download_file_inline_hash"),
    "asyncio_discard / httpx_discard_256k": ("asyncio_discard", "httpx_discard_256k"),
    "download_file / curl": ("download_file", "curl"),
}


def run(size_mib: int = 256, rounds: int = ROUNDS) -> dict[str, Any]:
    """Measure every variant in alternated rounds; returns {"size_bytes", "gb_per_s": {name: spread},
    "ratios": {name: spread}, "loop_lag_ms": spread, "cpus", "rounds"}."""
    size = size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="trainorch-bench-") as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "served.bin"
        sha = _make_file(src, size)
        dest = tmpdir / "dest"
        dest.mkdir()
        buf = os.urandom(64 * MIB)  # the in-memory hashing baseline's bytes, made before any clock starts
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(src)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            port = json.loads(proc.stdout.readline())["port"]
            url = f"http://127.0.0.1:{port}/big.bin"
            lags: list[float] = []
            sides: dict[str, Any] = {
                "httpx_discard": lambda: _timed_run(lambda: _httpx_discard(url), size),
                "httpx_discard_256k": lambda: _timed_run(lambda: _httpx_discard_256k(url), size),
                "asyncio_discard": lambda: _timed_run(lambda: _asyncio_discard(url), size),
                "sha256_memory": lambda: _sha_memory(buf, size),
                "download_file": lambda: asyncio.run(_download(url, size, sha, dest, lag=lags)),
            }
            for label, variant in (("64k_reads", "64k"), ("per_chunk", "per_chunk"), ("inline_hash", "inline")):
                sides[f"download_file_{label}"] = lambda v=variant: asyncio.run(_download(url, size, sha, dest, v))
            curl = shutil.which("curl")
            if curl:
                sides["curl"] = lambda: _curl(curl, url)
            seconds = alternated(sides, rounds, warmup=1)  # the warm-up also fills the page cache
        finally:
            proc.terminate()
            proc.wait(10)
    lags = lags[-rounds:]  # the warm-up's is dropped
    gbps = {k: [size / v / 1e9 for v in vs] for k, vs in seconds.items()}
    result_ratios = {name: spread(ratios(seconds[base], seconds[ours]))
                     for name, (ours, base) in RATIOS.items() if ours in seconds and base in seconds}
    return {"size_bytes": size, "rounds": rounds, "cpus": os.cpu_count(),
            "gb_per_s": {k: spread(v) for k, v in gbps.items()}, "ratios": result_ratios,
            "loop_lag_ms": spread([x * 1e3 for x in lags], 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return
    result = run(args.size_mib, args.rounds)
    print(f"{args.size_mib} MiB over loopback, median (min-max) of {args.rounds} alternated rounds, {result['cpus']} CPUs")
    for k, v in result["gb_per_s"].items():
        print(f"  {k:28s} {v['median']:6.3f} GB/s ({v['min']:.3f}-{v['max']:.3f})")
    for k, v in result["ratios"].items():
        print(f"  {k:38s} {v['median']:5.2f} ({v['min']:.2f}-{v['max']:.2f})")
    lag = result["loop_lag_ms"]
    print(f"  longest event-loop delay during download_file: {lag['median']:.1f} ms (max {lag['max']:.1f})")


if __name__ == "__main__":
    main()
