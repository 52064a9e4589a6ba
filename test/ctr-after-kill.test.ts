/**
 * What containerd stores after fetching through a cache that was killed with SIGKILL in the middle
 * of concurrent cold pulls. The reference is the same `ctr content fetch` against the upstream
 * directly: through the proxy, in every round and for every platform choice, containerd ends up
 * with exactly the content it gets without the proxy.
 *
 * containerd leaves content out without an error where the platform filter says so
 * (https://github.com/containerd/containerd/blob/v1.6.20/images/handlers.go, FilterPlatforms):
 * an index entry for wasip1/wasm is skipped unless the fetch asks for that platform or for all.
 * The test pins that too, so a "fetched, yet the wasm layer is missing" report can be told apart
 * from a cache fault.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startCli, writeConfig, type Running } from './helpers/cli.js';
import { run, startContainerd } from './helpers/daemons.js';
import { startDistribution } from './helpers/distribution.js';
import { pullImage } from './helpers/proxy.js';
import { artifact, image, OCI_INDEX, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { tempDir } from './helpers/tools.js';

const WASM_CONFIG = 'application/vnd.wasm.config.v1+json';
const WASM_LAYER = 'application/vnd.wasm.content.layer.v1+wasm';
const MiB = 1024 * 1024;

async function serve(config: string): Promise<{ proc: Running; host: string }> {
  const proc = startCli(['serve', '--config', config]);
  for (let i = 0; i < 400; i++) {
    const port = /"msg":"Server listening at http:\/\/127\.0\.0\.1:(\d+)"/.exec(proc.out())?.[1];
    if (port) return { proc, host: `127.0.0.1:${port}` };
    if (proc.child.exitCode !== null) break;
    await sleep(25);
  }
  proc.child.kill('SIGKILL');
  throw new Error(`proxy did not start:\n${proc.out()}\n${proc.err()}`);
}

/** A hosts.toml directory that sends docker.io to one plain-HTTP host, and nowhere else. */
function hostsDir(parent: string, name: string, host: string): string {
  const dir = join(parent, name);
  mkdirSync(join(dir, 'docker.io'), { recursive: true });
  writeFileSync(join(dir, 'docker.io', 'hosts.toml'), `server = "http://127.0.0.1:1"\n\n[host."http://${host}"]\n  capabilities = ["pull", "resolve"]\n`);
  return dir;
}

test('after kill -9 mid-pull, containerd fetches through the cache exactly what it fetches from the upstream directly', { timeout: 240_000 }, async (t) => {
  const c = await startContainerd(t);
  if (!c) return;
  const registry = await startDistribution(t);
  if (!registry) return;
  // A wasm artifact (the shape of the original report) large enough to be cut by a kill, and an
  // index that names it beside a linux/amd64 image under its own platform.
  const wasm = artifact(WASM_CONFIG, Buffer.from('{"architecture":"wasm","os":"wasip1"}'), [[WASM_LAYER, Buffer.concat([Buffer.from('\0asm\x01\0\0\0'), randomBytes(12 * MiB)])]]);
  const amd64 = image({ 'app.bin': randomBytes(4 * MiB) });
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_INDEX,
      manifests: [
        { mediaType: OCI_MANIFEST, digest: amd64.digest, size: amd64.manifest.length, platform: { os: 'linux', architecture: 'amd64' } },
        { mediaType: OCI_MANIFEST, digest: wasm.digest, size: wasm.manifest.length, platform: { os: 'wasip1', architecture: 'wasm' } },
      ],
    }),
  );
  const pusher = new Pusher({ url: registry.url });
  await pusher.pushImage('wasm/hello', 'v1', wasm);
  await pusher.pushImage('wasm/multi', undefined, amd64);
  await pusher.pushImage('wasm/multi', undefined, wasm);
  await pusher.pushManifest('wasm/multi', 'v1', index, OCI_INDEX);

  const all = (img: typeof wasm): string[] => [img.digest, ...img.blobs.map((b) => b.descriptor.digest)];
  // [reference, ctr flags, what containerd stores]: the platform filter decides the last two rows.
  const fetches: Array<[string, string[], string[]]> = [
    ['docker.io/wasm/hello:v1', [], all(wasm)],
    ['docker.io/wasm/multi:v1', ['--all-platforms'], [sha256(index), ...all(amd64), ...all(wasm)]],
    ['docker.io/wasm/multi:v1', ['--platform', 'wasip1/wasm'], [sha256(index), ...all(wasm)]],
    ['docker.io/wasm/multi:v1', ['--platform', 'linux/amd64'], [sha256(index), ...all(amd64)]],
  ];
  let namespaces = 0;
  const fetchInto = async (hosts: string, ref: string, flags: string[]): Promise<string[]> => {
    const ns = `n${namespaces++}`;
    await run(c.ctr, ['--address', c.socket, '--namespace', ns, 'content', 'fetch', '--hosts-dir', hosts, ...flags, ref]);
    const listed = await run(c.ctr, ['--address', c.socket, '--namespace', ns, 'content', 'ls', '--quiet']);
    return listed.split('\n').filter(Boolean).sort();
  };

  const work = tempDir(t, 'ctr-kill');
  const direct = hostsDir(work, 'direct', registry.url.replace(/^http:\/\//, ''));
  for (const [ref, flags, expected] of fetches) {
    assert.deepEqual(await fetchInto(direct, ref, flags), [...expected].sort(), `direct: ${ref} ${flags.join(' ')}`);
  }

  const root = join(work, 'cache');
  const config = writeConfig(work, {
    server: { host: '127.0.0.1', port: 0 },
    log: { level: 'info' },
    storage: { root },
    upstreams: [{ name: 'docker.io', url: registry.url, tagTtl: '1ms' }],
  });
  let running: Running | undefined;
  t.after(() => running?.child.kill('SIGKILL'));
  let cutRounds = 0;
  for (const delay of [0, 2, 5, 10]) {
    // Cold again each round, so the kill lands in fills.
    rmSync(root, { recursive: true, force: true });
    const { proc, host } = await serve(config);
    running = proc;
    let alive = true;
    const pulls = Array.from({ length: 16 }, async (_, i) => {
      while (alive) await pullImage(`http://${host}`, i % 2 ? 'wasm/hello' : 'wasm/multi', i % 2 ? 'v1' : amd64.digest).catch(() => undefined);
    });
    // Aim at a fill in progress: wait for its temp file, then a few ms more.
    for (const end = Date.now() + 5000; !(existsSync(join(root, 'tmp')) && readdirSync(join(root, 'tmp')).length > 0) && Date.now() < end; ) await sleep(1);
    await sleep(delay);
    proc.child.kill('SIGKILL');
    await proc.exit;
    alive = false;
    await Promise.all(pulls);
    // Temp files left behind: the kill cut fills short (swept at the next start).
    const cut = existsSync(join(root, 'tmp')) ? readdirSync(join(root, 'tmp')).length : 0;
    if (cut > 0) cutRounds++;
    t.diagnostic(`killed after ${delay} ms: ${cut} fills cut short`);

    const restarted = await serve(config);
    running = restarted.proc;
    const viaCache = hostsDir(work, `cache-${delay}`, restarted.host);
    for (const [ref, flags, expected] of fetches) {
      assert.deepEqual(await fetchInto(viaCache, ref, flags), [...expected].sort(), `through the cache, killed after ${delay} ms: ${ref} ${flags.join(' ')}`);
    }
    restarted.proc.child.kill('SIGKILL');
    await restarted.proc.exit;
  }
  assert.ok(cutRounds >= 2, `the kills must cut fills in progress (did in ${cutRounds} rounds)`);
});
