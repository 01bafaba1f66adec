"""`python -m epp sidecar`: the P/D disaggregation sidecar for a decode pod (llm-d's pd-sidecar flags).

It listens on `--port` (8000) in front of the local engine on `localhost:--model-server-port` (8200)
and, when the picker put `x-prefiller-host-port` on a request, first has the prefill pod compute
the prompt's KV, then lets the local engine decode with it (see epp.sidecar.proxy). docs/pd.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

log = logging.getLogger("epp.sidecar")


async def _serve(argv: Sequence[str]) -> int:
    from epp.sidecar.options import OptionError, parse_options
    from epp.sidecar.proxy import Sidecar

    try:
        opts = parse_options(argv)
    except (OptionError, OSError) as e:
        print(f"epp sidecar: error: {e}", file=sys.stderr)
        return 2
    sidecar = Sidecar(opts)
    try:
        await sidecar.start()
    except Exception as e:
        print(f"epp sidecar: error: start failed: {e}", file=sys.stderr)
        await sidecar.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"epp sidecar: listening on port {sidecar.port}", file=sys.stderr, flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await sidecar.stop()
    return 0


def main(argv: Sequence[str]) -> int:
    """Run the sidecar until SIGTERM/SIGINT; exit 2 on bad flags."""
    from epp import logs

    logs.setup("info", "text")
    return asyncio.run(_serve(argv))
