"""Helpers of the `var-rt serve` tests: a real uvicorn server in a thread on a free loopback port, the engines
the command line builds, and decoding the answers."""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import numpy as np


def engine_for(*argv):
    """The Engine `var-rt serve ARGV` builds (e.g. engine_for("--demo"))."""
    from var_rt import cli
    from var_rt.cli.serve import build_engine, check_args
    a = cli.build_parser().parse_args(["serve", *argv])
    check_args(a)
    return build_engine(a)


@contextlib.contextmanager
def serving(engine, **kw):
    """(base URL, app) of create_app(engine, **kw) served by uvicorn in a thread; stopped (drained) on exit."""
    import uvicorn

    from var_rt.serve.app import create_app
    app = create_app(engine, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        t.join(60)
        sock.close()


def png_to_array(b64: str) -> np.ndarray:
    """A base64 PNG -> uint8 (H, W, 3), checking it is a PNG."""
    from PIL import Image
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sse_events(text: str) -> list:
    """A Server-Sent Events body -> [(event, data dict)]."""
    import json
    out = []
    for chunk in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        out.append((fields.get("event"), json.loads(fields["data"])))
    return out


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition (name with its labels, as written)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
