/**
 * `npm run bench [-- --quick] [--workers N]`: ocicache side by side with the practical ceiling (nginx serving the
 * same bytes as static files) and the peer (distribution in proxy mode), in one run, on loopback.
 * Prints a markdown table of ratios and writes the figures to bench/results/latest.json (or
 * latest-quick.json). See issue 4 for the figures and targets; README "Performance" for results.
 *
 * Load comes from bench/loadgen (Go, standard library, an epoll loop per thread as wrk has): wrk
 * 4.1 stalls on HEAD and cannot follow a redirect, and ab reports latency in whole milliseconds.
 * Every run checks that loadgen drives nginx as hard as wrk does (the generator check).
 *
 * What each figure measures is in bench/figures/; what they share (the servers, the generator,
 * the statistics) in bench/harness.ts.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { startDistribution } from '../test/helpers/distribution.js';
import { need } from '../test/helpers/tools.js';
import { image, multiArch, OCI_MANIFEST, Pusher } from '../test/helpers/seed.js';
import { bucketFigure } from './figures/bucket.js';
import { coldFigures, type Seeded } from './figures/cold.js';
import { fleetFigure } from './figures/fleet.js';
import { indexFigure } from './figures/index-scale.js';
import { generatorCheck, workersCurve } from './figures/manifests.js';
import { STUCK_CLIENTS, stuckClients } from './figures/stuck.js';
import { warmFigures } from './figures/warm.js';
import { cleanups, fail, log, median, MiB, P, quick, ROOT, scope, work, WORKERS } from './harness.js';
import { table } from './table.js';

async function main(): Promise<void> {
  need(scope, 'docker-registry', 'apt-get install docker-registry');
  need(scope, 'nginx', 'apt-get install nginx-light');
  need(scope, 'go', 'Go builds bench/loadgen');
  need(scope, 'wrk', 'apt-get install wrk (the generator check)');
  const gob = spawnSync('go', ['build', '-o', join(ROOT, '.tools', 'loadgen'), '.'], { cwd: join(ROOT, 'bench', 'loadgen'), encoding: 'utf8' });
  if (gob.status !== 0) fail(`go build loadgen: ${gob.stderr}`);

  log(`${quick ? 'quick' : 'full'} run: ${P.layerMiB} MiB layer, ${P.rounds} rounds, ${P.reps} reps of figure 3, ${P.round} per manifest load round, ${P.tags} tags looked up for ${P.duration}`);
  const upstream = (await startDistribution(scope))!;
  const big = image({ 'big.bin': randomBytes(P.layerMiB * MiB) });
  const small = multiArch([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 'small');
  const pusher = new Pusher({ url: upstream.url });
  await pusher.pushImage('library/big', 'latest', big);
  await pusher.pushMultiArch('library/small', '1', small);
  const warmup = image({ 'warmup.bin': randomBytes((quick ? 8 : 32) * MiB) });
  await pusher.pushImage('library/warmup', 'latest', warmup);
  const blobPath = `/v2/library/big/blobs/${big.blobs[1]!.descriptor.digest}`;
  const seeded: Seeded = {
    upstream,
    blobPath,
    manifestPath: '/v2/library/big/manifests/latest',
    warmupManifestPath: '/v2/library/warmup/manifests/latest',
    warmupBlobPath: `/v2/library/warmup/blobs/${warmup.blobs[1]!.descriptor.digest}`,
    accept: `Accept: ${OCI_MANIFEST}`,
    upstreamGets: () => upstream.accessLog.filter((l) => l.startsWith(`GET ${blobPath} `)).length,
  };

  // 3 (and 4 behind a WAN-like link): cold blobs.
  const { cold, wan } = await coldFigures(seeded);
  // 4 and 5 on loopback, 1 and 2: one cache, against nginx and the peer.
  const { nginx, results: warm } = await warmFigures(seeded, big, median(cold.samples.ocicache));
  // The generator check: loadgen against wrk on nginx, alternating, GET (wrk 4.1 stalls on HEAD).
  const generator = await generatorCheck(nginx + seeded.manifestPath, seeded.accept);
  // 2 by workers: the same GET load on a cache with 1, 2 (and 4) workers, against nginx and Node's floor.
  const curve = await workersCurve(upstream.url, nginx, { path: seeded.manifestPath, body: big.manifest, digest: big.digest, mediaType: OCI_MANIFEST }, seeded.accept);
  // 6: the index at scale.
  const index = await indexFigure(upstream.url, seeded.accept);
  // 7: memory with clients that read nothing.
  const stuckRss = await stuckClients();
  // 8: a fleet of three replicas behind HAProxy (README, "Running a fleet").
  const fleet = await fleetFigure(upstream);
  // 9: warm blobs from an S3 bucket (SeaweedFS on loopback), streamed or redirected, against the disk.
  const bucket = await bucketFigure(upstream.url, blobPath);

  const results = {
    quick,
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memGiB: Math.round(totalmem() / 1024 ** 3), node: process.version, date: new Date().toISOString() },
    params: P,
    workers: WORKERS,
    blob: warm.blob,
    manifest: warm.manifest,
    cold,
    herd: warm.herd,
    wan,
    rssMiB: warm.rssMiB,
    index,
    stuck: { clients: STUCK_CLIENTS, blobMiB: P.stuckMiB, peakRssMiB: Math.round(stuckRss) },
    fleet,
    bucket,
    generator,
    curve,
  };
  const outDir = join(ROOT, 'bench', 'results');
  mkdirSync(outDir, { recursive: true });
  const name = `${quick ? 'latest-quick' : 'latest'}${process.argv.includes('--workers') ? `-workers${WORKERS}` : ''}.json`;
  writeFileSync(join(outDir, name), `${JSON.stringify(results, null, 2)}\n`);
  process.stdout.write(table(results));
  if (warm.herd.upstreamGets !== 1) fail(`figure 4: 32 concurrent cold requests made ${warm.herd.upstreamGets} upstream GETs, expected exactly 1`);
  if (fleet.fetchesPerBlob !== 1) fail(`figure 8: the fleet made ${fleet.fetchesPerBlob} upstream GETs per blob, expected exactly 1`);
  if (wan.herd.upstreamGets !== 1) fail(`figure 4 (upstream at ${P.wanMiBps} MiB/s): 32 concurrent cold requests made ${wan.herd.upstreamGets} upstream GETs, expected exactly 1`);
}

main()
  .catch((err: Error) => {
    process.stderr.write(`bench failed: ${err.message}\n`);
    process.exitCode = 1;
  })
  .finally(async () => {
    for (const fn of cleanups.reverse()) await fn();
    rmSync(work, { recursive: true, force: true });
  });
