/**
 * Figure 2's floor: what Node's HTTP server costs before ocicache does any work of its own.
 *
 *   node --max-semi-space-size=4 --import tsx bench/node-floor.ts <port> <workers> <body-file> <digest> <media-type>
 *
 * The same server ocicache's workers run (src/http/server.ts: its timeouts, its connection
 * limits, Node's cluster module sharing the port among <workers> processes), answering every
 * request with the manifest's bytes and the same seven headers a cached manifest gets
 * (src/http/manifest-answer.ts). No path parsing, no lookup, no access check, no log line, no
 * metrics: the figure between this and ocicache is ocicache's own work per request.
 */
import cluster from 'node:cluster';
import { readFileSync } from 'node:fs';
import { stringify } from 'yaml';
import type { ManifestResult } from '../src/cache/manifests.js';
import { configFromText } from '../src/core/config.js';
import { answerManifest } from '../src/http/manifest-answer.js';
import { createHttpServer } from '../src/http/server.js';

const [port, workers, bodyFile, digest, mediaType] = process.argv.slice(2);
const n = Number(workers);

if (cluster.isPrimary && n > 1) {
  for (let i = 0; i < n; i++) cluster.fork();
} else {
  const body = readFileSync(bodyFile!);
  // The server section as ocicache reads it (defaults and all), on this port.
  const config = configFromText('bench', stringify({ server: { host: '127.0.0.1', port: Number(port) }, upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:1' }] }));
  const m: ManifestResult = { digest: digest!, mediaType: mediaType!, size: body.length, body, cache: 'hit' };
  const server = createHttpServer(
    config.server,
    (req, res) => {
      const head = req.method === 'HEAD';
      res.writeHead(200, answerManifest({ kind: 'manifest', upstream: 'docker.io', bytes: () => 0 }, m, head));
      res.end(head ? undefined : body);
      return true;
    },
    () => undefined,
    { info: () => undefined, warn: () => undefined },
  );
  server.listen(Number(port), '127.0.0.1');
}
