/**
 * The HTTP fan-out baseline's origin server, run inside the origin's namespace by bench/distribution.ts:
 * serves one file at `/<its name>` with Content-Length, nothing else.
 *
 *   node --import tsx bench/distribution-http-origin.ts <address> <port> <file>
 *
 * Prints `listening <address>:<port>` once it accepts connections.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createServer } from 'node:http';
import { basename } from 'node:path';

const [address, port, file] = process.argv.slice(2);
if (address === undefined || port === undefined || file === undefined) {
  process.stderr.write('usage: distribution-http-origin.ts <address> <port> <file>\n');
  process.exit(2);
}
const size = (await stat(file)).size;
const path = `/${basename(file)}`;
const server = createServer((request, response) => {
  if (request.method !== 'GET' || request.url !== path) {
    response.writeHead(404).end();
    return;
  }
  response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size });
  createReadStream(file, { highWaterMark: 1024 * 1024 }).pipe(response);
});
server.listen(Number(port), address, () => process.stdout.write(`listening ${address}:${port}\n`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
