/**
 * `cowherd images`: publish from a powered-off VM, import a disk file (either onto an existing id adds a
 * version), list, show with replicas, versions and aliases, retention, garbage collection, distribute with
 * live progress, delete.
 */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import {
  CollectImageGarbageResponse,
  DistributeImageResponse,
  ImportImageDomain,
  ImportImageDomain_DiskBus,
  ImportImageDomain_Firmware,
  type ImportImageRequest,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image, ImageFile, imageFile_RoleToJSON, ImageReplica, imageReplica_StateToJSON, ImageView } from '../gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../gen/google/longrunning/operations.js';
import type { CommandSpec } from './command-line.js';
import { EVERY_HOST, IMAGE_NAME, imageVersionName, LATEST_ALIAS, parseImageReference } from '../common/domain/resource-names.js';
import type { CliContext } from './cli-context.js';
import { CliError, EXIT, explain, readStatus } from './exit-codes.js';
import {
  aliasesAt,
  bareId,
  hypervisorWord,
  imageState,
  labelText,
  listImages,
  listImageVersions,
  listReplicas,
  listVirtualMachines,
  replicaState,
  versionNumberOf,
  versionOf,
} from './fleet-reads.js';
import { DELETE_IMAGE_OPERATION, DISTRIBUTE_OPERATION, IMPORT_OPERATION, PUBLISH_OPERATION } from './operation-kinds.js';
import { followOperation, OPERATION_OPTIONS, printStarted } from './operation-wait.js';
import { enumWord, formatBytes, formatTime, keyValues, table } from './output.js';
import { DiskBackend } from '../gen/cowherd/common/v1/types.js';
import { ArgumentReader, diskBackendWord } from './resource-arguments.js';

const IMAGE_ARGUMENT = { name: 'image', description: 'the image id, like debian-12 (or images/debian-12)' };
const IMAGE_OR_VERSION_ARGUMENT = {
  name: 'image',
  description: 'the image, like debian-12 (its latest version), or one version: debian-12/versions/3 or debian-12/versions/stable',
};

