"""Serving on Ray Serve (issue 15): a local Ray instance, a tiny ViT on 2 replicas, 6 streams
of 10 frames interleaved. Every stream's outputs equal a batch-1 EventfulModule fed that
stream alone; a killed replica loses no frame and the streams it held go on from a dense
frame; bad frames and made-up tokens are refused for that stream alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")
import ray  # noqa: E402
from ray import serve  # noqa: E402

import eventful_fx  # noqa: E402
from eventful_fx import serve as es  # noqa: E402
from eventful_fx.cli import load_model  # noqa: E402
from eventful_fx.video import builtin_clip  # noqa: E402

pytestmark = pytest.mark.serve

MODEL, SIZE, BUDGET, STREAMS, FRAMES = "vit_tiny_patch16_224", 96, 0.25, 6, 10
OPTIONS = {"calibration": None}  # the uniform plan: no calibration per batch size on start-up


@pytest.fixture(scope="module")
def url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield es.run(MODEL, BUDGET, replicas=2, size=SIZE, port=8765, max_batch=4, options=OPTIONS)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the replicas build the same untrained weights from the spec
    return load_model(MODEL, (SIZE, SIZE))


@pytest.fixture(scope="module")
def clips():
    clip = builtin_clip(SIZE)
    return [torch.roll(clip, 3 * i, 0)[:FRAMES] for i in range(STREAMS)]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference(model, clip, flushes):
    """What one in-process EventfulModule gives for this stream alone, reset where the server flushed."""
    emodel = eventful_fx.compile(model, budget=BUDGET, **OPTIONS)
    outs = []
    with torch.no_grad():
        for t, frame in enumerate(clip):
            if t in flushes:
                emodel.reset()
            outs.append(emodel(frame[None])[0].numpy())
    return outs


def serve_lockstep(url, clips, between=None):
    """Frame t of every stream, all streams at once, then frame t + 1; `between(t, clients)` before each step."""
    clients = [es.StreamClient(url) for _ in clips]
    outs = [[] for _ in clips]
    with ThreadPoolExecutor(len(clips)) as pool:
        for t in range(len(clips[0])):
            if between:
                between(t, clients)

            def send(i):
                out = clients[i].send(clips[i][t].numpy())
                return out, clients[i].flushed
            for i, result in enumerate(pool.map(send, range(len(clips)))):
                outs[i].append(result)
    for c in clients:
        c.close()
    return outs


def test_streams_on_two_replicas_equal_one_module_per_stream(url, model, clips):
    outs = serve_lockstep(url, clips)
    for clip, served in zip(clips, outs):
        assert [flushed for _, flushed in served] == [True] + [False] * (FRAMES - 1)
        expected = reference(model, clip, flushes={0})
        assert max(rel(out, ref) for (out, _), ref in zip(served, expected)) <= 1e-5


def test_bad_frames_and_tokens_are_refused_for_that_stream_alone(url, model, clips):
    with es.StreamClient(url) as a, es.StreamClient(url) as b:
        a.send(clips[0][0].numpy())
        b.send(clips[1][0].numpy())
        with pytest.raises(es.StreamError, match="422.*shape"):
            a.send(np.zeros((3, SIZE + 16, SIZE), np.float32))
        nan = clips[0][1].numpy().copy()
        nan[0, 0, 0] = np.nan
        with pytest.raises(es.StreamError, match="422.*NaN"):
            a.send(nan)
        a.seq = 1  # the refused frames never reached the state: the stream goes on where it was
        out = a.send(clips[0][1].numpy())
        assert not a.flushed
        assert rel(out, reference(model, clips[0][:2], {0})[1]) <= 1e-5
        assert not b.send(clips[1][1].numpy()) is None and not b.flushed
        forged = es.StreamClient.__new__(es.StreamClient)
        forged.__dict__.update(a.__dict__, token=a.token[:24] + "0" * 24)
        with pytest.raises(es.StreamError, match="404"):
            forged.send(clips[0][2].numpy())


def test_budget_changes_without_restarting(url, clips):
    with es.StreamClient(url) as c:
        c.send(clips[0][0].numpy())
        c.send(clips[0][1].numpy())
        assert c.mac_fraction == pytest.approx(BUDGET, abs=0.02)
        es.set_budget(0.5)
        try:
            c.send(clips[0][2].numpy())
            assert not c.flushed and c.mac_fraction == pytest.approx(0.5, abs=0.02)
        finally:
            es.set_budget(BUDGET)


def test_a_killed_replica_loses_no_frame_and_its_streams_restart_dense(url, model, clips):
    def kill_one(t, clients):
        if t == FRAMES // 2:  # the replica holding stream 0: the one the router ranks first for its token
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if es.MODEL_DEPLOYMENT in a["name"] and "REPLICA" in a["name"]]
            holder = max(names, key=lambda name: es._rank(clients[0].token, name.rsplit("#", 1)[-1]))
            ray.kill(ray.get_actor(holder, namespace="serve"), no_restart=True)

    outs = serve_lockstep(url, clips, between=kill_one)
    moved = []
    for clip, served in zip(clips, outs):
        assert len(served) == FRAMES  # every frame answered
        flushes = {t for t, (_, flushed) in enumerate(served) if flushed}
        moved.append(any(t >= FRAMES // 2 for t in flushes))
        expected = reference(model, clip, flushes)
        assert max(rel(out, ref) for (out, _), ref in zip(served, expected)) <= 1e-5
        with torch.no_grad():
            for t in flushes:  # a flushed frame is the dense model's output
                assert rel(served[t][0], model(clip[t][None])[0].numpy()) <= 1e-4
    assert moved[0], moved  # stream 0 lived on the killed replica: it went on from a dense frame elsewhere
