"""The data plane's HTTP client, its answers parsed by hand (before) or by httptools (after).

    .venv/bin/python benchmarks/http_client.py [--requests 3000] [--concurrency 64] [--rounds 5]

One mvllm-sim at --time-scale 0 answers; this process runs only the client, the two versions in
turns (each round runs every case with both, in alternating order), and measures the client's CPU
per request (time.process_time: this process alone, the simulator is another) and requests per
second of wall time. Cases: a JSON POST with an 8-token answer (Content-Length), and a streamed
answer of 20 tokens, a chunk each (stream_interval 1), handed chunk by chunk to on_data. Then the
same answers without a socket ("parse only"): fed to a connection whose transport does nothing, the
stream a chunk a read, as it comes from the simulator; this is the parser's own cost, without the
event loop's and the kernel's, which on a shared machine vary more than it does. The old client is
read from git (--old REV, the last commit with the hand-written parser) into a temporary module, so
that both run the same loop. Prints a markdown table of medians (and the range).

A benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from mvllmd.transport import http as after

from benchkit import load_average, machine, print_table, sim_servers

ROOT = Path(__file__).resolve().parent.parent
OLD_REV = "7316729dc685edbf258a9147c029ea4431198f65"  # jobs/http.py's hand-written head and chunk parsing
PLAIN = {"model": "sim", "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
STREAMED = {**PLAIN, "max_tokens": 20, "stream": True, "stream_interval": 1}
HEADERS = {"Content-Type": "application/json"}
ANSWER = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "sim",
                     "choices": [{"index": 0, "text": " word" * 8, "logprobs": None, "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}}).encode()  # fmt: skip
EVENT = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"sim","choices":[{"index":0,' \
        b'"text":" word","token_ids":[5],"finish_reason":null}]}\n\n'  # fmt: skip
PLAIN_READS = [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
               % (len(ANSWER), ANSWER)]  # fmt: skip
STREAM_READS = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                *[b"%x\r\n%s\r\n" % (len(EVENT), EVENT)] * 20, b"0\r\n\r\n"]  # fmt: skip


def load_old(rev: str, directory: Path) -> ModuleType:
    """jobs/http.py as it was at `rev`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:daemon/mvllmd/jobs/http.py"],  # noqa: S607
                            cwd=ROOT, capture_output=True, check=True).stdout  # fmt: skip
    path = directory / "http_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("http_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["http_before"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


async def measure(module: ModuleType, url: str, streamed: bool, requests: int, concurrency: int) -> tuple[float, float]:
    """(client CPU us per request, requests per second) for `requests` answers at `concurrency`."""
    client = module.Client()
    pool = client.pool(url)
    body = json.dumps(STREAMED if streamed else PLAIN).encode()
    chunks = 0

    def on_data(_: bytes) -> None:
        nonlocal chunks
        chunks += 1

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await pool.post("/v1/completions", body, HEADERS, on_data if streamed else None)
            if response.status != 200 or not (streamed or response.body):
                raise RuntimeError(f"HTTP {response.status}: {response.body[:200]!r}")

    await asyncio.gather(*(worker(1) for _ in range(concurrency)))  # the connections open, outside the count
    chunks = 0
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(share) for share in shares))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    client.close()
    if streamed and chunks < 20 * requests:
        raise RuntimeError(f"{chunks} chunks for {requests} streamed answers: not one a token")
    return cpu / requests * 1e6, requests / wall


class _Sink(asyncio.Transport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def parse_only(module: ModuleType, reads: list[bytes], answers: int) -> tuple[float, float]:
    """(client CPU us per answer, answers per second) for `answers` fed to one connection, no socket."""
    connection = module._Connection()
    connection.connection_made(_Sink())
    on_data = (lambda _: None) if len(reads) > 1 else None
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(answers):
        done = connection.request(b"", on_data)
        for data in reads:
            connection.data_received(data)
        if done.result().status != 200:
            raise RuntimeError("not a 200")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / answers * 1e6, answers / wall


def summary(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", default=OLD_REV, help="the commit whose jobs/http.py is 'before'")
    args = parser.parse_args()

    header = (f"HTTP client, {args.requests} requests a run at concurrency {args.concurrency}, {args.rounds} rounds, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; {load_average()} at the start")  # fmt: skip
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, sim_servers([["--time-scale", "0"]]) as (url,):
        clients = {"hand-written (before)": load_old(args.old, Path(tmp)), "httptools (after)": after}
        for round_ in range(args.rounds):
            order = list(clients.items()) if round_ % 2 == 0 else list(reversed(clients.items()))
            for case, streamed in (("JSON POST, Content-Length", False), ("streamed, 20 chunks", True)):
                for name, module in order:
                    got = await measure(module, url, streamed, args.requests, args.concurrency)
                    results.setdefault((case, name), []).append(got)
                    print(f"round {round_ + 1} {case}, {name}: {got[0]:.0f} us, {got[1]:.0f}/s", file=sys.stderr)
            for case, reads in (("parse only: JSON", PLAIN_READS), ("parse only: streamed, 20 reads", STREAM_READS)):
                for name, module in order:
                    got = await parse_only(module, reads, 10 * args.requests)
                    results.setdefault((case, name), []).append(got)
    print(header + "\n")
    rows = [[case, name, summary([cpu for cpu, _ in runs]), summary([rate for _, rate in runs])]
            for (case, name), runs in results.items()]  # fmt: skip
    print_table(["answer", "client", "client CPU µs/request, median (range)", "requests/s, median (range)"], rows)


if __name__ == "__main__":
    asyncio.run(main())
