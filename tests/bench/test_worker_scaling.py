"""bench/worker_scaling.py's h2load stream: one ext_proc stream's gRPC-framed messages, as Envoy
sends them for a request of the profile (request headers, then the whole body)."""

from __future__ import annotations

import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import worker_scaling


def frames(data: bytes) -> list[ep.ProcessingRequest]:
    out = []
    while data:
        flag, n = data[0], struct.unpack(">I", data[1:5])[0]
        assert flag == 0 and len(data) >= 5 + n  # uncompressed, whole
        out.append(ep.ProcessingRequest.FromString(data[5:5 + n]))
        data = data[5 + n:]
    return out


@pytest.mark.parametrize("profile", ["lean", "buffered"])
def test_the_stream_is_request_headers_then_the_whole_body(profile: str) -> None:
    msgs = frames(worker_scaling.stream_body(profile, 1000))
    assert [m.WhichOneof("request") for m in msgs] == ["request_headers", "request_body"]
    assert msgs[1].request_body.end_of_stream and len(msgs[1].request_body.body) > 1000
    assert b'"model": "m"' in msgs[1].request_body.body


def test_the_merged_counters_are_summed_over_label_sets() -> None:
    page = (b'inference_objective_request_total{model_name="m",target_model_name="m"} 5.0\n'
            b'inference_objective_request_total{model_name="n",target_model_name="n"} 2.0\n'
            b'inference_objective_request_error_total{model_name="m",error_code="x"} 1.0\n'
            b"# inference_objective_request_total{ 9\n")

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        assert worker_scaling.counters(srv.server_address[1]) == (7.0, 1.0)
    finally:
        srv.shutdown()
        srv.server_close()
