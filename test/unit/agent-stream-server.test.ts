// The host's streaming server (services/agent/streaming/stream-server.ts) with qemu's own NBD client: a read is
// served only from pieces whose SHA-1 matches the torrent's (a piece whose bytes are wrong on disk waits, it is never
// served), the range a guest waits for is told to the agent (`want`) and the read completes once the bytes are right
// and the agent says `ready`; the path follows the replica from its partial directory to its own; a read that waits
// longer than the stall limit fails; the first minute's reads come back as a profile; an idle server exits.
//
//   node --import tsx --test test/unit/agent-stream-server.test.ts
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, open, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { runStreamServer, streamServerPaths, StreamServerClient, type ExportSpec, type RunningStreamServer } from '../../services/agent/streaming/index.js';

const KiB = 1024;
const PIECE = 256 * KiB;
/** The torrent: a small template, then the disk (pieces run across the two files). */
const TEMPLATE = Buffer.alloc(10 * KiB, 't');
const DISK_PIECES = 12;
/** Piece i of the torrent is filled with byte i + 1, so qemu-io can check what it read with -P. */
const torrent = Buffer.concat(
  Array.from({ length: Math.ceil((TEMPLATE.length + DISK_PIECES * PIECE) / PIECE) }, (_, index) => Buffer.alloc(PIECE, index + 1)),
).subarray(0, TEMPLATE.length + DISK_PIECES * PIECE);
TEMPLATE.copy(torrent, 0);
const disk = torrent.subarray(TEMPLATE.length);
const hashes = Buffer.concat(
  Array.from({ length: Math.ceil(torrent.length / PIECE) }, (_, index) =>
    createHash('sha1')
      .update(torrent.subarray(index * PIECE, (index + 1) * PIECE))
      .digest(),
  ),
);

let root: string;
let partial: string;
let final: string;
let server: RunningStreamServer;
let client: StreamServerClient;
const wants: Array<{ name: string; offset: number; length: number }> = [];
const profiles: Array<{ name: string; connection: number; reads: ReadonlyArray<readonly [number, number]> }> = [];

function spec(name: string): ExportSpec {
  return {
    name,
    directories: [partial, final],
    files: [
      { path: 'domain-template.xml', length: TEMPLATE.length },
      { path: 'disk.raw', length: disk.length },
    ],
    file: 'disk.raw',
    pieceLength: PIECE,
    pieceHashes: hashes.toString('base64'),
  };
}

