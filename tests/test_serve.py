"""`var-rt serve`: answers equal to the offline pipeline's under concurrency (VAR + CoDe with draft_steps chosen
per request, LlamaGen + ZipAR), batching, streaming, 400 / 429 / 500 / 503, OOM retries, cancellation, and the
SIGTERM drain of the real command. A real uvicorn server on a loopback port (serve_util.serving); the models are
the embedded demo models (32 px, fast on a CPU)."""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from var_rt import cli, images  # noqa: E402
from var_rt.demo import models as dm  # noqa: E402
from var_rt.pipeline_base import image_seeds  # noqa: E402

from serve_util import engine_for, metric, png_to_array, serving, sse_events  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DEMO_FILES = {n: os.path.join(dm.WEIGHTS_DIR, n + ".safetensors") for n in ("vae", "var_drafter", "var_refiner")}


@pytest.fixture(scope="module")
def var_engine():
    return engine_for("--demo", "--max-batch", "16")


@pytest.fixture(scope="module")
def llamagen_engine():
    return engine_for("--demo", "llamagen", "--max-batch", "8")


@pytest.fixture(scope="module")
def offline():
    """Offline pipelines (not the server's): the demo VAR per draft_steps, and the demo LlamaGen."""
    pipes = {}

    def get(kind):
        if kind not in pipes:
            pipes[kind] = dm.load_demo_llamagen() if kind == "llamagen" else dm.load_demo_var(
                draft_steps=None if kind == 6 else kind)
        return pipes[kind]
    return get


def expected(offline, kind, label, n, seed, **kw):
    """uint8 (n, H, W, 3): what pipe([label] * n, seed=seed, **settings) gives (the demo's default settings)."""
    settings = dict(dm.LLAMAGEN_SAMPLING if kind == "llamagen" else dm.demo_sampling(), **kw)
    return images.to_uint8(offline(kind)([label] * n, seed=seed, **settings))


def post(url, body, timeout=60):
    with httpx.Client(timeout=timeout) as c:
        return c.post(url + "/v1/images", json=body)


def test_concurrent_clients_get_the_offline_images_in_batches(var_engine, offline):
    """12 clients at once, two draft_steps groups, padded to buckets: every image equals the offline call's."""
    reqs = [{"class_label": i % 10, "n": 1 + i % 3, "seed": 100 + i, **({"draft_steps": 2} if i % 2 else {})}
            for i in range(12)]
    with serving(var_engine, max_batch=16, max_wait_ms=1000, pad=True) as (url, app):
        with concurrent.futures.ThreadPoolExecutor(len(reqs)) as ex:
            answers = list(ex.map(lambda b: post(url, b), reqs))
        text = httpx.get(url + "/metrics").text
        health = httpx.get(url + "/healthz").json()
    for body, r in zip(reqs, answers):
        assert r.status_code == 200, r.text
        data = r.json()
        ref = expected(offline, body.get("draft_steps", 6), body["class_label"], body["n"], body["seed"])
        got = np.stack([png_to_array(s) for s in data["images"]])
        assert np.array_equal(got, ref), body
        assert data["seeds"] == [int(s) for s in var_engine.parse(body).seeds]
    assert health["status"] == "ok"
    batches = metric(text, "var_rt_batches_total")
    assert batches < len(reqs)                                            # requests shared model runs
    assert metric(text, 'var_rt_batch_size_bucket{le="1"}') < batches     # some batches held more than one image
    assert metric(text, "var_rt_padded_rows_total") > 0
    assert metric(text, "var_rt_images_total") == sum(b["n"] for b in reqs)
    assert metric(text, 'var_rt_requests_total{code="200"}') == len(reqs)
    assert "# TYPE var_rt_request_seconds histogram" in text and "var_rt_images_per_second" in text


def test_llamagen_requests_and_streams(llamagen_engine, offline):
    with serving(llamagen_engine, max_batch=8, max_wait_ms=100) as (url, _):
        bodies = [{"class_label": 3, "n": 2, "seed": 7, "zipar_window": 2}, {"class_label": 5, "seed": 1},
                  {"class_label": 8, "seed": 2, "zipar_window": 2}]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(lambda b: post(url, b), bodies))
        for body, r in zip(bodies, answers):
            assert r.status_code == 200, r.text
            kw = {k: body[k] for k in ("zipar_window",) if k in body}
            ref = expected(offline, "llamagen", body["class_label"], body.get("n", 1), body["seed"], **kw)
            assert np.array_equal(np.stack([png_to_array(s) for s in r.json()["images"]]), ref)
        r = post(url, {"class_label": 4, "seed": 3, "stream": True, "zipar_window": 4})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = sse_events(r.text)
    assert [e for e, _ in ev] == ["preview"] * (len(ev) - 1) + ["final"] and len(ev) >= 3
    assert [d["step"] for _, d in ev] == sorted(d["step"] for _, d in ev)
    ref = expected(offline, "llamagen", 4, 1, 3, zipar_window=4)
    assert np.array_equal(png_to_array(ev[-1][1]["images"][0])[None], ref)
    assert ev[-1][1]["seeds"] == llamagen_engine.parse({"class_label": 4, "seed": 3}).seeds


