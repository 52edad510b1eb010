"""`var-rt serve`: an HTTP server (var_rt.serve: Starlette + uvicorn, the optional extra var_rt[serve]) with
dynamic batching, streamed previews and a page to try it. The model arguments are generate's (VAR, CoDe,
LlamaGen), or --demo (the embedded VAR drafter + refiner: requests choose draft_steps) / --demo llamagen; the
sampling options are the defaults of requests that give none. Everything is checked before anything is loaded;
the listening socket is bound before the model loads, and its address printed on stdout once the model is
ready ("var-rt: serving ... on http://HOST:PORT"; --port 0 picks a free port). SIGTERM (or Ctrl-C) stops taking
connections, finishes the requests in flight and exits (0 for SIGTERM)."""
from __future__ import annotations

import signal
import socket

from var_rt.cli.args import (LLAMAGEN_ONLY, UsageError, add_model_args, add_sampling_args, build_pipeline,
                             check_count, check_device_arg, check_model, check_sampling, sampling_options)

MODEL_SOURCES = {"model": "--model", "var": "--var", "drafter": "--drafter", "refiner": "--refiner", "vae": "--vae",
                 "llamagen": "--llamagen", "vq": "--vq", "random_weights": "--random-weights"}


def add_parser(sub) -> None:
    g = sub.add_parser("serve", help="an HTTP server: POST /v1/images with dynamic batching, streamed previews, "
                                     "a page at /")
    add_model_args(g)
    add_sampling_args(g)  # the defaults of requests (--seed: of requests that give no seed)
    g.add_argument("--demo", nargs="?", const="var", choices=["var", "llamagen"],
                   help="the embedded demo models instead of a model: var (drafter + refiner; requests choose "
                        "draft_steps) or llamagen")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    g.add_argument("--max-batch", type=int, default=16, help="images per model run (and per request) at most")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a request waits for batch-mates before its batch runs")
    g.add_argument("--queue-size", type=int, default=256, help="requests waiting at most; more are answered 429")
    g.add_argument("--no-warmup", action="store_true",
                   help="do not capture the CUDA graphs of every batch bucket at start (the first request of a "
                        "bucket then waits for its capture); nothing to capture without CUDA graphs")
    g.add_argument("-q", "--quiet", action="store_true", help="no access log")
    g.set_defaults(fn=cmd_serve)


def check_args(a) -> None:
    check_count(a.max_batch, "--max-batch", 1, 4096)
    check_count(a.queue_size, "--queue-size", 1)
    check_count(a.port, "--port", 0, 65535)
    if not a.max_wait_ms >= 0:
        raise UsageError(f"--max-wait-ms {a.max_wait_ms}: expected a number >= 0")
    if a.demo:
        given = [opt for dest, opt in MODEL_SOURCES.items() if getattr(a, dest, None) is not None]
        if given:
            raise UsageError(f"--demo runs the embedded demo models; it takes no {given[0]}")
        if a.demo == "var":
            wrong = [opt for dest, opt in LLAMAGEN_ONLY.items() if getattr(a, dest, None) is not None]
        else:
            wrong = [opt for dest, opt in (("draft_steps", "--draft-steps"), ("preset", "--preset"),
                                           ("cfg_skip_last", "--cfg-skip-last")) if getattr(a, dest, None) is not None]
        if wrong:
            raise UsageError(f"{wrong[0]} is not an option of --demo {a.demo}")
        check_device_arg(a.device)


def build_engine(a):
    """The Engine the arguments describe (checked first: check_args)."""
    from var_rt.serve.engine import Engine
    if a.demo:
        return _demo_engine(a)
    plan = check_model(a)
    check_sampling(a, plan)
    pipe = build_pipeline(a, plan=plan, log=lambda s: print(s, flush=True))
    defaults = sampling_options(a, plan.family)
    if plan.family == "llamagen":
        for k in ("zipar_window", "zipar_mask", "sjd_window", "sjd_relaxed"):
            if getattr(a, k, None) is not None:
                defaults[k] = getattr(a, k)
    name = a.model or a.var or a.drafter or a.llamagen or f"random {a.random_weights}"
    return Engine(pipe, defaults, a.seed, a.max_batch, name=str(name))


def _demo_engine(a):
    from var_rt.demo import models as dm
    from var_rt.demo.data import CLASSES
    from var_rt.serve.engine import Engine
    given = {k: getattr(a, k) for k in ("cfg", "top_k", "top_p", "temperature", "cfg_skip_last")
             if getattr(a, k, None) is not None}
    if a.demo == "llamagen":
        pipe = dm.load_demo_llamagen(device=a.device, dtype=a.dtype or "fp32", backend=a.backend)
        return Engine(pipe, {**dm.LLAMAGEN_SAMPLING, **given}, a.seed, a.max_batch, class_names=CLASSES,
                      name="demo llamagen (SHAPES-10)")
    from var_rt.pipeline import VARPipeline
    code = dm.load_demo_var(draft_steps=1, device=a.device, dtype=a.dtype or "fp32")  # loads the refiner too
    K = len(code.cfg.patch_nums)
    pipe = VARPipeline(code.vae, drafter=code.models["drafter"], draft_steps=K, device=a.device, backend=a.backend)
    defaults = {**dm.demo_sampling(), **given, "draft_steps": a.draft_steps or K}
    if a.preset:
        defaults["preset"] = a.preset
    engine = Engine(pipe, defaults, a.seed, a.max_batch, class_names=CLASSES, name="demo var (SHAPES-10)",
                    refiner=code.models["refiner"])
    engine.parse({"class_label": 0})  # the defaults, through the request checks (e.g. --draft-steps 9)
    return engine


def cmd_serve(a) -> int:
    from var_rt import serve
    serve.require()
    check_args(a)
    sock = _bind(a.host, a.port)   # a taken port fails now, before the model loads
    try:
        engine = build_engine(a)
        if not a.no_warmup:   # the graphs of the default settings at every bucket, before the first request
            from var_rt.serve.batcher import buckets_for
            engine.warm_up(buckets_for(a.max_batch), log=lambda s: print(s, flush=True))
        import uvicorn

        from var_rt.serve.app import create_app
        app = create_app(engine, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, queue_size=a.queue_size)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if a.quiet else "info",
                                               access_log=not a.quiet, lifespan="on", timeout_graceful_shutdown=None))
        host, port = sock.getsockname()[:2]
        print(f"var-rt: serving {engine.name} on http://{'[' + host + ']' if ':' in host else host}:{port} "
              f"(device {engine.device}, max batch {a.max_batch}, max wait {a.max_wait_ms:g} ms)", flush=True)
        # uvicorn re-raises the signal that stopped it once it has drained: SIGTERM then lands here (exit 0)
        prev = signal.signal(signal.SIGTERM, lambda sig, frame: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, prev)
    finally:
        sock.close()
    print("var-rt: stopped", flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
