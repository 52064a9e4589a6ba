/**
 * Figures 3 and 4 upstream of the loopback herd: a cold blob through ocicache against the same
 * blob straight from the upstream (each rep a fresh cache, without the blob), with the peer cold
 * the same way and three relays written in Node (bench/relay.ts) for reference; then the same
 * with the upstream behind a WAN-like link, where production caches live, and 32 concurrent cold
 * requests behind it.
 */
import { rmSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Distribution } from '../../test/helpers/distribution.js';
import { kill, loadgen, log, median, P, pairedRatio, r2, settle, startOcicache, startPeer, startRelay, startWanUpstream } from '../harness.js';

/** The upstream and what was pushed to it for figures 1-5. */
export interface Seeded {
  upstream: Distribution;
  /** the big layer, and the manifest naming it */
  blobPath: string;
  manifestPath: string;
  /** another image, pulled first by pullFirst */
  warmupManifestPath: string;
  warmupBlobPath: string;
  /** the Accept header line every manifest request sends */
  accept: string;
  /** GETs of blobPath the upstream has answered so far */
  upstreamGets(): number;
}

/**
 * As in a cache that has run for a while, the process has pulled another image before (manifest
 * and layer, both cold); then the manifest comes first, as in a pull, and the blob timed is cold.
 * Without the earlier pull, figures 3 and 4 timed a fresh process loading and compiling its code
 * (V8's compiler threads took 0.1-0.2 CPU-s of the two cores; README, Performance).
 */
export async function pullFirst(base: string, s: Seeded): Promise<void> {
  await loadgen(['-url', base + s.warmupManifestPath, '-c', '1', '-n', '1', '-H', s.accept]);
  await loadgen(['-url', base + s.warmupBlobPath, '-c', '1', '-n', '1']);
  await sleep(500); // the earlier layer's commit (fsync, rename, index) is not timed
  await loadgen(['-url', base + s.manifestPath, '-c', '1', '-n', '1', '-H', s.accept]);
}

export async function coldFigures(s: Seeded) {
  const { upstream, blobPath } = s;
  const direct: number[] = [];
  const cold: number[] = [];
  const peerCold: number[] = [];
  const relayed: number[] = [];
  const verified: number[] = [];
  const proxied: number[] = [];
  /** The cold blob's time through a freshly started server (a cache, the peer or a relay), after the earlier pull. */
  const coldVia = async (started: Promise<{ url: string; child: ChildProcess; root?: string }>): Promise<number> => {
    const server = await started;
    await pullFirst(server.url, s);
    await settle();
    const seconds = (await loadgen(['-url', server.url + blobPath, '-c', '1', '-n', '1'])).seconds;
    await kill(server.child);
    if (server.root) rmSync(server.root, { recursive: true, force: true });
    return seconds;
  };
  const coldThrough = (base: string): Promise<number> => coldVia(startOcicache(base));
  for (let i = 0; i < P.reps; i++) {
    await settle();
    direct.push((await loadgen(['-url', upstream.url + blobPath, '-c', '1', '-n', '1'])).seconds);
    cold.push(await coldThrough(upstream.url));
    peerCold.push(await coldVia(startPeer(upstream.url)));
    relayed.push(await coldVia(startRelay(upstream.url, 'tcp')));
    verified.push(await coldVia(startRelay(upstream.url, 'verify')));
    proxied.push(await coldVia(startRelay(upstream.url, 'http')));
    log(`3: direct ${direct[i]!.toFixed(3)} s, ocicache ${cold[i]!.toFixed(3)} s, peer ${peerCold[i]!.toFixed(3)} s, relays: TCP ${relayed[i]!.toFixed(3)} s, verifying ${verified[i]!.toFixed(3)} s, HTTP ${proxied[i]!.toFixed(3)} s`);
  }
  const wan = await startWanUpstream(upstream.url, P.wanMiBps);
  const wanDirect: number[] = [];
  const wanCold: number[] = [];
  for (let i = 0; i < P.reps; i++) {
    await settle();
    wanDirect.push((await loadgen(['-url', wan + blobPath, '-c', '1', '-n', '1'])).seconds);
    wanCold.push(await coldThrough(wan));
  }
  const wanOc = await startOcicache(wan);
  await pullFirst(wanOc.url, s);
  const wanBefore = s.upstreamGets();
  await settle();
  const wanHerd = await loadgen(['-url', wanOc.url + blobPath, '-c', '32', '-n', '32']);
  await sleep(200);
  const wanHerdGets = s.upstreamGets() - wanBefore;
  await kill(wanOc.child);
  rmSync(wanOc.root, { recursive: true, force: true });

  return {
    cold: {
      directSeconds: r2(median(direct)),
      ocicacheSeconds: r2(median(cold)),
      ratio: pairedRatio(cold, direct),
      peerSeconds: r2(median(peerCold)),
      peerRatio: r2(pairedRatio(peerCold, direct)),
      vsPeer: r2(pairedRatio(cold, peerCold)),
      relaySeconds: r2(median(relayed)),
      relayRatio: r2(pairedRatio(relayed, direct)),
      verifyingRelaySeconds: r2(median(verified)),
      verifyingRelayRatio: r2(pairedRatio(verified, direct)),
      vsVerifyingRelay: r2(pairedRatio(cold, verified)),
      httpRelaySeconds: r2(median(proxied)),
      httpRelayRatio: r2(pairedRatio(proxied, direct)),
      samples: { direct, ocicache: cold, peer: peerCold, relay: relayed, verifyingRelay: verified, httpRelay: proxied },
    },
    wan: {
      mibps: P.wanMiBps,
      directSeconds: r2(median(wanDirect)),
      ocicacheSeconds: r2(median(wanCold)),
      ratio: median(wanCold) / median(wanDirect),
      herd: { upstreamGets: wanHerdGets, seconds: r2(wanHerd.seconds), vsOneCold: wanHerd.seconds / median(wanCold) },
    },
  };
}