def test_var_stream_previews_per_scale(var_engine, offline):
    with serving(var_engine) as (url, _):
        r = post(url, {"class_label": 2, "n": 2, "seed": 11, "stream": True, "draft_steps": 3})
    ev = sse_events(r.text)
    assert [e for e, _ in ev] == ["preview"] * 5 + ["final"] and [d["step"] for _, d in ev] == list(range(6))
    got = np.stack([png_to_array(s) for s in ev[-1][1]["images"]])
    assert np.array_equal(got, expected(offline, 3, 2, 2, 11))


@pytest.mark.parametrize("kind", ["seq", "zipar", "official", "sjd"])
def test_llamagen_pipeline_stream_ends_with_the_images_of_a_call(offline, kind):
    kw = {"seq": {}, "zipar": {"zipar_window": 2}, "official": {"zipar_window": 4, "zipar_mask": "official"},
          "sjd": {"sjd_window": 4}}[kind]
    pipe = offline("llamagen")
    settings = dict(dm.LLAMAGEN_SAMPLING, **kw)
    ref = pipe([3, 5], seed=7, **settings)
    out = list(pipe.stream([3, 5], seed=7, every_rows=3, **settings))
    assert torch.equal(out[-1].images, ref)
    assert [o.rows for o in out] == ([8] if kind == "sjd" else [3, 6, 8])
    if kind != "sjd":
        assert not torch.equal(out[0].images, ref)  # a preview: rows 3..7 not drawn yet
    with pytest.raises(ValueError, match="every_rows"):
        pipe.stream([3], every_rows=9)


