"""The e2e `gateway` fixture (a real Envoy in front of the picker and HTTP simulators), for the
flow-control tests behind Envoy."""

from tests.e2e.conftest import gateway  # noqa: F401
