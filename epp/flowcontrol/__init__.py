"""Flow control: requests wait in the picker, in per-flow queues grouped in priority bands, and are
dispatched to the best endpoint at the moment the saturation detector reports room.

Modules: `types` (keys, items, outcomes, reasons), `policy` (the policy kinds), one file per policy
plugin (`fcfs`, `edf`, `global_strict`, `round_robin`), `bands`, `controller` (the synchronous core),
`aio` (the asyncio driver), `sim` (the discrete-event driver), `metrics`, `build` (from the
`flowControl` config section). See README.md and docs/flow-control.md.
"""
