/**
 * The three baselines of bench:distribution, each a {@link DistributionMethod}:
 * - http: every receiver fetches the image from an HTTP server on the origin at once (curl);
 * - deluge: the 2011 tool's stack, mktorrent (private, 4 MiB pieces) and one deluged per host, the torrent
 *   added with deluge-console;
 * - aria2: the same torrent with one aria2c per host.
 * Both torrent methods announce to bittorrent-tracker on the control host; receivers keep seeding until the
 * last one has its copy, the origin seeds throughout.
 */
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCommand, type Daemon } from '../services/common/platform/child-process.js';
import {
  CONTROL,
  ORIGIN,
  Stopwatch,
  receiverHosts,
  stopAll,
  transferTimeoutMs,
  waitForCopies,
  waitUntil,
  type BenchImage,
  type DistributionMethod,
} from './distribution-method.js';
import type { TestBed } from './testbed.js';

const REPOSITORY = fileURLToPath(new URL('..', import.meta.url));
const HTTP_PORT = 8080;
const TRACKER_PORT = 6969;
const BITTORRENT_PORT = 6881;
const DELUGE_DAEMON_PORT = 58846;
/** 2^22 = 4 MiB pieces. */
const PIECE_LENGTH_EXPONENT = 22;

/** Starts a Node script of this folder inside a host's namespace. */
function startNodeScript(bed: TestBed, host: string, script: string, args: readonly string[], onLine?: (line: string) => void): Promise<Daemon> {
  return bed.spawn(host, process.execPath, ['--import', 'tsx', join(REPOSITORY, 'bench', script), ...args], {
    cwd: REPOSITORY,
    readyPattern: /^listening /m,
    ...(onLine === undefined ? {} : { onLine }),
  });
}

/** HTTP fan-out: one Node HTTP server on the origin, one curl per receiver, all at once. */
export const httpFanOut: DistributionMethod = async (bed, image) => {
  const receivers = receiverHosts(bed);
  const server = await startNodeScript(bed, ORIGIN, 'distribution-http-origin.ts', [bed.address(ORIGIN), String(HTTP_PORT), image.path]);
  try {
    const url = `http://${bed.address(ORIGIN)}:${HTTP_PORT}/${basename(image.path)}`;
    const copies = receivers.map((receiver) => join(bed.directory(receiver), basename(image.path)));
    const stopwatch = new Stopwatch(bed);
    await stopwatch.start();
    await Promise.all(
      receivers.map(async (receiver, index) => {
        await bed.exec(receiver, 'curl', ['--fail', '--silent', '--show-error', '--output', copies[index]!, url], { timeoutMs: transferTimeoutMs(bed, image) });
        stopwatch.finished(receiver);
      }),
    );
    return await stopwatch.result(receivers, copies, image);
  } finally {
    await server.stop();
  }
};

/** One announce the tracker saw. */
interface Announce {
  readonly event: string;
  readonly ip: string;
  readonly port: number;
  readonly left: number;
}

/** The tracker on the control host and a private torrent of the image (mktorrent, 4 MiB pieces) announcing to it. */
async function startSwarm(bed: TestBed, image: BenchImage): Promise<{ tracker: Daemon; torrent: string; announces: Announce[] }> {
  const announces: Announce[] = [];
  const tracker = await startNodeScript(bed, CONTROL, 'distribution-tracker.ts', [bed.address(CONTROL), String(TRACKER_PORT)], (line) => {
    if (line.startsWith('{')) announces.push(JSON.parse(line) as Announce);
  });
  const torrent = join(bed.directory(CONTROL), `${basename(image.path)}.torrent`);
  await runCommand(
    'mktorrent',
    [
      '--private',
      `--piece-length=${PIECE_LENGTH_EXPONENT}`,
      `--announce=http://${bed.address(CONTROL)}:${TRACKER_PORT}/announce`,
      `--output=${torrent}`,
      image.path,
    ],
    { timeoutMs: 120_000 },
  );
  return { tracker, torrent, announces };
}

/** Resolves once the origin has announced itself to the tracker as a seed (it checked its copy and listens). */
function originSeeding(bed: TestBed, announces: readonly Announce[]): Promise<void> {
  const origin = bed.address(ORIGIN);
  return waitUntil('the origin to announce as a seed', () => announces.some((announce) => announce.ip === origin && announce.left === 0), 120_000);
}

/**
 * deluged's core.conf (deluge's config format: a version header object, then the settings), written before the
 * first start: no DHT, UPnP, NAT-PMP, local service discovery or peer exchange, one fixed listen port on the
 * host's address, no release check. Everything else keeps deluge's defaults (4 upload slots, encryption
 * enabled, sparse files) as the 2011 tool had them.
 */
function delugeCoreConfig(address: string, downloadLocation: string): string {
  const settings = {
    dht: false,
    upnp: false,
    natpmp: false,
    lsd: false,
    utpex: false,
    new_release_check: false,
    send_info: false,
    allow_remote: false,
    random_port: false,
    listen_ports: [BITTORRENT_PORT, BITTORRENT_PORT],
    listen_interface: address,
    outgoing_interface: '',
    download_location: downloadLocation,
    enabled_plugins: [],
  };
  return `${JSON.stringify({ file: 1, format: 1 }, null, 2)}${JSON.stringify(settings, null, 2)}`;
}

const DELUGE_USER = 'bench';
const DELUGE_PASSWORD = 'bench';

