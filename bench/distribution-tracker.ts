/// <reference path="../services/distribution/tracker.d.ts" />
/**
 * The torrent baselines' tracker, run inside the control host's namespace by bench/distribution.ts:
 * bittorrent-tracker's Server, HTTP announce only (no UDP, no WebSocket, no stats page), every info-hash
 * accepted (the test bed is a closed network), a 30 s announce interval like cowherd's own tracker.
 *
 *   node --import tsx bench/distribution-tracker.ts <address> <port>
 *
 * Prints `listening <address>:<port>`, then one JSON line per announce: {"event","ip","port","left"}, which
 * the bench reads to know when the origin seeds.
 */
import { createServer } from 'node:http';
import TrackerServer, { type AnnounceParams } from 'bittorrent-tracker/server';

const [address, port] = process.argv.slice(2);
if (address === undefined || port === undefined) {
  process.stderr.write('usage: distribution-tracker.ts <address> <port>\n');
  process.exit(2);
}
const tracker = new TrackerServer({ http: false, udp: false, ws: false, stats: false, interval: 30_000 });
for (const event of ['start', 'complete', 'update', 'stop']) {
  tracker.on(event, (_addr: string, params: AnnounceParams) => {
    process.stdout.write(`${JSON.stringify({ event, ip: params.ip, port: params.port, left: params.left })}\n`);
  });
}
tracker.on('warning', (error: Error) => process.stderr.write(`tracker warning: ${error.message}\n`));
const server = createServer((request, response) => {
  if (request.url?.startsWith('/announce')) tracker.onHttpRequest(request, response, { action: 'announce' });
  else response.writeHead(404).end();
});
server.listen(Number(port), address, () => process.stdout.write(`listening ${address}:${port}\n`));
process.on('SIGTERM', () => {
  tracker.close();
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
