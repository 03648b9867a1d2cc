"""Benchmark: scoring latency and throughput of the Serve deployment against the bare model.

Goals (issues 6 and 16): 1-row requests at p50 ≤ 5 ms and p99 ≤ 15 ms on the recommended
(direct) path; 256-row requests at ≥ 0.8 of the bare model's rows/s at concurrency 8; and,
with 100 slow clients holding connections open (headers, then a body byte now and then),
good 1-row requests at a p99 no more than 3× their p99 without them. Both Serve paths are
measured — the
HTTP proxy (:8000 style) and direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, the replica's
own port) — each in a fresh Ray started by a child process (the flag only counts when Ray
starts), at concurrency 1, 8 and 32 with 1-row and 256-row requests. The bare model's
forward on the same rows, with the replica's thread count, is measured in the same run so
that machine load weighs on both alike. The client is a minimal asyncio HTTP/1.1 keep-alive
client sending pre-encoded bodies, so the numbers are the server's, not a JSON encoder's.

Run: `python jobs/benchmarks/serve_latency.py [--seconds 4] [--paths proxy,direct]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import time
from typing import Any

import numpy as np
import torch

from jobs.ports import free_port

REAL_DATA = Path(os.environ.get("EMBPRESS_REAL_DATA",
                                Path(__file__).resolve().parents[3] / "shared" / "data"))
UNLABELLED = "criteo_kaggle_unlabeled_sample.tsv"
CONCURRENCY = (1, 8, 32)
SIZES = (1, 256)
SLOW_CLIENTS = 100


# ---------------------------------------------------------------- inputs


def load_rows(count: int = 4000) -> tuple[list[dict[str, list]], str]:
    """Request rows: the real unlabelled Criteo sample, or Criteo-shaped random rows."""
    path = REAL_DATA / UNLABELLED
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines()[:count]:
            f = line.split("\t")[-39:]
            rows.append({"dense": [int(v) if v else None for v in f[:13]],
                         "categorical": [v or None for v in f[13:]]})
        return rows, f"{len(rows)} real rows of {UNLABELLED}"
    rng = np.random.default_rng(0)
    for _ in range(count):
        rows.append({
            "dense": [int(v) if rng.random() > 0.2 else None for v in rng.exponential(20, 13)],
            "categorical": [f"{int(v):08x}" if rng.random() > 0.1 else None
                            for v in rng.integers(0, 2**32, 26)],
        })
    return rows, f"{count} synthetic Criteo-shaped rows (real sample not found)"


def build_model(directory: Path) -> Path:
    """A random dlrm-small over hashed embeddings at 1/100 of Terabyte's cardinalities."""
    from data_pipeline.schema import TERABYTE_CARDINALITIES
    from embeddings.collection import CollectionConfig, EmbeddingCollection
    from embeddings.models import model_preset
    from embeddings.serving import ServingModel, export_model

    torch.manual_seed(0)
    cards = [max(c // 100, 3) for c in TERABYTE_CARDINALITIES]
    config = CollectionConfig(dim=16, cardinalities=cards, method={"method": "hash"}, ratio=10)
    serving = EmbeddingCollection(config).collapse()
    spec = model_preset("dlrm-small")
    model = ServingModel(spec, spec.build(), serving.names, list(serving.embeddings.values()))
    return export_model(model, directory, {"version": "bench"})


def _bodies(rows: list[dict], size: int, count: int) -> list[bytes]:
    starts = [(i * 97) % (len(rows) - size + 1) for i in range(count)]
    return [json.dumps({"rows": rows[s:s + size]}).encode() for s in starts]


# ---------------------------------------------------------------- the bare model


class BareModel:
    """The model's forward on the same rows, one thread like the replica."""

    def __init__(self, model_dir: Path, rows: list[dict], size: int) -> None:
        from embeddings.serving import load_model
        from services.features import model_inputs

        torch.set_num_threads(1)
        self.model, _ = load_model(model_dir)
        self.batches = []
        for i in range(0, len(rows) - size + 1, max(size, 7)):
            dense, sparse = model_inputs(rows[i:i + size])
            self.batches.append((torch.from_numpy(dense), torch.from_numpy(sparse)))
        self.k = 0
        self.run(0.2)  # warm-up

    def run(self, seconds: float) -> list[float]:
        """Seconds of each forward pass made in about `seconds`."""
        times = []
        with torch.inference_mode():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                d, s = self.batches[self.k % len(self.batches)]
                t = time.perf_counter()
                self.model(d, s)
                times.append(time.perf_counter() - t)
                self.k += 1
        return times


# ---------------------------------------------------------------- the HTTP client


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _connection(host: str, port: int, requests: list[bytes], warm_until: float,
                      end: float, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await _open(host, port)
    i = 0
    try:
        while (now := time.perf_counter()) < end:
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                status, body = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # The server closed the connection (an answer with `connection: close`):
                # counted as an error, and the client reconnects as a real one would.
                errors.append(f"connection closed: {exc!r}")
                writer.close()
                reader, writer = await _open(host, port)
                continue
            done = time.perf_counter()
            if status != 200:
                errors.append(f"{status}: {body[:200]!r}")
            elif now >= warm_until:
                latencies.append(done - now)
    finally:
        writer.close()


def _requests(host: str, port: int, bodies: list[bytes]) -> list[bytes]:
    return [(f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b
            for b in bodies]


def load(urls: list[str], bodies: list[bytes], concurrency: int, seconds: float,
         warmup: float) -> tuple[list[float], list[str]]:
    """Latencies of the requests that `concurrency` connections complete in `seconds`.

    Connections are spread over `urls` (one per direct-ingress replica), as a load balancer
    in front of several replicas would spread them.
    """
    targets = []
    for url in urls:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        targets.append((host, int(port), _requests(host, int(port), bodies)))
    latencies: list[float] = []
    errors: list[str] = []

    async def run() -> None:
        start = time.perf_counter()
        connections = []
        for k in range(concurrency):
            host, port, requests = targets[k % len(targets)]
            connections.append(_connection(host, port, requests[k:] + requests[:k],
                                           start + warmup, start + warmup + seconds,
                                           latencies, errors))
        await asyncio.gather(*connections)

    asyncio.run(run())
    return latencies, errors


def cell(urls: list[str], bodies: list[bytes], concurrency: int, size: int, bare: BareModel,
         seconds: float) -> dict[str, Any]:
    """One table cell: the service and the bare model, measured in alternating slices.

    The machine's load moves by the second (2 cores, shared); interleaving 0.3 s of bare
    forwards with 0.7 s of served requests, round after round, lets both see the same load.
    """
    served: list[float] = []
    errors: list[str] = []
    forwards: list[float] = []
    rounds = max(1, round(seconds))
    for r in range(rounds):
        forwards += bare.run(0.3)
        lat, err = load(urls, bodies, concurrency, 0.7, warmup=1.0 if r == 0 else 0.1)
        served += lat
        errors += err
    lat, fwd = np.array(served), np.array(forwards)
    return {
        "requests": len(lat), "errors": len(errors), "first_error": errors[:1],
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "requests_per_s": len(lat) / (0.7 * rounds),
        "rows_per_s": size * len(lat) / (0.7 * rounds),
        "bare": {"p50_ms": 1e3 * float(np.percentile(fwd, 50)),
                 "p99_ms": 1e3 * float(np.percentile(fwd, 99)),
                 "rows_per_s": size * len(fwd) / float(fwd.sum())},
    }


async def _slow_client(host: str, port: int, end: float, answers: list[int]) -> None:
    """Headers promising 390 bytes, then a byte every 0.5 s; reconnects when answered."""
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
            f"application/json\r\nContent-Length: 390\r\n\r\n").encode()
    while time.perf_counter() < end:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            answers.append(-1)
            await asyncio.sleep(0.1)
            continue
        writer.write(head + b'{"row')
        try:
            while time.perf_counter() < end:
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.5)
                except asyncio.TimeoutError:
                    writer.write(b" ")
                    continue
                answers.append(int(line.split()[1]) if line else -1)
                break
        except (OSError, IndexError, ValueError):
            answers.append(-1)
        finally:
            writer.close()


async def _beside_slow(host: str, port: int, requests: list[bytes], slow: int,
                       seconds: float, latencies: list[float], errors: list[str],
                       answers: list[int]) -> None:
    end = time.perf_counter() + 1.0 + seconds
    tasks = [asyncio.create_task(_slow_client(host, port, end, answers)) for _ in range(slow)]
    await asyncio.sleep(0.5 if slow else 0)  # let them connect first
    await _connection(host, port, requests, time.perf_counter() + 0.5, end, latencies, errors)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def slow_phase(url: str, bodies: list[bytes], seconds: float) -> dict[str, Any]:
    """1-row latency at concurrency 1, alone and beside SLOW_CLIENTS slow uploads."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    requests = _requests(host, int(port), bodies)
    out: dict[str, Any] = {}
    for label, slow in (("without", 0), ("with", SLOW_CLIENTS)):
        latencies: list[float] = []
        errors: list[str] = []
        answers: list[int] = []

        asyncio.run(_beside_slow(host, int(port), requests, slow, seconds, latencies, errors,
                                 answers))
        lat = np.array(latencies)
        out[label] = {"requests": len(lat), "errors": len(errors),
                      "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                      "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                      "slow_answers": {str(k): answers.count(k) for k in sorted(set(answers))}}
    return out


# ---------------------------------------------------------------- one Serve path (child)


def run_path(path: str, model_dir: Path, seconds: float, replicas: int) -> dict[str, Any]:
    """Start Ray + Serve for one path, load it, verify answers; runs in a child process."""
    import httpx

    from jobs.serve import build_parser, start_service
    from services.features import model_inputs

    argv = ["--model", str(model_dir), "--port", str(free_port()), "--replicas", str(replicas)]
    if path == "direct":
        argv += ["--direct-ingress", "--direct-port", str(free_port())]
    t0 = time.perf_counter()
    urls, _ = start_service(build_parser().parse_args(argv))
    startup = time.perf_counter() - t0
    targets = urls["direct"] if path == "direct" else urls["proxy"]
    url = targets[0]
    if path == "direct" and not urls["direct"]:
        raise RuntimeError("direct ingress asked for, but the replica has no port of its own")
    rows, _ = load_rows()
    # Measure a service that is right: one answer checked against the model in this process.
    from embeddings.serving import load_model

    model, _ = load_model(model_dir)
    dense, sparse = model_inputs(rows[:256])
    with torch.inference_mode():
        expected = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse)))
    answer = httpx.post(f"{url}/v1/score", json={"rows": rows[:256]}, timeout=30).json()
    error = float(np.abs(np.array(answer["probabilities"]) - expected.numpy()).max())
    if error > 1e-5:
        raise RuntimeError(f"the service's scores differ from the model's by {error}")
    results = {}
    for size in SIZES:
        bare = BareModel(model_dir, rows, size)
        bodies = _bodies(rows, size, 64 if size == 1 else 16)
        for concurrency in CONCURRENCY:
            results[f"{size}x{concurrency}"] = cell(targets, bodies, concurrency, size, bare,
                                                    seconds)
    slow = slow_phase(url, _bodies(rows, 1, 64), seconds)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return {"url": url, "startup_s": startup, "check_max_error": error, "results": results,
            "slow": slow, "load_average": os.getloadavg()}


# ---------------------------------------------------------------- report


def _child(path: str, model_dir: Path, seconds: float, replicas: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", path, "--model", str(model_dir),
                   "--seconds", str(seconds), "--replicas", str(replicas), "--out", out.name]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            # Ray's log lines come on stderr too: show the child's own traceback.
            start = done.stderr.rfind("Traceback (most recent call last)")
            raise RuntimeError(f"{path} run failed:\n{done.stderr[start:][-3000:]}")
        return json.loads(Path(out.name).read_text())


def report(paths: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'path':<7} {'rows':>4} {'conc':>4} | {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} "
          f"{'rows/s':>8} | {'bare p50':>8} {'bare p99':>8} {'bare rows/s':>11} | "
          f"{'vs bare':>7} {'errors':>6}")
    for name, run in paths.items():
        for size in SIZES:
            for concurrency in CONCURRENCY:
                r = run["results"][f"{size}x{concurrency}"]
                b = r["bare"]
                print(f"{name:<7} {size:>4} {concurrency:>4} | {r['p50_ms']:>7.2f} "
                      f"{r['p99_ms']:>7.2f} {r['requests_per_s']:>7,.0f} {r['rows_per_s']:>8,.0f} "
                      f"| {b['p50_ms']:>8.2f} {b['p99_ms']:>8.2f} {b['rows_per_s']:>11,.0f} | "
                      f"{r['rows_per_s'] / b['rows_per_s']:>7.2f} {r['errors']:>6}")
    print("(bare: the model's forward alone, 1 thread, on the same rows, timed in slices "
          "alternating with the served requests of that line)\n")
    for name, run in paths.items():
        without, with_slow = run["slow"]["without"], run["slow"]["with"]
        print(f"{name} slow clients: 1-row p50/p99 {without['p50_ms']:.2f}/"
              f"{without['p99_ms']:.2f} ms alone, {with_slow['p50_ms']:.2f}/"
              f"{with_slow['p99_ms']:.2f} ms beside {SLOW_CLIENTS} slow uploads "
              f"({with_slow['requests']} good requests, {with_slow['errors']} errors; slow "
              f"clients' answers by status: {with_slow['slow_answers']})")
    print()
    for name, run in paths.items():
        one = run["results"]["1x1"]
        at8 = run["results"]["256x8"]
        ratio = at8["rows_per_s"] / at8["bare"]["rows_per_s"]
        slow = run["slow"]["with"]["p99_ms"] / run["slow"]["without"]["p99_ms"]
        load_avg = ", ".join(f"{x:.1f}" for x in run["load_average"])

        def verdict(ok: bool) -> str:
            return "met" if ok else "MISSED"

        print(f"{name}: {run['url']}, Serve start {run['startup_s']:.1f} s, load average "
              f"{load_avg}; goals: 1-row p50 {one['p50_ms']:.2f} ms (≤ 5: "
              f"{verdict(one['p50_ms'] <= 5)}), p99 {one['p99_ms']:.2f} ms (≤ 15: "
              f"{verdict(one['p99_ms'] <= 15)}); 256-row at concurrency 8: {ratio:.2f} of "
              f"bare rows/s (≥ 0.8: {verdict(ratio >= 0.8)}); good p99 beside "
              f"{SLOW_CLIENTS} slow clients {slow:.2f}× alone (≤ 3: {verdict(slow <= 3)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="exported model dir (default: a random "
                                                   "dlrm-small at 1/100 Terabyte sizes)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--paths", default="proxy,direct", help="proxy, direct or both")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas (default: %(default)s; the bare model gets one thread)")
    parser.add_argument("--child", choices=("proxy", "direct"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_path(args.child, args.model, args.seconds, args.replicas)
        Path(args.out).write_text(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(Path(tmp) / "model")
        _, source = load_rows()
        print(f"rows: {source}; model: {model_dir}; {os.cpu_count()} CPUs; {args.replicas} "
              f"replica(s) of 1 CPU; {args.seconds:g} s per cell after 1 s of warm-up")
        paths = {}
        for path in args.paths.split(","):
            print(f"measuring the {path} path…", flush=True)
            paths[path] = _child(path, model_dir, args.seconds, args.replicas)
        report(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