export const IMAGES_COMMAND: CommandSpec<CliContext> = {
  name: 'images',
  summary: 'publish master images and their versions, alias and collect versions, spread them to hosts, inspect and delete them',
  subcommands: [
    {
      name: 'publish',
      summary: 'make a new image (or a new version of one) from a powered-off VM (its disks flattened, its domain XML sanitized)',
      options: [
        { name: 'host', value: '<host>', description: 'the host the VM is on', required: true },
        { name: 'vm', value: '<vm>', description: 'the powered-off VM to publish', required: true },
        { name: 'image', value: '<id>', description: "the image's id, like debian-12; an existing image gets a new version", required: true },
        { name: 'description', value: '<text>', description: 'a description, at most 1024 characters' },
        { name: 'label', value: '<key=value>', description: 'a label for the image', repeatable: true },
        ...OPERATION_OPTIONS,
      ],
      details:
        'Onto an image id that exists, the publish adds the next version, which becomes `latest` once AVAILABLE; clones stay on\n' +
        'their version until `cowherd vms rebase` moves them.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const host = bareId(args.host(invocation.string('host')!, '--host'));
        const source = args.virtualMachine(`${host}/${invocation.string('vm')!}`, '--vm');
        const imageId = args.imageId(invocation.string('image')!, '--image');
        const started = await context.call<Operation>('distribution', (cb) =>
          context.distribution.publishImage(
            {
              imageId,
              sourceVirtualMachine: source,
              description: invocation.string('description') ?? '',
              labels: args.labels(invocation.list('label')),
              requestId: invocation.string('request-id') ?? randomUUID(),
            },
            cb,
          ),
        );
        if (invocation.flag('no-wait')) return printStarted(context, started, PUBLISH_OPERATION);
        context.out.note(`publishing ${IMAGE_NAME.format({ image: imageId })} from ${source} (${started.name})`);
        const image = await followOperation(context, started, PUBLISH_OPERATION);
        if (context.out.format === 'json') context.out.json(Image.toJSON(image));
        else {
          context.out.line(
            `published ${IMAGE_NAME.format({ image: imageId })} version ${versionOf(image)}: ${imageState(image)}, ${image.files.length} file(s), ${formatBytes(image.torrent?.totalBytes)}, origin ${image.originHost}`,
          );
          nextAfterNewVersion(context, imageId, versionOf(image));
        }
        return EXIT.OK;
      },
    },
    {
      name: 'import',
      summary: 'make a new image (or a new version of one) from a disk file (qcow2, raw, vmdk, vhd, vhdx) on a host or at an http(s) URL',
      options: [
        { name: 'host', value: '<host>', description: 'the host that imports the file and becomes the origin', required: true },
        { name: 'image', value: '<id>', description: "the image's id, like debian-12; an existing image gets a new version", required: true },
        { name: 'file', value: '<path>', description: "a file in the host agent's import directory (COWHERD_IMPORT_DIR), relative to it" },
        { name: 'url', value: '<url>', description: 'an http(s) URL to download the file from (needs --sha256)' },
        { name: 'sha256', value: '<hex>', description: "the downloaded file's SHA-256; a different file fails the import and leaves nothing" },
        { name: 'max-bytes', value: '<n>', description: "the largest download to accept (default: the agent's limit, 64 GiB)" },
        { name: 'vcpus', value: '<n>', description: 'virtual CPUs of the template (default 1)' },
        { name: 'memory-mib', value: '<n>', description: 'memory of the template in MiB (default 1024)' },
        { name: 'firmware', value: '<bios|uefi>', description: 'firmware of the template (default bios)' },
        { name: 'disk-bus', value: '<virtio|sata|ide>', description: 'bus of the disk (default virtio on KVM, xen on Xen)' },
        { name: 'network', value: '<name|none>', description: 'libvirt network of the one NIC (default `default`; `none`: no NIC)' },
        { name: 'kernel', value: '<path>', description: 'direct kernel boot: a kernel in the import directory, relative to it' },
        { name: 'initrd', value: '<path>', description: 'the initrd for --kernel, in the import directory' },
        { name: 'cmdline', value: '<text>', description: 'the kernel command line for --kernel' },
        {
          name: 'domain-xml-file',
          value: '<file>',
          description: 'a local libvirt domain XML file to use as the template instead (sanitized like a published one)',
        },
        { name: 'description', value: '<text>', description: 'a description, at most 1024 characters' },
        { name: 'label', value: '<key=value>', description: 'a label for the image', repeatable: true },
        ...OPERATION_OPTIONS,
      ],
      details:
        'Exactly one of --file and --url. The format is read from the file, never from its name; files with a backing file are refused.\n' +
        "The file is converted to the host's format (qcow2 on KVM, VHD on Xen); the image then distributes and clones like a published one.\n" +
        'Onto an image id that exists, the import adds the next version.\n' +
        'Examples:\n' +
        '  cowherd images import --host kvm-01 --image debian-12 --file debian-12-genericcloud-amd64.qcow2 --memory-mib 2048\n' +
        '  cowherd images import --host kvm-01 --image alpine --url https://example.org/alpine.qcow2 --sha256 <hex> --firmware uefi',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const host = args.host(invocation.string('host')!, '--host');
        const imageId = args.imageId(invocation.string('image')!, '--image');
        const request = await importRequest(invocation, args, host, imageId);
        const started = await context.call<Operation>('distribution', (cb) => context.distribution.importImage(request, cb));
        if (invocation.flag('no-wait')) return printStarted(context, started, IMPORT_OPERATION);
        context.out.note(`importing ${IMAGE_NAME.format({ image: imageId })} on ${bareId(host)} (${started.name})`);
        const image = await followOperation(context, started, IMPORT_OPERATION);
        if (context.out.format === 'json') context.out.json(Image.toJSON(image));
        else {
          context.out.line(
            `imported ${IMAGE_NAME.format({ image: imageId })} version ${versionOf(image)}: ${imageState(image)}, ${image.files.length} file(s), ${formatBytes(image.torrent?.totalBytes)}, origin ${image.originHost}`,
          );
          nextAfterNewVersion(context, imageId, versionOf(image));
        }
        return EXIT.OK;
      },
    },
    {
      name: 'list',
      summary: 'list the image catalog with versions, sizes and how many hosts hold each latest version',
      options: [
        {
          name: 'filter',
          value: '<expr>',
          description: 'AIP-160 filter: state = AVAILABLE, hypervisor = KVM, origin_host = "hosts/kvm-01", labels.os = "debian"',
        },
      ],
      run: async (invocation, context) => {
        const [images, replicas] = await Promise.all([listImages(context, invocation.string('filter') ?? ''), listReplicas(context)]);
        if (context.out.format === 'json') {
          context.out.json({ images: images.map((image) => Image.toJSON(image)) });
          return EXIT.OK;
        }
        if (images.length === 0) {
          context.out.note('no images yet: `cowherd images publish --host <h> --vm <vm> --image <id>` makes one from a powered-off VM');
          return EXIT.OK;
        }
        context.out.line(
          table(
            ['image', 'version', 'state', 'hypervisor', 'size', 'origin', 'hosts', 'created', 'aliases', 'labels'],
            images.map((image) => {
              // The hosts that hold this row's version (replicas of every version share `image`).
              const mine = replicas.filter((replica) => replicaHoldsVersion(replica, image));
              const available = mine.filter((replica) => imageReplica_StateToJSON(replica.state) === 'STATE_AVAILABLE').length;
              const count = image.versions.length;
              return [
                bareId(imageNameOf(image)),
                `${versionOf(image)}${count > 1 ? ` of ${count}` : ''}`,
                imageState(image),
                hypervisorWord(image.hypervisor),
                formatBytes(image.torrent?.totalBytes),
                bareId(image.originHost) || '-',
                `${available}/${mine.length}`,
                image.createTime?.toISOString().slice(0, 19).replace('T', ' ') ?? '-',
                aliasList(image.aliases),
                labelText(image.labels),
              ];
            }),
          ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'show',
      summary: 'show one image (its latest version, or the one named) with its files, versions, aliases and the hosts that hold it',
      positionals: [IMAGE_OR_VERSION_ARGUMENT],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).imageOrVersion(invocation.positionals[0]!);
        const imageName = `images/${parseImageReference(name)!.id}`;
        const image = await context.call<Image>('inventory', (cb) => context.inventory.getImage({ name, view: ImageView.IMAGE_VIEW_BASIC }, cb));
        const versioned = name !== imageName;
        const allReplicas = await listReplicas(context, EVERY_HOST, `image = "${imageName}"`);
        // The image view lists the replicas of every version; one version only its own.
        const replicas = versioned ? allReplicas.filter((replica) => replicaHoldsVersion(replica, image)) : allReplicas;
        if (context.out.format === 'json') {
          context.out.json({ image: Image.toJSON(image), imageReplicas: replicas.map((replica) => ImageReplica.toJSON(replica)) });
          return EXIT.OK;
        }
        const versions = image.versions.map(Number);
        context.out.line(
          keyValues([
            ['image', imageName],
            ['version', `${versionOf(image)}${versioned ? '' : ' (latest)'} (${imageVersionName(parseImageReference(name)!.id, versionOf(image))})`],
            ...(versioned
              ? []
              : ([
                  ['versions', versions.length > 0 ? versions.join(', ') : String(versionOf(image))],
                  ['aliases', aliasList(image.aliases)],
                  ['keep versions', image.keepVersions > 0 ? String(image.keepVersions) : 'the default (COWHERD_KEEP_IMAGE_VERSIONS, 3)'],
                  ['default disk backend', diskBackendWord(image.defaultDiskBackend, "the hosts' standard")],
                ] as const)),
            ['state', `${imageState(image)}${image.error ? ` (${image.error.message})` : ''}`],
            ['description', image.description || '-'],
            ['hypervisor', hypervisorWord(image.hypervisor)],
            ['published from', image.sourceVirtualMachine || '-'],
            ['origin host', image.originHost || '-'],
            ['size', formatBytes(image.torrent?.totalBytes)],
            [
              'torrent',
              image.torrent ? `${image.torrent.infoHash} (${image.torrent.pieceCount} pieces of ${formatBytes(image.torrent.pieceLengthBytes)})` : '-',
            ],
            ['labels', labelText(image.labels)],
            ['created', formatTime(image.createTime)],
          ]),
        );
        context.out.line();
        context.out.line(
          table(
            ['file', 'role', 'size', 'virtual size', 'sha256'],
            image.files.map((file: ImageFile) => [
              file.path,
              enumWord(imageFile_RoleToJSON(file.role), 'ROLE_'),
              formatBytes(file.sizeBytes),
              file.virtualSizeBytes === '0' ? '-' : formatBytes(file.virtualSizeBytes),
              file.sha256 ? `${file.sha256.slice(0, 16)}…` : '-',
            ]),
          ),
        );
        context.out.line();
        context.out.line(
          replicas.length === 0
            ? 'replicas: none'
            : table(
                ['host', 'replica state', 'origin', 'dependent vms', 'version', 'path'],
                replicas.map((replica) => [
                  bareId(replica.host),
                  replicaState(replica),
                  replica.origin ? 'yes' : 'no',
                  String(replica.dependentVirtualMachines.length),
                  String(replicaVersion(replica)),
                  replica.path || '-',
                ]),
              ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'versions',
      summary: "list an image's versions: state, size, aliases, how many hosts hold each and how many clones use it",
      positionals: [IMAGE_ARGUMENT],
      details: 'Garbage collection (`cowherd images gc`) keeps the newest keep-versions versions, every version a clone uses or an alias names, and latest.',
      run: async (invocation, context) => {
        const image = new ArgumentReader(invocation.command).image(invocation.positionals[0]!);
        const [view, versions, replicas, clones] = await Promise.all([
          context.call<Image>('inventory', (cb) => context.inventory.getImage({ name: image, view: ImageView.IMAGE_VIEW_BASIC }, cb)),
          listImageVersions(context, image),
          listReplicas(context, EVERY_HOST, `image = "${image}"`),
          listVirtualMachines(context, EVERY_HOST, `source_image = "${image}"`),
        ]);
        const id = parseImageReference(image)!.id;
        if (context.out.format === 'json') {
          context.out.json({ versions: versions.map((version) => Image.toJSON(version)), aliases: view.aliases, keepVersions: view.keepVersions });
          return EXIT.OK;
        }
        context.out.line(
          table(
            ['version', 'state', 'size', 'created', 'aliases', 'hosts', 'clones', 'name'],
            versions.map((version) => {
              const number = versionOf(version);
              const mine = replicas.filter((replica) => replicaVersion(replica) === number);
              const available = mine.filter((replica) => imageReplica_StateToJSON(replica.state) === 'STATE_AVAILABLE').length;
              const using = clones.filter((vm) => (versionNumberOf(vm.sourceImageVersion || vm.lineage?.imageVersion || '') ?? 1) === number).length;
              return [
                String(number),
                imageState(version),
                formatBytes(version.torrent?.totalBytes),
                version.createTime?.toISOString().slice(0, 19).replace('T', ' ') ?? '-',
                aliasesAt(view.aliases, number),
                `${available}/${mine.length}`,
                String(using),
                imageVersionName(id, number),
              ];
            }),
          ),
        );
        context.out.note(
          `garbage collection keeps the newest ${view.keepVersions > 0 ? view.keepVersions : '3 (the default)'} versions and every version in use or aliased; \`cowherd images alias ${id} <alias> <version>\` names one, \`cowherd vms rebase --to-version ${id}/versions/<n>\` moves clones`,
        );
        return EXIT.OK;
      },
    },
    {
      name: 'alias',
      summary: 'point an alias (like stable) at a version of an image, or remove it with --delete',
      positionals: [
        IMAGE_ARGUMENT,
        { name: 'alias', description: 'the alias: a lowercase DNS label starting with a letter, like stable (not latest: the catalog moves it)' },
        { name: 'version', description: 'the version number, or another alias to pin its current version (not with --delete)', optional: true },
      ],
      options: [{ name: 'delete', description: 'remove the alias instead' }],
      details:
        'Examples:\n' +
        '  cowherd images alias debian-12 stable 3\n' +
        '  cowherd images alias debian-12 stable latest    # pins the version latest points at now\n' +
        '  cowherd images alias debian-12 stable --delete\n' +
        'An alias names a version wherever a version is taken (`debian-12/versions/stable`), and garbage collection keeps what an alias names.\n' +
        'The aliases are read, changed and written back whole (UpdateImage): two operators changing them at once, the last one wins.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const image = args.image(invocation.positionals[0]!);
        const alias = args.alias(invocation.positionals[1]!, '<alias>');
        if (alias === LATEST_ALIAS) args.fail('latest always points at the newest AVAILABLE version: the catalog moves it, so it cannot be set or deleted');
        const remove = invocation.flag('delete');
        const rawVersion = invocation.positionals[2];
        if (remove && rawVersion !== undefined) args.fail('give either <version> or --delete, not both');
        if (!remove && rawVersion === undefined) args.fail('missing <version> (or --delete to remove the alias)');
        const current = await context.call<Image>('inventory', (cb) => context.inventory.getImage({ name: image, view: ImageView.IMAGE_VIEW_BASIC }, cb));
        const aliases: Record<string, string> = { ...current.aliases };
        delete aliases[LATEST_ALIAS];
        if (remove) {
          if (aliases[alias] === undefined)
            throw new CliError(`${image} has no alias "${alias}"; \`cowherd images versions ${bareId(image)}\` shows its aliases`, EXIT.NOT_FOUND);
          delete aliases[alias];
        } else {
          let version: number;
          if (/^\d+$/.test(rawVersion!)) version = args.versionNumber(rawVersion!, '<version>');
          else {
            const target = current.aliases[args.alias(rawVersion!, '<version>')];
            if (target === undefined)
              throw new CliError(
                `${image} has no alias "${rawVersion}" to take the version from; \`cowherd images versions ${bareId(image)}\` lists versions and aliases`,
                EXIT.NOT_FOUND,
              );
            version = Number(target);
          }
          aliases[alias] = String(version);
        }
        const updated = await context.call<Image>('distribution', (cb) =>
          context.distribution.updateImage({ image: Image.fromPartial({ name: image, aliases }), updateMask: ['aliases'] }, cb),
        );
        if (context.out.format === 'json') context.out.json(Image.toJSON(updated));
        else {
          context.out.line(remove ? `removed the alias ${alias} of ${image}` : `${image}/versions/${alias} is now version ${aliases[alias]}`);
          context.out.line(`aliases: ${aliasList(updated.aliases)}`);
        }
        return EXIT.OK;
      },
    },
    {
      name: 'update',
      summary: "change an image's settings: how many of its newest versions garbage collection keeps, its clones' default disk backend",
      positionals: [IMAGE_ARGUMENT],
      options: [
        {
          name: 'keep-versions',
          value: '<n>',
          description: 'keep the newest n versions (0: the default, COWHERD_KEEP_IMAGE_VERSIONS, 3); versions in use are kept anyway',
        },
        {
          name: 'default-disk-backend',
          value: '<reflink-copy|qcow2-overlay|vhd-differencing|standard>',
          description: "how clones get their disks when `vms clone` names no --disk-backend (standard: the hosts' own)",
        },
      ],
      details:
        'Example: cowherd images update debian-12 --keep-versions 5 --default-disk-backend reflink-copy\n' +
        'At least one of the options. Aliases are set with `cowherd images alias`.',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const image = args.image(invocation.positionals[0]!);
        const keepText = invocation.string('keep-versions');
        const backendText = invocation.string('default-disk-backend');
        if (keepText === undefined && backendText === undefined) args.fail('give --keep-versions, --default-disk-backend or both');
        const keepVersions = keepText === undefined ? 0 : args.integer(keepText, '--keep-versions', 0, 1000);
        const defaultDiskBackend =
          backendText === undefined || backendText === 'standard'
            ? DiskBackend.DISK_BACKEND_UNSPECIFIED
            : args.diskBackend(backendText, '--default-disk-backend');
        const updateMask = [...(keepText === undefined ? [] : ['keep_versions']), ...(backendText === undefined ? [] : ['default_disk_backend'])];
        const updated = await context.call<Image>('distribution', (cb) =>
          context.distribution.updateImage({ image: Image.fromPartial({ name: image, keepVersions, defaultDiskBackend }), updateMask }, cb),
        );
        if (context.out.format === 'json') context.out.json(Image.toJSON(updated));
        else {
          if (keepText !== undefined)
            context.out.line(
              `${image} keeps ${updated.keepVersions > 0 ? `its newest ${updated.keepVersions}` : 'the default number of'} versions (and every version in use)`,
            );
          if (backendText !== undefined)
            context.out.line(
              `clones of ${image} are made with ${diskBackendWord(updated.defaultDiskBackend, "the hosts' standard disk backend")} unless they ask for another`,
            );
        }
        return EXIT.OK;
      },
    },
    {
      name: 'gc',
      summary: 'collect garbage by policy: old versions nothing uses, and unused replicas on hosts above their watermark',
      options: [
        { name: 'dry-run', description: 'delete nothing; list what would go' },
        { name: 'image', value: '<id>', description: 'only this image (default every image)', repeatable: true },
      ],
      details:
        'Per image: versions beyond the newest keep-versions (`cowherd images update --keep-versions`) go, unless a clone uses them,\n' +
        'an alias names them, or they are latest. Per host: above its image-directory watermark (`cowherd hosts update\n' +
        '--image-dir-watermark`), the least recently used replicas that nothing uses go. Never a replica with dependents.\n' +
        'Exit status 7 when some hosts could not be reached (their files stay; each is listed).',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const images = invocation
          .list('image')
          .flatMap((value) => value.split(','))
          .filter((value) => value.trim() !== '')
          .map((value) => args.image(value.trim(), '--image'));
        const dryRun = invocation.flag('dry-run');
        const response = await context.call<CollectImageGarbageResponse>('distribution', (cb) =>
          context.distribution.collectImageGarbage({ images, validateOnly: dryRun }, cb),
        );
        return printGarbageResult(context, response, dryRun);
      },
    },
    {
      name: 'distribute',
      summary: 'spread an image (its latest version, or the one named) to hosts peer-to-peer, with live per-host progress',
      positionals: [IMAGE_OR_VERSION_ARGUMENT],
      options: [
        {
          name: 'hosts',
          value: '<h1,h2|all>',
          description: "the target hosts, comma-separated; `all` for every READY host of the image's hypervisor",
          required: true,
        },
        ...OPERATION_OPTIONS,
      ],
      details:
        'Hosts that already hold the image count as done at once; failed transfers resume when distributed again.\nExit status 7 when some hosts failed (they are listed).',
      run: async (invocation, context) => {
        const args = new ArgumentReader(invocation.command);
        const image = args.imageOrVersion(invocation.positionals[0]!);
        const hosts = invocation.list('hosts').join(',').trim() === 'all' ? [EVERY_HOST] : args.hosts(invocation.list('hosts'));
        const started = await context.call<Operation>('distribution', (cb) =>
          context.distribution.distributeImage({ image, hosts, requestId: invocation.string('request-id') ?? randomUUID() }, cb),
        );
        if (invocation.flag('no-wait')) return printStarted(context, started, DISTRIBUTE_OPERATION);
        context.out.note(`distributing ${image} to ${hosts[0] === EVERY_HOST ? 'every ready host' : hosts.map(bareId).join(', ')} (${started.name})`);
        const response = await followOperation(context, started, DISTRIBUTE_OPERATION);
        return printDistributeResult(context, image, response);
      },
    },
    {
      name: 'delete',
      summary: 'delete an image, or one version of it, and every replica of it (refused while any VM is cloned from it)',
      positionals: [IMAGE_OR_VERSION_ARGUMENT],
      options: OPERATION_OPTIONS,
      details:
        'Named by version (debian-12/versions/2), only that version goes; the latest one cannot while older ones remain.\n' +
        '`cowherd images gc` removes the versions nothing uses by policy.',
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).imageOrVersion(invocation.positionals[0]!);
        const started = await context.call<Operation>('distribution', (cb) =>
          context.distribution.deleteImage({ name, requestId: invocation.string('request-id') ?? randomUUID() }, cb),
        );
        if (invocation.flag('no-wait')) return printStarted(context, started, DELETE_IMAGE_OPERATION);
        await followOperation(context, started, DELETE_IMAGE_OPERATION);
        if (context.out.format === 'json') context.out.json({ name, deleted: true });
        else context.out.line(`deleted ${name} and its replicas`);
        return EXIT.OK;
      },
    },
  ],
};

