"""`python -m epp` / `epp`: run the picker, or a subcommand (`envoy-config`, `check-config`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from epp import logs
from epp.cli import Options, parse_args

if TYPE_CHECKING:
    from epp import handoff

log = logging.getLogger("epp")

# A latency server allocates many short-lived objects per request and keeps a large, long-lived
# heap (modules, the config, the prefix index): the cyclic collector's default gen-0 threshold (700)
# runs it every few requests and a full pass walks everything. Fewer, cheaper passes instead:
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """After start: move everything alive into the permanent generation (never scanned again) and
    raise the thresholds (`--gc-tuning=false` keeps Python's defaults)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def set_switch_interval(seconds: float) -> None:
    """How long a thread may hold the interpreter lock while another waits (0: leave Python's 5 ms).
    The serving loop shares the lock with the scraper and /metrics threads; a shorter interval bounds
    what one makes the other wait, and keeps a saturated loop from starving the scraper."""
    if seconds > 0:
        sys.setswitchinterval(seconds)


async def _serve(opts: Options) -> int:
    from epp.resources import ResourceError
    from epp.scheduling.config import ConfigError
    from epp.server import App

    set_switch_interval(opts.gil_switch_interval)  # before the scraper and /metrics threads start
    try:
        app = App(opts)
    except (ConfigError, ResourceError, OSError) as e:
        print(f"epp: error: config: {e}", file=sys.stderr)
        return 2
    signals = 0
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        signalled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await app.start()
    except Exception as e:
        log.error("start failed", extra={"error": str(e)})
        await app.stop(0)
        return 1
    if opts.gc_tuning:
        tune_gc()
    await signalled.wait()
    signalled.clear()
    # drain: NOT_SERVING at once, keep serving new streams for --drain-timeout so the proxy and the
    # Service stop sending here before we stop accepting; a second signal skips the rest of it
    log.info("shutting down: draining", extra={"drain_s": opts.drain_timeout, "grace_s": opts.shutdown_grace})
    await app.begin_drain()
    if opts.drain_timeout > 0 and signals < 2:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signalled.wait(), opts.drain_timeout)
    log.info("shutting down: no new streams", extra={"grace_s": opts.shutdown_grace})
    await app.stop()
    return 0


def _worker_dies_with_supervisor() -> None:
    """In a worker before exec: SIGTERM when the supervisor dies, even by SIGKILL (no orphans
    holding the port)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(workers: int, args: list[str], opts: Options | None = None) -> int:
    """`--workers N`: N picker processes (`python -m epp` with the same flags) serving one ext_proc
    port; this process starts them, passes SIGTERM/SIGINT on and waits. With
    `--worker-connections balanced` (the default, on the native gRPC server) it also holds the
    port's listener and hands each connection to the worker with the fewest (epp.handoff);
    otherwise every worker listens through SO_REUSEPORT and the kernel spreads connections.
    Worker 0 serves --metrics-port; the others bind an OS-assigned one. If a worker dies, the
    others are stopped and its exit code is returned, so the pod restarts whole. The workers share
    one file in /dev/shm (epp.workershare): worker 0's scrapes and every worker's in-flight counts;
    its name is removed once every worker has mapped it (the mappings keep it), so nothing is left
    behind however the supervisor ends. What each worker's plugins learn (prefix placements) goes
    to the others over ipc:// sockets named after the share."""
    from epp import handoff, workershare

    dispatcher = None
    theirs: list[socket.socket] = []  # the workers' ends of their control streams

    def close_theirs() -> None:  # once the workers have them: a dead worker's end must read as gone
        for t in theirs:
            t.close()

    if opts is not None and opts.worker_connections == "balanced" and opts.grpc_server == "native":
        try:
            listener = handoff.bind_listener(opts.grpc_bind_address or opts.bind_address, opts.grpc_port)
        except OSError as e:
            log.error("ext_proc port not bound", extra={"port": opts.grpc_port, "error": str(e)})
            return 1
        pairs = [handoff.control_pair() for _ in range(workers)]
        dispatcher = handoff.Dispatcher(listener, [mine for mine, _ in pairs])
        theirs = [t for _, t in pairs]
    share = workershare.create(workers)
    try:
        extra: list[list[str]] = [[] for _ in range(workers)]
        fds: list[tuple[int, ...]] = [() for _ in range(workers)]
        if dispatcher is not None:
            for i, t in enumerate(theirs):
                extra[i] = ["--worker-handoff-fd", str(t.fileno())]
                fds[i] = (t.fileno(),)
        return _run_workers(workers, [*args, "--worker-share", share],
                            lambda: workershare.all_attached(share, workers), lambda: os.unlink(share),
                            extra=extra, pass_fds=fds, dispatcher=dispatcher,
                            started=close_theirs)
    finally:
        close_theirs()
        if dispatcher is not None:
            dispatcher.close()
        with contextlib.suppress(OSError):
            os.unlink(share)
        for i in range(workers):  # the workers' ipc:// sockets (epp.workershare.sibling_url), if left
            with contextlib.suppress(OSError):
                os.unlink(f"{share}.peer{i}")


