#!/usr/bin/env bash
# Builds the tiny guest that boot tests run under TCG: Debian's kernel (direct kernel boot, no disk image
# needed) and a ~1 MiB busybox initramfs whose /init loads the virtio modules, writes a marker block to
# /dev/vda and powers the guest off.
#
#   bash scripts/guest-kernel.sh            # idempotent; prints the paths (KEY=VALUE lines on stdout)
#   bash scripts/guest-kernel.sh --rebuild  # resolves the kernel package again and rebuilds the kit
#
# Output (stdout, one per line, nothing else):
#   COWHERD_GUEST_KERNEL=<state>/guest/vmlinux      uncompressed ELF kernel, booted through its PVH entry
#   COWHERD_GUEST_INITRD=<state>/guest/initrd.gz    busybox initramfs (cpio newc, gzip)
#   COWHERD_GUEST_VERSION=<kernel release>
#
# The guest's /init (see INIT_SH): mounts proc, sys and devtmpfs; insmods virtio_pci, virtio_blk and button
# with their dependencies in dependency order; waits up to 10 s for /dev/vda; writes one 4 KiB block at byte offset
# 1 MiB (MARKER_OFFSET) holding "cowherd-was-here-<marker>\n" and zeros, where <marker> is the `marker=` word
# of the kernel command line, with dd conv=fsync; syncs; `poweroff -f` (needs <features><acpi/> in the
# domain). It prints "cowherd-guest: ..." lines on the console (ttyS0), "cowherd-guest: marker written" on
# success. On any failure it still powers off, so a boot never hangs: the missing marker says what went wrong.
# Before the marker, when a disk other than /dev/vda carries the volume label `cidata` (a clone's NoCloud
# seed disk, services/agent/hypervisor/seed-image.ts), /init mounts it read-only as cloud-init would, sets
# the hostname from meta-data's local-hostname and prints "cowherd-guest: hostname <name>",
# "cowherd-guest: instance-id <id>", "cowherd-guest: seed files <names>" and
# "cowherd-guest: user-data sha256 <hex>" (a digest, not the document: user-data may hold secrets).
# A persistent data disk (the first /dev/vd[b-z] that is not the seed; a clone's data_disk_bytes disk): block 0
# holds the guest's "file"; when it does not start with `cowherd-data-`, /init writes
# "cowherd-data-<instance-id, else marker>\n" there; either way it prints "cowherd-guest: data <text>". Then
# "cowherd-guest: system <text>": what /dev/vda held at MARKER_OFFSET before this boot wrote its own marker (for
# a clone, the marker its image version's master wrote: which version the clone booted).
# With `cowherd.reads=<count>x<KiB>@<span MiB>` on the kernel command line (bench:boot's guest: a boot that reads
# a known scattered set of blocks), /init reads <count> blocks of <KiB> KiB each from /dev/vda before it writes
# the marker, one `dd iflag=direct` (O_DIRECT: every block comes from the disk, not the page cache) per block.
# Block k (0 <= k < count) starts k x floor(span x 1024 / count) KiB into the disk, so the blocks are spread
# evenly over its first <span> MiB; they are read in the order k = (j x stride) mod count for j = 0, 1, ...,
# where stride is the first integer from floor(count x 618 / 1000) (at least 1) that is coprime with count: a
# fixed golden-ratio stride permutation, each block once, consecutive reads far apart (64x1024@1024 reads the
# MiB at 0, 624, 224, 848, ...). test/harness/guest.ts `guestReadOffsets` computes the same order. Then it
# prints "cowherd-guest: read <count> blocks <bytes> bytes in <ms> ms" and "cowherd-guest: slowest read <ms> ms
# at byte <offset>" (times from /proc/uptime: 10 ms steps). A malformed word, blocks that do not fit the span
# (count x KiB > span x 1024), a span beyond the disk, or a failed read print "cowherd-guest: reads failed:
# <why>", and the marker is not written. When O_DIRECT is refused, the blocks are read through the page cache
# (each is read once) and "cowherd-guest: O_DIRECT refused, reading through the page cache" says so. Without the
# word nothing is read.
# With `cowherd.stay=1` on the kernel command line (the local fleet's story uses it), a guest that wrote its
# marker prints "cowherd-guest: staying up (cowherd.stay=1)" and keeps running until the ACPI power button
# (`virsh shutdown`, a graceful `cowherd vms stop`), then syncs and powers off the same way.
#
# Where things come from: the kernel package that the metapackage linux-image-amd64 depends on
# (`apt-get download`, cached in <state>/guest/cache; `apt-get update` only when apt has no lists), and
# /bin/busybox from busybox-static (scripts/install.sh installs it). Debian ships no modules.dep in the
# package (depmod runs at install time), so dependencies are read from each module's .modinfo `depends=`.
#
# Why vmlinux and not vmlinuz: Debian compresses the kernel with xz; under TCG the bzImage spends ~1-2 s
# decompressing itself. qemu boots an uncompressed ELF vmlinux through its PVH note (CONFIG_PVH=y) with no
# decompression and no real-mode setup. vmlinuz is kept beside it (COWHERD_GUEST_VMLINUZ) for comparison.
#
# State: ${COWHERD_STATE_DIR:-<repo>/.state}/guest/. A stamp records the kernel package, busybox and this
# script's hash: an unchanged kit is reused without touching apt (~0 s); editing this script rebuilds the
# initramfs from the cached .deb. Concurrent runs serialize on a lock file.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
COWHERD_TAG=guest-kernel

