/**
 * server.workers: a coordinator and two workers, run as `ocicache serve` runs them, against a real
 * registry. Pinned: one upstream GET for a cold blob asked through every worker at once, hits
 * answered by the workers themselves, one /metrics for the group, a killed worker replaced, a
 * killed coordinator taking its workers with it (and the cache serving again after a restart),
 * and SIGTERM letting a download in flight finish.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, constants, openSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, Socket } from 'node:net';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import bcrypt from 'bcryptjs';
import { Agent, request } from 'undici';
import { CLI, startCli, writeConfig, type Running } from './helpers/cli.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { Db } from '../src/storage/db.js';
import { image, OCI_MANIFEST, Pusher, randomLayer, type Image } from './helpers/seed.js';
import { tempDir } from './helpers/tools.js';

const MiB = 1024 * 1024;

interface Group {
  proc: Running;
  url: string;
  pid: number;
}

/** Where a group listens, from its "Server listening" line in `out()`; undefined if it exited or `ms` passed first. */
async function listeningAt(child: ChildProcess, out: () => string, ms = 10_000): Promise<string | undefined> {
  for (const end = Date.now() + ms; Date.now() < end && child.exitCode === null; await sleep(25)) {
    const port = /"msg":"Server listening at http:\/\/127\.0\.0\.1:(\d+)"/.exec(out())?.[1];
    if (port) return `http://127.0.0.1:${port}`;
  }
  return undefined;
}

async function serveGroup(t: TestContext, config: string): Promise<Group> {
  const proc = startCli(['serve', '--config', config]);
  t.after(() => proc.child.kill('SIGKILL'));
  const url = await listeningAt(proc.child, proc.out);
  if (!url) throw new Error(`ocicache did not start:\n${proc.out()}\n${proc.err()}`);
  return { proc, url, pid: proc.child.pid! };
}

