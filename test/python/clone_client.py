#!/usr/bin/python3
"""Clones an image through cowherd's public API from Python, as an operator's own client would: stubs
generated from proto/ with Debian's grpc tools (see cowherd_stubs.py), mutual TLS with the admin credential
bundle, CloningService.CloneVirtualMachines, then google.longrunning.Operations (GetOperation, then
WaitOperation until done), and the CloneVirtualMachinesResponse unpacked from the operation's Any.

Usage:
  clone_client.py --image debian-12 --count 2 --name-template 'web-{index}' [--start]
                  [--hosts kvm-01,kvm-02] [--credentials DIR] [--cloning HOST:PORT] [--timeout SECONDS]

--credentials names the admin bundle directory (cert.pem, key.pem, ca.pem; default: the local fleet's,
.state/fleet/credentials/admin, under $COWHERD_STATE_DIR when set); --cloning the cloning service (default
$COWHERD_CLONING_ADDRESS or localhost:7444). Progress goes to stderr; stdout gets one JSON object:
  {"operation": "operations/...", "source": "images/...", "clones": [{"index", "name", "virtualMachine",
   "host", "state", "started", "overlays", "error"}], "error": null}
Exit status: 0 every clone is DONE; 1 the call or the operation failed (the JSON's "error" says why);
2 usage; 7 the operation finished but some clones FAILED (each has its "error").
"""
import argparse
import json
import os
import sys
import time
import uuid

import grpc

from cowherd_stubs import ROOT, generated


def parse_arguments():
    state = os.environ.get("COWHERD_STATE_DIR") or os.path.join(ROOT, ".state")
    parser = argparse.ArgumentParser(description="Clone an image through cowherd's public API.")
    parser.add_argument("--image", required=True, help="the image id or images/{image}")
    parser.add_argument("--count", type=int, default=1, help="how many clones (1 to 1000)")
    parser.add_argument("--name-template", default="", help="e.g. 'web-{index}'; empty: '{source}-{random}'")
    parser.add_argument("--start", action="store_true", help="start each clone once defined")
    parser.add_argument("--hosts", default="", help="comma-separated host ids (STRATEGY_HOSTS); default: where the image is")
    parser.add_argument("--credentials", default=os.path.join(state, "fleet", "credentials", "admin"))
    parser.add_argument("--cloning", default=os.environ.get("COWHERD_CLONING_ADDRESS") or "localhost:7444")
    parser.add_argument("--server-name", default="", help="TLS server name when the address is not in the certificate")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to follow the operation")
    return parser.parse_args()


def channel_credentials(directory):
    def read(name):
        with open(os.path.join(directory, name), "rb") as file:
            return file.read()
    return grpc.ssl_channel_credentials(root_certificates=read("ca.pem"), private_key=read("key.pem"), certificate_chain=read("cert.pem"))


def code_name(code):
    """The canonical name of a google.rpc.Status code, e.g. NOT_FOUND."""
    return next((status.name for status in grpc.StatusCode if status.value[0] == code), str(code))


def main():
    arguments = parse_arguments()
    try:
        credentials = channel_credentials(arguments.credentials)
    except OSError as error:
        print(f"clone_client: cannot read the admin credentials: {error}; pass --credentials <dir>", file=sys.stderr)
        return 2
    image = arguments.image if arguments.image.startswith("images/") else f"images/{arguments.image}"
    result = {"operation": None, "source": image, "clones": [], "error": None}
    with generated():
        from google.longrunning import operations_pb2, operations_pb2_grpc
        from google.protobuf import duration_pb2
        from cowherd.cloning.v1 import cloning_service_pb2 as cloning, cloning_service_pb2_grpc as cloning_grpc

        placement = cloning.Placement(strategy=cloning.Placement.STRATEGY_WHERE_IMAGE_IS)
        if arguments.hosts:
            placement = cloning.Placement(strategy=cloning.Placement.STRATEGY_HOSTS,
                                          hosts=[f"hosts/{host}" for host in arguments.hosts.split(",")])
        request = cloning.CloneVirtualMachinesRequest(
            image=image, placement=placement, count=arguments.count, name_template=arguments.name_template,
            start=arguments.start, request_id=str(uuid.uuid4()))
        options = [("grpc.ssl_target_name_override", arguments.server_name)] if arguments.server_name else []
        try:
            with grpc.secure_channel(arguments.cloning, credentials, options=options) as channel:
                service = cloning_grpc.CloningServiceStub(channel)
                operations = operations_pb2_grpc.OperationsStub(channel)
                operation = service.CloneVirtualMachines(request, timeout=30)
                result["operation"] = operation.name
                print(f"clone_client: {operation.name} clones {image} x{arguments.count}", file=sys.stderr)
                operation = operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=30)
                deadline = time.monotonic() + arguments.timeout
                while not operation.done:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{operation.name} not done after {arguments.timeout:g} s (it keeps running)")
                    metadata = cloning.CloneVirtualMachinesMetadata()
                    if operation.metadata.Unpack(metadata):
                        print(f"clone_client: {metadata.done_count} done, {metadata.failed_count} failed of {metadata.total_count}", file=sys.stderr)
                    wait = operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=10))
                    operation = operations.WaitOperation(wait, timeout=30)
        except grpc.RpcError as error:
            result["error"] = {"code": error.code().name, "message": error.details()}
            print(json.dumps(result), flush=True)
            print(f"clone_client: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except TimeoutError as error:
            result["error"] = {"code": "DEADLINE_EXCEEDED", "message": str(error)}
            print(json.dumps(result), flush=True)
            print(f"clone_client: {error}", file=sys.stderr)
            return 1

        if operation.WhichOneof("result") == "error":
            result["error"] = {"code": code_name(operation.error.code), "message": operation.error.message}
            print(json.dumps(result), flush=True)
            print(f"clone_client: {operation.name} failed: {operation.error.message}", file=sys.stderr)
            return 1
        response = cloning.CloneVirtualMachinesResponse()
        if not operation.response.Unpack(response):
            result["error"] = {"code": "INTERNAL", "message": f"unexpected response type {operation.response.type_url}"}
            print(json.dumps(result), flush=True)
            return 1
        state_name = cloning.CloneResult.State.Name
        for clone in response.clones:
            result["clones"].append({
                "index": clone.index,
                "name": clone.domain_name,
                "virtualMachine": clone.virtual_machine,
                "host": clone.host,
                "state": state_name(clone.state),
                "started": clone.started,
                "overlays": list(clone.overlays),
                "error": {"code": code_name(clone.error.code), "message": clone.error.message} if clone.HasField("error") else None,
            })
        print(json.dumps(result), flush=True)
        failed = [clone for clone in response.clones if clone.state != cloning.CloneResult.STATE_DONE]
        for clone in failed:
            print(f"clone_client: clone {clone.index} ({clone.domain_name}) {state_name(clone.state)}: {clone.error.message}", file=sys.stderr)
        return 7 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
