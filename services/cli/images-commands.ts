/** `cowherd images`: publish from a powered-off VM, list, show with replicas, distribute with live progress, delete. */
import { randomUUID } from 'node:crypto';
import { DistributeImageResponse } from '../gen/cowherd/distribution/v1/distribution_service.js';
import { Image, ImageFile, imageFile_RoleToJSON, ImageReplica, imageReplica_StateToJSON, ImageView } from '../gen/cowherd/inventory/v1/resources.js';
import type { Operation } from '../gen/google/longrunning/operations.js';
import type { CommandSpec } from './command-line.js';
import { EVERY_HOST, IMAGE_NAME } from '../common/domain/resource-names.js';
import type { CliContext } from './cli-context.js';
import { EXIT, explain, readStatus } from './exit-codes.js';
import { bareId, hypervisorWord, imageState, labelText, listImages, listReplicas, replicaState } from './fleet-reads.js';
import { DELETE_IMAGE_OPERATION, DISTRIBUTE_OPERATION, PUBLISH_OPERATION } from './operation-kinds.js';
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