GUEST_DIR="$COWHERD_STATE_DIR/guest"
CACHE_DIR="$GUEST_DIR/cache"
STAMP="$GUEST_DIR/kit.stamp"
METAPACKAGE="${COWHERD_GUEST_KERNEL_METAPACKAGE:-linux-image-amd64}"
BUSYBOX=/bin/busybox
# The modules /init needs (button: the ACPI power button, which ends a cowherd.stay=1 guest; isofs: the
# clone's NoCloud seed disk, ISO 9660 with Joliet names); their
# dependencies are added and ordered below.
WANTED_MODULES=(virtio_pci virtio_blk button isofs)
# Byte offset of the marker block on /dev/vda (tests read the same offset).
MARKER_OFFSET=$((1024 * 1024))
MARKER_BLOCK=4096

rebuild=0
case "${1:-}" in
  "") ;;
  --rebuild) rebuild=1 ;;
  *)
    echo "usage: $0 [--rebuild]" >&2
    exit 2
    ;;
esac

# Progress goes to stderr: stdout is the KEY=VALUE result only.
note() { say "$@" >&2; }

print_result() {
  printf 'COWHERD_GUEST_KERNEL=%s\n' "$GUEST_DIR/vmlinux"
  printf 'COWHERD_GUEST_INITRD=%s\n' "$GUEST_DIR/initrd.gz"
  printf 'COWHERD_GUEST_VMLINUZ=%s\n' "$GUEST_DIR/vmlinuz"
  printf 'COWHERD_GUEST_VERSION=%s\n' "$(cat "$GUEST_DIR/version")"
}

# shellcheck disable=SC2016 # expanded by the guest's shell, not here
# The guest's /init. MARKER_OFFSET and MARKER_BLOCK are substituted at build time; modules/order lists the
# modules in load order.
INIT_SH='#!/bin/sh
export PATH=/bin
say() { echo "cowherd-guest: $*" >/dev/console 2>/dev/null || echo "cowherd-guest: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for module in $(cat /modules/order); do
  insmod "/modules/$module.ko" || say "insmod $module failed"
done
marker=
stay=
reads=
for word in $(cat /proc/cmdline); do
  case "$word" in
    marker=*) marker="${word#marker=}" ;;
    cowherd.stay=1) stay=1 ;;
    cowherd.reads=*) reads="${word#cowherd.reads=}" ;;
  esac
