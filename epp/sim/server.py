"""The simulated model server over HTTP (aiohttp): the routes a vLLM OpenAI server answers, plus /sim/*.

Routes:
- `POST /v1/completions`, `POST /v1/chat/completions`: streaming (SSE `data: {...}` chunks, one per
  token, then `data: [DONE]`; usage in a last chunk with `choices: []` when
  `stream_options.include_usage` is true) and non-streaming JSON with `usage`
  (`prompt_tokens_details.cached_tokens` carries the prefix-cache hit tokens).
- `GET /v1/models` (base model and adapters), `GET /health`, `GET /version`,
  `GET /metrics` (`?name[]=` filter), `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`.
- What routers call besides inference (answered as vLLM and SGLang do, tokens from epp.sim.tokens):
  `POST /tokenize` (`prompt` or `messages`), `POST /detokenize`, `POST /v1/completions/render`
  (a list of `{token_ids}`, one per prompt), `POST /v1/chat/completions/render` (`{token_ids}`),
  `GET /server_info` and `/get_server_info` (vLLM's `vllm_config` and SGLang's flat server args in
  one object), `GET /get_model_info` and `/model_info`, `GET /get_load` and `/load`.
- `GET /sim/served[?since=N]` (what this server served), `DELETE /sim/served`, `GET /sim/state`,
  `GET|POST /sim/faults` (read / change the fault knobs), `POST /sim/refuse {"seconds": S}`.
Every response carries `x-sim-server: <name>` and echoes `x-request-id`.
P/D (epp.sim.pd): a request with `kv_transfer_params.do_remote_decode` is answered with the
`kv_transfer_params` a decode pod pulls with; one bringing them skips the transferred prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiohttp import web
from prometheus_client import exposition

from epp.sim.config import EngineConfig, Faults
from epp.sim.engine import DONE, Engine, Seq, SimError
from epp.sim.exposition import ENGINE_KINDS, make_registry, render
from epp.sim.live import LiveDriver
from epp.sim.pd import TransferCost, is_prefill_request, prefill_response_params, remote_tokens
from epp.sim.tokens import chat_prompt, completion_prompt, detokenize, output_piece, output_text, token_ids

log = logging.getLogger("epp.sim.server")

SERVED_KEEP = 100_000  # served records kept in memory (the total count keeps growing)
_METRICS_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)


@dataclass(slots=True)
class ServedRecord:
    """One response this server produced (errors included). Times: `time` is wall-clock Unix
    seconds when the request arrived; ttft/e2e/queue are simulated seconds (None when not served)."""

    index: int  # 0-based order of arrival at this server
    server: str
    request_id: str
    model: str
    path: str
    time: float
    status: int = 200  # HTTP status; 0 when the connection was dropped (fault or client gone)
    stream: bool = False
    outcome: str = "ok"  # ok | error | injected_error | died | client_gone
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    queue: float | None = None
    kv_transfer: str = ""  # P/D: "prefill" (answered with kv_transfer_params) | "decode" (took remote KV)
    transfer_tokens: int = 0  # P/D decode: prompt tokens whose KV came from the prefill pod


@dataclass(slots=True)
class SimServerConfig:
    """How to run one simulated server."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port from the OS
    name: str = ""  # x-sim-server value; default "sim-<port>"
    engine_kind: str = "vllm"  # metric names: vllm | sglang
    time_scale: float = 1.0  # wall seconds per simulated second
    seed: int = 0  # fault-injection randomness
    engine: EngineConfig = field(default_factory=EngineConfig)
    faults: Faults = field(default_factory=Faults)
    # KV events (epp.sim.kvevents), vLLM's --kv-events-config: a PUB endpoint (bound when it has `*`
    # or port 0, else connected: the picker's centralized endpoint), an optional replay endpoint,
    # the topic ("" = llm-d's kv@<host:port>@<model>) and the data-parallel rank put in the payload
    kv_events_endpoint: str = ""
    kv_events_replay: str = ""
    kv_events_topic: str = ""
    data_parallel_rank: int | None = None
    role: str = ""  # P/D: the pod's llm-d.ai/role (prefill, decode, ...), shown in /sim/state
    transfer: TransferCost = field(default_factory=TransferCost)  # P/D: KV pull cost on a decode pod


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class SimServer:
    """One simulated model server on 127.0.0.1 (or `host`). Use `async with SimServer(cfg) as s:`."""

    def __init__(self, cfg: SimServerConfig | None = None, **engine_overrides: Any) -> None:
        cfg = cfg or SimServerConfig()
        if engine_overrides:  # a copy: the caller's configs may be shared between servers
            cfg = replace(cfg, engine=replace(cfg.engine, **engine_overrides))
        self.cfg = cfg
        if cfg.engine_kind not in ENGINE_KINDS:
            raise ValueError(f"engine_kind must be one of {', '.join(ENGINE_KINDS)}")
        self.engine = Engine(cfg.engine)
        self.faults = cfg.faults
        self.driver = LiveDriver(self.engine, cfg.time_scale)
        self.registry = make_registry(self.engine, cfg.engine_kind, time.time)
        self.served: deque[ServedRecord] = deque(maxlen=SERVED_KEEP)
        self.served_total = 0
        self.name = cfg.name
        self.port = cfg.port
        self._rng = random.Random(cfg.seed)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._refuse_task: asyncio.Task[None] | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self.kv_publisher: Any = None  # epp.sim.kvevents.ZmqPublisher when KV events are published
        self.kv_recorder: Any = None

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def address(self) -> str:
        """"host:port", what a picker routes to."""
        return f"{self.cfg.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/v1/completions/render", self._render_completions)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self._server_info)
        for path in ("/get_model_info", "/model_info"):
            app.router.add_get(path, self._model_info)
        for path in ("/get_load", "/load"):
            app.router.add_get(path, self._load)
        app.router.add_get("/sim/served", self._served)
        app.router.add_delete("/sim/served", self._clear_served)
        app.router.add_get("/sim/state", self._state)
        app.router.add_get("/sim/faults", self._get_faults)
        app.router.add_post("/sim/faults", self._set_faults)
        app.router.add_post("/sim/refuse", self._refuse)
        app.on_response_prepare.append(self._stamp)
        return app

    async def start(self) -> SimServer:
        # in-flight handlers wait on the engine: give them a short grace on stop, not aiohttp's 60 s
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.cfg.host, self.port, reuse_address=True)
        await self._site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        if not self.name:
            self.name = f"sim-{self.port}"
        self.driver.start()
        if self.cfg.kv_events_endpoint:
            from epp.sim.kvevents import KVEventRecorder, ZmqPublisher, topic_for

            self.kv_publisher = ZmqPublisher(
                self.cfg.kv_events_endpoint, self.cfg.kv_events_topic or topic_for(self.address, self.cfg.engine.model),
                replay_endpoint=self.cfg.kv_events_replay, data_parallel_rank=self.cfg.data_parallel_rank)
            self.kv_recorder = KVEventRecorder(self.engine, self.kv_publisher.sink)
            log.info("sim server %s publishes KV events on %s", self.name, self.kv_publisher.endpoint)
        log.info("sim server %s listening on %s (engine %s, time scale %g)", self.name, self.url,
                 self.cfg.engine_kind, self.cfg.time_scale)
        return self

    async def stop(self) -> None:
        if self._refuse_task is not None:
            self._refuse_task.cancel()
        # close the listener and the open requests first (they wait on the engine), then the engine
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.driver.stop()
        if self.kv_publisher is not None:
            self.kv_recorder.detach()
            self.kv_publisher.close()
            self.kv_publisher = None

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def refuse_connections(self, refuse: bool) -> None:
        """Stop (True) or resume (False) listening; refused clients get a connection error."""
        if self._runner is None:
            raise RuntimeError("server not started")
        if refuse and self._site is not None:
            await self._site.stop()
            self._site = None
        elif not refuse and self._site is None:
            self._site = web.TCPSite(self._runner, self.cfg.host, self.port, reuse_address=True)
            await self._site.start()

    @property
    def refusing(self) -> bool:
        return self._site is None

    def served_ids(self) -> list[str]:
        """Request ids served so far (kept records), in arrival order."""
        return [r.request_id for r in self.served]

    # ---- inference -----------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, chat=True)

    def _record(self, request: web.Request, rid: str, model: str, stream: bool) -> ServedRecord:
        rec = ServedRecord(self.served_total, self.name, rid, model, request.path, time.time(), stream=stream)
        self.served_total += 1
        self.served.append(rec)
        return rec

    async def _inference(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            rec = self._record(request, rid, "", False)
            rec.status, rec.outcome = 400, "error"
            return _error(400, "request body must be a JSON object", "BadRequestError")
        raw_model = body.get("model")
        model: str = raw_model if isinstance(raw_model, str) else ""
        stream = body.get("stream") is True
        rec = self._record(request, rid, model or self.cfg.engine.model, stream)
        faults = self.faults
        if faults.extra_latency_ms > 0:
            await asyncio.sleep(self.driver.wall_delay(faults.extra_latency_ms / 1000.0))
        if model in faults.fail_models or (faults.error_rate > 0 and self._rng.random() < faults.error_rate):
            rec.status, rec.outcome = faults.error_status, "injected_error"
            return _error(faults.error_status, "injected failure (simulator)", "InternalServerError")
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or \
                        not all(isinstance(m, dict) for m in messages):
                    raise SimError(400, "messages must be a non-empty list of message objects")
                prompt = chat_prompt(messages)
                max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            else:
                try:
                    prompt = completion_prompt(body.get("prompt"))
                except ValueError as e:
                    raise SimError(400, str(e)) from None
                max_tokens = body.get("max_tokens")
            if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
                raise SimError(400, "max_tokens must be an integer")
            event = asyncio.Event()
            seq = self.engine.new_seq(rid, prompt, max_tokens, model, self.driver.now(),
                                      notify=lambda _s: event.set())
        except SimError as e:
            rec.status, rec.outcome = e.status, "error"
            return _error(e.status, e.message, e.kind)
        rec.prompt_tokens = seq.prompt_tokens
        served_model = model or self.cfg.engine.model
        opts = body.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
        kv_params = body.get("kv_transfer_params")
        extra: dict[str, Any] | None = None
        if is_prefill_request(kv_params):  # P/D: a prefill pod's answer names the blocks to pull
            rec.kv_transfer = "prefill"
            extra = {"kv_transfer_params": prefill_response_params(
                self.name, seq.prompt_tokens, self.cfg.engine.block_size, self.cfg.host, self.port)}
        elif (pulled := remote_tokens(kv_params, self.cfg.engine.block_size, seq.prompt_tokens)) > 0:
            # P/D decode: the prompt's KV arrives from the prefill pod (the transfer's time first)
            seq.remote_tokens = rec.transfer_tokens = pulled
            rec.kv_transfer = "decode"
            await asyncio.sleep(self.driver.wall_delay(self.cfg.transfer.seconds(pulled)))
        self.driver.submit(seq)
        try:
            if stream:
                return await self._stream(request, rec, seq, event, chat, served_model, include_usage)
            return await self._whole(request, rec, seq, event, chat, served_model, extra)
        finally:
            if seq.state != DONE:
                self.driver.abort(seq)
            rec.cached_tokens = seq.cached_tokens
            rec.completion_tokens = seq.generated
            if seq.first_token is not None:
                rec.ttft = seq.first_token - seq.arrival
            if seq.scheduled is not None:
                rec.queue = seq.scheduled - seq.arrival
            if seq.finished is not None and seq.finish_reason == "length":
                rec.e2e = seq.finished - seq.arrival

    @staticmethod
    def _usage(seq: Seq) -> dict[str, Any]:
        return {"prompt_tokens": seq.prompt_tokens, "total_tokens": seq.prompt_tokens + seq.generated,
                "completion_tokens": seq.generated,
                "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}

    def _drop(self, request: web.Request, rec: ServedRecord) -> None:
        """Simulate the server dying: abort the connection without a proper end."""
        rec.status, rec.outcome = 0, "died"
        if request.transport is not None:
            request.transport.abort()

    async def _whole(self, request: web.Request, rec: ServedRecord, seq: Seq, event: asyncio.Event,
                     chat: bool, model: str, extra: dict[str, Any] | None = None) -> web.StreamResponse:
        while seq.state != DONE:
            await event.wait()
            event.clear()
        if self.faults.die_after_chunks >= 0:
            self._drop(request, rec)
            raise web.HTTPInternalServerError()  # never reaches the client: the transport is gone
        created = int(time.time())
        text = output_text(seq.generated)
        if chat:
            body: dict[str, Any] = {
                "id": f"chatcmpl-{seq.request_id}", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": seq.finish_reason, "stop_reason": None}],
                "usage": self._usage(seq)}
        else:
            body = {"id": f"cmpl-{seq.request_id}", "object": "text_completion", "created": created,
                    "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": seq.finish_reason, "stop_reason": None}],
                    "usage": self._usage(seq)}
        if extra:
            body.update(extra)
        return web.json_response(body)

    async def _stream(self, request: web.Request, rec: ServedRecord, seq: Seq, event: asyncio.Event,
                      chat: bool, model: str, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        cid = f"chatcmpl-{seq.request_id}" if chat else f"cmpl-{seq.request_id}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        die_after = self.faults.die_after_chunks
        chunks = 0

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model,
                                       "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        try:
            if die_after == 0:
                self._drop(request, rec)
                return resp
            if chat:
                await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
                chunks += 1
            sent = 0
            while True:
                await event.wait()
                event.clear()
                while sent < seq.generated:
                    if 0 <= die_after <= chunks:
                        self._drop(request, rec)
                        return resp
                    piece = output_piece(sent)
                    sent += 1
                    last = seq.state == DONE and sent == seq.generated
                    reason = seq.finish_reason if last else None
                    if chat:
                        choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                  "finish_reason": reason}
                    else:
                        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason,
                                  "stop_reason": None}
                    if last:
                        choice["stop_reason"] = None
                    await resp.write(chunk([choice]))
                    chunks += 1
                if seq.state == DONE:
                    break
            if 0 <= die_after <= chunks:
                self._drop(request, rec)
                return resp
            if include_usage:
                await resp.write(chunk([], self._usage(seq)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            if rec.outcome == "ok":
                rec.status, rec.outcome = 0, "client_gone"
        return resp

    # ---- other routes --------------------------------------------------------------------
    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-sim-server"] = self.name
        rid = request.headers.get("x-request-id")
        if rid:
            response.headers["x-request-id"] = rid

    def models_list(self) -> dict[str, Any]:
        base = self.cfg.engine.model
        max_len = self.cfg.engine.max_model_len
        data = [{"id": base, "object": "model", "created": self._created, "owned_by": "vllm", "root": base,
                 "parent": None, "max_model_len": max_len}]
        for name in self.engine.adapters:
            data.append({"id": name, "object": "model", "created": self._created, "owned_by": "vllm",
                         "root": f"/adapters/{name}", "parent": base, "max_model_len": None})
        return {"object": "list", "data": data}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(self.models_list())

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0+sim"})

    async def _metrics(self, request: web.Request) -> web.Response:
        names: Sequence[str] | None = request.query.getall("name[]", None)
        output = render(self.registry, names)
        headers = {"Content-Type": _METRICS_TYPE}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            output = gzip.compress(output, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=output, headers=headers)

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    def load_adapter(self, name: str) -> None:
        """Make an adapter servable (as vLLM's runtime LoRA loading does)."""
        self.engine.adapters[name] = None

    def unload_adapter(self, name: str) -> None:
        self.engine.adapters.pop(name, None)

    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            return _error(400, "lora_name is required", "BadRequestError")
        if name in self.engine.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        self.load_adapter(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.engine.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        self.unload_adapter(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # ---- what routers call: tokens, server and model info, load -----------------------------
    def _tokens(self, text: str) -> list[int]:
        return token_ids(text, self.cfg.engine.chars_per_token)

    @staticmethod
    def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise SimError(400, "messages must be a non-empty list of message objects")
        return messages

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: `prompt` (completions) or `messages` (chat template applied)."""
        body = await self._json_body(request)
        try:
            if "messages" in body:
                text = chat_prompt(self._messages(body))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise SimError(400, "prompt must be a string (or give messages)")
                text = prompt
        except SimError as e:
            return _error(e.status, e.message, e.kind)
        ids = self._tokens(text)
        return web.json_response({"count": len(ids), "max_model_len": self.cfg.engine.max_model_len,
                                  "tokens": ids, "token_strs": None})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return _error(400, "tokens must be a list of integers", "BadRequestError")
        return web.json_response({"prompt": detokenize(ids)})

    def _prompt_texts(self, prompt: Any) -> list[str]:
        """Each prompt of a completions request's `prompt`: a string, token ids, or a list of either."""
        def ids_ok(v: Any) -> bool:
            return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        if isinstance(prompt, str):
            return [prompt]
        if ids_ok(prompt):
            return [detokenize(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
            return [p if isinstance(p, str) else detokenize(p) for p in prompt]
        raise SimError(400, "prompt must be a string, token ids, or a non-empty list of either")

    async def _render_completions(self, request: web.Request) -> web.Response:
        """vLLM's /v1/completions/render: the request in, one `{token_ids}` per prompt out (no inference)."""
        body = await self._json_body(request)
        if self.faults.render_delay_ms > 0:
            await asyncio.sleep(self.faults.render_delay_ms / 1000)
        try:
            texts = self._prompt_texts(body.get("prompt"))
        except SimError as e:
            return _error(e.status, e.message, e.kind)
        return web.json_response([{"token_ids": self._tokens(t)} for t in texts])

    async def _render_chat(self, request: web.Request) -> web.Response:
        """vLLM's /v1/chat/completions/render: the chat request in, its templated prompt's `{token_ids}` out."""
        body = await self._json_body(request)
        if self.faults.render_delay_ms > 0:
            await asyncio.sleep(self.faults.render_delay_ms / 1000)
        try:
            text = chat_prompt(self._messages(body))
        except SimError as e:
            return _error(e.status, e.message, e.kind)
        return web.json_response({"token_ids": self._tokens(text)})

    def server_info(self) -> dict[str, Any]:
        """What /server_info answers: vLLM's `vllm_config` (model, block size) and, in the same object,
        the flat server arguments SGLang's /get_server_info has (routers read one or the other)."""
        e = self.cfg.engine
        return {
            "vllm_config": {"model_config": {"model": e.model, "served_model_name": e.model,
                                             "max_model_len": e.max_model_len},
                            "cache_config": {"block_size": e.block_size, "num_gpu_blocks": e.num_gpu_blocks,
                                             "enable_prefix_caching": True},
                            "scheduler_config": {"max_num_seqs": e.max_num_seqs,
                                                 "max_num_batched_tokens": e.max_num_batched_tokens}},
            "model_path": e.model, "served_model_name": e.model, "tokenizer_path": None,
            "page_size": e.block_size, "max_total_num_tokens": e.num_gpu_blocks * e.block_size,
            "max_running_requests": e.max_num_seqs, "context_length": e.max_model_len,
            "dp_size": 1, "tp_size": 1, "version": "0.0.0+sim",
        }

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_info())

    async def _model_info(self, request: web.Request) -> web.Response:
        """SGLang's /get_model_info. No tokenizer path: the simulator's tokenizer is not a file to load."""
        e = self.cfg.engine
        return web.json_response({"model_path": e.model, "tokenizer_path": None, "served_model_name": e.model,
                                  "is_generation": True, "max_model_len": e.max_model_len,
                                  "weight_version": "default"})

    def load(self) -> dict[str, Any]:
        """The engine's load as SGLang's /get_load reports it (one data-parallel rank)."""
        e = self.engine
        return {"dp_rank": 0, "num_reqs": len(e.running) + len(e.waiting), "num_running_reqs": len(e.running),
                "num_waiting_reqs": len(e.waiting), "num_tokens": e.kv.used_count * e.cfg.block_size,
                "kv_usage": e.kv.usage}

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response([self.load()])

    async def _served(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since must be an integer") from None
        records = [asdict(r) for r in self.served if r.index >= since]
        return web.json_response({"server": self.name, "total": self.served_total, "served": records})

    async def _clear_served(self, request: web.Request) -> web.Response:
        self.served.clear()
        return web.json_response({"server": self.name, "total": self.served_total})

    def state(self) -> dict[str, Any]:
        """The engine's current state, as /sim/state shows it."""
        e = self.engine
        return {"server": self.name, "engine_kind": self.cfg.engine_kind, "time_scale": self.cfg.time_scale,
                "simulated_now": self.driver.now(), "waiting": len(e.waiting), "running": len(e.running),
                "kv_usage": e.kv.usage, "kv_cached_blocks": e.kv.cached_count,
                "running_adapters": e.running_adapters(), "waiting_adapters": e.waiting_adapters(),
                "resident_adapters": e.resident_adapters(), "adapters": list(e.adapters),
                "steps": e.stats.steps, "preemptions": e.stats.preemptions,
                "prefix_hits": e.stats.prefix_hits, "prefix_queries": e.stats.prefix_queries,
                "config": asdict(self.cfg.engine)}

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            self.faults.update(body)
        except ValueError as e:
            return _error(400, str(e), "BadRequestError")
        return web.json_response(asdict(self.faults))

    async def _refuse(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 3600:
            return _error(400, "seconds must be a number in (0, 3600]", "BadRequestError")

        async def pause() -> None:
            await asyncio.sleep(0.01)  # let this response go out before the listener closes
            await self.refuse_connections(True)
            await asyncio.sleep(seconds)
            await self.refuse_connections(False)

        if self._refuse_task is not None and not self._refuse_task.done():
            return _error(409, "already refusing connections", "ConflictError")
        self._refuse_task = asyncio.get_running_loop().create_task(pause())
        return web.json_response({"refusing_for": seconds})


async def serve_many(configs: Sequence[SimServerConfig]) -> list[SimServer]:
    """Start several servers; on failure stop those already started."""
    started: list[SimServer] = []
    try:
        for cfg in configs:
            started.append(await SimServer(cfg).start())
    except BaseException:
        for s in started:
            with contextlib.suppress(Exception):
                await s.stop()
        raise
    return started
