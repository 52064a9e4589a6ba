/**
 * `npm run bench [-- --quick] [--workers N]`: ocicache side by side with the practical ceiling (nginx serving the
 * same bytes as static files) and the peer (distribution in proxy mode), in one run, on loopback.
 * Prints a markdown table of ratios and writes the figures to bench/results/latest.json (or
 * latest-quick.json). See issue 4 for the figures and targets; README "Performance" for results.
 *
 * Load comes from bench/loadgen (Go, standard library, an epoll loop per thread as wrk has): wrk
 * 4.1 stalls on HEAD and cannot follow a redirect, and ab reports latency in whole milliseconds.
 * Every run checks that loadgen drives nginx as hard as wrk does (the generator check).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { availableParallelism, cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { request } from 'undici';
import { stringify } from 'yaml';
import { configFromText } from '../src/core/config.js';
import { Db } from '../src/storage/db.js';
import { startDistribution, type Distribution } from '../test/helpers/distribution.js';
import { startSeaweed } from '../test/helpers/seaweed.js';
import { replicaFor, startFleet } from '../test/helpers/fleet.js';
import { nodeFlags } from '../test/helpers/cli.js';
import { exec, freePort, need, stopChild, type Scope } from '../test/helpers/tools.js';
import { image, multiArch, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, Pusher, sha256 } from '../test/helpers/seed.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
/** npm start's node flags, read once: ocicache is measured as operators run it (Dockerfile, systemd unit). */
const NODE_FLAGS = nodeFlags();
const quick = process.argv.includes('--quick');
/**
 * server.workers of every cache measured but figure 2's curve and figure 8's replicas: `--workers N`,
 * or what it is on this machine by default (auto), read as ocicache reads its config.
 */