/** The pids of a process's children (the workers of a coordinator). */
function children(pid: number): number[] {
  try {
    // Node processes only: tsx runs its esbuild service as a child too, while its cache is cold.
    return execFileSync('pgrep', ['-x', '-P', String(pid), 'node'], { encoding: 'utf8' }).split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** Request log lines: which process answered what. */
function requests(out: string): Array<{ pid: number; reqId: string; url: string; cache?: string; status: number }> {
  return out
    .split('\n')
    .filter((l) => l.includes('"msg":"request"'))
    .map((l) => JSON.parse(l) as { pid: number; reqId: string; url: string; cache?: string; status: number });
}

function sha256(b: Buffer): string {
  return `sha256:${createHash('sha256').update(b).digest('hex')}`;
}

async function setup(t: TestContext, extra: Record<string, unknown> = {}): Promise<{ registry: Distribution; img: Image; root: string; config: string; blobPath: string; manifestPath: string } | undefined> {
  const registry = await startDistribution(t);
  if (!registry) return undefined;
  const img = image({ 'big.bin': randomLayer(16 * MiB) });
  await new Pusher({ url: registry.url }).pushImage('library/app', 'v1', img);
  const root = tempDir(t, 'workers');
  const config = writeConfig(root, {
    server: { host: '127.0.0.1', port: 0, workers: 2, shutdownTimeout: '20s' },
    log: { level: 'info' },
    storage: { root },
    defaultUpstream: 'docker.io',
    upstreams: [{ name: 'docker.io', url: registry.url, dockerHubLibrary: true }],
    ...extra,
  });
  return { registry, img, root, config, blobPath: `/v2/library/app/blobs/${img.blobs[1]!.descriptor.digest}`, manifestPath: '/v2/library/app/manifests/v1' };
}

/** Separate connections, so the coordinator hands them to both workers in turn. */
async function get(url: string, headers: Record<string, string> = {}): Promise<{ status: number; body: Buffer; headers: Record<string, unknown> }> {
  const dispatcher = new Agent({ connections: 1 });
  try {
    const res = await request(url, { dispatcher, headers });
    return { status: res.statusCode, body: Buffer.from(await res.body.arrayBuffer()), headers: res.headers };
  } finally {
    await dispatcher.close();
  }
}

/**
 * Waits until the coordinator indexed a blob: a client's download ends when its last byte is
 * verified, and the fill is renamed into place and indexed just after, so a request at once may
 * still follow the fill (a miss) instead of reading the file (a hit).
 */
async function untilCached(root: string, name: string, digest: string): Promise<void> {
  const db = new Db(join(root, 'index.db'), { reader: true });
  try {
    for (const end = Date.now() + 5000; !db.blobHeldBy('docker.io', name, digest); await sleep(20)) assert.ok(Date.now() < end, `${digest} was not indexed`);
  } finally {
    db.close();
  }
}

test('two workers: one upstream GET for 32 concurrent cold requests, hits answered by both workers, one /metrics', { timeout: 120_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  const before = Date.now() / 1000;
  const group = await serveGroup(t, s.config);
  const listening = Date.now() / 1000;
  for (const end = Date.now() + 5000; children(group.pid).length !== 2; await sleep(50)) assert.ok(Date.now() < end, `two workers beside the coordinator, not ${children(group.pid).join(', ')}`);
  const workers = children(group.pid);

  const digest = s.img.blobs[1]!.descriptor.digest;
  const cold = await Promise.all(Array.from({ length: 32 }, () => get(group.url + s.blobPath)));
  for (const r of cold) {
    assert.equal(r.status, 200);
    assert.equal(sha256(r.body), digest, 'every waiter got the whole verified blob');
  }
  assert.equal(s.registry.accessLog.filter((l) => l.startsWith(`GET ${s.blobPath} `)).length, 1, 'exactly one upstream GET');
  await untilCached(s.root, 'library/app', digest);

  const warm = await Promise.all(Array.from({ length: 16 }, () => get(group.url + s.blobPath, { range: 'bytes=0-99' })));
  for (const r of warm) {
    assert.equal(r.status, 206);
    assert.equal(r.headers['x-cache'], 'HIT');
    assert.equal(r.headers["content-range"], `bytes 0-99/${s.img.blobs[1]!.descriptor.size}`);
    assert.equal(r.headers['oci-namespace'], 'docker.io', 'a node tier checks it (README, "Running a fleet")');
    assert.equal(r.headers['docker-content-digest'], digest);
  }
  await get(group.url + s.manifestPath, { accept: OCI_MANIFEST });
  const manifests = await Promise.all(Array.from({ length: 16 }, () => get(group.url + s.manifestPath, { accept: OCI_MANIFEST })));
  for (const r of manifests) assert.equal(r.headers['x-cache'], 'HIT');

  await sleep(400); // request lines are written in batches
  const hits = requests(group.proc.out()).filter((r) => r.cache === 'hit');
  assert.equal(hits.length, 32);
  assert.deepEqual([...new Set(hits.map((r) => r.pid))].sort(), [...workers].sort(), 'both workers answered hits themselves');
  // The workers followed the coordinator's fill and answered the misses themselves, each logged
  // once (by the worker: the coordinator does not count what it handed off).
  const misses = requests(group.proc.out()).filter((r) => r.cache === 'miss' && r.url === s.blobPath);
  assert.equal(misses.length, 32);
  assert.deepEqual([...new Set(misses.map((r) => r.pid))].sort(), [...workers].sort(), 'both workers followed the fill');
  for (const m of misses) assert.match(m.reqId, /^req-w\d+-[0-9a-z]+$/, 'a worker\'s request id');

  const metrics = (await get(`${group.url}/metrics`)).body.toString();
  assert.match(metrics, /^ocicache_cache_requests_total\{upstream="docker.io",kind="blob",result="hit"\} 16$/m);
  assert.match(metrics, /^ocicache_cache_requests_total\{upstream="docker.io",kind="manifest",result="hit"\} 16$/m);
  assert.match(metrics, /^ocicache_cache_requests_total\{upstream="docker.io",kind="blob",result="miss"\} 32$/m);
  assert.equal(metrics.match(/^ocicache_process_resident_memory_bytes /gm)?.length, 1, 'one series for the group');
  // The group's start: one series (prom-client would omit it when summing processes).
  assert.equal(metrics.match(/^ocicache_process_start_time_seconds /gm)?.length, 1);
  const started = Number(/^ocicache_process_start_time_seconds (\d+)$/m.exec(metrics)?.[1]);
  assert.ok(started >= Math.floor(before) - 1 && started <= listening, `${started} between ${before} and ${listening}`);

  // The status page counts every process's answers (the workers' arrive each second): 32 blob
  // misses, 16 blob hits, 1 manifest miss and 16 manifest hits; 17 pulls of the image by tag.
  let page = '';
  for (const end = Date.now() + 5000; !page.includes('<td>17</td>') || !page.includes('49.2%'); await sleep(200)) {
    if (Date.now() > end) break;
    page = (await get(`${group.url}/`)).body.toString();
  }
  assert.match(page, /<dd id="hit-ratio">49\.2% of manifest and blob requests since start<\/dd>/);
  assert.match(page, /<tr><td>docker\.io\/library\/app<\/td><td>17<\/td><\/tr>/);
});

test('a worker killed with SIGKILL is replaced; the coordinator killed takes its workers, and a restart serves from the cache', { timeout: 120_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  const group = await serveGroup(t, s.config);
  assert.equal((await get(group.url + s.blobPath)).status, 200);
  await untilCached(s.root, 'library/app', s.img.blobs[1]!.descriptor.digest);
  for (let i = 0; i < 4; i++) assert.equal((await get(group.url + s.blobPath)).headers['x-cache'], 'HIT');
  const hitsServed = async (): Promise<number> => Number(/^ocicache_cache_requests_total\{upstream="docker.io",kind="blob",result="hit"\} (\d+)$/m.exec((await get(`${group.url}/metrics`)).body.toString())?.[1] ?? 0);
  assert.equal(await hitsServed(), 4);
  const [victim, other] = children(group.pid);
  process.kill(victim!, 'SIGKILL');
  for (const end = Date.now() + 30_000; !group.proc.out().includes('a worker died: starting another'); await sleep(50)) assert.ok(Date.now() < end, 'the coordinator saw the worker die');
  for (const end = Date.now() + 30_000; children(group.pid).length < 2; await sleep(50)) assert.ok(Date.now() < end, 'a new worker was started');
  assert.ok(children(group.pid).includes(other!), 'the other worker kept running');
  for (let i = 0; i < 4; i++) assert.equal((await get(group.url + s.blobPath)).headers['x-cache'], 'HIT');
  // The dead worker's hits stay counted: a counter that went down would read as a reset.
  assert.equal(await hitsServed(), 8);

  const workers = children(group.pid);
  group.proc.child.kill('SIGKILL');
  await group.proc.exit;
  for (const end = Date.now() + 5000; workers.some(alive); await sleep(50)) assert.ok(Date.now() < end, 'the workers exited with their coordinator');

  const again = await serveGroup(t, s.config);
  const r = await get(again.url + s.blobPath);
  assert.equal(r.status, 200);
  assert.equal(r.headers['x-cache'], 'HIT');
  assert.equal(s.registry.accessLog.filter((l) => l.startsWith(`GET ${s.blobPath} `)).length, 1, 'still one upstream GET in all');
});

/** Running (a zombie waiting for its new parent to reap it counts as gone). */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

test('SIGTERM: a download in flight through a worker finishes, then the group exits 0', { timeout: 120_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  const group = await serveGroup(t, s.config);
  assert.equal((await get(group.url + s.blobPath)).status, 200);
  await untilCached(s.root, 'library/app', s.img.blobs[1]!.descriptor.digest);
  const dispatcher = new Agent({ connections: 1 });
  t.after(() => dispatcher.close());
  const res = await request(group.url + s.blobPath, { dispatcher });
  assert.equal(res.headers['x-cache'], 'HIT');
  // The client holds the answer unread while the group is told to stop.
  group.proc.child.kill('SIGTERM');
  await sleep(500);
  assert.equal(group.proc.child.exitCode, null, 'still draining');
  const body = Buffer.from(await res.body.arrayBuffer());
  assert.equal(sha256(body), s.img.blobs[1]!.descriptor.digest, 'the whole blob');
  assert.equal(await group.proc.exit, 0);
  // New connections are refused once the group is gone.
  await assert.rejects(request(group.url + s.blobPath));
});

test('a body smuggled in a chunked GET is forwarded as its body, never parsed by the coordinator as a request of its own', { timeout: 60_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  const group = await serveGroup(t, s.config);
  const smuggled = 'GET /smuggled HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\n\r\n';
  const raw = `GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n${smuggled.length.toString(16)}\r\n${smuggled}\r\n0\r\n\r\n`;
  const answer = await new Promise<string>((resolve, reject) => {
    const socket = connect(Number(new URL(group.url).port), '127.0.0.1', () => socket.write(raw));
    let got = '';
    socket.on('data', (d: Buffer) => (got += d.toString()));
    socket.on('close', () => resolve(got));
    socket.on('error', reject);
    // Whatever comes in 1.5 s: one answer, or (the bug) more.
    setTimeout(() => socket.destroy(), 1500);
  });
  assert.match(answer, /^HTTP\/1\.1 200 OK\r\n/);
  assert.equal(answer.match(/HTTP\/1\.1 /g)?.length, 1, 'one answer for one request');
  // Every worker's connection to the coordinator is used again: none carries a stray answer.
  for (let i = 0; i < 8; i++) assert.equal((await get(`${group.url}/v2/`)).status, 200);
  await sleep(400);
  const urls = requests(group.proc.out()).map((r) => r.url);
  assert.ok(urls.includes('/v2/'));
  assert.ok(!urls.includes('/smuggled'), `the coordinator saw no smuggled request: ${urls.join(' ')}`);
});

test('a cold blob followed by a worker: a Range of it exactly, an empty blob; a client\'s own follow header gets the blob itself, from a group or a single process', { timeout: 60_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  const group = await serveGroup(t, s.config);
  const layer = s.img.blobs[1]!;
  const ranged = await get(group.url + s.blobPath, { range: 'bytes=1000-200999' });
  assert.equal(ranged.status, 206);
  assert.equal(ranged.headers['x-cache'], 'MISS');
  assert.equal(ranged.headers['content-range'], `bytes 1000-200999/${layer.descriptor.size}`);
  assert.equal(ranged.headers['content-length'], '200000');
  assert.ok(ranged.body.equals(layer.data.subarray(1000, 201000)));
  await sleep(400);
  const line = requests(group.proc.out()).find((r) => r.url === s.blobPath);
  assert.ok(line && line.pid !== group.pid && line.status === 206 && line.cache === 'miss', JSON.stringify(line));

  // An empty blob (some artifact tools push them): its last byte is no byte at all.
  const empty = Buffer.alloc(0);
  const emptyDigest = await new Pusher({ url: s.registry.url }).pushBlob('library/app', empty);
  const none = await get(`${group.url}/v2/library/app/blobs/${emptyDigest}`);
  assert.deepEqual([none.status, none.headers['content-length'], none.headers['x-cache'], none.body.length], [200, '0', 'MISS', 0]);

  // What a worker asks of the coordinator is never taken from a client: the blob itself comes back.
  const other = image({ 'other.bin': randomLayer(2 * MiB) });
  await new Pusher({ url: s.registry.url }).pushImage('library/other', 'v1', other);
  const otherPath = `/v2/library/other/blobs/${other.blobs[1]!.descriptor.digest}`;
  const asked = await get(group.url + otherPath, { 'x-ocicache-follow': '1' });
  assert.equal(asked.status, 200);
  assert.equal(asked.headers['x-ocicache-follow'], undefined);
  assert.equal(sha256(asked.body), other.blobs[1]!.descriptor.digest);
  group.proc.child.kill('SIGKILL');
  await group.proc.exit;

  const singleConfig = `${s.config}.single.yaml`;
  writeFileSync(singleConfig, readFileSync(s.config, 'utf8').replace(/workers: 2/, 'workers: 1'));
  const single = await serveGroup(t, singleConfig);
  const third = image({ 'third.bin': randomLayer(2 * MiB) });
  await new Pusher({ url: s.registry.url }).pushImage('library/third', 'v1', third);
  const alone = await get(`${single.url}/v2/library/third/blobs/${third.blobs[1]!.descriptor.digest}`, { 'x-ocicache-follow': '1' });
  assert.equal(alone.status, 200);
  assert.equal(alone.headers['x-ocicache-follow'], undefined);
  assert.equal(sha256(alone.body), third.blobs[1]!.descriptor.digest);
});

test('a fill that fails while a worker follows it cuts the client off: never a complete-looking wrong body, never counted as answered', { timeout: 60_000 }, async (t) => {
  const upstream = await startFakeUpstream(t);
  const good = randomLayer(4 * MiB);
  const digest = sha256(good);
  const path = `/v2/library/bad/blobs/${digest}`;
  upstream.route(path, (_req, res) => {
    // Half the right bytes, a pause (the worker follows meanwhile), then the wrong half.
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(good.length) });
    res.write(good.subarray(0, good.length / 2));
    setTimeout(() => res.end(randomLayer(good.length / 2)), 300);
  });
  const root = tempDir(t, 'workers-bad');
  const config = writeConfig(root, {
    server: { host: '127.0.0.1', port: 0, workers: 2 },
    log: { level: 'info' },
    storage: { root },
    defaultUpstream: 'docker.io',
    upstreams: [{ name: 'docker.io', url: upstream.url, dockerHubLibrary: true }],
  });
  const group = await serveGroup(t, config);
  const dispatcher = new Agent({ connections: 1 });
  t.after(() => dispatcher.close());
  const res = await request(group.url + path, { dispatcher });
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['content-length'], String(good.length));
  let got = 0;
  await assert.rejects(
    (async () => {
      for await (const chunk of res.body) got += (chunk as Buffer).length;
    })(),
  );
  assert.ok(got < good.length, `${got} of ${good.length} bytes before the cut`);
  await sleep(400);
  const out = group.proc.out();
  assert.ok(!requests(out).some((r) => r.url === path), 'no request line: it was not answered');
  const aborted = out.split('\n').find((l) => l.includes('"msg":"response aborted"'));
  assert.ok(aborted && JSON.parse(aborted).pid !== group.pid, `a worker said it was cut short: ${aborted}`);
  const metrics = (await get(`${group.url}/metrics`)).body.toString();
  assert.doesNotMatch(metrics, /kind="blob",result="miss"/);
  assert.deepEqual(readdirSync(join(root, 'tmp')), [], 'the failed fill left nothing');
});

