"""Modules generated from protos/*.proto at install (setup.py runs grpcio-tools); not committed.

`vllm_engine_pb2` (messages) and `vllm_engine_pb2_grpc` (stubs and servicer base) for vLLM's gRPC
engine API. Regenerate with `pip install -e .` (or `make install`).
"""
