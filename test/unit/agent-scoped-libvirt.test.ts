/** Unit tests of scoped-libvirt.ts over a fake Libvirt: an agent sees only domains with a disk in its directory. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { LibvirtError, type DomainInfo, type Libvirt } from '../../services/agent/hypervisor/libvirt.js';
import { scopedLibvirt } from '../../services/agent/hypervisor/scoped-libvirt.js';

function domain(name: string, paths: string[]): DomainInfo {
  return {
    name,
    uuid: `00000000-0000-4000-8000-${name.padStart(12, '0').slice(-12)}`,
    state: 'shut off' as never,
    domainType: 'qemu',
    vcpus: 1,
    memoryBytes: 1,
    disks: paths.map((sourcePath, index) => ({ target: `vd${String.fromCharCode(97 + index)}`, device: 'disk', type: 'file', sourcePath })),
  };
}

describe('scopedLibvirt', () => {
  const domains = [
    domain('mine', ['/srv/a/images/clones/mine/vda.qcow2']),
    domain('theirs', ['/srv/b/images/clones/theirs/vda.qcow2']),
    domain('sibling', ['/srv/a/images-other/x.qcow2']),
    domain('diskless', []),
  ];
  const calls: string[] = [];
  const inner: Libvirt = {
    uri: 'test:///default',
    listDomains: async () => domains,
    domain: async (name) => {
      const found = domains.find((candidate) => candidate.name === name);
      if (!found) throw new LibvirtError('domain-not-found', name);
      return found;
    },
    domainXml: async (name) => `<domain><name>${name}</name></domain>`,
    hypervisorFacts: async () => ({}) as never,
    watchEvents: async () => ({ stop: async () => undefined }) as never,
    define: async () => void calls.push('define'),
    start: async (name) => void calls.push(`start ${name}`),
    destroy: async (name) => void calls.push(`destroy ${name}`),
    undefine: async (name) => void calls.push(`undefine ${name}`),
  };
  const scoped = scopedLibvirt(inner, '/srv/a/images');

  it('lists only domains with a disk inside the directory (not a sibling with the same prefix)', async () => {
    assert.deepEqual(
      (await scoped.listDomains()).map((found) => found.name),
      ['mine'],
    );
  });

  it('treats other domains as missing and never acts on them', async () => {
    assert.equal((await scoped.domain('mine')).name, 'mine');
    for (const name of ['theirs', 'sibling', 'diskless']) {
      await assert.rejects(scoped.domain(name), (error: unknown) => error instanceof LibvirtError && error.kind === 'domain-not-found');
      await assert.rejects(scoped.start(name), LibvirtError);
      await assert.rejects(scoped.undefine(name), LibvirtError);
      await assert.rejects(scoped.domainXml(name), LibvirtError);
    }
    await scoped.start('mine');
    assert.deepEqual(calls, ['start mine']);
  });
});
