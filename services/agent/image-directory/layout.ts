/**
 * The image directory's layout (COWHERD_IMAGE_DIR): every path under it is built here, so a reader finds the
 * whole tree in one place and no module guesses another's names.
 *
 *   images/<id>/                          a replica (its files' generation 1): disks, boot files, domain-template.xml
 *   images/<id>.generation-<n>/           generation n of a replica repaired while domains used the old files
 *   images/.<id>.partial/                 a replica while it is fetched (`.<id>.generation-<n>.partial` likewise)
 *   images/.<id>.replica.json             the swarm's state file of a replica
 *   images/.<id>.partial-<random>/        an export's work directory, renamed to images/<id>/ when complete
 *   clones/<domain>/                      a clone: one child per disk (<target>.qcow2, .vhd, or .raw for a reflink copy
 *                                         of a raw base), domain.xml, NVRAM, logs,
 *                                         cidata.iso (its NoCloud seed disk, when it was made with a guest configuration),
 *                                         data.qcow2 / data.vhd (its persistent data disk, with data_disk_bytes),
 *                                         .<target>.qcow2.rebase / .previous (a rebase's overlays during the switch)
 *   clones/.prototype-<uuid>-<target>.qcow2   an overlay made once per batch and copied for each clone
 *   event-outbox/                         events waiting for JetStream (the default outbox)
 *   .streaming/                           the streaming server's sockets (nbd.sock for qemu, control.sock for the agent),
 *                                         its pid file and log: replicas still arriving served to streaming clones
 *   import/                               disk files an admin puts there for ImportImage (the default COWHERD_IMPORT_DIR)
 *
 * `<id>` is a version's storage key (`debian-12`, `debian-12_v3`: resource-names.ts IMAGE_KEY). Keys have no
 * dots, so no key's names can be mistaken for another's (`x_v2` is never a generation of `x`: generations
 * are `.generation-<n>`).
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve } from 'node:path';

/** The name of the domain XML template in a replica directory. */
export const TEMPLATE_FILE = 'domain-template.xml';

const STATE_SUFFIX = '.replica.json';
const GENERATION_SUFFIX = /^\.generation-([1-9][0-9]{0,8})$/;

/** `<root>/images`: replicas, their partial and work directories and state files. */
export function imagesDirectory(root: string): string {
  return join(root, 'images');
}

/** `<root>/clones`: one directory per clone. */
export function clonesDirectory(root: string): string {
  return join(root, 'clones');
}

/** `<root>/event-outbox`: where the agent's events wait by default. */
export function eventOutboxDirectory(root: string): string {
  return join(root, 'event-outbox');
}

/** `<root>/import`: the default directory ImportImage reads local files from. */
export function importDirectory(root: string): string {
  return join(root, 'import');
}

/** `<root>/.streaming`: the host's streaming server (streaming/stream-server.ts): sockets, pid file, log. */
export function streamingDirectory(root: string): string {
  return join(root, '.streaming');
}

/** The NBD socket qemu reads streamed bases from. */
export function streamingNbdSocket(root: string): string {
  return join(streamingDirectory(root), 'nbd.sock');
}

/**
 * The NBD export of file `file` of the replica with storage key `key`: `<key>.<file>` (keys have no dots, so the
 * first dot separates them; file names are single segments of `[A-Za-z0-9._-]`).
 */
export function streamExportName(key: string, file: string): string {
  return `${key}.${file}`;
}

/** The storage key and file of an export name made by {@link streamExportName}; undefined for anything else. */
export function streamExportOf(name: string): { key: string; file: string } | undefined {
  const dot = name.indexOf('.');
  if (dot <= 0 || dot === name.length - 1) return undefined;
  return { key: name.slice(0, dot), file: name.slice(dot + 1) };
}

/** The backing URI of a streamed base in a clone's overlay: `nbd+unix:///<export>?socket=<root>/.streaming/nbd.sock`. */
export function streamBackingUri(root: string, key: string, file: string): string {
  return `nbd+unix:///${streamExportName(key, file)}?socket=${streamingNbdSocket(root)}`;
}