/** qemu-io on an export, read-only: resolves with its output and exit code (it exits 0 even when a read fails). */
function qemuIo(name: string, command: string): { done: Promise<{ output: string; code: number | null }>; finished: () => boolean } {
  const uri = `nbd+unix:///${name}?socket=${streamServerPaths(path.join(root, '.streaming')).nbdSocket}`;
  const child = spawn('qemu-io', ['-r', '-f', 'raw', '-c', command, uri], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  let ended = false;
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const done = new Promise<{ output: string; code: number | null }>((resolve) =>
    child.once('close', (code) => {
      ended = true;
      resolve({ output, code });
    }),
  );
  return { done, finished: () => ended };
}

/** The byte of disk offset `offset` (its torrent piece's fill). */
const fillAt = (offset: number): number => Math.floor((TEMPLATE.length + offset) / PIECE) + 1;

describe('the streaming server', () => {
  before(async () => {
    root = await mkdtemp(path.join(tmpdir(), 'cowherd-stream-server-'));
    partial = path.join(root, 'images', '.img.partial');
    final = path.join(root, 'images', 'img');
    await mkdir(partial, { recursive: true });
    await writeFile(path.join(partial, 'domain-template.xml'), TEMPLATE);
    // The disk "arriving": every piece but the torrent's piece 5 in place; piece 5 holds zeros (not verified yet).
    const arriving = Buffer.from(disk);
    arriving.fill(0, 5 * PIECE - TEMPLATE.length, 6 * PIECE - TEMPLATE.length);
    await writeFile(path.join(partial, 'disk.raw'), arriving);
    server = await runStreamServer({ directory: path.join(root, '.streaming'), idleExitMs: 60_000, maxStallMs: 20_000 });
    client = new StreamServerClient({
      directory: path.join(root, '.streaming'),
      onWant: (name, offset, length) => wants.push({ name, offset, length }),
      onReads: (name, connection, reads) => profiles.push({ name, connection, reads }),
    });
    await client.export(spec('img.disk.raw'));
  });
  after(async () => {
    client?.close();
    await server?.close();
    await rm(root, { recursive: true, force: true });
  });

  it('serves verified pieces at once, across the file boundary of a piece', async () => {
    const offset = 0;
    const { done } = qemuIo('img.disk.raw', `read -P ${fillAt(offset)} ${offset} ${PIECE - TEMPLATE.length}`);
    const { output } = await done;
    assert.match(output, /read \d+\/\d+ bytes/, output);
    assert.doesNotMatch(output, /Pattern verification failed|error/i, output);
  });

  it('holds a read of a piece whose bytes do not match its hash, tells the agent, and serves it once right', async () => {
    const offset = 5 * PIECE - TEMPLATE.length + 4 * KiB;
    const read = qemuIo('img.disk.raw', `read -P ${fillAt(offset)} ${offset} 4096`);
    await new Promise((resolve) => setTimeout(resolve, 1200));
    assert.equal(read.finished(), false, 'the read waits: zeros on disk are not the piece');
    assert.ok(
      wants.some((want) => want.name === 'img.disk.raw' && want.offset <= offset && offset < want.offset + want.length),
      `the agent was asked for the range: ${JSON.stringify(wants)}`,
    );
    // The piece arrives (as webtorrent writes a verified piece) and the agent says so.
    const handle = await open(path.join(partial, 'disk.raw'), 'r+');
    await handle.write(disk, 5 * PIECE - TEMPLATE.length, PIECE, 5 * PIECE - TEMPLATE.length);
    await handle.close();
    client.ready();
    const { output } = await read.done;
    assert.match(output, /read 4096\/4096 bytes/, output);
    assert.doesNotMatch(output, /Pattern verification failed/, output);
  });

  it('follows the replica to its own directory when the fetch completes', async () => {
    await rename(partial, final);
    const offset = 9 * PIECE;
    const { output } = await qemuIo('img.disk.raw', `read -P ${fillAt(offset)} ${offset} 65536`).done;
    assert.match(output, /read 65536\/65536 bytes/, output);
    const status = await client.status();
    assert.equal(status?.exports.find((entry) => entry.name === 'img.disk.raw')?.path, path.join(final, 'disk.raw'));
  });

  it('fails a read that waits longer than the stall limit, and never serves unverified bytes', async () => {
    const stalled = await runStreamServer({ directory: path.join(root, '.stalled'), idleExitMs: 60_000, maxStallMs: 800 });
    const other = new StreamServerClient({ directory: path.join(root, '.stalled'), onWant: () => undefined });
    try {
      const missing = path.join(root, 'missing');
      await mkdir(missing, { recursive: true });
      await writeFile(path.join(missing, 'disk.raw'), Buffer.alloc(disk.length));
      await other.export({ ...spec('gone.disk.raw'), directories: [missing] });
      const uri = `nbd+unix:///gone.disk.raw?socket=${streamServerPaths(path.join(root, '.stalled')).nbdSocket}`;
      const child = spawn('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4096', uri]);
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      await new Promise((resolve) => child.once('close', resolve));
      assert.match(output, /Input\/output error/, output);
      const status = await other.status();
      assert.equal(status?.statistics.failedReads, 1);
    } finally {
      other.close();
      await stalled.close();
    }
  });

  it('sends the reads of each connection’s first minute, in order, as profiles', async () => {
    await new Promise((resolve) => setTimeout(resolve, 2500));
    const mine = profiles.filter((profile) => profile.name === 'img.disk.raw');
    // One qemu-io process (one connection) per read above: three connections, one read each, in the order served.
    const connections = [...new Set(mine.map((profile) => profile.connection))];
    assert.equal(connections.length, 3, JSON.stringify(profiles));
    assert.deepEqual(
      connections.map((connection) => mine.filter((profile) => profile.connection === connection).flatMap((profile) => profile.reads)),
      [[[0, PIECE - TEMPLATE.length]], [[5 * PIECE - TEMPLATE.length + 4 * KiB, 4096]], [[9 * PIECE, 65536]]],
    );
  });

  it('exits by itself once it has had no agent and no guest for its idle time', async () => {
    const idle = await runStreamServer({ directory: path.join(root, '.idle'), idleExitMs: 300 });
    const started = performance.now();
    await idle.stopped;
    assert.ok(performance.now() - started < 5000);
  });
});
