"""`header-based-testing-filter`: the conformance tests' way to choose endpoints deterministically.

Keeps the endpoints named in the request header `test-epp-endpoint-selection`, a comma-separated
list of `IP` (any port of that IP) or `IP:port` (exactly that one; IPv6 with or without brackets).
The result follows the header's order, one endpoint per IP; no header, or no match, keeps none.
"""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.registry import FILTER, BuildContext, NoParams, register

TEST_HEADER = "test-epp-endpoint-selection"


def _split(item: str) -> tuple[str, str]:
    """(host, port) of "ip", "ip:port", "[v6]:port", "[v6]" or a bare v6 address ("" port)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if item.count(":") == 1:
        host, _, port = item.partition(":")
        return host, port
    return item, ""  # IPv4 without port, or a bare IPv6 address


def select(header: str, endpoints: list[Endpoint]) -> list[Endpoint]:
    """The endpoints the header value names, in its order, deduplicated by IP."""
    by_ip: dict[str, Endpoint] = {}
    by_hp: dict[str, Endpoint] = {}
    for e in endpoints:
        ip = e.ip.strip("[]")
        by_ip[ip] = e  # as the reference: with several ports, an IP-only entry selects the last
        by_hp[f"{ip}:{e.port}"] = e
    out: list[Endpoint] = []
    seen: set[str] = set()
    for raw in header.split(","):
        item = raw.strip()
        if not item:
            continue
        host, port = _split(item)
        ep = by_hp.get(f"{host}:{port}") if port else by_ip.get(host)
        if ep is not None and ep.ip not in seen:
            seen.add(ep.ip)
            out.append(ep)
    return out


@register("header-based-testing-filter", FILTER)
class HeaderBasedTestingFilter(NoParams):
    """Endpoints named by the `test-epp-endpoint-selection` header (see module doc)."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]:
        headers = cycle.request.headers
        value = headers.get(TEST_HEADER)
        if value is None:  # header names are usually lower-case already; look further only if not
            value = next((v for k, v in headers.items() if k.lower() == TEST_HEADER), None)
        if value is None or not value.strip():
            return []
        return select(value, endpoints)
