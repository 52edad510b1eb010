"""Load test of `var-rt serve` on the loopback interface: p50 / p99 latency and images/s at 1, 4, 16, 64
concurrent clients, beside the offline pipeline's images/s at the same batch sizes; one JSON object.

  python3 benchmarks/bench_serve.py                       # the demo VAR (drafter alone), on CUDA if present
  python3 benchmarks/bench_serve.py --demo llamagen --concurrency 1 8 --seconds 5
  python3 benchmarks/bench_serve.py --tiny                # smoke test (the GPU suite's dry run): seconds

The server is a `var-rt serve --demo` subprocess on 127.0.0.1 (a free port; nothing else is contacted), with
--max-batch = the largest concurrency. Each client sends one-image requests back to back (class i % 10, its own
seeds), for at most --requests per client and --seconds per level (bounded in count and time); the first
--warmup requests of a level are not timed. The offline figure is the same model, in this process after the server
has stopped: pipe(B labels) + the uint8 conversion, for B = each concurrency, repeated for --seconds. The server
does more per image (JSON, PNG encoding, HTTP, the clients themselves on the same CPU), so `ratio` =
server images/s at the largest concurrency / offline images/s at that batch size is what the batching achieves
(target >= 0.9). On a CPU the clients and the server share the cores: say so when quoting the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def metrics(url):
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def level(url, clients: int, requests: int, seconds: float, warmup: int) -> dict:
    """`clients` clients: each sends `warmup` untimed requests, waits for the others, then up to `requests` timed
    one-image requests back to back within `seconds`."""
    import httpx
    lat, images, errors, warmed = [], 0, 0, 0
    all_warm, go = asyncio.Event(), asyncio.Event()
    t_end = [0.0]

    async def client(i, c):
        nonlocal images, errors, warmed
        for k in range(warmup):
            await c.post(url + "/v1/images", json={"class_label": i % 10, "seed": -1 - k})
        warmed += 1
        if warmed == clients:
            all_warm.set()
        await go.wait()
        for k in range(requests):
            if time.monotonic() > t_end[0]:
                return
            t = time.monotonic()
            r = await c.post(url + "/v1/images", json={"class_label": i % 10, "seed": i * 100003 + k})
            if r.status_code == 200:
                lat.append(time.monotonic() - t)
                images += len(r.json()["images"])
            else:
                errors += 1
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        tasks = [asyncio.create_task(client(i, c)) for i in range(clients)]
        await all_warm.wait()
        before = metrics(url)
        t0 = time.monotonic()
        t_end[0] = t0 + seconds
        go.set()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
    after = metrics(url)
    batches = after["var_rt_batches_total"] - before["var_rt_batches_total"]
    rows = after["var_rt_batch_size_sum"] - before["var_rt_batch_size_sum"]
    return {"concurrency": clients, "requests": len(lat), "errors": errors, "seconds": round(wall, 3),
            "p50_ms": round(1e3 * percentile(lat, 50), 2) if lat else None,
            "p99_ms": round(1e3 * percentile(lat, 99), 2) if lat else None,
            "images_per_s": round(images / wall, 2) if wall > 0 else None,
            "mean_batch": round(rows / batches, 2) if batches else None}


def offline(demo: str, device: str, sizes, seconds: float, requests: int) -> list:
    import torch

    from var_rt import images
    from var_rt.demo import models as dm
    if demo == "llamagen":
        pipe, kw = dm.load_demo_llamagen(device=device), dict(dm.LLAMAGEN_SAMPLING)
    else:
        pipe, kw = dm.load_demo_var(device=device), dm.demo_sampling()
    out = []
    for b in sizes:
        labels = [i % 10 for i in range(b)]
        images.to_uint8(pipe(labels, seed=0, **kw))  # warm-up (CUDA graph capture)
        n, t0 = 0, time.perf_counter()
        while n < requests * b and (n == 0 or time.perf_counter() - t0 < seconds):
            images.to_uint8(pipe(labels, seed=n, **kw))
            n += b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out.append({"batch": b, "images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 2)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", choices=["var", "llamagen"], default="var")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=40, help="timed requests per client and level, at most")
    p.add_argument("--seconds", type=float, default=10.0, help="per level (and per offline batch size), at most")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per client before each level")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="smoke test: concurrency 1 and 4, a few requests")
    p.add_argument("--out", help="also append the JSON line here")
    a = p.parse_args(argv)
    if a.tiny:
        a.concurrency, a.requests, a.seconds, a.warmup = [1, 4], 3, 3.0, 1
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_batch = max(a.concurrency)
    cmd = [sys.executable, "-m", "var_rt.cli", "serve", "--demo", a.demo, "--port", "0", "--host", "127.0.0.1",
           "--max-batch", str(max_batch), "--max-wait-ms", str(a.max_wait_ms), "--queue-size", str(4 * max_batch),
           "-q", "--device", device]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = server.stdout.readline()
        if " on http://" not in line:
            raise SystemExit(f"bench_serve: the server did not start: {line.strip()!r}")
        url = line.split(" on ")[1].split()[0]
        levels = [asyncio.run(level(url, c, a.requests, a.seconds, a.warmup)) for c in a.concurrency]
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(120)
        server.stdout.close()
    off = offline(a.demo, device, a.concurrency, a.seconds, a.requests)
    from timing import run_meta  # benchmarks/timing.py
    top, base = levels[-1], off[-1]
    result = {"bench": "serve", "demo": a.demo, **run_meta(torch.device(device)), "max_batch": max_batch,
              "max_wait_ms": a.max_wait_ms, "levels": levels, "offline": off,
              "ratio": round(top["images_per_s"] / base["images_per_s"], 3) if top["images_per_s"] else None,
              "target_ratio": 0.9, "server_exit": rc, "tiny": a.tiny}
    text = json.dumps(result)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")
    return 0 if rc == 0 and all(lv["errors"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
