"""Python stubs for cowherd, generated from proto/ at run time with Debian's grpc tools (grpc_tools.protoc),
as any client in another language makes them: `proto/` and `proto/third_party` on the include path.

    from cowherd_stubs import generated
    with generated() as stubs:
        from cowherd.cloning.v1 import cloning_service_pb2, cloning_service_pb2_grpc
        health_pb2 = stubs.load("grpc/health/v1/health_pb2.py")

Debian's protoc (3.5) predates proto3 `optional`, which the vendored google/rpc/error_details.proto uses, so
only what cowherd's protos import is compiled besides them; clients read ErrorInfo with a google-rpc package.
"""
import contextlib
import importlib.util
import os
import sys
import tempfile

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")
THIRD_PARTY = os.path.join(PROTO, "third_party")

# What cowherd's protos import from proto/third_party (google/rpc/error_details.proto is left out: see above).
DEPENDENCIES = [
    "google/longrunning/operations.proto", "google/rpc/status.proto", "google/api/annotations.proto",
    "google/api/http.proto", "google/api/client.proto", "google/api/field_behavior.proto",
    "google/api/resource.proto", "google/api/launch_stage.proto",
]


def generate(out_dir):
    """Generates Python messages and gRPC stubs for health, reflection and every cowherd proto into out_dir."""
    files = ["grpc/health/v1/health.proto", "grpc/reflection/v1/reflection.proto"]
    for dirpath, _, names in os.walk(os.path.join(PROTO, "cowherd")):
        files += sorted(os.path.relpath(os.path.join(dirpath, n), PROTO) for n in names if n.endswith(".proto"))
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO}", f"-I{THIRD_PARTY}", f"-I{well_known}", "-I/usr/include",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"] + files + DEPENDENCIES
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on proto/")
    # protoc writes packages without __init__.py; namespace packages import fine on Python 3.


class Stubs:
    """Generated stubs in a directory that is on sys.path (cowherd.*, google.longrunning.*, ...)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def load(self, rel):
        """Loads a generated module by file path: the generated grpc/... package would shadow the grpc library."""
        name = rel[:-3].replace("/", "_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(self.out_dir, rel))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


@contextlib.contextmanager
def generated():
    """Generates the stubs into a temporary directory, puts it on sys.path, and removes it afterwards."""
    with tempfile.TemporaryDirectory(prefix="cowherd-test-stubs-") as out_dir:
        generate(out_dir)
        sys.path.insert(0, out_dir)
        try:
            yield Stubs(out_dir)
        finally:
            sys.path.remove(out_dir)
