"""Build hook: compile the project's .proto files (protos/) into epp/_gen with grpcio-tools.

Everything else about the package is in pyproject.toml; grpcio-tools is a build-system requirement,
so `pip install .` and `pip install -e .` (hence `make install`) both generate the modules from a
fresh clone. The generated files are not committed (.gitignore).
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
PACKAGE = "epp/_gen"  # the import path the generated modules live at (and import each other by)


def compile_protos() -> list[Path]:
    """Write epp/_gen/<name>_pb2.py, .pyi and _pb2_grpc.py for every protos/*.proto; raise on failure."""
    import importlib.resources

    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    sources = sorted(PROTOS.glob("*.proto"))
    out: list[Path] = []
    for src in sources:
        # -I<virtual>=<dir>: protoc sees protos/x.proto as epp/_gen/x.proto, so the outputs land in
        # the package and the grpc module imports `from epp._gen import x_pb2`
        args = [
            "grpc_tools.protoc",
            f"-I{well_known}",
            f"-I{PACKAGE}={PROTOS}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(src),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {src}")
        out.append(ROOT / PACKAGE / f"{src.stem}_pb2.py")
    return out


class BuildPyWithProtos(build_py):
    """build_py that generates the protobuf modules first (also runs for editable installs)."""

    def run(self) -> None:
        for path in compile_protos():
            print(f"generated {path.relative_to(ROOT)}", file=sys.stderr)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
