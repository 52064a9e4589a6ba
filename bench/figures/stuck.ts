/**
 * Figure 7: memory with clients that read nothing. Each asks for a cold blob of its own, takes the
 * response head and stops reading; every fill still completes. The cache's peak memory meanwhile.
 */
import { randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { sha256 } from '../../test/helpers/seed.js';
import { fail, kill, log, memoryPeak, MiB, P, settle, startNginx, startOcicache } from '../harness.js';

/** Clients that read nothing, each on a blob of its own (P.stuckMiB each). */
export const STUCK_CLIENTS = 64;

/** Figure 7: STUCK_CLIENTS raw connections, each on its own cold blob served by nginx, that read only the response head. */
export async function stuckClients(): Promise<number> {
  const files: Record<string, { data: Buffer; type: string; digest: string }> = {};
  for (let i = 0; i < STUCK_CLIENTS; i++) {
    const data = randomBytes(P.stuckMiB * MiB);
    files[`/v2/library/stuck/blobs/${sha256(data)}`] = { data, type: 'application/octet-stream', digest: sha256(data) };
  }
  const origin = await startNginx(files);
  const oc = await startOcicache(origin);
  await settle();
  const stuckPeak = memoryPeak(oc.child.pid!);
  const port = Number(new URL(oc.url).port);
  const sockets = Object.keys(files).map((path) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(`GET ${path} HTTP/1.1\r\nHost: bench\r\n\r\n`));
    socket.once('data', () => socket.pause());
    socket.on('error', () => undefined);
    return socket;
  });
  const cached = (): number => readdirSync(join(oc.root, 'blobs'), { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).length;
  for (const end = Date.now() + 300_000; cached() < STUCK_CLIENTS; await sleep(200)) {
    if (Date.now() > end) fail(`figure 7: ${cached()} of ${STUCK_CLIENTS} blobs cached after 300 s`);
  }
  const peak = stuckPeak.read();
  stuckPeak.stop();
  for (const s of sockets) s.destroy();
  await kill(oc.child);
  log(`figure 7: ${STUCK_CLIENTS} clients that read nothing: peak memory ${peak.toFixed(0)} MiB`);
  return peak;
}

