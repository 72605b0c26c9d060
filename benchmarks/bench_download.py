"""Throughput of ``artifacts.download_file`` against baselines measured in the same run.

A 512 MiB file is served over loopback by a small Range-capable HTTP server running in a separate process (it
sends with ``sendfile``, as cheap as a server gets). Measured, best of ``repeat`` runs each:

- ``httpx_discard``: a plain ``httpx.AsyncClient`` stream, bytes thrown away (no hash, no disk): the ceiling of
  the HTTP client itself with its default 64 KiB reads;
- ``httpx_discard_256k``: the same with the larger reads ``download_file`` asks of its connection;
- ``asyncio_discard``: the body read with plain ``asyncio`` streams (no httpx), thrown away: a reference only;
- ``sha256_memory``: ``hashlib.sha256`` over the same number of bytes already in memory, 1 MiB updates;
- ``download_file``: the real thing (256 KiB reads; each 1 MiB batch joined, then hashed and written in one
  worker thread; fsync, rename);
- ``download_file_64k_reads``: the same with httpcore's default 64 KiB reads (``_READ_SIZE = 0``);
- ``download_file_per_chunk``: the same with the batch hashed and written chunk by chunk (no join);
- ``download_file_inline_hash``: the same with hashing and writing on the event loop thread (the alternative);
- ``curl``: ``curl -o /dev/null`` when curl is installed (a reference outside Python).

Also reported: the longest the event loop was late for a 1 ms timer while ``download_file`` ran (its worst
blocking stretch, GIL hand-offs to the worker thread included).

Run: ``.venv/bin/python -m benchmarks.bench_download [--size-mib N] [--repeat N]``.
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
                    lag: list[float] | None = None) -> None:
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
        async with httpx.AsyncClient(timeout=60) as http:
            await artifacts.download_file(http, url, headers={}, name="big.bin", expected_size=size,
                                          expected_sha256=sha, dest_dir=dest)
    finally:
        artifacts._HASH_IN_THREAD, artifacts._READ_SIZE, artifacts._Sink._work = saved  # type: ignore[method-assign]
        stop.set()
        if monitor is not None:
            await monitor
    (dest / "big.bin").unlink()


def _sha_memory(size: int) -> None:
    buf = os.urandom(64 * MIB)
    view = memoryview(buf)
    h = hashlib.sha256()
    left = size
    while left:
        for off in range(0, len(buf), MIB):
            n = min(MIB, left)
            h.update(view[off:off + n])
            left -= n
            if not left:
                break


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(size_mib: int = 512, repeat: int = 3) -> dict[str, Any]:
    """Measure every variant; returns {"size_bytes", "gb_per_s": {...}, "ratios": {...}, "cpus"}."""
    size = size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="trainorch-bench-") as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "served.bin"
        sha = _make_file(src, size)
        dest = tmpdir / "dest"
        dest.mkdir()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(src)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            port = json.loads(proc.stdout.readline())["port"]
            url = f"http://127.0.0.1:{port}/big.bin"
            seconds: dict[str, float] = {}
            assert asyncio.run(_httpx_discard(url)) == size  # warm the page cache and check the server
            assert asyncio.run(_asyncio_discard(url)) == size
            seconds["httpx_discard"] = _best(lambda: asyncio.run(_httpx_discard(url)), repeat)
            seconds["httpx_discard_256k"] = _best(lambda: asyncio.run(_httpx_discard_256k(url)), repeat)
            seconds["asyncio_discard"] = _best(lambda: asyncio.run(_asyncio_discard(url)), repeat)
            seconds["sha256_memory"] = _best(lambda: _sha_memory(size), repeat)
            lags: list[float] = []
            seconds["download_file"] = _best(lambda: asyncio.run(_download(url, size, sha, dest, lag=lags)), repeat)
            for label, variant in (("64k_reads", "64k"), ("per_chunk", "per_chunk"), ("inline_hash", "inline")):
                seconds[f"download_file_{label}"] = _best(
                    lambda v=variant: asyncio.run(_download(url, size, sha, dest, v)), repeat)
            curl = shutil.which("curl")
            if curl:
                seconds["curl"] = _best(lambda: subprocess.run([curl, "-s", "-o", os.devnull, url], check=True),
                                        repeat)
        finally:
            proc.terminate()
            proc.wait(10)
    gbps = {k: size / v / 1e9 for k, v in seconds.items()}
    ratios = {
        "download_file / httpx_discard": gbps["download_file"] / gbps["httpx_discard"],
        "download_file / httpx_discard_256k": gbps["download_file"] / gbps["httpx_discard_256k"],
        "download_file / sha256_memory": gbps["download_file"] / gbps["sha256_memory"],
        "download_file / 64k_reads": gbps["download_file"] / gbps["download_file_64k_reads"],
        "download_file / per_chunk": gbps["download_file"] / gbps["download_file_per_chunk"],
        "download_file / inline_hash": gbps["download_file"] / gbps["download_file_inline_hash"],
        "asyncio_discard / httpx_discard_256k": gbps["asyncio_discard"] / gbps["httpx_discard_256k"],
    }
    if "curl" in gbps:
        ratios["download_file / curl"] = gbps["download_file"] / gbps["curl"]
    return {"size_bytes": size, "repeat": repeat, "cpus": os.cpu_count(), "gb_per_s": gbps, "ratios": ratios,
            "loop_lag_max_ms": max(lags) * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return
    result = run(args.size_mib, args.repeat)
    print(f"{args.size_mib} MiB over loopback, best of {args.repeat}, {result['cpus']} CPUs")
    for k, v in result["gb_per_s"].items():
        print(f"  {k:28s} {v:6.3f} GB/s")
    for k, v in result["ratios"].items():
        print(f"  {k:38s} {v:5.2f}")
    print(f"  longest event-loop delay during download_file: {result['loop_lag_max_ms']:.1f} ms")


if __name__ == "__main__":
    main()
