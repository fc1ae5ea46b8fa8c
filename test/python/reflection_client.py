#!/usr/bin/python3
"""A client in another language, as an operator would write one: Python stubs generated from proto/ with
Debian's grpc tools (grpc_tools.protoc), mutual TLS with a cowherd certificate, server reflection to
discover the services, and the health service of each.

Usage: reflection_client.py CERT KEY CA ADDRESS [ADDRESS...]
Prints one JSON object per address: {"address", "services", "health": {service: status}, "descriptors_ok"}.
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from cowherd_stubs import generated


def main():
    cert, key, ca, *addresses = sys.argv[1:]
    with generated() as stubs:
        health_pb2 = stubs.load("grpc/health/v1/health_pb2.py")
        reflection_pb2 = stubs.load("grpc/reflection/v1/reflection_pb2.py")
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
