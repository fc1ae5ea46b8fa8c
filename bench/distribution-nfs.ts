/**
 * bench:distribution's nfs method, the second alternative the 2011 thesis weighed: every receiver reads the image
 * from an NFS server on the origin. This machine's kernel has neither an NFS client nor nfsd (no `nfs` or `nfsd`
 * in /proc/filesystems or /proc/config.gz), so both ends are user-space programs from Debian:
 * - nfs-ganesha 4.3 with FSAL_VFS on the origin, in the origin's namespace, exporting the origin's directory
 *   read-only over NFSv3 on TCP, with its MOUNT service on a fixed port, no NLM, no RQUOTA. ganesha will not
 *   start unless it can register with rpcbind, so an rpcbind runs in the origin's namespace during the method
 *   (its local socket, /run/rpcbind.sock, is the machine's: two runs of this method at once would clash, and
 *   rpcbind refuses to start a second time); the client needs none, it is told both ports;
 * - `nfs-cp` (libnfs 4.0) on every receiver, all at once, copying the file into the receiver's directory.
 * A receiver is done when its nfs-cp exits with success. As with HTTP, the origin sends one copy per receiver.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Daemon } from '../services/common/platform/child-process.js';
import { ORIGIN, Stopwatch, receiverHosts, transferTimeoutMs, waitUntil, type DistributionMethod } from './distribution-method.js';

const NFS_PORT = 2049;
const MOUNT_PORT = 20048;

/** ganesha.conf: one read-only export of `directory`, NFSv3 over TCP on fixed ports, nothing else. */
function ganeshaConfig(address: string, directory: string, state: string): string {
  return `NFS_CORE_PARAM {
  Bind_Addr = ${address};
  NFS_Port = ${NFS_PORT};
  MNT_Port = ${MOUNT_PORT};
  Protocols = 3;
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Enable_UDP = false;
}
NFS_KRB5 {
  Active_krb5 = false;
}
NFSV4 {
  Graceless = true;
  RecoveryRoot = ${state};
}
EXPORT {
  Export_Id = 1;
  Path = ${directory};
  Pseudo = /origin;
  Access_Type = RO;
  Squash = No_Root_Squash;
  SecType = sys;
  Protocols = 3;
  Transports = TCP;
  FSAL {
    Name = VFS;
  }
}
LOG {
  Default_Log_Level = EVENT;
}
`;
}

export const nfs: DistributionMethod = async (bed, image) => {
  const receivers = receiverHosts(bed);
  const state = join(bed.directory(ORIGIN), 'ganesha');
  await mkdir(state, { recursive: true });
  const config = join(state, 'ganesha.conf');
  const exported = dirname(image.path);
  await writeFile(config, ganeshaConfig(bed.address(ORIGIN), exported, state));
  const daemons: Daemon[] = [];
  try {
    daemons.push(await bed.spawn(ORIGIN, 'rpcbind', ['-f']));
    await waitUntil(
      'rpcbind on the origin',
      () =>
        bed.exec(ORIGIN, 'rpcinfo', ['-p', '127.0.0.1'], { timeoutMs: 5_000 }).then(
          () => true,
          () => false,
        ),
      10_000,
    );
    daemons.push(
      await bed.spawn(ORIGIN, 'ganesha.nfsd', ['-F', '-f', config, '-L', 'STDERR', '-p', join(state, 'ganesha.pid')], {
        readyPattern: /NFS SERVER INITIALIZED/,
        readyTimeoutMs: 60_000,
      }),
    );
    const url = `nfs://${bed.address(ORIGIN)}${exported}/${basename(image.path)}?version=3&nfsport=${NFS_PORT}&mountport=${MOUNT_PORT}`;
    const copies = receivers.map((receiver) => join(bed.directory(receiver), basename(image.path)));
    const stopwatch = new Stopwatch(bed);
    await stopwatch.start();
    await Promise.all(
      receivers.map(async (receiver, index) => {
        await bed.exec(receiver, 'nfs-cp', [url, copies[index]!], { timeoutMs: transferTimeoutMs(bed, image) });
        stopwatch.finished(receiver);
      }),
    );
    return await stopwatch.result(receivers, copies, image);
  } finally {
    // ganesha first: it unregisters from rpcbind on its way out.
    for (const daemon of daemons.reverse()) await daemon.stop(5_000);
  }
};
