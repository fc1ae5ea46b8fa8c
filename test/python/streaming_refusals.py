#!/usr/bin/python3
"""Calls server-streaming RPCs from Python, as an operator's own client would (stubs generated from proto/ with
Debian's grpc tools, mutual TLS), and reports how each call ended: its status code, message, the
google.rpc.ErrorInfo reason from the status details, how many messages arrived and how long the call took.
A refused call must end with its status at once, not when the client's own deadline runs out.

Usage: streaming_refusals.py CERT KEY CA ADDRESS CALLS_JSON
CALLS_JSON is a list of {"service": "inventory" | "agent", "method": "WatchVirtualMachines", "request": {...},
"timeout": seconds}; "request" is the request message in proto3 JSON. Prints one JSON object per call:
{"method", "code", "details", "reason", "domain", "messages", "seconds"}.
"""
import json
import sys
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from cowherd_stubs import generated


def error_info_class():
    """google.rpc.ErrorInfo (reason = 1, domain = 2) built at run time: Debian's protoc cannot compile
    error_details.proto (see cowherd_stubs.py), and the wire format is all a client needs."""
    file = descriptor_pb2.FileDescriptorProto(name="streaming_refusals/error_info.proto", package="google.rpc", syntax="proto3")
    message = file.message_type.add(name="ErrorInfo")
    message.field.add(name="reason", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    message.field.add(name="domain", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.MessageFactory(pool).GetPrototype(pool.FindMessageTypeByName("google.rpc.ErrorInfo"))


def main():
    cert, key, ca, address, calls_json = sys.argv[1:]
    calls = json.loads(calls_json)
    ErrorInfo = error_info_class()
    with generated():
        from cowherd.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
        from cowherd.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc
        from google.rpc import status_pb2

        services = {
            "inventory": (inventory_service_pb2, inventory_service_pb2_grpc.InventoryServiceStub),
            "agent": (agent_service_pb2, agent_service_pb2_grpc.AgentServiceStub),
        }
        credentials = grpc.ssl_channel_credentials(
            root_certificates=open(ca, "rb").read(), private_key=open(key, "rb").read(), certificate_chain=open(cert, "rb").read()
        )
        with grpc.secure_channel(address, credentials) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            for spec in calls:
                messages, stub_class = services[spec["service"]]
                method = getattr(stub_class(channel), spec["method"])
                request_type = getattr(messages, f"{spec['method']}Request")
                request = json_format.ParseDict(spec.get("request", {}), request_type())
                result = {"method": spec["method"], "code": "OK", "details": "", "reason": "", "domain": "", "messages": 0, "seconds": 0.0}
                started = time.monotonic()
                try:
                    for _ in method(request, timeout=spec.get("timeout", 30)):
                        result["messages"] += 1
                except grpc.RpcError as error:
                    result["code"] = error.code().name
                    result["details"] = error.details() or ""
                    for name, value in error.trailing_metadata() or ():
                        if name != "grpc-status-details-bin":
                            continue
                        for detail in status_pb2.Status.FromString(value).details:
                            if detail.type_url.endswith("/google.rpc.ErrorInfo"):
                                info = ErrorInfo.FromString(detail.value)
                                result["reason"], result["domain"] = info.reason, info.domain
                result["seconds"] = round(time.monotonic() - started, 3)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
