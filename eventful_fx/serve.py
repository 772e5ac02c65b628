"""Serving many camera streams on Ray Serve, each stream's eventful state on one replica.

Owns the Ray Serve application (`build_app`, `run`, `set_budget`), its request router, the
HTTP ingress, the budget all replicas follow and the client (`StreamClient`). Needs ``pip install 'eventful_fx[serve]'``.

How a frame travels: the client opens a stream and gets an opaque token (random bytes
signed with the application's secret, so it cannot be guessed or made up). Each frame goes
to the ingress with the token and the frame's sequence number; the ingress calls the model
deployment with the token as the call's first argument, and `StreamKeyRouter` sends every
request of a token to the same replica: the live replica ranked first for that token by
rendezvous hashing. Ray Serve offers two other ways to key requests, neither right here:
multiplexing (`multiplexed_model_id`) only prefers a replica that holds a key and falls
back to any other when that one is busy, which would split a stream's state, and
`serve.batch` never batches requests of different multiplexed ids together, so streams
would never share a batch. The custom `RequestRouter` (Ray Serve's request-router API)
makes the choice deterministic, and when a replica dies or is added only the streams it
ranked first move.

Each replica keeps a `StreamPool`: frames of different streams that arrive within one
`serve.batch` window run as one batch, each stream in its own row. A replica uses a
stream's state only if the last frame it served of that stream is the one just before
(sequence numbers): a stream that arrives without that (first frame, moved after a replica
died or was added, idle-evicted) starts with a dense flush, so no frame is ever answered
from stale or foreign state. A frame the ingress cannot serve because its replica died is
retried once on the replica the stream moves to (a dense flush there), so no frame is lost;
any other failure reaches the client as an HTTP error. Malformed frames (shape, dtype,
NaN/inf) are refused for that stream alone, before they join a batch.
"""
# no `from __future__ import annotations`: FastAPI reads the ingress's parameter types at run time
import asyncio
import hashlib
import hmac
import io
import secrets
import time
import urllib.error
import urllib.request

import numpy as np
import torch

try:
    import ray
    from ray import serve
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("eventful_fx.serve needs Ray Serve: pip install 'eventful_fx[serve]'") from e

__all__ = ["StreamKeyRouter", "EventfulReplica", "BudgetBoard", "build_app", "run", "set_budget", "StreamClient",
           "StreamError"]

APP_NAME = "eventful"
MODEL_DEPLOYMENT = "EventfulReplica"


class StreamError(RuntimeError):
    """A frame the server refused or could not serve (the message says why)."""


# -- routing ------------------------------------------------------------------------------