const WORKERS = process.argv.includes('--workers')
  ? Number(process.argv[process.argv.indexOf('--workers') + 1])
  : configFromText('bench', stringify({ upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:1' }] })).server.workers;
const MiB = 1024 * 1024;
const P = quick
  ? { layerMiB: 32, duration: '3s', round: '1500ms', rounds: 2, blobsPerStream: 8, reps: 2, tags: 100_000, wanMiBps: 32, stuckMiB: 8 }
  : { layerMiB: 256, duration: '10s', round: '4s', rounds: 5, blobsPerStream: 2, reps: 3, tags: 1_000_000, wanMiBps: 32, stuckMiB: 16 };
/** Figure 7: clients that read nothing, each on a blob of its own (P.stuckMiB each). */
const STUCK_CLIENTS = 64;

const cleanups: Array<() => unknown> = [];
/** What the test helpers need of a test: their clean-ups run at the end, and a skip (a missing program) fails the run. */
const scope: Scope = { after: (fn) => void cleanups.push(fn), skip: (msg) => fail(msg) };
const work = mkdtempSync(join(tmpdir(), 'ocicache-bench-'));

function fail(msg: string): never {
  throw new Error(msg);
}

function log(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

interface Load {
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
async function loadgen(args: string[]): Promise<Load> {
  const { code, stdout, stderr } = await exec(join(ROOT, '.tools', 'loadgen'), args);
  if (code !== 0) fail(`loadgen ${args.join(' ')}: ${stderr}`);
  const out = JSON.parse(stdout) as Load;
  if (out.errors > 0 || out.non2xx > 0) fail(`loadgen ${args.join(' ')}: ${out.errors} errors, ${out.non2xx} non-2xx`);
  return out;
}

async function waitHttp(url: string, ms = 20_000): Promise<void> {
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
async function settle(): Promise<void> {
  await exec('sync', []);
}

/** The servers under test are killed outright between measurements; nginx gets SIGQUIT (see runNginx). */
const kill = (child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => stopChild(child, signal);

/** Peak RSS since the last reset (VmHWM), in MiB; writing 5 to clear_refs resets it (proc(5)). */
/** A process and its children: a coordinator and its workers (server.workers). */
function group(pid: number): number[] {
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
/** The peak RSS of a process group: the sum of each process's peak (an upper bound of the peak of the sum). */
function peakRss(pid: number): number {
  let mib = 0;
  for (const p of group(pid)) {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'));
    mib += m ? Number(m[1]) / 1024 : NaN;
  }
  return mib;
}
function resetPeak(pid: number): void {
  for (const p of group(pid)) writeFileSync(`/proc/${p}/clear_refs`, '5');
}

/**
 * The peak memory of a cache from now on, in MiB. A single process: its peak RSS (VmHWM, reset
 * here). A group: the peak of its processes' summed PSS, sampled every 100 ms, because each
 * process's RSS also counts the pages of the node binary and libraries it shares with the others
 * (about 45 MiB each, smaps_rollup's Shared_Clean), which the machine holds once.
 */
function memoryPeak(pid: number): { read(): number; stop(): void } {
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

interface Ocicache {
  url: string;
  child: ChildProcess;
  root: string;
  /** ms from spawn to the first answered request */
  startMs: number;
}

async function startOcicache(upstreamUrl: string, root = mkdtempSync(join(work, 'cache-')), storage: Record<string, unknown> = {}, server: Record<string, unknown> = {}): Promise<Ocicache> {
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

async function startPeer(upstreamUrl: string): Promise<{ url: string; child: ChildProcess }> {
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
async function runNginx(server: (port: number, dir: string) => string, ready: string): Promise<string> {
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
function startNginx(files: Record<string, { data: Buffer; type: string; digest: string }>): Promise<string> {
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
function startWanUpstream(upstreamUrl: string, mibps: number): Promise<string> {
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
async function startRelay(upstreamUrl: string, mode: 'tcp' | 'verify' | 'http'): Promise<{ url: string; child: ChildProcess }> {
  const port = await freePort();
  const args = ['--import', 'tsx', join(ROOT, 'bench', 'relay.ts'), String(port), upstreamUrl];
  if (mode === 'verify') args.push('--verify', mkdtempSync(join(work, 'relay-')));
  if (mode === 'http') args.push('--http');
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  cleanups.push(() => kill(child));
  await waitHttp(`http://127.0.0.1:${port}/v2/`);
  return { url: `http://127.0.0.1:${port}`, child };
}

type Server = 'ocicache' | 'nginx' | 'peer';
type Rounds = Record<Server, Load[]>;

/**
 * Measures the servers in turn, P.rounds rounds, each round starting with the next server. The
 * machine is shared: a noisy neighbour for a few seconds then moves one round's ratio, not the
 * figure, which is the median of the rounds' ratios. Five rounds in the full run, not three: with
 * three, one noisy round of the two on the low side decided figure 2 GET (0.49×) and figure 1 with
 * 8 streams (0.79×) once each in session 7's nine runs.
 */
async function rounds<K extends string = Server>(servers: Record<K, string>, measure: (base: string) => Promise<Load>): Promise<Record<K, Load[]>> {
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
const pairedRatio = (a: number[], b: number[]): number => median(a.map((x, i) => x / b[i]!));

/** Each server's median figure over the rounds, and the median of ocicache's per-round ratios to nginx and to the peer. */
function compare(r: Rounds, figure: (l: Load) => number): { ocicache: number; nginx: number; peer: number; vsNginx: number; vsPeer: number } {
  const of = (k: Server): number => median(r[k].map(figure));
  const vs = (k: Server): number => pairedRatio(r.ocicache.map(figure), r[k].map(figure));
  return { ocicache: of('ocicache'), nginx: of('nginx'), peer: of('peer'), vsNginx: vs('nginx'), vsPeer: vs('peer') };
}

/** The middle value; with an even count (the quick run's two rounds) the mean of the middle two. */
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const r2 = (x: number): number => Math.round(x * 100) / 100;
/** Ratios judged against a target are kept whole and rounded only when printed: 0.4995 must not pass as 0.5. */
const f3 = (x: number): string => x.toFixed(3);

/** Fills an index with `n` tags, each pointing to its own small manifest, the way the cache stores them. */
function fillIndex(root: string, n: number): void {
  mkdirSync(root, { recursive: true });
  new Db(join(root, 'index.db')).close(); // creates the schema
  const db = new Database(join(root, 'index.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = OFF');
  const putManifest = db.prepare('INSERT INTO manifests (digest, media_type, body, size, created_at) VALUES (?, ?, ?, ?, ?)');
  const putRepo = db.prepare('INSERT INTO manifest_repos (upstream, name, digest) VALUES (?, ?, ?)');
  const putTag = db.prepare('INSERT INTO tags (upstream, name, tag, digest, checked_at) VALUES (?, ?, ?, ?, ?)');
  const putRef = db.prepare('INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)');
  const layer = sha256('layer');
  const now = Date.now() + 365 * 86_400_000; // checked "in the future": fresh for the whole run
  const batch = db.transaction((from: number, to: number) => {
    for (let i = from; i < to; i++) {
      const config = sha256(`config ${i}`);
      const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: config, size: 100 }, layers: [{ mediaType: OCI_LAYER_TAR, digest: layer, size: 1000 }] }));
      const digest = sha256(body);
      const name = `org${i % 1000}/app${Math.floor(i / 1000) % 100}`;
      putManifest.run(digest, OCI_MANIFEST, body, body.length, now);
      putRepo.run('docker.io', name, digest);
      putTag.run('docker.io', name, `v${i}`, digest, now);
      putRef.run(digest, config);
    }
  });
  for (let i = 0; i < n; i += 50_000) batch(i, Math.min(n, i + 50_000));
  db.close();
}

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
  const warmupManifestPath = '/v2/library/warmup/manifests/latest';
  const warmupBlobPath = `/v2/library/warmup/blobs/${warmup.blobs[1]!.descriptor.digest}`;
  const layer = big.blobs[1]!;
  const blobPath = `/v2/library/big/blobs/${layer.descriptor.digest}`;
  const manifestPath = '/v2/library/big/manifests/latest';
  const accept = `Accept: ${OCI_MANIFEST}`;
  const upstreamGets = (): number => upstream.accessLog.filter((l) => l.startsWith(`GET ${blobPath} `)).length;

  // 3: a cold blob through ocicache vs straight from the upstream (each rep a fresh cache, without
  // the blob), with the peer cold the same way and three relays written in Node (bench/relay.ts)
  // for reference.
  const direct: number[] = [];
  const cold: number[] = [];
  const peerCold: number[] = [];
  const relayed: number[] = [];
  const verified: number[] = [];
  const proxied: number[] = [];
  // As in a cache that has run for a while, the process has pulled another image before (manifest
  // and layer, both cold); then the manifest comes first, as in a pull, and the blob timed is cold.
  // Without the earlier pull, figures 3 and 4 timed a fresh process loading and compiling its code
  // (V8's compiler threads took 0.1-0.2 CPU-s of the two cores; README, Performance).
  const pullFirst = async (base: string): Promise<void> => {
    await loadgen(['-url', base + warmupManifestPath, '-c', '1', '-n', '1', '-H', accept]);
    await loadgen(['-url', base + warmupBlobPath, '-c', '1', '-n', '1']);
    await sleep(500); // the earlier layer's commit (fsync, rename, index) is not timed
    await loadgen(['-url', base + manifestPath, '-c', '1', '-n', '1', '-H', accept]);
  };
  /** The cold blob's time through a freshly started server (a cache, the peer or a relay), after the earlier pull. */
  const coldVia = async (started: Promise<{ url: string; child: ChildProcess; root?: string }>): Promise<number> => {
    const s = await started;
    await pullFirst(s.url);
    await settle();
    const seconds = (await loadgen(['-url', s.url + blobPath, '-c', '1', '-n', '1'])).seconds;
    await kill(s.child);
    if (s.root) rmSync(s.root, { recursive: true, force: true });
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
  // 3 and 4 again with the upstream behind a WAN-like link, where production caches live.
  const wan = await startWanUpstream(upstream.url, P.wanMiBps);
  const wanDirect: number[] = [];
  const wanCold: number[] = [];
  for (let i = 0; i < P.reps; i++) {
    await settle();
    wanDirect.push((await loadgen(['-url', wan + blobPath, '-c', '1', '-n', '1'])).seconds);
    wanCold.push(await coldThrough(wan));
  }
  const wanOc = await startOcicache(wan);
  await pullFirst(wanOc.url);
  const wanBefore = upstreamGets();
  await settle();
  const wanHerd = await loadgen(['-url', wanOc.url + blobPath, '-c', '32', '-n', '32']);
  await sleep(200);
  const wanHerdGets = upstreamGets() - wanBefore;
  await kill(wanOc.child);
  rmSync(wanOc.root, { recursive: true, force: true });

  // 4 and 5: 32 concurrent cold requests for one blob on a fresh cache; peak RSS.
  const oc = await startOcicache(upstream.url);
  await pullFirst(oc.url);
  const herdPeak = memoryPeak(oc.child.pid!);
  const before = upstreamGets();
  await settle();
  const herd = await loadgen(['-url', oc.url + blobPath, '-c', '32', '-n', '32']);
  await sleep(200); // the access log line arrives asynchronously
  const herdGets = upstreamGets() - before;
  const rssHerd = herdPeak.read();
  herdPeak.stop();

  // 1: warm blob throughput, 1 and 8 streams, against nginx and the peer.
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

  // 2: manifest by tag, GET and HEAD, 50 connections.
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

  // The generator check: loadgen against wrk on nginx, alternating, GET (wrk 4.1 stalls on HEAD).
  const generator = await generatorCheck(nginx + manifestPath, accept);
  // 2 by workers: the same GET load on a cache with 1, 2 (and 4) workers, against nginx.
  const curve = await workersCurve(upstream.url, nginx, manifestPath, accept);

  // 6: the index at scale: start-up time and tag lookup latency (one connection: latency, not queueing).
  log(`filling an index with ${P.tags} tags and manifests`);
  const t0 = Date.now();
  const bigRoot = join(work, 'index-at-scale');
  fillIndex(bigRoot, P.tags);
  log(`index filled in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  await settle();
  const scaled = await startOcicache(upstream.url, bigRoot);
  const urls = Array.from({ length: 20_000 }, () => {
    const i = Math.floor(Math.random() * P.tags);
    return `${scaled.url}/v2/org${i % 1000}/app${Math.floor(i / 1000) % 100}/manifests/v${i}`;
  });
  const urlFile = join(work, 'tag-urls.txt');
  writeFileSync(urlFile, urls.join('\n'));
  const lookup = await loadgen(['-urlfile', urlFile, '-c', '1', '-d', P.duration, '-H', accept]);
  await kill(scaled.child);

  // 7: memory with clients that read nothing: each asks for a cold blob of its own, takes the
  // response head and stops reading. Every fill still completes; ocicache's peak RSS meanwhile.
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
    herd: { upstreamGets: herdGets, seconds: r2(herd.seconds), vsOneCold: herd.seconds / median(cold), nginxSameLoadSeconds: r2(herdFloor), vsNginxSameLoad: r2(herd.seconds / herdFloor) },
    wan: {
      mibps: P.wanMiBps,
      directSeconds: r2(median(wanDirect)),
      ocicacheSeconds: r2(median(wanCold)),
      ratio: median(wanCold) / median(wanDirect),
      herd: { upstreamGets: wanHerdGets, seconds: r2(wanHerd.seconds), vsOneCold: wanHerd.seconds / median(wanCold) },
    },
    rssMiB: { herd: Math.round(rssHerd), warmBlobs: Math.round(rssWarm), warmBlobsThenManifests: Math.round(rssThrough2) },
    index: { tags: P.tags, lookupP99us: lookup.p99us, lookupP50us: lookup.p50us, startMs: scaled.startMs },
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
  if (herdGets !== 1) fail(`figure 4: 32 concurrent cold requests made ${herdGets} upstream GETs, expected exactly 1`);
  if (fleet.fetchesPerBlob !== 1) fail(`figure 8: the fleet made ${fleet.fetchesPerBlob} upstream GETs per blob, expected exactly 1`);
  if (wanHerdGets !== 1) fail(`figure 4 (upstream at ${P.wanMiBps} MiB/s): 32 concurrent cold requests made ${wanHerdGets} upstream GETs, expected exactly 1`);
}

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
async function generatorCheck(url: string, accept: string): Promise<{ loadgen: number; wrk: number; ratio: number; loadgenCpu: number }> {
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

/** Figure 2 (GET) by server.workers: 1, 2 and 4 where the machine has the cores, each against nginx in alternating rounds. */
async function workersCurve(upstreamUrl: string, nginx: string, manifestPath: string, accept: string): Promise<Array<{ workers: number; rps: number; nginx: number; vsNginx: number }>> {
  const out = [];
  for (const workers of [1, 2, 4].filter((n) => n <= availableParallelism())) {
    const oc = await startOcicache(upstreamUrl, undefined, {}, { workers });
    await loadgen(['-url', oc.url + manifestPath, '-c', '1', '-n', '1', '-H', accept]);
    await loadgen(['-url', oc.url + manifestPath, '-c', '50', '-d', quick ? '1s' : '2s', '-H', accept]);
    const r = await rounds({ ocicache: oc.url, nginx }, async (base) => {
      await settle();
      return loadgen(['-url', base + manifestPath, '-c', '50', '-d', P.round, '-H', accept]);
    });
    const [mine, theirs] = [r.ocicache.map((l) => l.rps), r.nginx.map((l) => l.rps)];
    await kill(oc.child);
    const point = { workers, rps: Math.round(median(mine)), nginx: Math.round(median(theirs)), vsNginx: pairedRatio(mine, theirs) };
    log(`figure 2 by workers: ${workers}: ${point.rps} req/s, nginx ${point.nginx} (${point.vsNginx.toFixed(3)}×)`);
    out.push(point);
  }
  return out;
}

/**
 * Figure 8: three replicas (run as npm start runs them) behind Debian's HAProxy with the config
 * `ocicache haproxy` generates. Upstream fetches per blob when 32 requests for each of 6 cold
 * blobs arrive at once through the balancer; warm blob (8 streams) and warm manifest (50
 * connections) throughput through the balancer against the replica that owns the key, asked
 * directly, alternating within each round.
 */
async function fleetFigure(upstream: Distribution): Promise<{ fetchesPerBlob: number; blob: { balancer: number; direct: number; ratio: number }; manifest: { balancer: number; direct: number; ratio: number } }> {
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

/**
 * Figure 9: the warm blob (8 streams) from three caches of the same blob: on disk, in an S3 bucket
 * streamed through the cache, and in the bucket with storage.s3.redirect (loadgen follows the 307
 * to SeaweedFS, as clients do), alternating within each round. SeaweedFS on loopback stands in for
 * S3: what is measured is the cache's share, not a cloud's.
 */
async function bucketFigure(upstreamUrl: string, blobPath: string): Promise<{ disk: number; stream: number; redirect: number; streamRatio: number; redirectRatio: number }> {
  const weed = await startSeaweed(scope);
  if (!weed) fail('figure 9: .tools/weed is missing (scripts/build-weed.sh)');
  await weed.createBucket('bench');
  const credentialsFile = join(work, 'aws-credentials');
  writeFileSync(credentialsFile, '[default]\naws_access_key_id = bench\naws_secret_access_key = bench\n');
  const s3 = (prefix: string, redirect: boolean): Record<string, unknown> => ({ backend: 's3', s3: { endpoint: weed.endpoint, bucket: 'bench', prefix, redirect, credentialsFile } });
  const caches = { disk: await startOcicache(upstreamUrl), stream: await startOcicache(upstreamUrl, undefined, s3('stream/', false)), redirect: await startOcicache(upstreamUrl, undefined, s3('redirect/', true)) };
  const digest = blobPath.slice(blobPath.lastIndexOf('/') + 1);
  const local = (root: string): string => join(root, 'blobs', 'sha256', digest.slice(7, 9), digest.slice(7));
  for (const [k, c] of Object.entries(caches)) {
    await loadgen(['-url', c.url + blobPath, '-c', '1', '-n', '1', '-follow']);
    // In the bucket once its local copy is gone (cache/uploads.ts).
    for (const end = Date.now() + 120_000; k !== 'disk' && existsSync(local(c.root)); await sleep(100)) if (Date.now() > end) fail(`figure 9: the ${k} cache did not write the blob to the bucket`);
  }
  const mibps = { disk: [] as number[], stream: [] as number[], redirect: [] as number[] };
  const order = Object.keys(caches) as Array<keyof typeof caches>;
  for (let i = 0; i < P.rounds; i++) {
    for (const k of i % 2 ? [...order].reverse() : order) {
      await settle();
      mibps[k].push((await loadgen(['-url', caches[k].url + blobPath, '-c', '8', '-n', String(8 * P.blobsPerStream), '-follow'])).mibps);
    }
  }
  for (const c of Object.values(caches)) await kill(c.child);
  await weed.kill();
  const result = { disk: Math.round(median(mibps.disk)), stream: Math.round(median(mibps.stream)), redirect: Math.round(median(mibps.redirect)), streamRatio: pairedRatio(mibps.stream, mibps.disk), redirectRatio: pairedRatio(mibps.redirect, mibps.disk) };
  log(`figure 9: warm blob ${result.disk} MiB/s from disk, ${result.stream} streamed from the bucket, ${result.redirect} redirected to it`);
  return result;
}

/** Figure 7: STUCK_CLIENTS raw connections, each on its own cold blob served by nginx, that read only the response head. */
async function stuckClients(): Promise<number> {
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

function table(r: any): string {
  const mark = (ok: boolean): string => (ok ? 'met' : '**missed**');
  const rows = [
    ['1: warm blob, 1 stream', `${r.blob['1stream'].ocicache.toFixed(0)} MiB/s (nginx ${r.blob['1stream'].nginx.toFixed(0)}, peer ${r.blob['1stream'].peer.toFixed(0)})`, `${f3(r.blob['1stream'].vsNginx)}× nginx, ${r.blob['1stream'].vsPeer}× peer`, '≥ 0.9× nginx', mark(r.blob['1stream'].vsNginx >= 0.9)],
    ['1: warm blob, 8 streams', `${r.blob['8stream'].ocicache.toFixed(0)} MiB/s (nginx ${r.blob['8stream'].nginx.toFixed(0)}, peer ${r.blob['8stream'].peer.toFixed(0)})`, `${f3(r.blob['8stream'].vsNginx)}× nginx, ${r.blob['8stream'].vsPeer}× peer`, '≥ 0.9× nginx', mark(r.blob['8stream'].vsNginx >= 0.9)],
    ...(['GET', 'HEAD'] as const).map((m) => [
      `2: manifest by tag, ${m}, 50 conns`,
      `${r.manifest[m].rps.ocicache} req/s, p99 ${(r.manifest[m].p99us.ocicache / 1000).toFixed(2)} ms (nginx ${r.manifest[m].rps.nginx}, p99 ${(r.manifest[m].p99us.nginx / 1000).toFixed(2)} ms; peer ${r.manifest[m].rps.peer}, p99 ${(r.manifest[m].p99us.peer / 1000).toFixed(2)} ms)`,
      `${f3(r.manifest[m].vsNginx)}× nginx, ${r.manifest[m].vsPeer.toFixed(1)}× peer`,
      '≥ 0.5× nginx, ≥ 50× peer',
      mark(r.manifest[m].vsNginx >= 0.5 && r.manifest[m].vsPeer >= 50),
    ]),
    [
      '3: cold blob, loopback',
      `${r.cold.ocicacheSeconds} s (direct ${r.cold.directSeconds} s; peer ${r.cold.peerSeconds} s, ${r.cold.peerRatio}× direct; Node relays: TCP ${r.cold.relaySeconds} s, ${r.cold.relayRatio}× direct; TCP hashing and writing the body ${r.cold.verifyingRelaySeconds} s, ${r.cold.verifyingRelayRatio}× direct; HTTP, nothing else ${r.cold.httpRelaySeconds} s, ${r.cold.httpRelayRatio}× direct)`,
      `${f3(r.cold.ratio)}× direct, ${r.cold.vsVerifyingRelay}× the verifying relay, ${r.cold.vsPeer}× peer`,
      '≤ 1.1× direct',
      mark(r.cold.ratio <= 1.1),
    ],
    [`3: cold blob, upstream at ${r.wan.mibps} MiB/s`, `${r.wan.ocicacheSeconds} s (direct ${r.wan.directSeconds} s)`, `${f3(r.wan.ratio)}× direct`, '≤ 1.1× direct', mark(r.wan.ratio <= 1.1)],
    ['4: 32 concurrent cold, loopback', `${r.herd.upstreamGets} upstream GET, ${r.herd.seconds} s (nginx sending the same 32 bodies: ${r.herd.nginxSameLoadSeconds} s)`, `${f3(r.herd.vsOneCold)}× one cold request, ${r.herd.vsNginxSameLoad}× nginx`, 'exactly 1 GET; ≤ 1.2×', mark(r.herd.upstreamGets === 1 && r.herd.vsOneCold <= 1.2)],
    [`4: 32 concurrent cold, upstream at ${r.wan.mibps} MiB/s`, `${r.wan.herd.upstreamGets} upstream GET, ${r.wan.herd.seconds} s`, `${f3(r.wan.herd.vsOneCold)}× one cold request`, 'exactly 1 GET; ≤ 1.2×', mark(r.wan.herd.upstreamGets === 1 && r.wan.herd.vsOneCold <= 1.2)],
    [
      `5: peak memory${r.workers > 1 ? ` (PSS), coordinator and ${r.workers} workers` : ' (RSS)'}`,
      `${r.rssMiB.herd} MiB during 4, ${r.rssMiB.warmBlobs} MiB during 1 (${r.rssMiB.warmBlobsThenManifests} MiB through 1 and 2)`,
      `${(Math.max(r.rssMiB.herd, r.rssMiB.warmBlobs) / r.workers).toFixed(0)} MiB per worker`,
      '≤ 150 MiB per worker',
      mark(Math.max(r.rssMiB.herd, r.rssMiB.warmBlobs) <= 150 * r.workers),
    ],
    ['6: index at scale', `${r.index.tags} tags: lookup p99 ${(r.index.lookupP99us / 1000).toFixed(2)} ms (p50 ${(r.index.lookupP50us / 1000).toFixed(2)} ms), start-up ${r.index.startMs} ms`, '', 'p99 < 1 ms; start-up < 2 s', mark(r.index.lookupP99us < 1000 && r.index.startMs < 2000)],
    // Issue 17's bound for one process; a group's is issue 22's for the blob figures, per worker.
    r.workers > 1
      ? [`7: clients that read nothing, coordinator and ${r.workers} workers`, `${r.stuck.clients} clients on ${r.stuck.clients} cold ${r.stuck.blobMiB} MiB blobs: peak PSS ${r.stuck.peakRssMiB} MiB`, `${(r.stuck.peakRssMiB / r.workers).toFixed(0)} MiB per worker`, '≤ 150 MiB per worker', mark(r.stuck.peakRssMiB <= 150 * r.workers)]
      : ['7: clients that read nothing', `${r.stuck.clients} clients on ${r.stuck.clients} cold ${r.stuck.blobMiB} MiB blobs: peak RSS ${r.stuck.peakRssMiB} MiB`, '', '≤ 200 MiB', mark(r.stuck.peakRssMiB <= 200)],
    [
      '8: fleet of 3 behind HAProxy',
      `${r.fleet.fetchesPerBlob} upstream GET per blob (32 concurrent requests for each of 6 cold blobs); warm blob ${r.fleet.blob.balancer} MiB/s through the balancer (${r.fleet.blob.direct} from the replica directly); warm manifest ${r.fleet.manifest.balancer} req/s (${r.fleet.manifest.direct})`,
      `blob ${f3(r.fleet.blob.ratio)}×, manifest ${f3(r.fleet.manifest.ratio)}× one replica direct`,
      'exactly 1 GET per blob',
      mark(r.fleet.fetchesPerBlob === 1),
    ],
    [
      '2 by workers: manifest by tag, GET, 50 conns',
      r.curve.map((c: { workers: number; rps: number; nginx: number }) => `${c.workers}: ${c.rps} req/s (nginx ${c.nginx})`).join('; '),
      r.curve.map((c: { workers: number; vsNginx: number }) => `${c.workers}: ${f3(c.vsNginx)}×`).join(', '),
      '≥ 0.6× nginx with every core',
      mark(r.curve[r.curve.length - 1].vsNginx >= 0.6),
    ],
    [
      'generator check: nginx GET, 50 conns',
      `loadgen ${r.generator.loadgen} req/s, wrk ${r.generator.wrk} req/s; loadgen's CPU ${r.generator.loadgenCpu} cores`,
      `${f3(r.generator.ratio)}× wrk`,
      '≥ 0.95× wrk',
      mark(r.generator.ratio >= 0.95),
    ],
    [
      '9: warm blob from an S3 bucket (SeaweedFS, loopback), 8 streams',
      `streamed through the cache ${r.bucket.stream} MiB/s; redirected to the bucket ${r.bucket.redirect} MiB/s; from disk ${r.bucket.disk} MiB/s`,
      `stream ${f3(r.bucket.streamRatio)}×, redirect ${f3(r.bucket.redirectRatio)}× disk`,
      'reported',
      '',
    ],
  ];
  const head = `\n${r.quick ? 'Quick run' : 'Full run'}: ${r.params.layerMiB} MiB layer; ${r.machine.cpus} × ${r.machine.cpu}, ${r.machine.memGiB} GiB, Node ${r.machine.node}, ${r.machine.date}\n\n`;
  return `${head}Measured: each server's median. Ratio: the median of the ratios within each round (figures 1-3).\n\n| figure | measured | ratio | target | |\n|---|---|---|---|---|\n${rows.map((row) => `| ${row.join(' | ')} |`).join('\n')}\n`;
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