/** `images/x` of a version record or view (a record of version n >= 2 is named `images/x/versions/n`). */
function imageNameOf(image: Image): string {
  const reference = parseImageReference(image.name);
  return reference ? `images/${reference.id}` : image.name;
}

/** The version a replica holds (1 for a replica recorded before versions existed). */
function replicaVersion(replica: ImageReplica): number {
  return versionNumberOf(replica.imageVersion) ?? 1;
}

/** Whether `replica` holds the version that `image` (a record or a view) describes. */
function replicaHoldsVersion(replica: ImageReplica, image: Image): boolean {
  return replica.image === imageNameOf(image) && replicaVersion(replica) === versionOf(image);
}

/** `latest=3, stable=2` or `-`. */
function aliasList(aliases: Readonly<Record<string, string>>): string {
  const entries = Object.entries(aliases).sort(([a], [b]) => (a === LATEST_ALIAS ? -1 : b === LATEST_ALIAS ? 1 : a.localeCompare(b)));
  return entries.length > 0 ? entries.map(([alias, version]) => `${alias}=${version}`).join(', ') : '-';
}

/** What to type after a publish or import: spread and clone a new image, or move the clones onto a new version. */
function nextAfterNewVersion(context: CliContext, imageId: string, version: number): void {
  if (version <= 1) context.out.note(`next: \`cowherd images distribute ${imageId} --hosts <h1,h2>\` or \`cowherd vms clone --image ${imageId} --count N\``);
  else
    context.out.note(
      `next: \`cowherd vms rebase --filter 'source_image = "images/${imageId}"' --to-version ${imageId}/versions/${version} --canary 1\` moves the clones onto it; \`cowherd images versions ${imageId}\` lists the versions`,
    );
}

