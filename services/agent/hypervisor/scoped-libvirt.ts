/**
 * A view of a libvirtd that several agents share (the local fleet runs two hosts on one machine, tests run
 * several): each agent sees only the domains whose disks live in its own image directory, so that two
 * agents never report, clone from or delete each other's domains. A dedicated host (the normal case) uses
 * the libvirtd as it is (COWHERD_DOMAIN_SCOPE=all).
 *
 * A domain belongs to the agent when at least one of its file disks is inside the agent's image directory
 * (clones live in `<image dir>/clones/`, and a master VM meant for this host keeps its disk under the image
 * directory too). Domains without such a disk are invisible: `domain()` answers domain-not-found.
 */
import { resolve, sep } from 'node:path';
import { LibvirtError, type DomainInfo, type EventWatch, type Libvirt, type LibvirtEvent } from './libvirt.js';

/** Wraps `inner` so that only domains with a disk under `directory` exist. */
export function scopedLibvirt(inner: Libvirt, directory: string): Libvirt {
  const root = resolve(directory) + sep;
  const belongs = (domain: DomainInfo): boolean => domain.disks.some((disk) => disk.sourcePath !== undefined && resolve(disk.sourcePath).startsWith(root));
  const visible = async (nameOrUuid: string): Promise<DomainInfo> => {
    const domain = await inner.domain(nameOrUuid);
    if (!belongs(domain))
      throw new LibvirtError('domain-not-found', `domain ${JSON.stringify(nameOrUuid)} is not one of this agent's (no disk under ${directory})`);
    return domain;
  };
  const checked =
    <A extends unknown[]>(call: (nameOrUuid: string, ...rest: A) => Promise<void>) =>
    async (nameOrUuid: string, ...rest: A): Promise<void> => {
      await visible(nameOrUuid);
      await call(nameOrUuid, ...rest);
    };
  return {
    uri: inner.uri,
    listDomains: async () => (await inner.listDomains()).filter(belongs),
    domain: visible,
    ...(inner.domainsMany
      ? {
          domainsMany: async (namesOrUuids: readonly string[]) =>
            (await inner.domainsMany!(namesOrUuids)).map((domain) => (domain && belongs(domain) ? domain : undefined)),
        }
      : {}),
    domainXml: async (nameOrUuid) => {
      await visible(nameOrUuid);
      return inner.domainXml(nameOrUuid);
    },
    hypervisorFacts: () => inner.hypervisorFacts(),
    // Events of other agents' domains pass: the reporter reads the domain, finds it invisible, and drops it.
    watchEvents: (onEvent: (event: LibvirtEvent) => void): Promise<EventWatch> => inner.watchEvents(onEvent),
    define: (xml) => inner.define(xml),
    ...(inner.defineMany ? { defineMany: (documents: readonly string[]) => inner.defineMany!(documents) } : {}),
    // Callers pass the UUIDs of domains they listed here, which are this agent's.
    ...(inner.inactiveXmlMany ? { inactiveXmlMany: (uuids: readonly string[]) => inner.inactiveXmlMany!(uuids) } : {}),
    ...(inner.redefineMany ? { redefineMany: (documents: readonly string[]) => inner.redefineMany!(documents) } : {}),
    ...(inner.shutdown ? { shutdown: checked((name) => inner.shutdown!(name)) } : {}),
    ...(inner.resume ? { resume: checked((name) => inner.resume!(name)) } : {}),
    start: checked((name) => inner.start(name)),
    destroy: checked((name) => inner.destroy(name)),
    undefine: checked((name) => inner.undefine(name)),
  };
}