def _rank(key: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()


class StreamKeyRouter(RequestRouter):
    """Every request whose first argument is the same stream token goes to one replica: the
    live one whose rendezvous hash with the token is highest. Other requests go anywhere."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        args = pending_request.args if pending_request is not None else ()
        key = args[0] if args and isinstance(args[0], str) else ""
        if not key:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: _rank(key, r.replica_id.unique_id), reverse=True)
        return [ranked[:1]]


# -- tokens and frames ---------------------------------------------------------------------

def _issue_token(secret: bytes) -> str:
    nonce = secrets.token_hex(12)
    return nonce + hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[:24]


def _token_is_ours(secret: bytes, token: str) -> bool:
    if not isinstance(token, str) or len(token) != 48:
        return False
    nonce, mac = token[:24], token[24:]
    return hmac.compare_digest(mac, hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[:24])


def encode_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"the frame is not a .npy array ({e})") from None


# -- the budget -----------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class BudgetBoard:
    """The application's budget, read by every replica before each batch. Ray Serve's own
    channel for this (`user_config`) restarts the replicas when redeployed from Python."""

    def __init__(self, budget: float):
        self.version, self.budget = 0, budget

    def set(self, budget: float) -> int:
        self.version, self.budget = self.version + 1, budget
        return self.version

    def read(self) -> tuple[int, float]:
        return self.version, self.budget


def _board(budget: float):
    return BudgetBoard.options(name=f"{APP_NAME}-budget", namespace="serve", get_if_exists=True,
                               lifetime="detached").remote(budget)


# -- the model replica ---------------------------------------------------------------------

@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0},
                  request_router_config={"request_router_class": StreamKeyRouter})
class EventfulReplica:
    """One replica: a `StreamPool` and, per stream token, the sequence number of its last frame."""

    def __init__(self, model, size: int | None = None, max_batch: int = 8, batch_wait_s: float = 0.02,
                 idle_timeout_s: float = 300.0, threads: int | None = 1, options: dict | None = None,
                 warm_up: bool = True):
        from .cli import default_input_size, load_model
        from .streams import StreamPool

        if threads:
            torch.set_num_threads(threads)
        if isinstance(model, str):
            torch.manual_seed(0)  # untrained weights: the same on every replica
            model = load_model(model, (size, size) if size else None)
        self.frame_shape = (3, *((size, size) if size else default_input_size(model)))
        self.pool = StreamPool(model.eval(), max_batch=max_batch, **(options or {}))  # budget: `reconfigure`
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(batch_wait_s)
        if warm_up:  # every batch size's graph, before the replica takes traffic
            self.pool.warm_up(torch.zeros(self.frame_shape))
        self.idle_timeout_s = idle_timeout_s
        self.last_seq: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self._pool_lock = asyncio.Lock()  # the pool runs in a worker thread: one user at a time

    def reconfigure(self, config: dict) -> None:
        """`user_config`: the budget the application was deployed with."""
        self.pool.budget = float(config["budget"])
        self.board, self.board_version = _board(self.pool.budget), None

    async def _follow_budget(self) -> None:
        version, budget = await self.board.read.remote()
        if version != self.board_version:
            self.pool.budget, self.board_version = budget, version

    async def frame(self, token: str, seq: int, frame: np.ndarray) -> dict:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.float32 or frame.shape != self.frame_shape:
            raise ValueError(f"a frame must be a float32 array of shape {self.frame_shape}, got "
                             f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}")
        if not np.isfinite(frame).all():
            raise ValueError("the frame holds NaN or inf values")
        if seq <= self.last_seq.get(token, -1):
            raise ValueError(f"frame {seq} of this stream was already served (last: {self.last_seq[token]})")
        return await self._batch((token, seq, frame))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batch(self, requests: list[tuple[str, int, np.ndarray]]) -> list[dict]:
        await self._follow_budget()
        results: list[dict | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:  # a stream with two frames in one window: one per call, in order
            now, later, seen = [], [], set()
            for i in pending:
                (later if requests[i][0] in seen else now).append(i)
                seen.add(requests[i][0])
            tokens = [requests[i][0] for i in now]
            frames = torch.from_numpy(np.stack([requests[i][2] for i in now]))
            async with self._pool_lock:
                self._forget_idle()  # first: a stream forgotten now must be counted as flushed below
                flushed = [self.last_seq.get(token) != seq - 1 for token, seq, _ in (requests[i] for i in now)]
                for token, fresh in zip(tokens, flushed):
                    if fresh:
                        self.pool.reset(token)
                # off the event loop: requests keep arriving (and form the next batch) while this one runs
                out = await asyncio.to_thread(self._run, frames, tokens)
            stats = self.pool.last_stats
            for j, i in enumerate(now):
                token, seq, _ = requests[i]
                self.last_seq[token], self.last_seen[token] = seq, time.monotonic()
                results[i] = {"seq": seq, "flushed": flushed[j], "output": out[j].numpy(),
                              "mac_fraction": stats.fraction}
            pending = later
        return results

    def _run(self, frames, tokens):
        with torch.no_grad():
            return self.pool.run(frames, tokens)

    async def close(self, token: str) -> None:
        async with self._pool_lock:
            self._forget(token)

    def _forget(self, token: str) -> None:
        self.pool.close(token)
        self.last_seq.pop(token, None)
        self.last_seen.pop(token, None)

    def _forget_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout_s
        for token in [t for t, seen in self.last_seen.items() if seen < cutoff]:
            self._forget(token)


# -- the HTTP ingress ----------------------------------------------------------------------

def _ingress_class():
    from fastapi import FastAPI, HTTPException, Request, Response
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    api = FastAPI(title="eventful_fx")
    lost_replica = (ActorDiedError, ActorUnavailableError, RayActorError)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(api)
    class Ingress:
        """HTTP: POST /streams opens a stream; POST /streams/{token}/frames/{seq} with a .npy
        float32 frame returns the output as .npy (headers X-Flushed, X-MAC-Fraction); DELETE
        /streams/{token} closes it."""

        def __init__(self, model_handle, secret: bytes):
            self.model, self.secret = model_handle, secret

        def _check(self, token: str) -> None:
            if not _token_is_ours(self.secret, token):
                raise HTTPException(404, "no such stream: open one with POST /streams and use the token it returns")

        @api.post("/streams")
        async def open_stream(self) -> dict:
            return {"stream": _issue_token(self.secret)}

        @api.post("/streams/{token}/frames/{seq}")
        async def frame(self, token: str, seq: int, request: Request) -> Response:
            self._check(token)
            try:
                frame = decode_array(await request.body())
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            handle = self.model
            for attempt in range(2):
                try:
                    result = await handle.frame.remote(token, seq, frame)
                    break
                except lost_replica:
                    if attempt:  # the stream's next replica failed too
                        raise HTTPException(503, "the replica serving this stream was lost twice; "
                                                 "send the frame again") from None
                    await asyncio.sleep(0.1)  # the router drops the dead replica; the retry flushes
                except ValueError as e:
                    raise HTTPException(422, str(e)) from None
            return Response(encode_array(result["output"]), media_type="application/x-npy",
                            headers={"X-Flushed": str(int(result["flushed"])),
                                     "X-MAC-Fraction": f"{result['mac_fraction']:.6f}"})

        @api.delete("/streams/{token}")
        async def close(self, token: str) -> dict:
            self._check(token)
            await self.model.close.remote(token)
            return {"closed": token}

    return Ingress


def build_app(model, budget: float = 0.25, *, replicas: int = 1, size: int | None = None, max_batch: int = 8,
              batch_wait_s: float = 0.02, idle_timeout_s: float = 300.0, threads: int | None = 1,
              options: dict | None = None, secret: bytes | None = None):
    """The application: `replicas` model replicas behind one HTTP ingress.

    `model`: a model spec as the CLI takes it (`vit_tiny_patch16_224`, `hf:ViTModel`, ...) or
    an `nn.Module` (shipped to every replica). `options`: those of `eventful_fx.compile`.
    The budget travels as the replicas' `user_config`, so changing it restarts nothing.
    """
    from .api import _check_budget

    _check_budget(budget)
    replica = EventfulReplica.options(num_replicas=replicas, user_config={"budget": budget})
    model_app = replica.bind(model, size, max_batch, batch_wait_s, idle_timeout_s, threads, options)
    return _ingress_class().bind(model_app, secret or secrets.token_bytes(32))


def run(model, budget: float = 0.25, *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> str:
    """Start Ray Serve (a local Ray instance unless `ray.init` reached a cluster) listening on
    `host` (localhost unless told otherwise), deploy `build_app(model, budget, **kwargs)` and
    return its URL."""
    kwargs.setdefault("secret", secrets.token_bytes(32))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model, budget, **kwargs), name=APP_NAME, route_prefix="/")
    set_budget(budget)  # a board left by an earlier deployment on this cluster holds another budget
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def set_budget(budget: float) -> None:
    """Change the running application's budget: every replica re-plans before its next batch
    (no restart, streams keep their state). Works from any process connected to the cluster."""
    from .api import _check_budget

    _check_budget(budget)
    board = _board(budget)
    ray.get(board.set.remote(budget))


# -- the client ----------------------------------------------------------------------------

class StreamClient:
    """One camera stream over HTTP: `send(frame)` returns the model's output for it.

        with StreamClient("http://127.0.0.1:8000") as stream:
            for frame in frames:
                out = stream.send(frame)      # numpy [3, H, W] float32 in, numpy out
    """

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.token = self._call("POST", "/streams", None)["stream"]
        self.seq = 0
        self.flushed = False
        self.mac_fraction = None

    def send(self, frame) -> np.ndarray:
        frame = np.asarray(frame, dtype=np.float32)
        data = self._call("POST", f"/streams/{self.token}/frames/{self.seq}", encode_array(frame), raw=True)
        self.seq += 1
        return data

    def close(self) -> None:
        if self.token is not None:
            self._call("DELETE", f"/streams/{self.token}", None)
            self.token = None

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: bytes | None, raw: bool = False):
        import json

        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/x-npy"} if body else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
                if raw:
                    self.flushed = response.headers.get("X-Flushed") == "1"
                    self.mac_fraction = float(response.headers.get("X-MAC-Fraction", "nan"))
                    return decode_array(payload)
                return json.loads(payload)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise StreamError(f"{method} {path.split('/frames')[0][:20]}...: HTTP {e.code}: {detail}") from None

