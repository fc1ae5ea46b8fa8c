/**
 * Resource names: every pattern formats and parses its own names, parsing is strict (no `..`, no extra or
 * missing `/`, no empty id, no other collection, every id against its rule), format refuses an id that
 * breaks its rule, and reserved host ids still name hosts.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  CERTIFICATE_NAME,
  HOST_IMAGE_NAME,
  HOST_NAME,
  hostOf,
  IMAGE_KEY,
  IMAGE_NAME,
  imageKey,
  imageNameOfKey,
  imageVersionName,
  imageVersionNameOfKey,
  isReservedHostId,
  JOIN_TOKEN_NAME,
  OPERATION_NAME,
  parseImageKey,
  parseImageReference,
  RESERVED_HOST_IDS,
  VIRTUAL_MACHINE_NAME,
  type ResourcePattern,
} from '../../services/common/domain/resource-names.js';

const UUID = '0b8f4c4e-5d2a-4f7e-9c1b-3a2d1e0f9a8b';

/** Each pattern with a good name, its ids, and names it must refuse. */
const CASES: { pattern: ResourcePattern<string>; text: string; name: string; ids: Record<string, string>; bad: string[] }[] = [
  {
    pattern: HOST_NAME,
    text: 'hosts/{host}',
    name: 'hosts/kvm-01',
    ids: { host: 'kvm-01' },
    bad: [
      'hosts/',
      'hosts/..',
      'hosts/KVM-01',
      'hosts/kvm.01',
      'hosts/-kvm',
      'hosts/kvm-',
      'hosts/kvm-01/',
      'hosts//kvm-01',
      '/hosts/kvm-01',
      'hosts/kvm-01/images/x',
      'images/kvm-01',
      'host/kvm-01',
      'Hosts/kvm-01',
      `hosts/${'a'.repeat(64)}`,
      'hosts/kvm 01',
      '',
    ],
  },
  {
    pattern: IMAGE_NAME,
    text: 'images/{image}',
    name: 'images/debian-12',
    ids: { image: 'debian-12' },
    bad: [
      'images/',
      'images/..',
      'images/../etc',
      'images/debian.12',
      'images/Debian-12',
      'images/debian_12',
      'hosts/debian-12',
      'images/debian-12/',
      'images/a/b',
      '',
    ],
  },
  {
    pattern: HOST_IMAGE_NAME,
    text: 'hosts/{host}/images/{image}',
    name: 'hosts/kvm-01/images/debian-12',
    ids: { host: 'kvm-01', image: 'debian-12' },
    bad: [
      'hosts/kvm-01/images/',
      'hosts//images/debian-12',
      'hosts/../images/debian-12',
      'hosts/kvm-01/images/..',
      'hosts/kvm-01/virtualMachines/debian-12',
      'hosts/kvm-01/images/debian-12/x',
      'images/debian-12',
      'hosts/kvm-01/images/debian.12',
      '',
    ],
  },
  {
    pattern: VIRTUAL_MACHINE_NAME,
    text: 'hosts/{host}/virtualMachines/{virtualMachine}',
    name: 'hosts/kvm-01/virtualMachines/web.prod_1-a',
    ids: { host: 'kvm-01', virtualMachine: 'web.prod_1-a' },
    bad: [
      'hosts/kvm-01/virtualMachines/',
      'hosts/kvm-01/virtualMachines/..',
      'hosts/kvm-01/virtualMachines/.hidden',
      'hosts/kvm-01/virtualMachines/-web',
      'hosts/kvm-01/virtualMachines/a/b',
      'hosts/kvm-01/virtualMachines/web 1',
      `hosts/kvm-01/virtualMachines/${'a'.repeat(64)}`,
      'hosts/KVM/virtualMachines/web',
      'hosts/kvm-01/vms/web',
      'hosts/kvm-01/images/web',
      '',
    ],
  },
  {
    pattern: OPERATION_NAME,
    text: 'operations/{operation}',
    name: `operations/${UUID}`,
    ids: { operation: UUID },
    bad: [
      'operations/',
      'operations/..',
      `operations/${UUID.toUpperCase()}`,
      `operations/${UUID.replaceAll('-', '')}`,
      `operations/${'-'.repeat(36)}`,
      'operations/op-1',
      `operations/${UUID}/x`,
      `images/${UUID}`,
      '',
    ],
  },
  {
    pattern: CERTIFICATE_NAME,
    text: 'certificates/{certificate}',
    name: 'certificates/1f0a9c',
    ids: { certificate: '1f0a9c' },
    bad: [
      'certificates/',
      'certificates/..',
      'certificates/1F0A9C',
      'certificates/xyz',
      `certificates/${'a'.repeat(41)}`,
      'certificates/1f/0a',
      'joinTokens/1f0a9c',
      '',
    ],
  },
  {
    pattern: JOIN_TOKEN_NAME,
    text: 'joinTokens/{joinToken}',
    name: 'joinTokens/0123456789abcdef',
    ids: { joinToken: '0123456789abcdef' },
    bad: [
      'joinTokens/',
      'joinTokens/..',
      'joinTokens/0123456789abcde',
      'joinTokens/0123456789abcdef0',
      'joinTokens/0123456789ABCDEF',
      'jointokens/0123456789abcdef',
      'certificates/0123456789abcdef',
      '',
    ],
  },
];

