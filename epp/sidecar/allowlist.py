"""SSRF protection (`--enable-ssrf-protection`): a prefill target must be a pod of the InferencePool.

The allowed hosts are the IPs of the pods the pool's selector picks, read from the Kubernetes API
(the InferencePool named by `--inference-pool` / INFERENCE_POOL, in group `--pool-group`, then its
pods) and re-read every `--allowlist-refresh` seconds in a worker thread. Until the first read
succeeds nothing is allowed (fail closed); a failed re-read keeps the last good list. Off, every
target is allowed (the reference's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from epp.resources import InferencePool, ResourceError, parse_object

log = logging.getLogger("epp.sidecar.allowlist")


def host_of(host_port: str) -> str:
    """The host of `host:port`, `[v6]:port` or a bare host."""
    hp = host_port.strip()
    if hp.startswith("["):
        end = hp.find("]")
        return hp[1:end] if end > 0 else hp
    host, sep, port = hp.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host
    return hp


class AllowList:
    """Which prefill hosts may be called. `allowed(host_port)`; `start()` / `stop()` the refresher."""

    def __init__(self, enabled: bool, *, group: str = "", version: str = "", namespace: str = "", name: str = "",
                 refresh: float = 5.0, kubeconfig: str = "") -> None:
        self.enabled = enabled
        self.group, self.version, self.namespace, self.name = group, version, namespace, name
        self.refresh = refresh
        self.kubeconfig = kubeconfig
        self.hosts: frozenset[str] = frozenset()
        self.synced = False
        self._task: asyncio.Task[None] | None = None
        self._api: Any = None

    def allowed(self, host_port: str) -> bool:
        return not self.enabled or host_of(host_port) in self.hosts

    async def start(self) -> None:
        if not self.enabled:
            return
        from epp.sources.kube_client import make_api_client

        self._api = make_api_client(self.kubeconfig or None)
        with contextlib.suppress(Exception):  # the loop retries; the first result is logged there
            await self._refresh_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._api is not None:
            await asyncio.to_thread(self._api.close)
            self._api = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self._refresh_once()
            except Exception as e:  # keep the last good list
                log.warning("SSRF allow-list: could not read the pool's pods (%s); keeping %d hosts", e,
                            len(self.hosts))

    async def _refresh_once(self) -> None:
        self.hosts = frozenset(await asyncio.to_thread(self._read))
        if not self.synced:
            log.info("SSRF allow-list: %d pod IPs of InferencePool %s/%s", len(self.hosts), self.namespace, self.name)
        self.synced = True

    def _read(self) -> set[str]:
        from kubernetes import client

        from epp.sources.kube import label_selector  # lazy, as kubernetes itself: only with SSRF protection

        raw = client.CustomObjectsApi(self._api).get_namespaced_custom_object(
            self.group, self.version, self.namespace, "inferencepools", self.name, _request_timeout=10)
        pool = parse_object(raw, self.namespace)  # the picker's own reading of both apiVersions
        if not isinstance(pool, InferencePool):
            raise ResourceError("kind", f"expected an InferencePool, got {type(pool).__name__}")
        pods = client.CoreV1Api(self._api).list_namespaced_pod(
            self.namespace, label_selector=label_selector(pool.selector), _request_timeout=10)
        return {p.status.pod_ip for p in pods.items if p.status is not None and p.status.pod_ip}