test('tokens from /token verify in every worker: hits for a bearer token are answered by the workers', { timeout: 60_000 }, async (t) => {
  const htpasswd = join(tempDir(t, 'workers-htpasswd'), 'htpasswd');
  // alice:alice-pw, bcrypt as htpasswd -B writes it ($2y$).
  writeFileSync(htpasswd, `alice:${bcrypt.hashSync('alice-pw', 4).replace(/^\$2a\$/, '$2y$')}\n`);
  const s = await setup(t, { access: { htpasswd, rules: [{ upstreams: ['*'], repositories: ['**'], allow: ['alice'] }] } });
  if (!s) return;
  const group = await serveGroup(t, s.config);
  const basic = `Basic ${Buffer.from('alice:alice-pw').toString('base64')}`;
  const issued = await get(`${group.url}/token?service=ocicache&scope=repository:library/app:pull`, { authorization: basic });
  assert.equal(issued.status, 200);
  const token = (JSON.parse(issued.body.toString()) as { token: string }).token;
  const bearer = { authorization: `Bearer ${token}`, accept: OCI_MANIFEST };
  assert.equal((await get(group.url + s.manifestPath, bearer)).headers['x-cache'], 'MISS');
  for (let i = 0; i < 8; i++) assert.equal((await get(group.url + s.manifestPath, bearer)).headers['x-cache'], 'HIT');
  await sleep(400);
  const hits = requests(group.proc.out()).filter((r) => r.cache === 'hit');
  assert.equal(hits.length, 8);
  assert.ok(hits.every((r) => r.pid !== group.pid), 'no hit needed the coordinator');
});

