"""Benchmark the SIP2 client and pool against the local replay server.

Two figures, each beside its baseline of one connection used sequentially:

* a reader's loans with 30 loans: one 63 (charged items) then a 17 per loan, the 17s spread over
  the pool's connections (``Sip2Pool.loans``) — what the bot does for "my loans";
* requests per second (17 item information) the pool sustains with 4 connections.

The replay server runs in its own process (``python -m storage.sip2.replay``) so that server and
client do not share one event loop, optionally with a per-request latency to stand in for the
library system's own work (real ILSes take milliseconds per request, which is where a pool pays).

Run: ``python bench/sip2.py [--rounds 30] [--requests 2000] [--latency 0 0.005]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from storage.sip2.client import Sip2Client, Sip2Config, Sip2Pool  # noqa: E402
from storage.sip2.replay import SYNTHETIC_PIN, default_exchanges_path  # noqa: E402

READER = "reader30"  # the replay server's synthetic reader with 30 loans


async def start_server(latency: float, data: Path) -> tuple[asyncio.subprocess.Process, int]:
    """Start the replay server in a subprocess; returns it and its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storage.sip2.replay",
        "--port",
        "0",
        "--latency",
        str(latency),
        "--data",
        str(data),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"replay server did not start: {line!r}")
    return process, int(line.split()[1])


def config(port: int, pool_size: int) -> Sip2Config:
    return Sip2Config(
        host="127.0.0.1",
        port=port,
        user="scclient",
        password="clientpwd",
        institution="UWOLS",
        location="lib",
        pool_size=pool_size,
        heartbeat_seconds=0,
        timeout=5.0,
    )


async def loans_pooled(port: int, rounds: int) -> list[float]:
    """Seconds per "my loans" (63 + 30 × 17) with the 17s spread over 4 connections."""
    times = []
    async with Sip2Pool(config(port, 4)) as pool:
        await pool.login()
        for _ in range(rounds):
            started = time.perf_counter()
            info, items = await pool.loans(READER, SYNTHETIC_PIN)
            times.append(time.perf_counter() - started)
            assert len(items) == 30 == len(info.charged_items)
    return times


async def loans_sequential(port: int, rounds: int) -> list[float]:
    """The baseline: the same on one connection, one request after the other."""
    times = []
    async with Sip2Client(config(port, 1)) as client:
        await client.login()
        for _ in range(rounds):
            started = time.perf_counter()
            info = await client.patron_information(READER, SYNTHETIC_PIN, summary="charged")
            items = [await client.item_information(barcode) for barcode in info.charged_items]
            times.append(time.perf_counter() - started)
            assert len(items) == 30
    return times


async def throughput_pooled(port: int, requests: int, barcodes: list[str]) -> float:
    """Requests per second with 4 connections kept busy by 16 concurrent callers."""
    async with Sip2Pool(config(port, 4)) as pool:
        await pool.login()
        remaining = iter(range(requests))

        async def caller() -> None:
            for n in remaining:
                await pool.item_information(barcodes[n % len(barcodes)])

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(16)))
        return requests / (time.perf_counter() - started)


async def throughput_sequential(port: int, requests: int, barcodes: list[str]) -> float:
    """The baseline: one connection, one request after the other."""
    async with Sip2Client(config(port, 1)) as client:
        await client.login()
        started = time.perf_counter()
        for n in range(requests):
            await client.item_information(barcodes[n % len(barcodes)])
        return requests / (time.perf_counter() - started)


async def run(latencies: list[float], rounds: int, requests: int, data: Path) -> None:
    barcodes = [f"{READER.upper()}-{n:03d}" for n in range(1, 31)]
    print("SIP2 benchmark: replay server in its own process on 127.0.0.1, checksums on")
    print(f"  loans: median of {rounds} rounds of 63 + 30 x 17; throughput: {requests} x 17 item information")
    print()
    header = (
        f"{'server latency':>14} | {'loans, 4 conn':>13} | {'loans, 1 seq':>12} | {'speed-up':>8} | "
        f"{'req/s, 4 conn':>13} | {'req/s, 1 seq':>12} | {'speed-up':>8}"
    )
    print(header)
    print("-" * len(header))
    for latency in latencies:
        process, port = await start_server(latency, data)
        try:
            pooled = statistics.median(await loans_pooled(port, rounds)) * 1000
            sequential = statistics.median(await loans_sequential(port, rounds)) * 1000
            rate_pooled = await throughput_pooled(port, requests, barcodes)
            rate_sequential = await throughput_sequential(port, requests, barcodes)
        finally:
            process.terminate()
            await process.wait()
        print(
            f"{latency * 1000:>11.1f} ms | {pooled:>10.1f} ms | {sequential:>9.1f} ms | {sequential / pooled:>7.1f}x | "
            f"{rate_pooled:>13.0f} | {rate_sequential:>12.0f} | {rate_pooled / rate_sequential:>7.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the loans measurement")
    parser.add_argument("--requests", type=int, default=2000, help="requests in each throughput measurement")
    parser.add_argument(
        "--latency", type=float, nargs="+", default=[0.0, 0.005], help="server latencies to try, in seconds"
    )
    parser.add_argument(
        "--data", type=Path, default=default_exchanges_path(), help="recorded exchanges (JSON)"
    )
    args = parser.parse_args()
    asyncio.run(run(args.latency, args.rounds, args.requests, args.data))


if __name__ == "__main__":
    main()
