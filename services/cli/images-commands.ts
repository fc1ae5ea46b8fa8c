/** `cowherd images`: publish from a powered-off VM, import a disk file, list, show with replicas, distribute with live progress, delete. */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import {
  DistributeImageResponse,
  ImportImageDomain,
  ImportImageDomain_DiskBus,
  ImportImageDomain_Firmware,
  type ImportImageRequest,
} from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image, ImageFile, imageFile_RoleToJSON, ImageReplica, imageReplica_StateToJSON, ImageView } from '../gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../gen/google/longrunning/operations.js';
import type { CommandSpec } from './command-line.js';
import { EVERY_HOST, IMAGE_NAME } from '../common/domain/resource-names.js';
import type { CliContext } from './cli-context.js';
import { EXIT, explain, readStatus } from './exit-codes.js';
import { bareId, hypervisorWord, imageState, labelText, listImages, listReplicas, replicaState } from './fleet-reads.js';
import { DELETE_IMAGE_OPERATION, DISTRIBUTE_OPERATION, IMPORT_OPERATION, PUBLISH_OPERATION } from './operation-kinds.js';
import { followOperation, OPERATION_OPTIONS, printStarted } from './operation-wait.js';
import { enumWord, formatBytes, formatTime, keyValues, table } from './output.js';
import { ArgumentReader } from './resource-arguments.js';

const IMAGE_ARGUMENT = { name: 'image', description: 'the image id, like debian-12 (or images/debian-12)' };

export const IMAGES_COMMAND: CommandSpec<CliContext> = {
  name: 'images',
  summary: 'publish master images, spread them to hosts, inspect and delete them',
  subcommands: [
    {
      name: 'publish',
      summary: 'make a new image from a powered-off VM (its disks flattened, its domain XML sanitized)',
      options: [
        { name: 'host', value: '<host>', description: 'the host the VM is on', required: true },
        { name: 'vm', value: '<vm>', description: 'the powered-off VM to publish', required: true },
        { name: 'image', value: '<id>', description: "the new image's id, like debian-12", required: true },
        { name: 'description', value: '<text>', description: 'a description, at most 1024 characters' },
        { name: 'label', value: '<key=value>', description: 'a label for the image', repeatable: true },
        ...OPERATION_OPTIONS,
      ],
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
            `published ${image.name}: ${imageState(image)}, ${image.files.length} file(s), ${formatBytes(image.torrent?.totalBytes)}, origin ${image.originHost}`,
          );
          context.out.note(`next: \`cowherd images distribute ${imageId} --hosts <h1,h2>\` or \`cowherd vms clone --image ${imageId} --count N\``);
        }
        return EXIT.OK;
      },
    },
    {
      name: 'import',
      summary: 'make a new image from a disk file (qcow2, raw, vmdk, vhd, vhdx) on a host or at an http(s) URL',
      options: [
        { name: 'host', value: '<host>', description: 'the host that imports the file and becomes the origin', required: true },
        { name: 'image', value: '<id>', description: "the new image's id, like debian-12", required: true },
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
            `imported ${image.name}: ${imageState(image)}, ${image.files.length} file(s), ${formatBytes(image.torrent?.totalBytes)}, origin ${image.originHost}`,
          );
          context.out.note(`next: \`cowherd images distribute ${imageId} --hosts <h1,h2>\` or \`cowherd vms clone --image ${imageId} --count N\``);
        }
        return EXIT.OK;
      },
    },
    {
      name: 'list',
      summary: 'list the image catalog with sizes and how many hosts hold each image',
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
            ['image', 'state', 'hypervisor', 'size', 'origin', 'hosts', 'created', 'labels'],
            images.map((image) => {
              const mine = replicas.filter((replica) => replica.image === image.name);
              const available = mine.filter((replica) => imageReplica_StateToJSON(replica.state) === 'STATE_AVAILABLE').length;
              return [
                bareId(image.name),
                imageState(image),
                hypervisorWord(image.hypervisor),
                formatBytes(image.torrent?.totalBytes),
                bareId(image.originHost) || '-',
                `${available}/${mine.length}`,
                image.createTime?.toISOString().slice(0, 19).replace('T', ' ') ?? '-',
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
      summary: 'show one image with its files and the hosts that hold a replica',
      positionals: [IMAGE_ARGUMENT],
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).image(invocation.positionals[0]!);
        const image = await context.call<Image>('inventory', (cb) => context.inventory.getImage({ name, view: ImageView.IMAGE_VIEW_BASIC }, cb));
        const replicas = await listReplicas(context, EVERY_HOST, `image = "${name}"`);
        if (context.out.format === 'json') {
          context.out.json({ image: Image.toJSON(image), imageReplicas: replicas.map((replica) => ImageReplica.toJSON(replica)) });
          return EXIT.OK;
        }
        context.out.line(
          keyValues([
            ['image', image.name],
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
                ['host', 'replica state', 'origin', 'dependent vms', 'path'],
                replicas.map((replica) => [
                  bareId(replica.host),
                  replicaState(replica),
                  replica.origin ? 'yes' : 'no',
                  String(replica.dependentVirtualMachines.length),
                  replica.path || '-',
                ]),
              ),
        );
        return EXIT.OK;
      },
    },
    {
      name: 'distribute',
      summary: 'spread an image to hosts peer-to-peer, with live per-host progress',
      positionals: [IMAGE_ARGUMENT],
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
        const image = args.image(invocation.positionals[0]!);
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
      summary: 'delete an image and every replica of it (refused while any VM is cloned from it)',
      positionals: [IMAGE_ARGUMENT],
      options: OPERATION_OPTIONS,
      run: async (invocation, context) => {
        const name = new ArgumentReader(invocation.command).image(invocation.positionals[0]!);
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
