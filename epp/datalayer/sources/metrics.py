"""`metrics-data-source`: scrape each endpoint's Prometheus page.

Parameters (the reference's): `scheme` (http | https, default http), `path` (default /metrics),
`port` (default: the endpoint's port), `insecureSkipVerify` (default true), `caCertPath`,
`clientCertPath` + `clientKeyPath` (together), `interval` (a duration; default the refresh interval).
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.scheduling.registry import DATA_SOURCE, BuildContext, ConfigError, Params, register


@dataclass(frozen=True, slots=True)
class MetricsSourceParams:
    scheme: str = "http"
    path: str = "/metrics"
    port: int | None = None
    insecure_skip_verify: bool = True
    ca_cert_path: str = ""
    client_cert_path: str = ""
    client_key_path: str = ""
    interval: float | None = None


@register("metrics-data-source", DATA_SOURCE)
class MetricsDataSource:
    """The scrape settings; the scraper (epp.metrics) does the scraping."""

    def __init__(self, name: str, params: MetricsSourceParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params

    @classmethod
    def parse(cls, p: Params) -> MetricsSourceParams:
        path = p.string("path", "/metrics")
        if not path.startswith("/"):
            raise ConfigError(p.field("path"), f"must start with '/', got {path!r}")
        cert, key = p.string("clientCertPath", ""), p.string("clientKeyPath", "")
        if bool(cert) != bool(key):
            raise ConfigError(p.field("clientCertPath" if key else "clientKeyPath"),
                              "clientCertPath and clientKeyPath go together")
        out = MetricsSourceParams(
            scheme=p.string("scheme", "http", choices=("http", "https")),
            path=path,
            port=p.integer("port", 0, lo=1, hi=65535) or None,
            insecure_skip_verify=p.boolean("insecureSkipVerify", True),
            ca_cert_path=p.string("caCertPath", ""),
            client_cert_path=cert,
            client_key_path=key,
            interval=p.duration("interval", 0.0) or None,
        )
        p.done()
        return out