done
# now: milliseconds since boot into $now_ms (/proc/uptime, 10 ms steps), without a fork.
now() {
  read -r up rest </proc/uptime
  centis=${up#*.}
  centis=${centis#0}
  now_ms=$((${up%.*} * 1000 + centis * 10))
}
# read_blocks <count>x<KiB>@<span MiB>: the scattered reads of cowherd.reads= (see the script header).
read_blocks() {
  count=${1%%x*}
  rest=${1#*x}
  kib=${rest%%@*}
  span=${rest#*@}
  for value in "$count" "$kib" "$span"; do
    case "$value" in
      "" | *[!0-9]*)
        say "reads failed: cowherd.reads=$1 is not <count>x<KiB>@<span MiB>"
        return 1
        ;;
    esac
  done
  if [ "$count" -eq 0 ] || [ "$kib" -eq 0 ] || [ $((count * kib)) -gt $((span * 1024)) ]; then
    say "reads failed: cowherd.reads=$1: $count blocks of $kib KiB do not fit in $span MiB"
    return 1
  fi
  read -r sectors </sys/block/vda/size
  if [ $((span * 1048576)) -gt $((sectors * 512)) ]; then
    say "reads failed: cowherd.reads=$1 spans more than /dev/vda ($((sectors * 512)) bytes)"
    return 1
  fi
  spacing=$((span * 1024 / count))
  stride=$((count * 618 / 1000))
  [ "$stride" -ge 1 ] || stride=1
  while :; do
    a=$stride
    b=$count
    while [ "$b" -ne 0 ]; do
      c=$((a % b))
      a=$b
      b=$c
    done
    [ "$a" -eq 1 ] && break
    stride=$((stride + 1))
  done
  flags=skip_bytes,direct
  slowest=0
  slowest_at=0
  now
  start=$now_ms
  j=0
  while [ "$j" -lt "$count" ]; do
    offset=$((j * stride % count * spacing * 1024))
    before=$now_ms
    if ! dd if=/dev/vda of=/dev/null bs=$((kib * 1024)) count=1 skip="$offset" iflag="$flags" 2>/dev/null; then
      if [ "$flags" = skip_bytes ] || ! dd if=/dev/vda of=/dev/null bs=$((kib * 1024)) count=1 skip="$offset" iflag=skip_bytes 2>/dev/null; then
        say "reads failed: reading $kib KiB at byte $offset of /dev/vda failed"
        return 1
      fi
      flags=skip_bytes
      say "O_DIRECT refused, reading through the page cache"
    fi
    now
    if [ $((now_ms - before)) -gt "$slowest" ]; then
      slowest=$((now_ms - before))
      slowest_at=$offset
    fi
    j=$((j + 1))
  done
  say "read $count blocks $((count * kib * 1024)) bytes in $((now_ms - start)) ms"
  say "slowest read $slowest ms at byte $slowest_at"
}
tries=0
while [ ! -b /dev/vda ] && [ "$tries" -lt 1000 ]; do
  sleep 0.01
  tries=$((tries + 1))
done
instance=
# The NoCloud seed: found by its label, as cloud-init finds it (findfs, else the ISO 9660 label read raw).
seed=$(findfs LABEL=cidata 2>/dev/null)
if [ -z "$seed" ]; then
  for dev in /dev/vd[b-z]; do
    [ -b "$dev" ] || continue
    if [ "$(dd if="$dev" bs=1 skip=32808 count=6 2>/dev/null)" = cidata ]; then seed=$dev; break; fi
  done
fi
if [ -n "$seed" ]; then
  mkdir -p /cidata
  if mount -t iso9660 -o ro "$seed" /cidata; then
    value() { sed -n "s/^$1: *\"\{0,1\}\([^\"]*\)\"\{0,1\} *\$/\1/p" /cidata/meta-data | head -n 1; }
    name=$(value local-hostname)
    [ -n "$name" ] && hostname "$name"
    say "hostname $(hostname)"
    instance=$(value instance-id)
    say "instance-id $instance"
    say "seed files $(ls /cidata | tr "\n" " ")"
    [ -f /cidata/user-data ] && say "user-data sha256 $(sha256sum /cidata/user-data | cut -d" " -f1)"
    umount /cidata
  else
    say "cannot mount the cidata volume $seed"
  fi
fi
# The persistent data disk: the first virtio disk after vda that is not the seed. Its "file" is the text in
# block 0: written once (when empty), then only read, so a rebase that keeps the disk keeps the text.
for dev in /dev/vd[b-z]; do
  [ -b "$dev" ] && [ "$dev" != "$seed" ] || continue
  data=$(dd if="$dev" bs=512 count=1 2>/dev/null | tr -d "\000" | head -n 1)
  case "$data" in
    cowherd-data-*) ;;
    *)
      data="cowherd-data-${instance:-$marker}"
      printf "%s\n" "$data" | dd of="$dev" bs=512 count=1 conv=sync,fsync 2>/dev/null || say "writing the data disk $dev failed"
      ;;
  esac
  say "data $data"
  break
done
if [ -b /dev/vda ]; then
  # What the system disk held before this boot wrote: the marker the master of its image left there.
  say "system $(dd if=/dev/vda bs=@BLOCK@ skip=@SEEK@ count=1 2>/dev/null | tr -d "\000" | head -n 1)"
fi
if [ ! -b /dev/vda ]; then
  say "no /dev/vda after 10 s"
elif [ -z "$marker" ]; then
  say "no marker= on the kernel command line"
elif [ -n "$reads" ] && ! read_blocks "$reads"; then
  say "no marker: the reads of cowherd.reads= failed"
elif printf "cowherd-was-here-%s\n" "$marker" | dd of=/dev/vda bs=@BLOCK@ seek=@SEEK@ count=1 conv=sync,fsync 2>/dev/null; then
  sync
  say "marker written"
  if [ -n "$stay" ]; then
    # Up until the ACPI power button (virsh shutdown): its counter moves once the button driver is loaded.
    presses() { set -- $(cat /sys/firmware/acpi/interrupts/ff_pwr_btn 2>/dev/null); echo "${1:-0}"; }
    before=$(presses)
    say "staying up (cowherd.stay=1)"
    while [ "$(presses)" = "$before" ]; do sleep 1; done
    say "power button pressed"
  fi
else
  say "writing the marker failed"
fi
sync
poweroff -f
'

# kernel_package: the versioned image package the metapackage depends on, e.g. linux-image-6.1.0-56-amd64.
kernel_package() {
  local output
  if ! output="$(LC_ALL=C apt-cache depends "$METAPACKAGE" 2>/dev/null)" || ! grep -q 'Depends: linux-image-' <<<"$output"; then
    note "apt knows no $METAPACKAGE: apt-get update"
    apt-get -q -y -o DPkg::Lock::Timeout=120 update >&2 || note "apt-get update reported errors; trying anyway"
    output="$(LC_ALL=C apt-cache depends "$METAPACKAGE")"
  fi
  # "  Depends: linux-image-6.1.0-56-amd64" (the first alternative when there are several).
  local package
  package="$(sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ ]*\).*/\1/p' <<<"$output" | head -n 1)"
  [[ -n "$package" ]] || die "cannot find the kernel package that $METAPACKAGE depends on"
  printf '%s' "$package"
}

# download PACKAGE: the path of its .deb in the cache, downloaded if missing.
download() {
  local package="$1" deb
  mkdir -p "$CACHE_DIR"
  deb="$(find -H "$CACHE_DIR" -maxdepth 1 -name "${package}_*.deb" -print | sort | tail -n 1)"
  if [[ -z "$deb" ]]; then
    local start
    start="$(now_ms)"
    # Sandbox user root: the cache directory may not be readable by _apt.
    if ! (cd "$CACHE_DIR" && apt-get -q -o APT::Sandbox::User=root download "$package" >&2); then
      note "apt-get download $package failed: apt-get update and retry"
      apt-get -q -y -o DPkg::Lock::Timeout=120 update >&2 || true
      (cd "$CACHE_DIR" && apt-get -q -o APT::Sandbox::User=root download "$package" >&2) || die "apt-get download $package failed"
    fi
    deb="$(find -H "$CACHE_DIR" -maxdepth 1 -name "${package}_*.deb" -print | sort | tail -n 1)"
    [[ -n "$deb" ]] || die "apt-get download $package left no .deb in $CACHE_DIR"
    note "downloaded $(basename "$deb") ($(($(stat -c %s "$deb") / 1048576)) MiB) in $(elapsed "$start" "$(now_ms)")"
  fi
  printf '%s' "$deb"
}

# extract DEB DIR PATTERN...: the members matching the tar wildcards (./-prefixed; `*` matches `/` too) into DIR.
extract() {
  local deb="$1" dir="$2"
  shift 2
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" --wildcards "$@" 2>/dev/null || true
}

# module_depends KO: its .modinfo dependencies, one per line.
module_depends() {
  tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n 1 | tr ',' '\n' | sed '/^$/d'
}

build() {
  local package deb work version
  package="$(kernel_package)"
  deb="$(download "$package")"
  work="$(mktemp -d "$GUEST_DIR/build.XXXXXX")"
  # shellcheck disable=SC2064 # expand now
  trap "rm -rf '$work'" EXIT
  local tree="$work/tree" root="$work/initramfs"
  mkdir -p "$tree" "$root"

  # One pass over the package (each pass decompresses all ~400 MB of it, ~2 s) for the kernel, the module
  # lists, the wanted modules and the virtio core where their dependencies usually are; a dependency elsewhere
  # costs another pass below. `*` matches across slashes here.
  local first_pass=('./boot/vmlinuz-*' './lib/modules/*/modules.order' './lib/modules/*/modules.builtin' './lib/modules/*/kernel/drivers/virtio/*')
  local wanted
  for wanted in "${WANTED_MODULES[@]}"; do first_pass+=("./lib/modules/*/${wanted}.ko*"); done
  extract "$deb" "$tree" "${first_pass[@]}"
  local vmlinuz
  vmlinuz="$(find "$tree/boot" -name 'vmlinuz-*' -print | head -n 1)"
  [[ -n "$vmlinuz" ]] || die "no vmlinuz in $deb"
  version="${vmlinuz##*/vmlinuz-}"
  local moddir="$tree/lib/modules/$version"
  [[ -s "$moddir/modules.order" ]] || die "no modules.order in $deb"

  # Dependency closure, depth first, dependencies before dependents. Modules are fetched from the .deb as they
  # are needed (usually two passes: the wanted modules, then their dependencies).
  local -A path_of=() state=()
  local line name
  while IFS= read -r line; do
    name="${line##*/}"
    name="${name%%.ko*}"
    path_of[${name//-/_}]="$line"
  done <"$moddir/modules.order"
  local order=()
  fetch_modules() {
    local patterns=() module
    for module in "$@"; do
      [[ -n "${path_of[$module]:-}" ]] || continue
      [[ -e "$moddir/${path_of[$module]}" ]] || patterns+=("./lib/modules/$version/${path_of[$module]}")
    done
    ((${#patterns[@]} == 0)) || extract "$deb" "$tree" "${patterns[@]}"
  }
  visit() {
    local module="${1//-/_}" dependency ko
    case "${state[$module]:-}" in
      loaded) return ;;
      active) die "module dependency cycle at $module" ;;
    esac
    if [[ -z "${path_of[$module]:-}" ]]; then
      # Built into the kernel: nothing to load.
      grep -q "/${module}.ko" "$moddir/modules.builtin" 2>/dev/null || die "module $module is neither in modules.order nor built in"
      state[$module]=loaded
      return
    fi
    state[$module]=active
    ko="$moddir/${path_of[$module]}"
    [[ -e "$ko" ]] || fetch_modules "$module"
    [[ -e "$ko" ]] || die "$module (${path_of[$module]}) is not in $deb"
    local dependencies=()
    mapfile -t dependencies < <(module_depends "$ko")
    fetch_modules "${dependencies[@]}"
    for dependency in "${dependencies[@]}"; do visit "$dependency"; done
    state[$module]=loaded
    order+=("$module")
  }
  fetch_modules "${WANTED_MODULES[@]}"
  local module
  for module in "${WANTED_MODULES[@]}"; do visit "$module"; done

  # The initramfs: busybox with a link per applet, the modules (decompressed), /init.
  mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/modules"
  cp "$BUSYBOX" "$root/bin/busybox"
  local applet
  while IFS= read -r applet; do
    [[ "$applet" == busybox || -z "$applet" ]] || ln -s busybox "$root/bin/$applet"
  done < <("$BUSYBOX" --list)
  for module in "${order[@]}"; do
    local source="$moddir/${path_of[$module]}"
    case "$source" in
      *.ko.xz) xz -dc "$source" >"$root/modules/$module.ko" ;;
      *.ko.zst) zstd -q -dc "$source" >"$root/modules/$module.ko" ;;
      *.ko.gz) gzip -dc "$source" >"$root/modules/$module.ko" ;;
      *) cp "$source" "$root/modules/$module.ko" ;;
    esac
  done
  printf '%s\n' "${order[@]}" >"$root/modules/order"
  local init="${INIT_SH//@BLOCK@/$MARKER_BLOCK}"
  init="${init//@SEEK@/$((MARKER_OFFSET / MARKER_BLOCK))}"
  printf '%s' "$init" >"$root/init"
  chmod 0755 "$root/init"
  # The kernel's built-in initramfs already has /dev/console; as root, add it anyway (harmless duplicate).
  if [[ "$(id -u)" == 0 ]]; then mknod -m 0600 "$root/dev/console" c 5 1; fi
  (cd "$root" && find . -mindepth 1 -print | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n >"$work/initrd.gz"

  # vmlinux: the xz payload of the bzImage, decompressed (xz stops at the end of the stream and complains
  # about the trailing bytes; the ELF check below is what counts).
  local offset
  offset="$(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)"
  [[ -n "$offset" ]] || die "no xz stream in $vmlinuz (is the kernel compressed differently?)"
  tail -c "+$((offset + 1))" "$vmlinuz" | xz -dc 2>/dev/null >"$work/vmlinux" || true
  [[ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" == '177ELF' ]] || die "decompressing $vmlinuz did not give an ELF vmlinux"

  cp "$vmlinuz" "$work/vmlinuz"
  printf '%s\n' "$version" >"$work/version"
  local file
  for file in vmlinux vmlinuz initrd.gz version; do mv -f "$work/$file" "$GUEST_DIR/$file"; done
  printf '%s\n' "$(stamp_of "$(basename "$deb")")" >"$STAMP"
  note "built kernel $version ($(($(stat -c %s "$GUEST_DIR/vmlinux") / 1048576)) MiB vmlinux), initramfs $(($(stat -c %s "$GUEST_DIR/initrd.gz") / 1024)) KiB with ${order[*]}"
}

# stamp_of DEB_NAME: what the kit was built from.
stamp_of() {
  printf 'deb=%s script=%s busybox=%s' "$1" \
    "$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)" "$(sha256sum "$BUSYBOX" | cut -d' ' -f1)"
}

# up_to_date: the kit exists and was built by this script, from a .deb still in the cache, with this busybox.
up_to_date() {
  [[ -s "$STAMP" && -s "$GUEST_DIR/vmlinux" && -s "$GUEST_DIR/initrd.gz" && -s "$GUEST_DIR/version" ]] || return 1
  local recorded deb
  recorded="$(cat "$STAMP")"
  deb="${recorded#deb=}"
  deb="${deb%% *}"
  [[ -e "$CACHE_DIR/$deb" && "$recorded" == "$(stamp_of "$deb")" ]]
}

[[ -x "$BUSYBOX" ]] || die "$BUSYBOX is missing: apt-get install busybox-static (scripts/install.sh does)"
mkdir -p "$GUEST_DIR"
exec 9>"$GUEST_DIR/.lock"
flock 9
# Half-built kits of runs that were killed.
rm -rf "$GUEST_DIR"/build.*
if ((rebuild)) || ! up_to_date; then
  ((rebuild)) && rm -f "$STAMP"
  start="$(now_ms)"
  build
  note "guest kit ready in $(elapsed "$start" "$(now_ms)")"
fi
print_result
