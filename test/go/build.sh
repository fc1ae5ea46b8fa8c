#!/usr/bin/env bash
# Builds the Go clone client (test/go/cmd/clone-client) offline from Debian's packages alone: Go stubs generated
# from proto/ with protoc, protoc-gen-go and protoc-gen-go-grpc into a temporary GOPATH, then `go build` in GOPATH
# mode against the Go sources Debian ships in /usr/share/gocode (grpc-go, google.golang.org/protobuf, genproto).
# No module proxy, no network. scripts/install.sh installs the packages.
#
#   bash test/go/build.sh [OUTPUT]     # default OUTPUT: <state>/go/bin/clone-client
#
# Only cowherd's own protos are generated. google/api, google/longrunning and google/rpc come from Debian's
# genproto (golang-google-genproto-dev, 2020): grpc-go already links its google/rpc/status, and a second Go
# package registering the same proto file panics at start. Their wire format is the same as the vendored ones'
# in proto/third_party. The generated code is not committed: it is made in about a second, and services/gen is
# for the TypeScript that the services compile against.
# The build cache lives in <state>/go/cache, so that only the first build compiles grpc-go and the protobuf runtime
# (10 to 17 s on a 2-core machine); later builds take about 3 s.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
COWHERD_TAG=go-client
COWHERD_LOG="$COWHERD_LOG_DIR/go-client.log"

OUTPUT="${1:-$COWHERD_STATE_DIR/go/bin/clone-client}"
# The Go import path of the generated packages: cowherd/cloning/v1/*.proto becomes <prefix>/cowherd/cloning/v1,
# package cloningv1 (buf's naming). cowherd's protos have no go_package option; protoc-gen-go takes M flags.
GO_PREFIX=cowherd.dev/go
DEBIAN_GOPATH=/usr/share/gocode

for command in go protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$command" >/dev/null 2>&1 || die "$command is missing: run bash scripts/install.sh"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/cowherd-go-client-XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/$GO_PREFIX"

generate() {
  local proto="$COWHERD_ROOT/proto" files=() mappings=() file package
  while IFS= read -r file; do
    files+=("$file")
    package="$(dirname "$file")"                  # cowherd/cloning/v1
    package="${package#cowherd/}"                 # cloning/v1
    mappings+=("M$file=$GO_PREFIX/$(dirname "$file");${package%%/*}${package##*/}")
  done < <(cd "$proto" && find cowherd -name '*.proto' | sort)
  # The vendored operations.proto names the newer cloud.google.com module; Debian has it in genproto.
  mappings+=("Mgoogle/longrunning/operations.proto=google.golang.org/genproto/googleapis/longrunning;longrunning")
  local go_opts=() grpc_opts=() mapping
  for mapping in "${mappings[@]}"; do
    go_opts+=("--go_opt=$mapping")
    grpc_opts+=("--go-grpc_opt=$mapping")
  done
  protoc -I"$proto" -I"$proto/third_party" \
    --go_out="$work/src" "${go_opts[@]}" \
    --go-grpc_out="$work/src" "${grpc_opts[@]}" \
    "${files[@]}"
}

build() {
  mkdir -p "$(dirname "$OUTPUT")" "$COWHERD_STATE_DIR/go/cache"
  cd "$COWHERD_ROOT/test/go/cmd/clone-client"
  export GO111MODULE=off GOPATH="$work:$DEBIAN_GOPATH" GOCACHE="$COWHERD_STATE_DIR/go/cache" GOFLAGS= GOPROXY=off
  # Every generated package compiles, not only those the client imports (the agent's, the events').
  go build "$GO_PREFIX/..."
  go build -ldflags "-X main.repositoryRoot=$COWHERD_ROOT" -o "$OUTPUT" .
}

step "generate Go stubs from proto/ (protoc $(protoc --version | cut -d' ' -f2))" generate
step "go build ${OUTPUT#"$COWHERD_ROOT"/} ($(go version | cut -d' ' -f3))" build