test('a group\'s log on a pipe: lines longer than a pipe takes at once come out whole, never cut by another process\'s lines', { timeout: 60_000 }, async (t) => {
  const s = await setup(t);
  if (!s) return;
  // stdout a pipe, as under a container runtime (a FIFO) or `| tee`, read by this test.
  const fifo = join(tempDir(t, 'fifo'), 'stdout');
  execFileSync('mkfifo', [fifo]);
  // Its read end first, without waiting for a writer; then the write end, which has a reader.
  const reader = new Socket({ fd: openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK), readable: true, writable: false });
  const fd = openSync(fifo, 'w');
  const child = spawn(process.execPath, [...CLI, 'serve', '--config', s.config], { stdio: ['ignore', fd, 'inherit'] });
  closeSync(fd);
  t.after(() => {
    child.kill('SIGKILL');
    reader.destroy();
  });
  let out = '';
  reader.on('data', (d) => (out += String(d)));
  const url = await listeningAt(child, () => out, 20_000);
  assert.ok(url, `ocicache did not start:\n${out}`);
  await get(url + s.manifestPath, { accept: OCI_MANIFEST });
  // Hits in both workers at once: short request lines, and lines of about 12 KiB (a long query
  // string, logged in the url) where a pipe takes 4 KiB whole (PIPE_BUF, POSIX write(2)).
  const pad = 'x'.repeat(12 * 1024);
  const client = new Agent({ connections: 8 });
  t.after(() => client.close());
  const hit = async (path: string): Promise<void> => {
    const res = await request(url + path, { dispatcher: client, headers: { accept: OCI_MANIFEST } });
    await res.body.dump();
    assert.equal(res.statusCode, 200);
  };
  const long = 64;
  const short = 2000;
  // A reader that falls behind (a log shipper, a busy terminal): the pipe fills, and each
  // process's writes wait for room, a long line taken in parts.
  reader.pause();
  await Promise.all([...Array.from({ length: long }, () => hit(`${s.manifestPath}?pad=${pad}`)), ...Array.from({ length: short }, () => hit(s.manifestPath))]);
  reader.resume();
  // The hits' lines (the first request, a miss, was the coordinator's).
  const answered = (): string[] => out.split('\n').filter((l) => l.includes('pad=') || (l.includes('"msg":"request"') && l.includes('"cache":"hit"')));
  for (const end = Date.now() + 5000; answered().length < long + short; await sleep(100)) if (Date.now() > end) break;
  const lines = answered();
  const broken = lines.filter((l) => {
    try {
      JSON.parse(l);
      return false;
    } catch {
      return true;
    }
  });
  assert.deepEqual(broken.map((l) => `${l.slice(0, 60)}…${l.slice(-60)} (${l.length} characters)`), [], 'every line is one JSON object');
  const requests = lines.map((l) => JSON.parse(l) as { url: string; pid: number });
  assert.equal(requests.filter((r) => r.url.endsWith(pad)).length, long);
  assert.equal(requests.length, long + short);
  assert.equal(new Set(requests.map((r) => r.pid)).size, 2, 'both workers answered');
});
