/**
 * bench:boot's image: a raw disk of random data (nothing compresses or deduplicates it) with a direct-kernel-boot
 * template that boots the guest kit's vmlinuz and initramfs (scripts/guest-kernel.sh) with `cowherd.reads=` on
 * its kernel command line, so that every clone's boot reads a fixed scattered set of blocks of the disk before
 * it writes its marker. Published from a powered-off domain on the origin, as an operator would.
 *
 * Also: which of the image's pieces a boot needs (the guest's reads mapped through the published qcow2 to the
 * torrent's pieces, and the boot files and template, which a streamed clone needs whole before it starts), the
 * lower bound of what a streamed boot must fetch before its marker.
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { copyFile, mkdir, open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ImageFile_Role, type Image, type ImageFile } from '../services/gen/cowherd/inventory/v1/resources.js';
import { guestDomainXml } from '../services/launcher/story.js';
import { guestReadOffsets, guestReadsWord, MARKER_BLOCK, MARKER_OFFSET, type GuestKit, type GuestReads } from '../test/harness/guest.js';
import type { BenchFleet } from './cowherd-fleet.js';
import type { TestBed } from './testbed.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
/** Enough for Debian's kernel and the busybox initramfs (the boot tests use the same). */
export const GUEST_MEMORY_MIB = 192;

/** The published image. */
export interface BootImage {
  readonly imageId: string;
  readonly record: Image;
  /** The disk (vda) as published: qcow2. */
  readonly disk: ImageFile;
  /** Every file's bytes: what cowherd moves to each host (the qcow2 disk, the boot files, the template). */
  readonly bytes: number;
  readonly reads: GuestReads;
  /** The master's (and so every clone's) kernel command line. */
  readonly commandLine: string;
}

/**
 * Writes the master's files under `host`'s image directory (`vms/`): a raw disk of `mib` MiB of random data
 * (the marker block zeroed, so the guest's "system" line stays readable), the kit's vmlinuz and initramfs; defines
 * the domain and publishes it as `images/<imageId>`.
 */
export async function publishBootImage(
  bed: TestBed,
  fleet: BenchFleet,
  kit: GuestKit,
  options: { host: string; imageId: string; mib: number; reads: GuestReads },
): Promise<BootImage> {
  const directory = join(bed.directory(options.host), 'images-root', 'vms');
  await mkdir(directory, { recursive: true });
  const domain = `${options.imageId}-master`;
  const disk = join(directory, `${domain}.img`);
  await writeRandomDisk(disk, options.mib);
  const kernel = join(directory, `${domain}-vmlinuz`);
  const initrd = join(directory, `${domain}-initrd.gz`);
  await copyFile(kit.vmlinuz, kernel);
  await copyFile(kit.initrd, initrd);
  // no_timer_check: under TCG on a loaded machine (six guests on two cores) the kernel's IO-APIC timer check can fail
  // and panic ("IO-APIC + timer doesn't work"), seen here once in a boot test.
  const commandLine = `console=ttyS0 quiet panic=-1 no_timer_check marker=${options.imageId} ${guestReadsWord(options.reads)}`;
  // guestDomainXml describes a qcow2 disk; the master's is raw (export turns it into qcow2 either way).
  const xml = guestDomainXml({
    name: domain,
    title: 'bench:boot master',
    memoryMib: GUEST_MEMORY_MIB,
    kernel,
    initrd,
    commandLine,
    disk,
    console: join(directory, `${domain}.console.log`),
  }).replace(`<driver name='qemu' type='qcow2'/>`, `<driver name='qemu' type='raw'/>`);
  const xmlFile = join(directory, `${domain}.xml`);
  await writeFile(xmlFile, xml);
  const record = await fleet.publishDomain({ host: options.host, domain, xmlFile, imageId: options.imageId, description: 'bench:boot' });
  const vda = record.files.find((file) => file.targetDevice === 'vda');
  if (vda === undefined) throw new Error(`images/${options.imageId} has no vda: ${JSON.stringify(record.files.map((file) => file.path))}`);
  return {
    imageId: options.imageId,
    record,
    disk: vda,
    bytes: record.files.reduce((sum, file) => sum + Number(file.sizeBytes), 0),
    reads: options.reads,
    commandLine,
  };
}

async function writeRandomDisk(path: string, mib: number): Promise<void> {
  const chunk = Buffer.alloc(16 * MiB);
  const file = await open(path, 'w');
  try {
    for (let offset = 0; offset < mib * MiB; offset += chunk.length) {
      const part = chunk.subarray(0, Math.min(chunk.length, mib * MiB - offset));
      randomFillSync(part);
      // The marker block: zeros, as a fresh disk has them.
      const from = Math.max(MARKER_OFFSET, offset);
      const to = Math.min(MARKER_OFFSET + MARKER_BLOCK, offset + part.length);
      if (from < to) part.fill(0, from - offset, to - offset);
      await file.write(part);
    }
    await file.sync();
  } finally {
    await file.close();
  }
}

/** What a boot needs of the image, in pieces of its torrent. */
export interface BootPieces {
  readonly pieceBytes: number;
  readonly pieceCount: number;
  /** Pieces that hold the data of the guest's cowherd.reads= blocks (qcow2 metadata not counted). */
  readonly readPieces: number;
  /** Pieces of the boot files and the template (a streamed clone starts only once they are whole). */
  readonly bootFilePieces: number;
  /** Both sets together (a piece in both counts once). */
  readonly totalPieces: number;
}

/**
 * Maps the guest's reads through `replicaDisk` (the published qcow2, `qemu-img map`) to file offsets and those to
 * the torrent's pieces (files in Image.files order, as the torrent has them).
 */
export async function bootPieces(image: BootImage, replicaDisk: string): Promise<BootPieces> {
  const torrent = image.record.torrent;
  if (torrent === undefined) throw new Error(`images/${image.imageId} has no torrent`);
  const pieceBytes = Number(torrent.pieceLengthBytes);
  const fileOffsets = new Map<string, number>();
  let offset = 0;
  for (const file of image.record.files) {
    fileOffsets.set(file.path, offset);
    offset += Number(file.sizeBytes);
  }
  const piecesOf = (from: number, length: number, into: Set<number>): void => {
    for (let piece = Math.floor(from / pieceBytes); piece <= Math.floor((from + length - 1) / pieceBytes); piece++) into.add(piece);
  };
  const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', '-f', 'qcow2', replicaDisk], { maxBuffer: 256 * MiB });
  const extents = (JSON.parse(stdout) as Array<{ start: number; length: number; data: boolean; offset?: number }>).filter(
    (extent) => extent.data && extent.offset !== undefined,
  );
  const diskOffset = fileOffsets.get(image.disk.path)!;
  const reads = new Set<number>();
  const blockBytes = image.reads.blockKib * 1024;
  for (const start of guestReadOffsets(image.reads)) {
    const end = start + blockBytes;
    for (const extent of extents) {
      const from = Math.max(start, extent.start);
      const to = Math.min(end, extent.start + extent.length);
      if (from < to) piecesOf(diskOffset + extent.offset! + (from - extent.start), to - from, reads);
    }
  }
  const boot = new Set<number>();
  for (const file of image.record.files) if (file.role !== ImageFile_Role.ROLE_DISK) piecesOf(fileOffsets.get(file.path)!, Number(file.sizeBytes), boot);
  return {
    pieceBytes,
    pieceCount: torrent.pieceCount,
    readPieces: reads.size,
    bootFilePieces: boot.size,
    totalPieces: new Set([...reads, ...boot]).size,
  };
}