/** The garbage collection's result: versions, replicas, failures, bytes freed; exit 7 when some hosts failed. */
function printGarbageResult(context: CliContext, response: CollectImageGarbageResponse, dryRun: boolean): number {
  if (context.out.format === 'json') context.out.json(CollectImageGarbageResponse.toJSON(response));
  else {
    const verb = dryRun ? 'would go' : 'deleted';
    const rows = [
      ...response.versions.map((version) => ['version', bareId(version), '-', '-', `${verb} (policy: beyond keep-versions, unused)`]),
      ...response.replicas.map((replica) => [
        'replica',
        bareId(replica.imageVersion || replica.image),
        bareId(replica.host),
        formatBytes(replica.progress?.bytesTotal),
        `${verb} (host above its watermark; last used ${replica.lastUseTime?.toISOString().slice(0, 19).replace('T', ' ') ?? '-'})`,
      ]),
      ...response.failures.map((failure) => [
        'failure',
        '-',
        bareId(failure.host),
        '-',
        failure.status ? explain(readStatus(failure.status), context.target('distribution')).split('\n')[0]! : 'failed',
      ]),
    ];
    if (rows.length === 0) context.out.line(dryRun ? 'nothing would go: every version and replica is kept by policy' : 'nothing to collect');
    else context.out.line(table(['kind', 'image version', 'host', 'size', 'what'], rows));
    context.out.note(
      `${dryRun ? 'dry run: ' : ''}${response.versions.length} version(s) and ${response.replicas.length} replica(s) ${verb}, ${formatBytes(response.freedBytes)} ${dryRun ? 'would be ' : ''}freed${response.failures.length > 0 ? `; ${response.failures.length} host(s) failed` : ''}`,
    );
  }
  return response.failures.length > 0 ? EXIT.PARTIAL : EXIT.OK;
}

