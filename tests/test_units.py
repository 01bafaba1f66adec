"""The shared duration and quantity grammar (epp.units) the config file and command line use."""

import pytest

from epp.units import go_duration, kube_quantity


@pytest.mark.parametrize(("text", "secs"), [("200ms", 0.2), ("1m30s", 90.0), (" 2s ", 2.0), (".5h", 1800.0),
                                            ("1.s", 1.0), ("10us", 1e-5), ("3µs", 3e-6), ("1h0m1ns", 3600 + 1e-9)])
def test_go_duration(text: str, secs: float) -> None:
    assert go_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize("text", ["", "5", "2 s", "2x", "s", "1m 30s", "-1s", "1s5"])
def test_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        go_duration(text)


@pytest.mark.parametrize(("text", "amount"), [("100", 100), ("1Gi", 2**30), ("500M", 5e8), ("250m", 0.25),
                                              ("1e3", 1000), ("-2k", -2000)])
def test_kube_quantity(text: str, amount: float) -> None:
    assert kube_quantity(text) == pytest.approx(amount)


@pytest.mark.parametrize("text", ["", "1GB", "ten", "1 Gi", "Gi"])
def test_kube_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        kube_quantity(text)