def _run_workers(workers: int, args: list[str], attached: Callable[[], bool], release: Callable[[], None], *,
                 extra: list[list[str]] | None = None, pass_fds: list[tuple[int, ...]] | None = None,
                 dispatcher: handoff.Dispatcher | None = None, started: Callable[[], None] | None = None) -> int:
    """Start and watch the workers; `release()` once `attached()` (every worker mapped the share).
    Worker i gets `extra[i]` flags and inherits `pass_fds[i]`; `started()` runs once all exist;
    `dispatcher` hands them connections while they run."""
    import subprocess
    import time

    released = False

    children: list[subprocess.Popen[bytes]] = []
    stopping = False
    forwarded: set[int] = set()  # the signals passed on to the workers

    def forward(sig: int, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        forwarded.add(sig)
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(workers):
        argv = [sys.executable, "-m", "epp", *args, "--worker-index", str(i), *(extra[i] if extra else [])]
        if i:
            argv += ["--metrics-port", "0"]
        children.append(subprocess.Popen(argv, preexec_fn=_worker_dies_with_supervisor,
                                         pass_fds=pass_fds[i] if pass_fds else ()))
    if started is not None:
        started()  # e.g. the workers' ends of their control streams: theirs now, not ours
    rc = 0
    while True:
        running = False
        for c in children:
            code = c.poll()
            if code is None:
                running = True
            elif code != 0 and rc == 0 and not (stopping and -code in forwarded):
                # (a worker still starting when the stop was passed on dies of it: that is a stop too)
                rc = code if code > 0 else 128 - code  # killed by a signal: the shell's convention
                if not stopping:  # a worker failed on its own: take the rest down with it
                    forward(signal.SIGTERM)
        if not running:
            return rc
        if not released and attached():
            released = True
            with contextlib.suppress(OSError):
                release()
        if dispatcher is not None:
            dispatcher.poll(0.2)
        else:
            time.sleep(0.2)


def _flow_control_on(opts: Options) -> bool:
    """Whether the picker's config turns flow control on (a config that does not load: False, the
    workers report it)."""
    from epp.cli import config_text
    from epp.scheduling.config import ConfigError, gate_enabled, load_config

    try:
        cfg = load_config(config_text(opts))
    except (ConfigError, OSError):
        return False
    return cfg.flow_control is not None and gate_enabled(cfg.feature_gates, "flowControl")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "envoy-config":
        from epp import envoyconf

        return envoyconf.main(args[1:])
    if args and args[0] == "check-config":
        from epp import check_config

        return check_config.main(args[1:])
    if args and args[0] == "sidecar":
        from epp import sidecar

        return sidecar.main(args[1:])
    opts = parse_args(args)
    if opts.workers > 1 and opts.worker_index < 0 and opts.workers_why and _flow_control_on(opts):
        # the default (the CPU limit) gives way: flow control's queues and fairness are one process's
        opts = dataclasses.replace(opts, workers=1, workers_why=f"flow control on (one process; {opts.workers_why} "
                                                                  f"would give {opts.workers})")
    logs.setup(opts.log_level, opts.log_format, time_encoding=opts.log_time_encoding,
               stacktrace_level=opts.log_stacktrace_level)
    if opts.workers > 1 and opts.worker_index < 0:
        if opts.workers_why:
            log.info("workers", extra={"workers": opts.workers, "why": opts.workers_why})
        # every worker gets the count decided here, whatever it would read of the cgroup itself
        return supervise(opts.workers, [*args, "--workers", str(opts.workers)], opts)
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