/**
 * What a backing file name of {@link streamBackingUri}'s form stands for: the image directory its socket is
 * in, the replica's storage key and file, and the file's final path once the replica is complete
 * (`images/<key>/<file>`). Undefined for anything else (a path, another URI).
 */
export function parseStreamBackingUri(uri: string): { root: string; key: string; file: string; replicaPath: string } | undefined {
  const match = /^nbd\+unix:\/\/\/([^?/]+)\?socket=(\/[^&]+)$/.exec(uri);
  if (!match) return undefined;
  const exported = streamExportOf(match[1]!);
  const socket = resolve(match[2]!);
  if (!exported || basename(socket) !== 'nbd.sock' || basename(dirname(socket)) !== '.streaming') return undefined;
  const root = dirname(dirname(socket));
  return { root, ...exported, replicaPath: replicaFile(replicaDirectory(root, exported.key), exported.file) };
}

/**
 * `<root>/.define`: where the domain XML handed to `virsh define` is written (a directory per call, 0700, removed
 * after it). In the image directory rather than the system's temp directory so that the agent can empty it
 * when it starts: a process killed in the middle of a define leaves its files there.
 */
export function defineWorkDirectory(root: string): string {
  return join(root, '.define');
}

/**
 * Creates the image directory (0755) and its images/ and clones/ folders when missing, and an empty
 * {@link defineWorkDirectory} (0700). Called once, when the agent starts, before anything is defined.
 */
export async function prepareImageDirectory(root: string): Promise<void> {
  for (const folder of [root, imagesDirectory(root), clonesDirectory(root)]) await mkdir(folder, { recursive: true, mode: 0o755 });
  await rm(defineWorkDirectory(root), { recursive: true, force: true });
  await mkdir(defineWorkDirectory(root), { mode: 0o700 });
}

/** True when `path` is below `root` (lexically; not `root` itself). */
export function isInsideImageDirectory(root: string, path: string): boolean {
  const relation = relative(resolve(root), resolve(path));
  return relation !== '' && !relation.startsWith('..') && !isAbsolute(relation);
}

// ---------------------------------------------------------------------------------------------------------
// Replicas

function generationName(id: string, generation: number): string {
  return generation === 1 ? id : `${id}.generation-${generation}`;
}

/** The directory of a replica's files: `images/<id>` (generation 1) or `images/<id>.generation-<n>`. */
export function replicaDirectory(root: string, id: string, generation = 1): string {
  return join(imagesDirectory(root), generationName(id, generation));
}

/** Where a replica generation is fetched: `images/.<id>.partial` or `images/.<id>.generation-<n>.partial`. */
export function replicaPartialDirectory(root: string, id: string, generation = 1): string {
  return partialDirectoryOf(replicaDirectory(root, id, generation));
}

/** The partial directory beside a replica directory: its sibling `.<name>.partial`. */
export function partialDirectoryOf(replicaDirectoryPath: string): string {
  return join(dirname(replicaDirectoryPath), `.${basename(replicaDirectoryPath)}.partial`);
}

/** The generation a replica directory's name stands for (`<id>` is 1, `<id>.generation-<n>` is n); undefined for other names. */
export function replicaGenerationOf(id: string, directoryName: string): number | undefined {
  if (directoryName === id) return 1;
  if (!directoryName.startsWith(id)) return undefined;
  const match = GENERATION_SUFFIX.exec(directoryName.slice(id.length));
  return match ? Number(match[1]) : undefined;
}

/** Every generation directory of a replica that exists (none when images/ is missing). */
export async function replicaGenerationDirectories(root: string, id: string): Promise<string[]> {
  const entries = await readdir(imagesDirectory(root)).catch(() => [] as string[]);
  return entries.filter((entry) => replicaGenerationOf(id, entry) !== undefined).map((entry) => join(imagesDirectory(root), entry));
}

/** A file of a replica, of its partial directory or of an export's work directory (`name` is one of its relative paths). */
export function replicaFile(directory: string, name: string): string {
  return join(directory, name);
}

