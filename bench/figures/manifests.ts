/**
 * What figure 2 is measured against, beside nginx in warm.ts:
 * - the generator check: nginx's GET rate under loadgen and under wrk, so that every run shows
 *   loadgen is not the limit;
 * - the curve by server.workers (1, 2 and 4 where the machine has the cores), each point with
 *   nginx and Node's floor (bench/node-floor.ts: Node's HTTP server as ocicache's workers run it,
 *   answering the same bytes with the same headers and doing nothing else) in the same rounds.
 *   The floor is the most any handler in Node reaches on this machine; ocicache's share of it is
 *   what its own work per request costs.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { exec, freePort } from '../../test/helpers/tools.js';
import { cleanups, fail, kill, loadgen, log, median, NODE_FLAGS, P, pairedRatio, quick, r2, ROOT, rounds, settle, startOcicache, waitHttp, work } from '../harness.js';

/** wrk's requests per second (GET only), failing the run on errors or non-2xx answers. */
async function wrk(url: string, seconds: number, header: string): Promise<number> {
  const { code, stdout, stderr } = await exec('wrk', ['-t', String(availableParallelism()), '-c', '50', '-d', `${seconds}s`, '-H', header, url]);
  if (code !== 0) fail(`wrk ${url}: ${stderr}`);
  if (/Non-2xx|Socket errors/.test(stdout)) fail(`wrk ${url}: ${stdout}`);
  const m = /Requests\/sec:\s+([\d.]+)/.exec(stdout);
  if (!m) fail(`wrk ${url}: no rate in ${stdout}`);
  return Number(m[1]);
}

/**
 * Whether loadgen is the limit: nginx's GET rate under loadgen and under wrk (50 connections,
 * wrk with a thread per CPU), alternating, and loadgen's own CPU (1.0 is one core busy).
 */
export async function generatorCheck(url: string, accept: string): Promise<{ loadgen: number; wrk: number; ratio: number; loadgenCpu: number }> {
  const seconds = quick ? 2 : 4;
  const lg: number[] = [];
  const w: number[] = [];
  const cpu: number[] = [];
  for (let i = 0; i < P.rounds; i++) {
    const one = async (): Promise<void> => {
      const l = await loadgen(['-url', url, '-c', '50', '-d', `${seconds}s`, '-H', accept]);
      lg.push(l.rps);
      cpu.push(l.cpuSeconds / l.seconds);
    };
    const two = async (): Promise<void> => void w.push(await wrk(url, seconds, accept));
    for (const f of i % 2 ? [two, one] : [one, two]) {
      await settle();
      await f();
    }
  }
  const result = { loadgen: Math.round(median(lg)), wrk: Math.round(median(w)), ratio: pairedRatio(lg, w), loadgenCpu: r2(median(cpu)) };
  log(`generator check: nginx ${result.loadgen} req/s under loadgen, ${result.wrk} under wrk (${result.ratio.toFixed(3)}×); loadgen's CPU ${result.loadgenCpu}`);
  return result;
}

/** The manifest figure 2 asks for: its bytes, digest and media type, for the floor to answer with. */
export interface Served {
  path: string;
  body: Buffer;
  digest: string;
  mediaType: string;
}

/** bench/node-floor.ts with `workers` processes, answering `m`. */
async function startFloor(m: Served, workers: number): Promise<{ url: string; stop(): Promise<void> }> {
  const port = await freePort();
  const bodyFile = join(work, `floor-${port}.json`);
  writeFileSync(bodyFile, m.body);
  const child = spawn(process.execPath, [...NODE_FLAGS, '--import', 'tsx', join(ROOT, 'bench', 'node-floor.ts'), String(port), String(workers), bodyFile, m.digest, m.mediaType], { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  cleanups.push(() => kill(child));
  const url = `http://127.0.0.1:${port}`;
  await waitHttp(url + m.path);
  return { url, stop: () => kill(child) };
}

export interface CurvePoint {
  workers: number;
  rps: number;
  nginx: number;
  floor: number;
  vsNginx: number;
  /** ocicache's rate over the floor's, paired by round */
  vsFloor: number;
  floorVsNginx: number;
}

/** Figure 2 (GET) by server.workers, each point against nginx and Node's floor with as many workers, in rotating rounds. */
export async function workersCurve(upstreamUrl: string, nginx: string, m: Served, accept: string): Promise<CurvePoint[]> {
  const out: CurvePoint[] = [];
  for (const workers of [1, 2, 4].filter((n) => n <= availableParallelism())) {
    const oc = await startOcicache(upstreamUrl, undefined, {}, { workers });
    const floor = await startFloor(m, workers);
    await loadgen(['-url', oc.url + m.path, '-c', '1', '-n', '1', '-H', accept]);
    // Both Node servers run warm (JIT-compiled hot path) before they are measured.
    for (const base of [oc.url, floor.url]) await loadgen(['-url', base + m.path, '-c', '50', '-d', quick ? '1s' : '2s', '-H', accept]);
    const r = await rounds({ ocicache: oc.url, floor: floor.url, nginx }, async (base) => {
      await settle();
      return loadgen(['-url', base + m.path, '-c', '50', '-d', P.round, '-H', accept]);
    });
    const [mine, floors, theirs] = [r.ocicache.map((l) => l.rps), r.floor.map((l) => l.rps), r.nginx.map((l) => l.rps)];
    await kill(oc.child);
    await floor.stop();
    const point = {
      workers,
      rps: Math.round(median(mine)),
      nginx: Math.round(median(theirs)),
      floor: Math.round(median(floors)),
      vsNginx: pairedRatio(mine, theirs),
      vsFloor: pairedRatio(mine, floors),
      floorVsNginx: pairedRatio(floors, theirs),
    };
    log(`figure 2 by workers: ${workers}: ${point.rps} req/s, Node's floor ${point.floor}, nginx ${point.nginx} (${point.vsNginx.toFixed(3)}× nginx, ${point.vsFloor.toFixed(3)}× the floor; the floor ${point.floorVsNginx.toFixed(3)}× nginx)`);
    out.push(point);
  }
  return out;
}
