/**
 * What every figure of the benchmark shares: the run's parameters, the servers measured (ocicache
 * as npm start runs it, nginx, the peer, the relays), the load generator, memory sampling, and
 * the statistics (rounds, medians, paired ratios). Clean-ups run at the end of the run (run.ts).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { request } from 'undici';
import { stringify } from 'yaml';
import { configFromText } from '../src/core/config.js';
import { nodeFlags } from '../test/helpers/cli.js';
import { exec, freePort, stopChild, type Scope } from '../test/helpers/tools.js';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
/** npm start's node flags, read once: ocicache is measured as operators run it (Dockerfile, systemd unit). */
export const NODE_FLAGS = nodeFlags();
export const quick = process.argv.includes('--quick');
/**
 * server.workers of every cache measured but figure 2's curve and figure 8's replicas: `--workers N`,
 * or what it is on this machine by default (auto), read as ocicache reads its config.
 */
export const WORKERS = process.argv.includes('--workers')
  ? Number(process.argv[process.argv.indexOf('--workers') + 1])
  : configFromText('bench', stringify({ upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:1' }] })).server.workers;
export const MiB = 1024 * 1024;
export const P = quick
  ? { layerMiB: 32, duration: '3s', round: '1500ms', rounds: 2, blobsPerStream: 8, reps: 2, tags: 100_000, wanMiBps: 32, stuckMiB: 8 }
  : { layerMiB: 256, duration: '10s', round: '4s', rounds: 5, blobsPerStream: 2, reps: 3, tags: 1_000_000, wanMiBps: 32, stuckMiB: 16 };

export const cleanups: Array<() => unknown> = [];
/** What the test helpers need of a test: their clean-ups run at the end, and a skip (a missing program) fails the run. */
export const scope: Scope = { after: (fn) => void cleanups.push(fn), skip: (msg) => fail(msg) };
export const work = mkdtempSync(join(tmpdir(), 'ocicache-bench-'));

export function fail(msg: string): never {
  throw new Error(msg);
}

export function log(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

export interface Load {
  requests: number;
  errors: number;
  non2xx: number;
  bytes: number;
  seconds: number;
  rps: number;
  mibps: number;
  p50us: number;
  p99us: number;
  /** the load generator's own CPU time: what receiving cost */
  cpuSeconds: number;
}

/** Runs loadgen asynchronously: a blocked event loop would stop draining the upstream's log pipe and stall it. */
export async function loadgen(args: string[]): Promise<Load> {
  const { code, stdout, stderr } = await exec(join(ROOT, '.tools', 'loadgen'), args);
  if (code !== 0) fail(`loadgen ${args.join(' ')}: ${stderr}`);
  const out = JSON.parse(stdout) as Load;
  if (out.errors > 0 || out.non2xx > 0) fail(`loadgen ${args.join(' ')}: ${out.errors} errors, ${out.non2xx} non-2xx`);
  return out;
}

export async function waitHttp(url: string, ms = 20_000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(10)) {
    try {
      const r = await request(url);
      await r.body.dump();
      if (r.statusCode < 500) return;
    } catch {
      /* not yet */
    }
  }
  fail(`${url} did not come up`);
}

/**
 * Writes dirty pages out before a timed transfer. The caches, the peer and nginx's set-up each
 * leave hundreds of MiB in the page cache; the kernel writes them back once they are about 30 s
 * old (vm.dirty_expire_centisecs), and on two cores that writeback ran during a later measurement.
 */
export async function settle(): Promise<void> {
  await exec('sync', []);
}

/** The servers under test are killed outright between measurements; nginx gets SIGQUIT (see runNginx). */
export const kill = (child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => stopChild(child, signal);

/** A process and its children: a coordinator and its workers (server.workers). */
export function group(pid: number): number[] {
  const kids = readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        return readFileSync(`/proc/${d}/stat`, 'utf8').replace(/^.*\) /s, '').split(' ')[1] === String(pid);
      } catch {
        return false;
      }
    })
    .map(Number);
  return [pid, ...kids];
}

/**
 * The peak RSS of a process group since the last reset (VmHWM, in MiB): the sum of each process's
 * peak (an upper bound of the peak of the sum).
 */
function peakRss(pid: number): number {
  let mib = 0;
  for (const p of group(pid)) {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'));
    mib += m ? Number(m[1]) / 1024 : NaN;
  }
  return mib;
}
/** Writing 5 to clear_refs resets VmHWM (proc(5)). */
function resetPeak(pid: number): void {
  for (const p of group(pid)) writeFileSync(`/proc/${p}/clear_refs`, '5');
}