def _cli_error(capsys, *args) -> str:
    """The one-line message `var-rt generate ARGS` prints for a bad option (checked before loading)."""
    rc = cli.main(["generate", "--drafter", DEMO_FILES["var_drafter"], "--refiner", DEMO_FILES["var_refiner"],
                   "--vae", DEMO_FILES["vae"], "--draft-steps", "2", "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("var-rt: error: "), err
    return err.removeprefix("var-rt: error: ")


@pytest.mark.parametrize("body,cli_args,msg", [
    ({"class_label": 10}, ["--classes", "10"], None),
    ({"class_label": 1, "top_p": 0}, ["--classes", "1", "--top-p", "0"], None),
    ({"class_label": 1, "cfg": -1}, ["--classes", "1", "--cfg", "-1"], None),
    ({"class_label": 1, "top_k": [1, 2]}, ["--classes", "1", "--top-k", "1,2"], None),
    ({"class_label": 1, "top_k": -3}, None, "top_k=-3"),
    ({"class_label": 1, "draft_steps": 7}, None, "draft_steps=7: expected 1..6"),
    ({"class_label": 1, "preset": "nope"}, None, "preset 'nope'"),
    ({"class_label": 1, "n": 17}, None, "n=17: expected 1..16"),
    ({"class_label": 1.5}, None, "class_label 1.5: expected an integer"),
    ({"n": 1}, None, "class_label: required"),
    ({"class_label": 1, "zipar_window": 2}, None, "unknown field 'zipar_window'"),
    ({"class_label": 1, "sjd_window": 2, "stream": 1}, None, "unknown field 'sjd_window'"),
    ({"class_label": 1, "seed": "x"}, None, "seed='x'"),
    ([1, 2], None, "must be a JSON object"),
])
def test_bad_requests_are_400_with_the_cli_message(var_engine, capsys, body, cli_args, msg):
    with serving(var_engine) as (url, app):
        r = post(url, body)
        assert r.status_code == 400
        err = r.json()["error"]
        if cli_args is not None:
            want = _cli_error(capsys, *cli_args)
            if "--classes" in want:  # the option named as the request's field
                want = want.replace("--classes", "class_label")
            assert err == want
        else:
            assert msg in err and "\n" not in err
        r = httpx.post(url + "/v1/images", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"].startswith("the request body is not JSON")
        assert app.state.metrics.batches == 0


@pytest.fixture
def gated(var_engine, monkeypatch):
    """The demo engine with its model runs held at a gate (and logged), and optional failures injected."""
    state = {"gate": threading.Event(), "calls": [], "fail_label": None, "oom_above": None,
             "stream_gate": threading.Event(), "streamed": []}
    state["stream_gate"].set()
    orig, orig_stream = var_engine.run, var_engine.stream

    def stream(req):  # held after its first preview until stream_gate is set
        for i, item in enumerate(orig_stream(req)):
            state["streamed"].append(item[0])
            yield item
            if i == 0:
                assert state["stream_gate"].wait(30)

    def run(req, labels, seeds):
        state["calls"].append(list(labels))
        assert state["gate"].wait(30)
        if state["fail_label"] in labels:
            raise RuntimeError(f"injected failure on class {state['fail_label']}")
        if state["oom_above"] is not None and len(labels) > state["oom_above"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return orig(req, labels, seeds)
    monkeypatch.setattr(var_engine, "run", run)
    monkeypatch.setattr(var_engine, "stream", stream)
    return var_engine, state


def _wait(cond, timeout=20):
    t = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t, "timed out"
        time.sleep(0.01)


def test_overload_is_429_with_retry_after(gated):
    engine, st = gated
    with serving(engine, max_batch=1, max_wait_ms=0, queue_size=2) as (url, app):
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            first = ex.submit(post, url, {"class_label": 0})
            _wait(lambda: len(st["calls"]) == 1)               # running, held at the gate
            waiting = [ex.submit(post, url, {"class_label": 1 + i}) for i in range(2)]
            _wait(lambda: len(app.state.batcher.waiting) == 2)
            r = post(url, {"class_label": 5})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]
            st["gate"].set()
            assert [f.result().status_code for f in [first, *waiting]] == [200] * 3
        r = post(url, {"class_label": 5, "n": 3})   # more images than --max-batch: runs alone
        assert r.status_code == 200 and len(r.json()["images"]) == 3
        assert app.state.metrics.requests[429] == 1


def test_a_failing_request_does_not_fail_its_batch_mates(gated, offline):
    engine, st = gated
    st["gate"].set()
    st["fail_label"] = 7
    with serving(engine, max_batch=16, max_wait_ms=1000) as (url, app):
        bodies = [{"class_label": c, "seed": c} for c in (1, 7, 2)]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(lambda b: post(url, b), bodies))
    assert [r.status_code for r in answers] == [200, 500, 200]
    assert answers[1].json()["error"] == "injected failure on class 7"
    assert sorted(len(c) for c in st["calls"]) == [1, 1, 1, 3]      # the batch of 3, then each alone
    for b, r in zip(bodies, answers):
        if r.status_code == 200:
            ref = expected(offline, 6, b["class_label"], 1, b["seed"])
            assert np.array_equal(png_to_array(r.json()["images"][0])[None], ref)


def test_out_of_memory_retries_smaller_then_503(gated, offline):
    engine, st = gated
    st["gate"].set()
    st["oom_above"] = 2
    with serving(engine, max_batch=16, max_wait_ms=1000) as (url, app):
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            answers = list(ex.map(lambda b: post(url, b), [{"class_label": 4, "n": 3, "seed": 9},
                                                           {"class_label": 6, "n": 2, "seed": 1}]))
        assert [r.status_code for r in answers] == [200, 200]
        assert np.array_equal(np.stack([png_to_array(s) for s in answers[0].json()["images"]]),
                              expected(offline, 6, 4, 3, 9))
        assert max(len(c) for c in st["calls"]) == 5 and app.state.metrics.oom_retries >= 2
        st["oom_above"] = 0   # not even one image fits
        r = post(url, {"class_label": 4})
        assert r.status_code == 503 and "out of memory" in r.json()["error"]


def test_a_client_that_goes_away_cancels_its_share(gated):
    engine, st = gated
    with serving(engine, max_batch=1, max_wait_ms=0) as (url, app):
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            first = ex.submit(post, url, {"class_label": 0})
            _wait(lambda: len(st["calls"]) == 1)
            with pytest.raises(httpx.ReadTimeout):   # waits behind the first, then gives up
                post(url, {"class_label": 9}, timeout=0.5)
            _wait(lambda: app.state.metrics.cancelled == 1)
            assert app.state.batcher.waiting == []
            st["gate"].set()
            assert first.result().status_code == 200
        # a stream closed after its first preview stops there
        st["stream_gate"].clear()
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/images", json={"class_label": 3, "stream": True}) as r:
                assert next(r.iter_lines()) == "event: preview"
        _wait(lambda: app.state.metrics.cancelled == 2)
        st["stream_gate"].set()
        _wait(lambda: app.state.batcher.running == 0)
        assert st["streamed"] == [0, 1]       # the worker stopped at its next preview (of 6 scales)
        assert app.state.metrics.requests[499] == 2
    assert [9] not in st["calls"]   # the cancelled request never ran


def _received(url):
    """(requests arrived, whether some are in flight) from /metrics."""
    text = httpx.get(url + "/metrics").text
    answered = sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("var_rt_requests_total{"))
    in_flight = metric(text, "var_rt_in_flight")
    return int(answered + in_flight), in_flight > 0


def test_sigterm_drains_in_flight_requests_and_exits_0():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "var_rt.cli", "serve", "--demo", "--port", "0", "--max-batch", "64",
                          "--max-wait-ms", "0", "-q", "--device", "cpu"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert "serving" in line, line + p.stderr.read()
        url = line.split(" on ")[1].split()[0]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(post, url, {"class_label": i, "n": 64, "seed": i}) for i in range(4)]
            _wait(lambda: _received(url) == (4, True))   # all 4 arrived, some still in flight
            p.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futs]
        assert [r.status_code for r in answers] == [200] * 4
        assert all(len(r.json()["images"]) == 64 for r in answers)
        assert p.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def test_serve_arguments_are_checked_before_loading(capsys, monkeypatch):
    for args, msg in [(["--demo", "--var", "x.pth"], "--demo runs the embedded demo models; it takes no --var"),
                      (["--demo", "--max-batch", "0"], "--max-batch 0: expected 1..4096"),
                      (["--demo", "llamagen", "--draft-steps", "2"], "--draft-steps is not an option of --demo"),
                      (["--demo", "--zipar-window", "2"], "--zipar-window is not an option of --demo var"),
                      (["--demo", "--draft-steps", "9"], "draft_steps=9: expected 1..6")]:
        assert cli.main(["serve", *args, "--port", "0"]) == 2
        assert msg in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)   # the optional stack missing: one line saying what to install
    assert cli.main(["serve", "--demo"]) == 2
    assert "pip install var_rt[serve]" in capsys.readouterr().err


