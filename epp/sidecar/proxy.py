"""The decode pod's sidecar: an aiohttp reverse proxy in front of the local engine that runs the
P/D handoff when the picker named a prefill pod (protocol.md §12, llm-d's nixlv2 connector).

- Without `x-prefiller-host-port`: the request is proxied to the engine as it is, bodies streamed
  both ways (nothing is buffered).
- With it (on the inference paths): the header is removed; the target is checked against the SSRF
  allow-list (403 when refused); the body is read (at most `--max-request-bytes`, else 413) and
  sent to the prefill pod with `kv_transfer_params: {do_remote_decode: true, ...}`, `stream: false`,
  no `stream_options` and every output-token limit set to 1; a 502/503/504 (or no connection) is
  retried `--prefill-max-retries` times after `--prefill-retry-backoff`, same host; a prefill that
  still fails is answered to the client with its status and body. Then the original request, with
  the `kv_transfer_params` the prefill returned, goes to the local engine and its answer is
  streamed back, `usage.prompt_tokens_details.cached_tokens` set to the prefill's cached tokens.
- Several prefill hosts in the header: the first, or a random one with
  `--enable-prefiller-sampling`. `x-data-parallel-host-port: host:port` (data-parallel-profile-
  handler) sends to engine port `--model-server-port + (port - --port)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from epp.sidecar.allowlist import AllowList
from epp.sidecar.options import POOL_GROUPS, SidecarOptions
from epp.sidecar.usage import SSERewriter, cached_tokens_of, rewrite_json

log = logging.getLogger("epp.sidecar")

PREFILL_HEADER = "x-prefiller-host-port"
ENCODE_HEADER = "x-encoder-hosts-ports"
DP_HEADER = "x-data-parallel-host-port"
KV_SOURCE_HEADER = "x-kv-cache-source-host-port"
REQUEST_ID = "x-request-id"
CHAT, COMPLETIONS, RESPONSES, GENERATE = "chat", "completions", "responses", "generate"
PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": CHAT, "/v1/messages": CHAT,
         "/v1/responses": RESPONSES, "/inference/v1/generate": GENERATE}
TOKEN_LIMITS = {CHAT: ("max_tokens", "max_completion_tokens", "min_tokens"), RESPONSES: ("max_output_tokens",),
                GENERATE: ("max_tokens", "min_tokens")}
RETRYABLE = frozenset({502, 503, 504})
HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                 "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
CHUNK = 64 * 1024
MAX_PREFILL_ANSWER = 16 * 1024 * 1024  # a one-token answer plus transfer params; more is an error
MAX_JSON_REWRITE = 16 * 1024 * 1024  # non-streamed answers larger than this pass without the usage fix
CERT_CHECK = 2.0  # seconds between checks of --cert-path for a rotated pair
# host:port as a prefill target may be written: an IPv4 or DNS name, or a bracketed IPv6, and a port
# (nothing that could carry a path, query or userinfo into the URL)
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}")


def prefill_params() -> dict[str, Any]:
    """What the prefill pod is asked to do: keep the KV for a remote decode."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(request: Mapping[str, Any], api: str) -> dict[str, Any]:
    """The prefill request: the client's, with transfer params, no streaming, one output token."""
    body = dict(request)
    body["kv_transfer_params"] = prefill_params()
    body["stream"] = False
    body.pop("stream_options", None)
    if api == GENERATE:
        sp = body.get("sampling_params")
        sp = dict(sp) if isinstance(sp, Mapping) else {}
        for f in TOKEN_LIMITS[api]:
            sp[f] = 1
        body["sampling_params"] = sp
    else:
        for f in TOKEN_LIMITS[api]:
            body[f] = 1
    return body


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": kind, "param": "", "code": status},
                             status=status)


def _forward_headers(headers: Iterable[tuple[str, str]], drop: Iterable[str] = ()) -> dict[str, str]:
    skip = HOP | {d.lower() for d in drop}
    out: dict[str, str] = {}
    for k, v in headers:
        lk = k.lower()
        if lk not in skip:
            out[k] = v
    return out


