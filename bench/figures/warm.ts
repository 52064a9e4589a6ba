/**
 * Figures 4 and 5 on loopback, then 1 and 2 on the same cache: 32 concurrent cold requests for
 * one blob on a fresh cache (upstream GETs, time, and nginx sending the same 32 bodies as the
 * floor), then the warm blob (1 and 8 streams) and the manifest by tag (GET and HEAD, 50
 * connections) against nginx serving the same bytes as static files and the peer, in rounds;
 * the cache's peak memory throughout.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { OCI_MANIFEST, type Image } from '../../test/helpers/seed.js';
import { compare, kill, loadgen, memoryPeak, P, quick, r2, rounds, settle, startNginx, startOcicache, startPeer, type Load } from '../harness.js';
import { pullFirst, type Seeded } from './cold.js';

export async function warmFigures(s: Seeded, big: Image, oneCold: number) {
  const { upstream, blobPath, manifestPath, accept } = s;
  const layer = big.blobs[1]!;
  const oc = await startOcicache(upstream.url);
  await pullFirst(oc.url, s);
  const herdPeak = memoryPeak(oc.child.pid!);
  const before = s.upstreamGets();
  await settle();
  const herd = await loadgen(['-url', oc.url + blobPath, '-c', '32', '-n', '32']);
  await sleep(200); // the access log line arrives asynchronously
  const herdGets = s.upstreamGets() - before;
  const rssHerd = herdPeak.read();
  herdPeak.stop();

  const nginx = await startNginx({
    [blobPath]: { data: layer.data, type: 'application/octet-stream', digest: layer.descriptor.digest },
    [manifestPath]: { data: big.manifest, type: OCI_MANIFEST, digest: big.digest },
  });
  // The floor for figure 4 on loopback: sending the same 32 bodies at once from static files.
  await settle();
  const herdFloor = (await loadgen(['-url', nginx + blobPath, '-c', '32', '-n', '32'])).seconds;
  const peer = (await startPeer(upstream.url)).url;
  await loadgen(['-url', peer + blobPath, '-c', '1', '-n', '1']); // warm the peer
  await sleep(500);
  const servers = { ocicache: oc.url, nginx, peer };
  const blob = async (base: string, streams: number): Promise<Load> => {
    await settle();
    return loadgen(['-url', base + blobPath, '-c', String(streams), '-n', String(streams * P.blobsPerStream)]);
  };
  const warmPeak = memoryPeak(oc.child.pid!);
  const warm = { 1: await rounds(servers, (base) => blob(base, 1)), 8: await rounds(servers, (base) => blob(base, 8)) };
  const rssWarm = warmPeak.read();

  // Each server's first round follows a short unmeasured run: a cache runs warm (JIT-compiled hot path), and the first seconds of a fresh Node process are not what operators see.
  const warmed = new Set<string>();
  const manifest = async (base: string, method: string): Promise<Load> => {
    if (!warmed.has(base + method)) await loadgen(['-url', base + manifestPath, '-method', method, '-c', '50', '-d', quick ? '1s' : '2s', '-H', accept]);
    warmed.add(base + method);
    return loadgen(['-url', base + manifestPath, '-method', method, '-c', '50', '-d', P.round, '-H', accept]);
  };
  const manifests = { GET: await rounds(servers, (base) => manifest(base, 'GET')), HEAD: await rounds(servers, (base) => manifest(base, 'HEAD')) };
  // Not part of the target, shown beside it: a cache serves both kinds of load, and under this one V8's old generation
  // grows with garbage until a full collection (README, Performance, figure 5).
  const rssThrough2 = warmPeak.read();
  warmPeak.stop();
  await kill(oc.child);

  return {
    /** nginx stays up for the generator check and figure 2's curve */
    nginx,
    results: {
      blob: Object.fromEntries(
        Object.entries(warm).map(([k, r]) => {
          const c = compare(r, (l) => l.mibps);
          return [`${k}stream`, { ...c, vsPeer: r2(c.vsPeer) }];
        }),
      ),
      manifest: Object.fromEntries(
        Object.entries(manifests).map(([m, r]) => {
          const c = compare(r, (l) => l.rps);
          const p99 = compare(r, (l) => l.p99us);
          return [m, { rps: { ocicache: Math.round(c.ocicache), nginx: Math.round(c.nginx), peer: Math.round(c.peer) }, p99us: { ocicache: p99.ocicache, nginx: p99.nginx, peer: p99.peer }, vsNginx: c.vsNginx, vsPeer: c.vsPeer }];
        }),
      ),
      herd: { upstreamGets: herdGets, seconds: r2(herd.seconds), vsOneCold: herd.seconds / oneCold, nginxSameLoadSeconds: r2(herdFloor), vsNginxSameLoad: r2(herd.seconds / herdFloor) },
      rssMiB: { herd: Math.round(rssHerd), warmBlobs: Math.round(rssWarm), warmBlobsThenManifests: Math.round(rssThrough2) },
    },
  };
}