/** The domain XML template of a replica directory. */
export function templateFile(directory: string): string {
  return replicaFile(directory, TEMPLATE_FILE);
}

/** The swarm's state file of a replica: `images/.<id>.replica.json`. */
export function replicaStateFile(root: string, id: string): string {
  return join(imagesDirectory(root), `.${id}${STATE_SUFFIX}`);
}

/** The replica id a state file's name stands for (unchecked), or undefined when the name is not a state file's. */
export function replicaStateFileId(fileName: string): string | undefined {
  return fileName.startsWith('.') && fileName.endsWith(STATE_SUFFIX) ? fileName.slice(1, -STATE_SUFFIX.length) : undefined;
}

// ---------------------------------------------------------------------------------------------------------
// Exports

function exportWorkPrefix(id: string): string {
  return `.${id}.partial-`;
}

/** One key per image id for the exports of this image directory (`images/.<id>.partial-`, resolved). */
export function exportLockKey(root: string, id: string): string {
  return join(resolve(imagesDirectory(root)), exportWorkPrefix(id));
}

/** An export's work directory: `images/.<id>.partial-<unique>`. */
export function exportWorkDirectory(root: string, id: string, unique: string): string {
  return join(imagesDirectory(root), `${exportWorkPrefix(id)}${unique}`);
}

/** The work directories exports of `id` left in images/ (a crash's leftovers when none runs). */
export async function exportWorkDirectories(root: string, id: string): Promise<string[]> {
  const entries = await readdir(imagesDirectory(root));
  return entries.filter((entry) => entry.startsWith(exportWorkPrefix(id))).map((entry) => join(imagesDirectory(root), entry));
}

// ---------------------------------------------------------------------------------------------------------
// Clones

/** A clone's own directory: `clones/<domain>`. */
export function cloneDirectory(root: string, domainName: string): string {
  return join(clonesDirectory(root), domainName);
}

/**
 * A clone's child of the template disk `target`: `<clone dir>/<target>.qcow2` (KVM), `.vhd` (Xen), or `.raw` (a
 * reflink copy of a raw base; a reflink copy of a qcow2 base is `.qcow2`).
 */
export function cloneDiskFile(cloneDirectoryPath: string, target: string, kind: 'qcow2' | 'vhd' | 'raw'): string {
  return join(cloneDirectoryPath, `${target}.${kind}`);
}

/** A clone's persistent data disk (data_disk_bytes): `<clone dir>/data.qcow2` (KVM) or `.vhd` (Xen); kept by a rebase. */
export function cloneDataDiskFile(cloneDirectoryPath: string, kind: 'qcow2' | 'vhd' | 'raw'): string {
  return join(cloneDirectoryPath, `data.${kind}`);
}

/**
 * A rebase's new system-disk overlay while it is made, beside the one it replaces: `<clone dir>/.<file>.rebase`
 * (renamed over `<file>`, which is the switch); and the old overlay's hard link while the switch is undone-able:
 * `<clone dir>/.<file>.previous`. Leftovers of a crash are removed by the next rebase of the clone.
 */
export function rebaseWorkFile(overlayPath: string, kind: 'rebase' | 'previous'): string {
  return join(dirname(overlayPath), `.${basename(overlayPath)}.${kind}`);
}

/** The domain XML a clone was defined with: `<clone dir>/domain.xml`. */
export function cloneDefinitionFile(cloneDirectoryPath: string): string {
  return join(cloneDirectoryPath, 'domain.xml');
}

/** A clone's NoCloud seed image (volume label `cidata`): `<clone dir>/cidata.iso`; removed with the directory. */
export function cloneSeedFile(cloneDirectoryPath: string): string {
  return join(cloneDirectoryPath, 'cidata.iso');
}

/** An overlay of a batch's base disk `target`, copied for each clone: `clones/.prototype-<unique>-<target>.qcow2`. */
export function overlayPrototypeFile(root: string, unique: string, target: string): string {
  return join(clonesDirectory(root), `.prototype-${unique}-${target}.qcow2`);
}