def pick_prefill(values: list[str], sampling: bool, rng: random.Random) -> str:
    """One prefill host from the header values (one may be a comma-separated list)."""
    hosts = [h.strip() for v in values for h in v.split(",") if h.strip()]
    if not hosts:
        return ""
    return hosts[rng.randrange(len(hosts))] if sampling else hosts[0]


class Sidecar:
    """The proxy server. `start()` binds, `stop()` closes; `port` is the bound port."""

    def __init__(self, opts: SidecarOptions, *, rng: random.Random | None = None) -> None:
        self.opts = opts
        self.rng = rng or random.Random()
        ns, name = opts.pool_namespace_name
        self.allowlist = AllowList(opts.enable_ssrf_protection, group=opts.pool_group,
                                   version=POOL_GROUPS.get(opts.pool_group, "v1"), namespace=ns, name=name,
                                   refresh=opts.allowlist_refresh, kubeconfig=opts.kubeconfig)
        self.port = opts.port
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._cert_task: asyncio.Task[None] | None = None
        # counters for tests and logs
        self.prefills = 0
        self.prefill_attempts = 0
        self.refused = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.opts.max_request_bytes)
        app.router.add_get("/health", self._health)
        for path in PATHS:
            app.router.add_post(path, self._inference)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def start(self) -> Sidecar:
        o = self.opts
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=max(1, o.max_idle_conns_per_host),
                                    enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        await self.allowlist.start()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        ctx = self._server_ssl()
        site = web.TCPSite(self._runner, o.host, o.port, ssl_context=ctx, reuse_address=True)
        await site.start()
        if o.port == 0:
            self.port = self._runner.addresses[0][1]
        for rank in range(1, o.data_parallel_size):  # rank r's listener, in front of its engine
            await web.TCPSite(self._runner, o.host, self.port + rank, ssl_context=ctx, reuse_address=True).start()
        for w in o.warnings:
            log.warning(w)
        log.info("sidecar listening on %s:%d (%s), engine %s, kv connector %s", o.host, self.port,
                 "TLS" if o.secure_proxy else "plain", o.engine_url, o.kv_connector)
        return self

    async def stop(self) -> None:
        if self._cert_task is not None:
            self._cert_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cert_task
            self._cert_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.allowlist.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _server_ssl(self) -> ssl.SSLContext | None:
        """The serving context: --cert-path's pair, else a self-signed one. With --cert-path the
        files are checked every CERT_CHECK seconds and a changed, valid pair is loaded into the same
        context (new connections get it; a bad or half-written pair keeps the last good one)."""
        if not self.opts.secure_proxy:
            return None
        from epp import tls

        if not self.opts.cert_path:
            return _context(tls.self_signed())
        try:
            reloader = tls.ReloadingCert(self.opts.cert_path)
        except (FileNotFoundError, ValueError) as e:
            raise OSError(f"--cert-path {self.opts.cert_path}: {e}") from None
        ctx = _context(reloader.current)

        async def watch() -> None:
            while True:
                await asyncio.sleep(CERT_CHECK)
                pair = reloader.fetch()
                if pair is None:
                    continue
                try:
                    _context(pair)  # the pair loads on its own first: a failed load must not half-change ctx
                    _load(ctx, pair)
                    log.info("sidecar serving certificate reloaded from %s", self.opts.cert_path)
                except (ssl.SSLError, ValueError, OSError) as e:
                    log.warning("sidecar certificate in %s not loaded (%s); keeping the last one",
                                self.opts.cert_path, e)

        self._cert_task = asyncio.create_task(watch())
        return ctx

    def _client_ssl(self, stage: str) -> bool:
        """aiohttp's `ssl`: verify (True), unless the stage is listed in --tls-insecure-skip-verify."""
        return stage not in self.opts.tls_insecure_skip_verify

    # ---- handlers ----------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def _engine_url(self, request: web.Request) -> str | web.Response:
        """The local engine's URL for a request: rank r's engine (`--model-server-port` + r) for a
        request that arrived on rank r's listener (`--port` + r), or on the primary port with
        `x-data-parallel-host-port: host:<--port + r>`; rank 0's otherwise."""
        size = self.opts.data_parallel_size
        port = self.opts.model_server_port
        if size > 1:
            local = request.transport.get_extra_info("sockname") if request.transport is not None else None
            rank = local[1] - self.port if isinstance(local, tuple) and len(local) >= 2 else 0
            dp = request.headers.get(DP_HEADER, "")
            if rank == 0 and dp:
                _, _, p = dp.rpartition(":")
                rank = int(p) - self.port if p.isdigit() else -1
                if not 0 <= rank < size:
                    return _error(400, "BadRequestError", f"{DP_HEADER} {dp!r} names no data-parallel rank")
            port += rank if 0 <= rank < size else 0
        scheme = "https" if "decoder" in self.opts.enable_tls else "http"
        return f"{scheme}://{self.opts.engine_host}:{port}{request.rel_url}"

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        url = self._engine_url(request)
        if isinstance(url, web.Response):
            return url
        headers = _forward_headers(request.headers.items(), (PREFILL_HEADER, ENCODE_HEADER, DP_HEADER,
                                                             KV_SOURCE_HEADER))
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data = request.content if request.body_exists else None
        return await self._relay(request, url, headers, data, cached=None)

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        target = pick_prefill(request.headers.getall(PREFILL_HEADER, []), self.opts.enable_prefiller_sampling,
                              self.rng)
        if request.headers.get(ENCODE_HEADER):
            log.debug("encoder hosts ignored: encode disaggregation is not built in this sidecar")
        if not target:
            return await self._passthrough(request)
        if HOST_PORT.fullmatch(target) is None:
            return _error(400, "BadRequestError", f"{PREFILL_HEADER}: not a host:port: {target[:100]!r}")
        if not self.allowlist.allowed(target):
            self.refused += 1
            log.error("SSRF protection: prefill target %s not in the allow-list (client %s, path %s)", target,
                      request.remote, request.path)
            return web.Response(status=403, text="Forbidden: prefill target not allowed by SSRF protection\n")
        api = PATHS[request.path]
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "BadRequestError", f"request body exceeds {self.opts.max_request_bytes} bytes")
        try:
            original = json.loads(raw)
            if not isinstance(original, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return _error(400, "BadRequestError", f"invalid JSON: {e}")
        del raw
        rid = request.headers.get(REQUEST_ID) or str(uuid.uuid4())
        base = _forward_headers(request.headers.items(), (PREFILL_HEADER, ENCODE_HEADER, DP_HEADER,
                                                          KV_SOURCE_HEADER, REQUEST_ID))
        base[REQUEST_ID] = rid
        status, answer, answer_headers = await self._prefill(target, request.path, base, prefill_body(original, api))
        if status >= 300 or not isinstance(answer, dict):
            if isinstance(answer, bytes):
                resp = web.Response(status=status, body=answer,
                                    content_type=(answer_headers or {}).get("Content-Type", "application/json")
                                    .split(";")[0])
                return resp
            return _error(502, "BadGateway", "prefill answer is not a JSON object")
        params = answer.get("kv_transfer_params")
        if params is None:
            log.warning("prefiller %s answered without kv_transfer_params (request %s)", target, rid)
        cached = cached_tokens_of(answer)
        decode = dict(original)
        decode["kv_transfer_params"] = params
        url = self._engine_url(request)
        if isinstance(url, web.Response):
            return url
        body = json.dumps(decode, separators=(",", ":")).encode()
        base["Content-Type"] = "application/json"
        return await self._relay(request, url, base, body, cached=cached)

    async def _prefill(self, target: str, path: str, headers: dict[str, str], body: dict[str, Any]
                       ) -> tuple[int, dict[str, Any] | bytes, Mapping[str, str] | None]:
        """(status, parsed JSON answer or the raw error body, its headers), after the retries."""
        assert self._session is not None
        url = f"{self.opts.prefill_scheme}://{target}{path}"
        data = json.dumps(body, separators=(",", ":")).encode()
        h = {**headers, "Content-Type": "application/json"}
        self.prefills += 1
        attempt = 0
        while True:
            self.prefill_attempts += 1
            status, payload, rh = await self._prefill_once(url, h, data)
            if status < 300 or status not in RETRYABLE or attempt >= self.opts.prefill_max_retries:
                break
            attempt += 1
            log.info("retrying prefill request", extra={"attempt": attempt, "target": target, "previous": status})
            if self.opts.prefill_retry_backoff > 0:
                await asyncio.sleep(self.opts.prefill_retry_backoff)
        if status >= 300:
            log.error("prefill to %s failed with %d", target, status)
            return status, payload, rh
        try:
            return status, json.loads(payload), rh
        except ValueError:
            return 502, json.dumps({"object": "error", "message": "prefill answer is not JSON", "type": "BadGateway",
                                    "param": "", "code": 502}).encode(), {"Content-Type": "application/json"}

    async def _prefill_once(self, url: str, headers: dict[str, str], data: bytes
                            ) -> tuple[int, bytes, Mapping[str, str] | None]:
        assert self._session is not None
        try:
            async with asyncio.timeout(self.opts.prefill_timeout):
                async with self._session.post(url, data=data, headers=headers,
                                              ssl=self._client_ssl("prefiller")) as resp:
                    payload = await self._read_bounded(resp, MAX_PREFILL_ANSWER)
                    if payload is None:
                        return 502, _error_bytes(502, "BadGateway", "prefill answer too large"), None
                    return resp.status, payload, {"Content-Type": resp.headers.get("Content-Type", "")}
        except TimeoutError:
            return 504, _error_bytes(504, "GatewayTimeout", f"prefill did not answer within "
                                                            f"{self.opts.prefill_timeout:g}s"), None
        except aiohttp.ClientError as e:
            return 502, _error_bytes(502, "BadGateway", f"prefill request failed: {e}"), None

    @staticmethod
    async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
        out = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK):
            out += chunk
            if len(out) > limit:
                return None
        return bytes(out)

    async def _relay(self, request: web.Request, url: str, headers: dict[str, str], data: Any,
                     cached: int | None) -> web.StreamResponse:
        """Send to the engine and stream its answer back (usage fixed when `cached` is given)."""
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, url, headers=headers, data=data,
                                                   ssl=self._client_ssl("decoder"))
        except aiohttp.ClientConnectorError as e:
            log.error("decoder %s unreachable: %s", url, e)
            return _error(503, "ServiceUnavailable", "The decode node is not ready. Please check that the vLLM "
                          "service is running and the port configuration is correct.")
        except aiohttp.ClientError as e:
            return _error(502, "BadGateway", str(e))
        async with upstream:
            out_headers = _forward_headers(upstream.headers.items())
            ctype = upstream.headers.get("Content-Type", "")
            sse = "text/event-stream" in ctype
            small = upstream.content_length is not None and upstream.content_length <= MAX_JSON_REWRITE
            if cached is not None and not sse and "json" in ctype and small:
                body = await upstream.read()
                return web.Response(status=upstream.status, body=rewrite_json(body, cached), headers=out_headers)
            if upstream.content_length is not None and (cached is None or not sse):
                out_headers["Content-Length"] = str(upstream.content_length)
            resp = web.StreamResponse(status=upstream.status, headers=out_headers)
            await resp.prepare(request)
            rewriter = SSERewriter(cached) if cached is not None and sse else None
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(rewriter.feed(chunk) if rewriter is not None else chunk)
                if rewriter is not None:
                    tail = rewriter.flush()
                    if tail:
                        await resp.write(tail)
            except (aiohttp.ClientError, ConnectionResetError) as e:
                # the engine's answer broke off: end the client's connection too, so it sees a
                # truncated response rather than a clean end
                log.warning("decoder stream ended early: %s", e)
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
            return resp


def _context(pair: Any) -> ssl.SSLContext:
    """A TLS 1.2+ server context for a PEM key pair."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, pair)
    return ctx


def _load(ctx: ssl.SSLContext, pair: Any) -> None:
    """Load a PEM key pair into `ctx` (the ssl module reads pairs from files only)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        crt, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        with open(crt, "wb") as f:
            f.write(pair.cert)
        with open(key, "wb") as f:
            f.write(pair.key)
        ctx.load_cert_chain(crt, key)


def _error_bytes(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"object": "error", "message": message, "type": kind, "param": "", "code": status}).encode()
