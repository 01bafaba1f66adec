"""Endpoint picker (EPP) for LLM inference pools: an Envoy ext_proc server."""

__version__ = "0.1.0"
