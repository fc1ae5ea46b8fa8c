/**
 * bench:distribution's multicast method, the first alternative the 2011 thesis weighed: reliable multicast with
 * UFTP (Debian's uftp 4.10). Every receiver runs the client daemon `uftpd`, listening on the test bed's
 * multicast group (MULTICAST_GROUP, administratively scoped: the one group the test bed lets off its hosts); the
 * origin runs the server `uftp` once, as a closed group naming every receiver, so that it starts sending as soon
 * as the last one registered. It sends every block once to the group, then resends what the receivers' NAKs name,
 * pass after pass, until every receiver has the file. `uftpd -t` receives into a temporary name and renames the
 * file once all of its blocks are there: a receiver is done when its copy appears under the image's name.
 *
 * Rate: `-R -1` ("as fast as the interface allows"). The origin's eth0 is the shaped link, and its htb queue
 * pushes back on the socket (a blocked send once the socket's send buffer, 256 KiB, is in the queue, which at
 * every rate of the matrix holds at least that much) instead of dropping, so uftp sends at the link's rate with
 * no loss on the origin's side; every receiver's downlink has the same rate, so none is slower than the sender.
 * A fixed `-R` at the link rate would have to guess the headers' share (uftp counts its payload), and TFMCC
 * (`-C tfmcc`) backs off on the losses it causes itself, below the link rate on a link with nothing else on it.
 */
import { basename, join } from 'node:path';
import type { Daemon } from '../services/common/platform/child-process.js';
import { ORIGIN, Stopwatch, receiverHosts, stopAll, waitForCopies, type DistributionMethod } from './distribution-method.js';
import { MULTICAST_GROUP, type TestBed } from './testbed.js';

const UFTP_PORT = 1044;
/**
 * uftpd's UDP receive buffer: 4 MiB, net.core.rmem_max on this machine (uftpd's default, 256 KiB, overflowed at
 * 5 Gbit/s while uftpd wrote to disk: 128 MiB to 2 receivers took 1.33 S from the origin, the rest resent).
 */
const RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024;

/** A host's UFTP id: its IPv4 address as 8 hex digits (uftpd's own default, made explicit for the closed group). */
function uftpId(bed: TestBed, host: string): string {
  return `0x${bed
    .address(host)
    .split('.')
    .map((part) => Number(part).toString(16).padStart(2, '0'))
    .join('')}`;
}

export const multicast: DistributionMethod = async (bed, image) => {
  const receivers = receiverHosts(bed);
  const daemons: Daemon[] = [];
  try {
    for (const receiver of receivers) {
      daemons.push(
        await bed.spawn(
          receiver,
          'uftpd',
          [
            '-d',
            '-I',
            'eth0',
            '-M',
            MULTICAST_GROUP,
            '-p',
            String(UFTP_PORT),
            '-U',
            uftpId(bed, receiver),
            '-D',
            bed.directory(receiver),
            '-t',
            '-x',
            '2',
            '-B',
            String(RECEIVE_BUFFER_BYTES),
          ],
          // Level 2 prints the key it generated once its sockets are set up, then a line per file.
          { readyPattern: /Loaded \d+ bit/ },
        ),
      );
    }
    const copies = receivers.map((receiver) => join(bed.directory(receiver), basename(image.path)));
    const stopwatch = new Stopwatch(bed);
    await stopwatch.start();
    const server = await bed.spawn(ORIGIN, 'uftp', [
      '-I',
      'eth0',
      '-M',
      MULTICAST_GROUP,
      '-P',
      MULTICAST_GROUP,
      '-p',
      String(UFTP_PORT),
      '-R',
      '-1',
      '-H',
      receivers.map((receiver) => uftpId(bed, receiver)).join(','),
      '-x',
      '2',
      image.path,
    ]);
    daemons.push(server);
    await waitForCopies(bed, image, receivers, copies, stopwatch, daemons);
    const result = await stopwatch.result(receivers, copies, image);
    // How often the sender went over the file again, and for which NAKs: the resends behind ratio_origin.
    const passes = server
      .output()
      .split('\n')
      .filter((line) => /Starting pass|Got \d+ NAKs|Transfer rate|excessive/i.test(line))
      .map((line) => line.replace(/^[\d/: .]+: /, ''));
    process.stderr.write(`distribution: multicast: uftp: ${passes.slice(0, 12).join(' | ')}${passes.length > 12 ? ` ... (${passes.length} lines)` : ''}\n`);
    return result;
  } finally {
    await stopAll(daemons);
  }
};
