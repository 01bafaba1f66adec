"""GC tuned for a latency server: after start the heap is frozen out of the cyclic collector and
the thresholds are raised; --gc-tuning=false keeps Python's defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epp.__main__ import GC_THRESHOLDS
from epp.cli import parse_args


def test_flag_default_on_and_can_be_turned_off():
    assert parse_args(["--pool-name", "p"]).gc_tuning is True
    assert parse_args(["--pool-name", "p", "--gc-tuning=false"]).gc_tuning is False


def test_tune_gc_freezes_the_heap_and_raises_thresholds():
    # in a fresh interpreter: freezing this test process would change every later test's GC
    code = ("import gc; from epp.__main__ import tune_gc; d = gc.get_threshold(); tune_gc(); "
            "print(d, gc.get_threshold(), gc.get_freeze_count() > 1000, gc.get_count()[0] < 100)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["(700,", "10,", "10)", f"({GC_THRESHOLDS[0]},", f"{GC_THRESHOLDS[1]},",
                                  f"{GC_THRESHOLDS[2]})", "True", "True"]


def test_the_gil_switch_interval_is_one_millisecond_unless_told():
    """The serving loop shares the interpreter lock with the scraper and /metrics threads: the
    picker shortens Python's 5 ms switch interval to 1 ms (0 keeps Python's)."""
    assert parse_args(["--pool-name", "p"]).gil_switch_interval == 0.001
    assert parse_args(["--pool-name", "p", "--gil-switch-interval", "2ms"]).gil_switch_interval == 0.002
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--gil-switch-interval", "1s"])
    code = ("import sys; from epp.__main__ import set_switch_interval; a = sys.getswitchinterval(); "
            "set_switch_interval(0); b = sys.getswitchinterval(); set_switch_interval(0.001); "
            "print(a, b, sys.getswitchinterval())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["0.005", "0.005", "0.001"]
