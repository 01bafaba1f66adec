"""pyproject.toml's build pin and runtime floors agree with the generated protobuf code.

epp/_gen is written at install by the build-system grpcio-tools; its modules refuse to import with a
protobuf runtime older than the protoc that wrote them, or a grpcio older than the tools. A fresh
install must therefore never be able to pick a generator newer than the runtime floors allow.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "epp" / "_gen"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _reqs(items: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(item)).name: r for item in items}


def _only(req: Requirement, op: str) -> Version:
    versions = [Version(s.version) for s in req.specifier if s.operator == op]
    assert len(versions) == 1, f"{req}: expected one {op} bound"
    return versions[0]


def test_generator_pin_and_runtime_floors_agree() -> None:
    data = _project()
    build = _reqs(data["build-system"]["requires"])
    deps = _reqs(data["project"]["dependencies"])
    tools = _only(build["grpcio-tools"], "==")  # exactly one generator version
    assert _only(deps["grpcio"], ">=") >= tools
    assert _only(deps["grpcio-health-checking"], ">=") >= Version(f"{tools.major}.{tools.minor}")
    # what this generator writes: the generated modules on disk came from the pinned tools
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (GEN / "vllm_engine_pb2_grpc.py").read_text())
    pb_gen = re.search(r"Protobuf Python Version: (\S+)", (GEN / "vllm_engine_pb2.py").read_text())
    assert grpc_gen and pb_gen
    assert Version(grpc_gen.group(1)) == tools
    protobuf = deps["protobuf"]
    assert _only(protobuf, ">=") >= Version(pb_gen.group(1))
    # the runtime's major version is the generated code's (protobuf refuses other majors)
    assert Version(pb_gen.group(1)).major + 1 == _only(protobuf, "<").major


def test_no_hung_test_stalls_the_run() -> None:
    data = _project()
    assert any(Requirement(r).name == "pytest-timeout" for r in data["project"]["optional-dependencies"]["test"])
    assert 0 < int(data["tool"]["pytest"]["ini_options"]["timeout"]) <= 600
