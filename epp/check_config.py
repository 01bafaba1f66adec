"""`python -m epp check-config FILE` (or `--config-text TEXT`): validate an EndpointPickerConfig
without starting the picker.

Every problem is reported at once, one line each starting with the field's path (unknown plugin
types with the nearest known names, reference types not built yet as "not yet supported
(<feature>)"). The engine metric names are checked as the scraper would, and the scheduler is
built once. Exit status: 0 valid, 1 invalid, 2 usage (bad arguments, unreadable file).
"""

from __future__ import annotations

import argparse
import sys

from epp.resources import ResourceError
from epp.scheduling.config import ConfigError, PickerConfig, all_errors, build_admission, build_scheduler, describe
from epp.scheduling.config import load_config as _load


def check(text: str) -> tuple[PickerConfig | None, list[str]]:
    """The config (None when invalid) and its problems, one line each."""
    try:
        cfg = _load(text)
    except ConfigError as e:
        return None, [str(err) for err in all_errors(e)]
    problems: list[str] = []
    try:
        from epp.metrics.engines import apply_overrides

        apply_overrides(cfg.engine_metrics)
    except ResourceError as e:
        problems.append(str(e))
    try:
        build_scheduler(cfg)
        build_admission(cfg)
    except (ConfigError, ValueError) as e:  # a plugin that refuses to be built with these parameters
        problems.append(f"building the scheduler: {e}")
    return (cfg if not problems else None), problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="epp check-config", description="Validate an EndpointPickerConfig.")
    ap.add_argument("file", nargs="?", help="the EndpointPickerConfig YAML file ('-' for stdin)")
    ap.add_argument("--config-text", default=None, help="the config given inline instead of a file")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if (args.file is None) == (args.config_text is None):
        print("epp check-config: error: give a FILE or --config-text (exactly one)", file=sys.stderr)
        return 2
    if args.config_text is not None:
        text, source = args.config_text, "--config-text"
    else:
        source = args.file
        try:
            if args.file == "-":
                text = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"epp check-config: error: cannot read {args.file}: {e}", file=sys.stderr)
            return 2
    if not text.strip():
        print(f"{source}: empty: the picker would run its default preset", file=sys.stderr)
        return 1
    cfg, problems = check(text)
    if problems:
        for p in problems:
            print(f"{source}: {p}", file=sys.stderr)
        n = len(problems)
        print(f"{source}: invalid ({n} problem{'s' if n != 1 else ''})", file=sys.stderr)
        return 1
    assert cfg is not None
    for w in cfg.warnings:
        print(f"{source}: warning: {w}")
    print(f"{source}: valid: {describe(cfg)}")
    return 0
