/**
 * Figure 8: three replicas (run as npm start runs them) behind Debian's HAProxy with the config
 * `ocicache haproxy` generates. Upstream fetches per blob when 32 requests for each of 6 cold
 * blobs arrive at once through the balancer; warm blob (8 streams) and warm manifest (50
 * connections) throughput through the balancer against the replica that owns the key, asked
 * directly, alternating within each round.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Distribution } from '../../test/helpers/distribution.js';
import { replicaFor, startFleet } from '../../test/helpers/fleet.js';
import { image, OCI_MANIFEST, Pusher } from '../../test/helpers/seed.js';
import { fail, kill, loadgen, log, median, MiB, NODE_FLAGS, P, pairedRatio, quick, ROOT, scope, settle, work } from '../harness.js';

export async function fleetFigure(upstream: Distribution): Promise<{ fetchesPerBlob: number; blob: { balancer: number; direct: number; ratio: number }; manifest: { balancer: number; direct: number; ratio: number } }> {
  const pusher = new Pusher({ url: upstream.url });
  const img = image(Object.fromEntries(Array.from({ length: 6 }, (_, i) => [`part${i}.bin`, randomBytes((quick ? 2 : 8) * MiB)])));
  await pusher.pushImage('library/fleet', 'latest', img);
  const fleet = await startFleet(scope, mkdtempSync(join(work, 'fleet-')), { defaultUpstream: 'docker.io', upstreams: [{ name: 'docker.io', url: upstream.url, dockerHubLibrary: true }] }, 3, {
    argv: [...NODE_FLAGS, join(ROOT, 'dist', 'cli.js')],
    // Request lines would come back through a pipe into this process: not what is measured here.
    log: 'warn',
  });
  if (!fleet) fail('figure 8: haproxy is missing (apt-get install haproxy)');
  const layers = img.blobs.slice(1).map((b) => `/v2/library/fleet/blobs/${b.descriptor.digest}`);
  const gets = (): number => upstream.accessLog.filter((l) => layers.some((p) => l.startsWith(`GET ${p} `))).length;
  await settle();
  await Promise.all(layers.map((p) => loadgen(['-url', fleet.url + p, '-c', '32', '-n', '32'])));
  await sleep(200);
  const fetchesPerBlob = gets() / layers.length;

  const accept = `Accept: ${OCI_MANIFEST}`;
  const manifestPath = '/v2/library/fleet/manifests/latest';
  const owner = async (path: string): Promise<string> => {
    const name = await replicaFor(fleet.url, path, { accept: OCI_MANIFEST });
    return `http://127.0.0.1:${fleet.replicas.find((r) => r.name === name)!.port}`;
  };
  const blobPath = layers[0]!;
  const [blobOwner, manifestOwner] = [await owner(blobPath), await owner(manifestPath)];
  const blobs = { balancer: [] as number[], direct: [] as number[] };
  const manifests = { balancer: [] as number[], direct: [] as number[] };
  for (const base of [fleet.url, manifestOwner]) await loadgen(['-url', base + manifestPath, '-c', '50', '-d', '1s', '-H', accept]);
  for (let i = 0; i < P.rounds; i++) {
    for (const [k, base] of (i % 2 ? [['direct', blobOwner], ['balancer', fleet.url]] : [['balancer', fleet.url], ['direct', blobOwner]]) as Array<['balancer' | 'direct', string]>) {
      await settle();
      blobs[k].push((await loadgen(['-url', base + blobPath, '-c', '8', '-n', String(8 * 8)])).mibps);
    }
    for (const [k, base] of (i % 2 ? [['direct', manifestOwner], ['balancer', fleet.url]] : [['balancer', fleet.url], ['direct', manifestOwner]]) as Array<['balancer' | 'direct', string]>) {
      manifests[k].push((await loadgen(['-url', base + manifestPath, '-c', '50', '-d', P.round, '-H', accept])).rps);
    }
  }
  for (const r of fleet.replicas) if (r.proc) await kill(r.proc.child);
  await kill(fleet.haproxy, 'SIGTERM');
  const pick = (x: { balancer: number[]; direct: number[] }): { balancer: number; direct: number; ratio: number } => ({ balancer: Math.round(median(x.balancer)), direct: Math.round(median(x.direct)), ratio: pairedRatio(x.balancer, x.direct) });
  log(`figure 8: ${fetchesPerBlob} upstream fetches per blob; blob ${median(blobs.balancer).toFixed(0)} vs ${median(blobs.direct).toFixed(0)} MiB/s; manifest ${median(manifests.balancer).toFixed(0)} vs ${median(manifests.direct).toFixed(0)} req/s`);
  return { fetchesPerBlob, blob: pick(blobs), manifest: pick(manifests) };
}

