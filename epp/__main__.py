"""`python -m epp` / `epp`: run the picker, or a subcommand (`envoy-config`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from epp import logs
from epp.cli import Options, parse_args

log = logging.getLogger("epp")


async def _serve(opts: Options) -> int:
    from epp.resources import ResourceError
    from epp.scheduling.config import ConfigError
    from epp.server import App

    try:
        app = App(opts)
    except (ConfigError, ResourceError, OSError) as e:
        print(f"epp: error: config: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except Exception as e:
        log.error("start failed", extra={"error": str(e)})
        await app.stop(0)
        return 1
    await stop.wait()
    log.info("shutting down", extra={"grace_s": opts.shutdown_grace})
    await app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "envoy-config":
        from epp import envoyconf

        return envoyconf.main(args[1:])
    opts = parse_args(args)
    logs.setup(opts.log_level, opts.log_format)
    if opts.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if opts.event_loop == "uvloop":
                print("epp: error: --event-loop uvloop: uvloop is not installed", file=sys.stderr)
                return 2
        else:
            return uvloop.run(_serve(opts))
    return asyncio.run(_serve(opts))


if __name__ == "__main__":
    sys.exit(main())
