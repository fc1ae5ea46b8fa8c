#!/usr/bin/python3
"""A client in another language, as an operator would write one: Python stubs generated from proto/ with
Debian's grpc tools (grpc_tools.protoc), mutual TLS with a cowherd certificate, server reflection to
discover the services, and the health service of each.

Usage: reflection_client.py CERT KEY CA ADDRESS [ADDRESS...]
Prints one JSON object per address: {"address", "services", "health": {service: status}, "descriptors_ok"}.
"""
import importlib.util
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc
from google.protobuf import descriptor_pb2, descriptor_pool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")
THIRD_PARTY = os.path.join(PROTO, "third_party")


def generate(out_dir):
    """Generates Python stubs for health, reflection and every cowherd proto."""
    files = ["grpc/health/v1/health.proto", "grpc/reflection/v1/reflection.proto"]
    for dirpath, _, names in os.walk(os.path.join(PROTO, "cowherd")):
        files += [os.path.relpath(os.path.join(dirpath, n), PROTO) for n in names if n.endswith(".proto")]
    # Only what cowherd's protos import: Debian's protoc (3.5) predates proto3 `optional`, which the vendored
    # google/rpc/error_details.proto uses; clients decode ErrorInfo with their own google-rpc package.
    deps = ["google/longrunning/operations.proto", "google/rpc/status.proto", "google/api/annotations.proto", "google/api/http.proto",
            "google/api/client.proto", "google/api/field_behavior.proto", "google/api/resource.proto",
            "google/api/launch_stage.proto"]
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO}", f"-I{THIRD_PARTY}", f"-I{well_known}", "-I/usr/include",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"] + files + deps
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on proto/")
    # protoc writes packages without __init__.py; namespace packages import fine on Python 3.


def main():
    cert, key, ca, *addresses = sys.argv[1:]
    with tempfile.TemporaryDirectory() as out_dir:
        generate(out_dir)
        sys.path.insert(0, out_dir)
        # The generated grpc/... package would shadow the grpc library: load those modules by file path.
        def load(name, rel):
            spec = importlib.util.spec_from_file_location(name, os.path.join(out_dir, rel))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module

        health_pb2 = load("grpc_health_v1_health_pb2", "grpc/health/v1/health_pb2.py")
        reflection_pb2 = load("grpc_reflection_v1_reflection_pb2", "grpc/reflection/v1/reflection_pb2.py")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=open(ca, "rb").read(),
            private_key=open(key, "rb").read(),
            certificate_chain=open(cert, "rb").read(),
        )
        for address in addresses:
            result = {"address": address, "services": [], "health": {}, "descriptors_ok": False, "error": None}
            try:
                with grpc.secure_channel(address, credentials) as channel:
                    grpc.channel_ready_future(channel).result(timeout=10)
                    reflect = channel.stream_stream(
                        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                    )
                    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
                    responses = list(reflect(iter(requests), timeout=10))
                    services = [s.name for s in responses[0].list_services_response.service]
                    result["services"] = sorted(services)
                    # Every service's file, with all of its dependencies, must build a descriptor pool:
                    # what grpcurl and dynamic clients do with reflection.
                    pool = descriptor_pool.DescriptorPool()
                    files = {}
                    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in services]
                    for response in reflect(iter(requests), timeout=10):
                        if response.HasField("error_response"):
                            raise RuntimeError(response.error_response.error_message)
                        for raw in response.file_descriptor_response.file_descriptor_proto:
                            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
                            files[fdp.name] = fdp
                    pending = dict(files)
                    while pending:
                        progressed = False
                        for name, fdp in list(pending.items()):
                            if all(dep in files and dep not in pending for dep in fdp.dependency) or not fdp.dependency:
                                pool.Add(fdp)
                                del pending[name]
                                progressed = True
                        if not progressed:
                            missing = {d for f in pending.values() for d in f.dependency if d not in files}
                            raise RuntimeError(f"unresolvable dependencies: {sorted(missing)}")
                    for s in services:
                        pool.FindServiceByName(s)
                    result["descriptors_ok"] = True
                    check = channel.unary_unary(
                        "/grpc.health.v1.Health/Check",
                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                        response_deserializer=health_pb2.HealthCheckResponse.FromString,
                    )
                    for s in [""] + services:
                        if s.startswith("grpc.reflection"):
                            continue
                        status = check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
                        result["health"][s] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except Exception as error:  # reported, not raised: the caller asserts on every field
                result["error"] = f"{type(error).__name__}: {error}"
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
