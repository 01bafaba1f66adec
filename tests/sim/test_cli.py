"""`python -m epp.sim` as a process: ready lines, several servers, clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import aiohttp
import pytest

from epp.sim.__main__ import build_parser, configs_from_args


async def test_cli_starts_servers_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.sim", "--port", "0", "--count", "2", "--name", "pod", "--lora", "a,b",
        "--time-scale", "0.01", "--engine", "vllm", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        urls = {}
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            m = re.match(r"SIM READY name=(\S+) url=(\S+)", line)
            assert m, line
            urls[m.group(1)] = m.group(2)
        assert set(urls) == {"pod-0", "pod-1"}
        async with aiohttp.ClientSession() as http:
            for name, url in urls.items():
                body = {"model": "a", "prompt": "hi", "max_tokens": 2}
                async with http.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 200 and r.headers["x-sim-server"] == name
                async with http.get(f"{url}/sim/served") as r:
                    assert (await r.json())["total"] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_args_map_to_configs() -> None:
    args = build_parser().parse_args(["--port", "9000", "--count", "3", "--lora", "x, y", "--max-loras", "2",
                                      "--engine", "sglang", "--error-rate", "0.25", "--num-gpu-blocks", "100"])
    cfgs = configs_from_args(args)
    assert [c.port for c in cfgs] == [9000, 9001, 9002]
    assert [c.name for c in cfgs] == ["sim-0", "sim-1", "sim-2"]
    assert cfgs[0].engine.loras == ("x", "y") and cfgs[0].engine.max_loras == 2
    assert cfgs[1].engine_kind == "sglang" and cfgs[2].faults.error_rate == 0.25
    assert cfgs[0].seed != cfgs[1].seed
    with pytest.raises(ValueError):
        configs_from_args(build_parser().parse_args(["--error-rate", "3"]))
    with pytest.raises(ValueError):
        configs_from_args(build_parser().parse_args(["--num-gpu-blocks", "0"]))