/** Starts a deluged in the host's namespace with its own config directory; resolves once it takes commands. */
async function startDeluged(bed: TestBed, host: string, downloadLocation: string): Promise<Daemon> {
  const config = join(bed.directory(host), 'deluge-config');
  await mkdir(config, { recursive: true });
  await writeFile(join(config, 'core.conf'), delugeCoreConfig(bed.address(host), downloadLocation));
  await writeFile(join(config, 'auth'), `${DELUGE_USER}:${DELUGE_PASSWORD}:10\n`, { mode: 0o600 });
  const daemon = await bed.spawn(
    host,
    'deluged',
    ['--do-not-daemonize', '--config', config, '--ui-interface', '127.0.0.1', '--port', String(DELUGE_DAEMON_PORT), '--loglevel', 'info'],
    {
      readyPattern: /Factory \(TLS\) starting on \d+/,
      readyTimeoutMs: 60_000,
    },
  );
  return daemon;
}

/** A path as one word of a deluge-console command line (which deluge splits like a POSIX shell). */
function quote(path: string): string {
  return `'${path.replaceAll("'", `'\\''`)}'`;
}

/** Runs one deluge-console command against the host's deluged. */
function delugeConsole(bed: TestBed, host: string, command: string): Promise<string> {
  return bed.exec(
    host,
    'deluge-console',
    [
      '--config',
      join(bed.directory(host), 'deluge-console'),
      '--daemon',
      '127.0.0.1',
      '--port',
      String(DELUGE_DAEMON_PORT),
      '--username',
      DELUGE_USER,
      '--password',
      DELUGE_PASSWORD,
      command,
    ],
    { timeoutMs: 60_000 },
  );
}

/** The 2011 tool's stack: mktorrent + deluged on every host, torrents added with deluge-console. */
export const deluge: DistributionMethod = async (bed, image) => {
  const receivers = receiverHosts(bed);
  const daemons: Daemon[] = [];
  try {
    const swarm = await startSwarm(bed, image);
    daemons.push(swarm.tracker);
    const started = await Promise.all(
      [ORIGIN, ...receivers].map((host) => startDeluged(bed, host, host === ORIGIN ? dirname(image.path) : join(bed.directory(host), 'incomplete'))),
    );
    daemons.push(...started);
    // The origin checks its copy against the torrent, then announces with nothing left.
    await delugeConsole(bed, ORIGIN, `add --path ${quote(dirname(image.path))} ${quote(swarm.torrent)}`);
    await originSeeding(bed, swarm.announces);
    // A receiver's copy is complete when deluge moves it to done/ (libtorrent renames it once every piece checked).
    const copies = receivers.map((receiver) => join(bed.directory(receiver), 'done', basename(image.path)));
    const stopwatch = new Stopwatch(bed);
    await stopwatch.start();
    await Promise.all(
      receivers.map((receiver) =>
        delugeConsole(
          bed,
          receiver,
          `add --path ${quote(join(bed.directory(receiver), 'incomplete'))} --move-path ${quote(join(bed.directory(receiver), 'done'))} ${quote(swarm.torrent)}`,
        ),
      ),
    );
    await waitForCopies(bed, image, receivers, copies, stopwatch, daemons);
    return await stopwatch.result(receivers, copies, image);
  } finally {
    await stopAll(daemons);
  }
};

/** aria2c on every host with the same kind of torrent; completion is signalled by aria2's download-complete hook. */
export const aria2: DistributionMethod = async (bed, image) => {
  const receivers = receiverHosts(bed);
  const daemons: Daemon[] = [];
  try {
    const swarm = await startSwarm(bed, image);
    daemons.push(swarm.tracker);
    // aria2 runs it as `hook GID FILE-COUNT FIRST-FILE-PATH` when the download completes (before seeding on).
    const hook = join(bed.directory(CONTROL), 'aria2-complete.sh');
    await writeFile(hook, '#!/bin/sh\n: > "$3.complete"\n');
    await chmod(hook, 0o755);
    const aria2c = (host: string, directory: string, extra: readonly string[]): Promise<Daemon> =>
      bed.spawn(host, 'aria2c', [
        `--dir=${directory}`,
        '--enable-dht=false',
        '--enable-dht6=false',
        '--bt-enable-lpd=false',
        '--enable-peer-exchange=false',
        '--seed-ratio=0.0',
        `--listen-port=${BITTORRENT_PORT}`,
        '--disable-ipv6=true',
        // prealloc (the default) writes zeros over the whole file first; falloc reserves it at once on ext4.
        '--file-allocation=falloc',
        '--summary-interval=0',
        '--console-log-level=warn',
        ...extra,
        swarm.torrent,
      ]);
    daemons.push(await aria2c(ORIGIN, dirname(image.path), ['--check-integrity=true']));
    await originSeeding(bed, swarm.announces);
    const copies = receivers.map((receiver) => join(bed.directory(receiver), basename(image.path)));
    const stopwatch = new Stopwatch(bed);
    await stopwatch.start();
    for (const receiver of receivers) daemons.push(await aria2c(receiver, bed.directory(receiver), [`--on-bt-download-complete=${hook}`]));
    await waitForCopies(bed, image, receivers, copies, stopwatch, daemons, (copy) => `${copy}.complete`);
    return await stopwatch.result(receivers, copies, image);
  } finally {
    await stopAll(daemons);
  }
};