describe('resource names', () => {
  for (const { pattern, text, name, ids, bad } of CASES) {
    describe(text, () => {
      it('formats and parses its names', () => {
        assert.equal(pattern.pattern, text);
        assert.equal(pattern.format(ids), name);
        assert.deepEqual(pattern.parse(name), ids);
        assert.equal(pattern.matches(name), true);
      });

      it('refuses malformed names, ids that break their rule and other collections', () => {
        for (const candidate of bad) {
          assert.equal(pattern.parse(candidate), undefined, candidate);
          assert.equal(pattern.matches(candidate), false, candidate);
        }
      });

      it('throws when asked to format an id that breaks its rule', () => {
        for (const key of Object.keys(ids)) {
          for (const value of ['', '..', 'a/b', 'has space'])
            assert.throws(() => pattern.format({ ...ids, [key]: value }), new RegExp(`\\{${key}\\}`), `${key} = ${value}`);
        }
      });
    });
  }

  it('parses names of hosts with reserved ids: the reservation is for handing ids out, not for naming', () => {
    for (const id of [...RESERVED_HOST_IDS, 'nats-0', 'nats-12']) {
      assert.equal(isReservedHostId(id), true, id);
      assert.deepEqual(HOST_NAME.parse(`hosts/${id}`), { host: id });
      assert.equal(HOST_NAME.format({ host: id }), `hosts/${id}`);
      assert.deepEqual(VIRTUAL_MACHINE_NAME.parse(`hosts/${id}/virtualMachines/vm-1`), { host: id, virtualMachine: 'vm-1' });
    }
    assert.equal(isReservedHostId('nats-x'), false);
    assert.equal(isReservedHostId('kvm-01'), false);
  });

  it('hostOf gives the host of a host name or of any name below it', () => {
    assert.equal(hostOf('hosts/kvm-01'), 'kvm-01');
    assert.equal(hostOf('hosts/kvm-01/virtualMachines/web'), 'kvm-01');
    assert.equal(hostOf('hosts/kvm-01/images/debian-12'), 'kvm-01');
    assert.equal(hostOf('hosts/..'), undefined);
    assert.equal(hostOf('hosts/'), undefined);
    assert.equal(hostOf('hosts/-'), undefined);
    assert.equal(hostOf('images/kvm-01'), undefined);
    assert.equal(hostOf(''), undefined);
  });

  describe('image versions in names', () => {
    it('IMAGE_NAME reads {image} as a storage key: version 1 is the image id, later versions <id>_v<n>', () => {
      assert.deepEqual(IMAGE_NAME.parse('images/debian-12'), { image: 'debian-12' });
      assert.deepEqual(IMAGE_NAME.parse('images/debian-12/versions/1'), { image: 'debian-12' });
      assert.deepEqual(IMAGE_NAME.parse('images/debian-12/versions/3'), { image: 'debian-12_v3' });
      assert.deepEqual(IMAGE_NAME.parse('images/debian-12/versions/123456789'), { image: 'debian-12_v123456789' });
      assert.equal(IMAGE_NAME.format({ image: 'debian-12' }), 'images/debian-12');
      assert.equal(IMAGE_NAME.format({ image: 'debian-12_v3' }), 'images/debian-12/versions/3');
      for (const key of ['debian-12', 'debian-12_v2', 'debian-12_v10']) assert.deepEqual(IMAGE_NAME.parse(IMAGE_NAME.format({ image: key })), { image: key });
    });

    it('HOST_IMAGE_NAME likewise, below its host', () => {
      assert.deepEqual(HOST_IMAGE_NAME.parse('hosts/kvm-01/images/debian-12/versions/3'), { host: 'kvm-01', image: 'debian-12_v3' });
      assert.deepEqual(HOST_IMAGE_NAME.parse('hosts/kvm-01/images/debian-12/versions/1'), { host: 'kvm-01', image: 'debian-12' });
      assert.equal(HOST_IMAGE_NAME.format({ host: 'kvm-01', image: 'debian-12_v3' }), 'hosts/kvm-01/images/debian-12/versions/3');
      assert.equal(HOST_IMAGE_NAME.format({ host: 'kvm-01', image: 'debian-12' }), 'hosts/kvm-01/images/debian-12');
    });

    it('aliases, version 0, keys and malformed versions do not parse as names of a version', () => {
      for (const name of [
        'images/debian-12/versions/latest',
        'images/debian-12/versions/stable',
        'images/debian-12/versions/0',
        'images/debian-12/versions/01',
        'images/debian-12/versions/-1',
        'images/debian-12/versions/1234567890',
        'images/debian-12/versions/',
        'images/debian-12/versions',
        'images/debian-12/versions/2/x',
        'images/debian-12/revisions/2',
        'images/debian-12_v2',
        'images/debian-12_v2/versions/3',
      ]) {
        assert.equal(IMAGE_NAME.parse(name), undefined, name);
        assert.equal(HOST_IMAGE_NAME.parse(`hosts/kvm-01/${name}`), undefined, name);
      }
      assert.throws(() => IMAGE_NAME.format({ image: 'debian-12_v1' }), /\{image\}/);
      assert.throws(() => HOST_IMAGE_NAME.format({ host: 'kvm-01', image: 'x_v0' }), /\{image\}/);
    });

    it('IMAGE_KEY takes an image id or <id>_v<n> with n >= 2, nothing else', () => {
      for (const key of ['x', 'debian-12', 'x_v2', 'x_v10', 'x_v999999999']) assert.equal(IMAGE_KEY.test(key), true, key);
      for (const key of ['x_v1', 'x_v0', 'x__v2', 'x_v02', 'x_v', '_v2', 'x_v2_v3', 'x-_v2', 'X_v2', 'x_V2', 'x_v1234567890', 'x.v2', ''])
        assert.equal(IMAGE_KEY.test(key), false, key);
      assert.equal(parseImageKey('x_v1'), undefined);
      assert.equal(parseImageKey('x__v2'), undefined);
      assert.deepEqual(parseImageKey('x_v2'), { id: 'x', version: 2 });
      assert.deepEqual(parseImageKey('x'), { id: 'x', version: 1 });
    });

    it('imageKey and the name helpers agree with the patterns', () => {
      assert.equal(imageKey('debian-12', 1), 'debian-12');
      assert.equal(imageKey('debian-12', 7), 'debian-12_v7');
      for (const [id, version] of [
        ['debian-12', 0],
        ['debian-12', 1.5],
        ['debian-12', 1_000_000_000],
        ['Debian', 2],
        ['x_v2', 2],
      ] as const)
        assert.throws(() => imageKey(id, version), /no image key/, `${id} ${version}`);
      assert.equal(imageVersionNameOfKey('debian-12'), 'images/debian-12/versions/1');
      assert.equal(imageVersionNameOfKey('debian-12_v4'), 'images/debian-12/versions/4');
      assert.equal(imageVersionName('debian-12', 1), 'images/debian-12/versions/1');
      assert.equal(imageNameOfKey('debian-12_v4'), 'images/debian-12');
      assert.throws(() => imageNameOfKey('debian-12_v1'), /not an image key/);
    });

    it("parseImageReference reads a caller's name: latest, a number or an alias", () => {
      assert.deepEqual(parseImageReference('images/debian-12'), { id: 'debian-12', alias: 'latest' });
      assert.deepEqual(parseImageReference('images/debian-12/versions/3'), { id: 'debian-12', version: 3 });
      assert.deepEqual(parseImageReference('images/debian-12/versions/stable'), { id: 'debian-12', alias: 'stable' });
      for (const name of [
        'images/debian-12/versions/0',
        'images/debian-12/versions/Stable',
        'images/debian-12_v2',
        'images/debian-12/versions/',
        'hosts/x',
        '',
      ])
        assert.equal(parseImageReference(name), undefined, name);
    });
  });
});