def test_request_rules_of_each_model(llamagen_engine):
    from var_rt.serve.engine import Engine
    plain = Engine(dm.load_demo_var(), dm.demo_sampling())
    with pytest.raises(ValueError, match="draft_steps is for CoDe models .* plain VAR"):
        plain.parse({"class_label": 0, "draft_steps": 2})
    a, b = plain.parse({"class_label": 0, "top_p": 0.5}), plain.parse({"class_label": 3, "top_p": 0.5, "seed": 4})
    assert a.key == b.key != plain.parse({"class_label": 0}).key          # same settings: one batch
    assert plain.parse({"class_label": 0, "preset": "var-demo", "cfg": 2.0}).kwargs["preset"] == "var-demo"
    for body, msg in [({"zipar_window": 9}, "zipar_window 9: expected an int in [1, 8]"),
                      ({"zipar_window": 9, "sjd_window": 4}, "zipar_window 9: expected an int in [1, 8]"),
                      ({"sjd_relaxed": 2}, "sjd_relaxed=2 needs sjd_window >= 1"),
                      ({"zipar_mask": "x"}, "zipar_mask 'x'"),
                      ({"top_k": [1, 2]}, "per-scale lists are for VAR models"),
                      ({"preset": "code-eval"}, "unknown field 'preset'")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            llamagen_engine.parse({"class_label": 0, **body})
    r = llamagen_engine.parse({"class_label": 0, "sjd_window": 4, "n": 2, "seed": 3})
    assert r.key[-2:] == (4, 0) and r.seeds == image_seeds(3, [0, 1]).tolist()


def test_warm_up_captures_every_bucket_largest_first(monkeypatch):
    """Where batches are padded (CUDA graphs replay), the server runs the default settings once per bucket before
    taking requests, largest first; without graphs (this CPU) it runs nothing."""
    from var_rt.serve.batcher import buckets_for
    engine = engine_for("--demo", "--max-batch", "12")
    calls = []
    monkeypatch.setattr(engine, "run", lambda req, labels, seeds: calls.append((req.key, len(labels), len(seeds))))
    assert engine.warm_up(buckets_for(12), log=lambda s: None) == 0 and calls == []
    monkeypatch.setattr(engine.base, "use_graphs", True)
    assert engine.warm_up(buckets_for(12), log=lambda s: None) == 5
    assert [n for _, n, _ in calls] == [12, 8, 4, 2, 1] and all(n == m for _, n, m in calls)
    assert {k for k, _, _ in calls} == {engine.parse({"class_label": 0}).key}