/**
 * The peak memory of a cache from now on, in MiB. A single process: its peak RSS (VmHWM, reset
 * here). A group: the peak of its processes' summed PSS, sampled every 100 ms, because each
 * process's RSS also counts the pages of the node binary and libraries it shares with the others
 * (about 45 MiB each, smaps_rollup's Shared_Clean), which the machine holds once.
 */
export function memoryPeak(pid: number): { read(): number; stop(): void } {
  const pids = group(pid);
  if (pids.length === 1) {
    resetPeak(pid);
    return { read: () => peakRss(pid), stop: () => undefined };
  }
  let peak = 0;
  const sample = (): void => {
    let sum = 0;
    for (const p of pids) sum += Number(/^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${p}/smaps_rollup`, 'utf8'))?.[1] ?? NaN) / 1024;
    peak = Math.max(peak, sum);
  };
  sample();
  const timer = setInterval(sample, 100);
  cleanups.push(() => clearInterval(timer));
  return {
    read: () => {
      sample();
      return peak;
    },
    stop: () => clearInterval(timer),
  };
}

export interface Ocicache {
  url: string;
  child: ChildProcess;
  root: string;
  /** ms from spawn to the first answered request */
  startMs: number;
}

export async function startOcicache(upstreamUrl: string, root = mkdtempSync(join(work, 'cache-')), storage: Record<string, unknown> = {}, server: Record<string, unknown> = {}): Promise<Ocicache> {
  const port = await freePort();
  const config = join(work, `ocicache-${port}.yaml`);
  writeFileSync(config, stringify({ server: { host: '127.0.0.1', port, workers: WORKERS, ...server }, storage: { root, ...storage }, defaultUpstream: 'docker.io', upstreams: [{ name: 'docker.io', url: upstreamUrl, dockerHubLibrary: true }] }));
  const t0 = Date.now();
  // Default log level (info, one line per request) to /dev/null: the cost of logging is measured too.
  const child = spawn(process.execPath, [...NODE_FLAGS, join(ROOT, 'dist', 'cli.js'), 'serve', '--config', config], { stdio: ['ignore', 'ignore', 'inherit'] });
  cleanups.push(() => kill(child));
  const url = `http://127.0.0.1:${port}`;
  await waitHttp(`${url}/healthz`);
  const startMs = Date.now() - t0;
  // A group answers once its first worker listens: measured once all are up.
  const workers = typeof server.workers === 'number' ? server.workers : WORKERS;
  for (const end = Date.now() + 20_000; workers > 1 && group(child.pid!).length < workers + 1; await sleep(20)) if (Date.now() > end) fail(`ocicache did not start ${workers} workers`);
  return { url, child, root, startMs };
}

export async function startPeer(upstreamUrl: string): Promise<{ url: string; child: ChildProcess }> {
  const port = await freePort();
  const dir = mkdtempSync(join(work, 'peer-'));
  writeFileSync(
    join(dir, 'config.yml'),
    `version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: ${join(dir, 'storage')}}
  cache: {blobdescriptor: inmemory}
http: {addr: "127.0.0.1:${port}"}
proxy: {remoteurl: "${upstreamUrl}"}
`,
  );
  const child = spawn('docker-registry', ['serve', join(dir, 'config.yml')], { stdio: 'ignore' });
  cleanups.push(() => kill(child));
  await waitHttp(`http://127.0.0.1:${port}/v2/`);
  return { url: `http://127.0.0.1:${port}`, child };
}

/** Runs nginx with `server` as its one server block; stopped with SIGQUIT at the end. */
export async function runNginx(server: (port: number, dir: string) => string, ready: string): Promise<string> {
  const port = await freePort();
  const dir = mkdtempSync(join(work, 'nginx-'));
  mkdirSync(join(dir, 'tmp'));
  const t = join(dir, 'tmp');
  writeFileSync(
    join(dir, 'nginx.conf'),
    `worker_processes auto;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log;
user root root;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path ${t}; proxy_temp_path ${t}; fastcgi_temp_path ${t}; uwsgi_temp_path ${t}; scgi_temp_path ${t};
  ${server(port, dir)}
}
`,
  );
  // Not inherited stdio: nginx workers would hold our stdout open. Stopped with SIGQUIT, which the
  // master passes on to its workers (SIGKILL would orphan them).
  const child = spawn('nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir, '-g', 'daemon off;'], { stdio: 'ignore' });
  cleanups.push(() => kill(child, 'SIGQUIT'));
  await waitHttp(`http://127.0.0.1:${port}${ready}`);
  return `http://127.0.0.1:${port}`;
}

/** nginx serving the blob and the manifest bytes as static files, at the same paths: the ceiling. */
export function startNginx(files: Record<string, { data: Buffer; type: string; digest: string }>): Promise<string> {
  return runNginx((port, dir) => {
    const locations: string[] = [];
    for (const [path, f] of Object.entries(files)) {
      mkdirSync(join(dir, 'www', dirname(path)), { recursive: true });
      writeFileSync(join(dir, 'www', path), f.data);
      locations.push(`location = ${path} { default_type ${f.type}; add_header Docker-Content-Digest ${f.digest}; }`);
    }
    return `server {
    listen 127.0.0.1:${port};
    root ${dir}/www;
    ${locations.join('\n    ')}
  }`;
  }, '/');
}

/**
 * The upstream as a client on a WAN sees it: nginx in front of the registry sending each response
 * at `mibps` (limit_rate is per connection), so the network, not the hop, sets the pace.
 */
export function startWanUpstream(upstreamUrl: string, mibps: number): Promise<string> {
  return runNginx(
    (port) => `server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass ${upstreamUrl}; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $http_host;
      # limit_rate paces what nginx sends; with proxy_buffering off it does not apply.
      limit_rate ${mibps * 1024 * 1024};
    }
  }`,
    '/v2/',
  );
}

/** A relay in its own Node process, from bench/relay.ts: figure 3's references. */
export async function startRelay(upstreamUrl: string, mode: 'tcp' | 'verify' | 'http'): Promise<{ url: string; child: ChildProcess }> {
  const port = await freePort();
  const args = ['--import', 'tsx', join(ROOT, 'bench', 'relay.ts'), String(port), upstreamUrl];
  if (mode === 'verify') args.push('--verify', mkdtempSync(join(work, 'relay-')));
  if (mode === 'http') args.push('--http');
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  cleanups.push(() => kill(child));
  await waitHttp(`http://127.0.0.1:${port}/v2/`);
  return { url: `http://127.0.0.1:${port}`, child };
}

export type Server = 'ocicache' | 'nginx' | 'peer';
export type Rounds = Record<Server, Load[]>;

/**
 * Measures the servers in turn, P.rounds rounds, each round starting with the next server. The
 * machine is shared: a noisy neighbour for a few seconds then moves one round's ratio, not the
 * figure, which is the median of the rounds' ratios. Five rounds in the full run, not three: with
 * three, one noisy round of the two on the low side decided figure 2 GET (0.49×) and figure 1 with
 * 8 streams (0.79×) once each in session 7's nine runs.
 */
export async function rounds<K extends string = Server>(servers: Record<K, string>, measure: (base: string) => Promise<Load>): Promise<Record<K, Load[]>> {
  const order = Object.keys(servers) as K[];
  const out = Object.fromEntries(order.map((k) => [k, [] as Load[]])) as Record<K, Load[]>;
  for (let i = 0; i < P.rounds; i++) {
    for (let j = 0; j < order.length; j++) {
      const k = order[(i + j) % order.length]!;
      out[k].push(await measure(servers[k]));
    }
  }
  return out;
}

/** The median of a[i] / b[i]: figures taken in the same round (figures 1, 2) or rep (figure 3), paired. */
export const pairedRatio = (a: number[], b: number[]): number => median(a.map((x, i) => x / b[i]!));

/** Each server's median figure over the rounds, and the median of ocicache's per-round ratios to nginx and to the peer. */
export function compare(r: Rounds, figure: (l: Load) => number): { ocicache: number; nginx: number; peer: number; vsNginx: number; vsPeer: number } {
  const of = (k: Server): number => median(r[k].map(figure));
  const vs = (k: Server): number => pairedRatio(r.ocicache.map(figure), r[k].map(figure));
  return { ocicache: of('ocicache'), nginx: of('nginx'), peer: of('peer'), vsNginx: vs('nginx'), vsPeer: vs('peer') };
}

/** The middle value; with an even count (the quick run's two rounds) the mean of the middle two. */
export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
export const r2 = (x: number): number => Math.round(x * 100) / 100;
/** Ratios judged against a target are kept whole and rounded only when printed: 0.4995 must not pass as 0.5. */
export const f3 = (x: number): string => x.toFixed(3);