/** The ImportImage request of `images import` (usage errors before any call). */
async function importRequest(
  invocation: Parameters<NonNullable<CommandSpec<CliContext>['run']>>[0],
  args: ArgumentReader,
  host: string,
  imageId: string,
): Promise<ImportImageRequest> {
  const file = invocation.string('file');
  const url = invocation.string('url');
  if ((file === undefined) === (url === undefined)) args.fail('give exactly one of --file and --url');
  let source: ImportImageRequest['source'];
  if (file !== undefined) source = { $case: 'importPath', value: file };
  else {
    const sha256 = invocation.string('sha256');
    if (sha256 === undefined) args.fail('--url needs --sha256 (the SHA-256 of the file to download)');
    const maxBytes = invocation.string('max-bytes');
    source = {
      $case: 'url',
      value: { uri: url!, sha256, maxBytes: maxBytes === undefined ? '0' : String(args.integer(maxBytes, '--max-bytes', 1, Number.MAX_SAFE_INTEGER)) },
    };
  }
  const xmlFile = invocation.string('domain-xml-file');
  const domainFlags = ['vcpus', 'memory-mib', 'firmware', 'disk-bus', 'network', 'kernel', 'initrd', 'cmdline'].filter(
    (flag) => invocation.string(flag) !== undefined,
  );
  let template: ImportImageRequest['template'];
  if (xmlFile !== undefined) {
    if (domainFlags.length > 0) args.fail(`--domain-xml-file cannot be combined with --${domainFlags.join(', --')}`);
    let xml: string;
    try {
      xml = await readFile(xmlFile, 'utf8');
    } catch (error) {
      return args.fail(`--domain-xml-file ${xmlFile}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    }
    template = { $case: 'domainXml', value: xml };
  } else {
    const choice = <T>(flag: string, values: Record<string, T>, fallback: T): T => {
      const raw = invocation.string(flag);
      if (raw === undefined) return fallback;
      const value = values[raw];
      if (value === undefined) args.fail(`--${flag} must be one of ${Object.keys(values).join(', ')}`);
      return value;
    };
    const number = (flag: string, min: number, max: number): number => {
      const raw = invocation.string(flag);
      return raw === undefined ? 0 : args.integer(raw, `--${flag}`, min, max);
    };
    template = {
      $case: 'domain',
      value: ImportImageDomain.fromPartial({
        vcpus: number('vcpus', 1, 256),
        memoryMib: String(number('memory-mib', 16, 4_194_304)),
        firmware: choice(
          'firmware',
          { bios: ImportImageDomain_Firmware.FIRMWARE_BIOS, uefi: ImportImageDomain_Firmware.FIRMWARE_UEFI },
          ImportImageDomain_Firmware.FIRMWARE_UNSPECIFIED,
        ),
        diskBus: choice(
          'disk-bus',
          { virtio: ImportImageDomain_DiskBus.DISK_BUS_VIRTIO, sata: ImportImageDomain_DiskBus.DISK_BUS_SATA, ide: ImportImageDomain_DiskBus.DISK_BUS_IDE },
          ImportImageDomain_DiskBus.DISK_BUS_UNSPECIFIED,
        ),
        network: invocation.string('network') ?? '',
        kernelPath: invocation.string('kernel') ?? '',
        initrdPath: invocation.string('initrd') ?? '',
        kernelCommandLine: invocation.string('cmdline') ?? '',
      }),
    };
  }
  return {
    imageId,
    host,
    source,
    template,
    description: invocation.string('description') ?? '',
    labels: args.labels(invocation.list('label')),
    requestId: invocation.string('request-id') ?? randomUUID(),
  };
}

function printDistributeResult(context: CliContext, image: string, response: DistributeImageResponse): number {
  if (context.out.format === 'json') context.out.json(DistributeImageResponse.toJSON(response));
  else {
    const rows = [
      ...response.replicas.map((replica) => [bareId(replica.host), replicaState(replica), '']),
      ...response.failures.map((failure) => [
        bareId(failure.host),
        'FAILED',
        failure.status ? explain(readStatus(failure.status), context.target('distribution')).split('\n')[0]! : '',
      ]),
    ];
    context.out.line(
      response.failures.length > 0
        ? table(['host', 'state', 'error'], rows)
        : table(
            ['host', 'state'],
            rows.map((row) => row.slice(0, 2)),
          ),
    );
    context.out.note(`${image}: ${response.replicas.length} host(s) hold it, ${response.failures.length} failed`);
  }
  return response.failures.length > 0 ? EXIT.PARTIAL : EXIT.OK;
}
