/**
 * The container image, built from the Dockerfile with buildah (chroot isolation, no registry: the
 * base is assembled locally by scripts/build-test-base.sh) and run: it serves as UID 10001 with
 * its cache in the /data volume, and skopeo pulls a real registry's image through it.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { stringify } from 'yaml';
import { nodeFlags } from './helpers/cli.js';
import { startDistribution } from './helpers/distribution.js';
import { image, Pusher } from './helpers/seed.js';
import { exec, freePort, need, needRoot, tempDir, until } from './helpers/tools.js';

const IMAGE = 'localhost/ocicache:test';
const BASE = 'localhost/ocicache-test-base:3';

test('the Dockerfile builds with buildah and the image serves pulls as a non-root user', { timeout: 900_000 }, async (t) => {
  const buildah = need(t, 'buildah', 'apt-get install buildah');
  const debootstrap = need(t, 'debootstrap', 'apt-get install debootstrap');
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  if (!buildah || !debootstrap || !skopeo) return;
  if (!needRoot(t, 'building the base image with debootstrap')) return;
  const base = await exec('scripts/build-test-base.sh', []);
  assert.equal(base.code, 0, base.stdout + base.stderr);
  // The build context: what the Dockerfile copies, with one fixed timestamp. buildah's layer cache
  // (--layers) hashes what COPY adds, timestamps included: a fresh clone's differ every run, and
  // every step after the first COPY (npm ci compiling better-sqlite3) would run again. Unchanged
  // inputs now come from the cache, as with docker build; the image is still built from this
  // Dockerfile and these sources.
  const context = tempDir(t, 'image-context');
  for (const f of ['Dockerfile', '.dockerignore', 'package.json', 'package-lock.json', 'tsconfig.json', 'src', 'config']) cpSync(f, join(context, f), { recursive: true });
  const touched = await exec('find', [context, '-exec', 'touch', '-h', '-d', '@0', '{}', '+']);
  assert.equal(touched.code, 0, touched.stderr);
  const bud = await exec(buildah, ['bud', '--isolation', 'chroot', '--layers', '--pull=never', '--build-arg', `BASE=${BASE}`, '-t', IMAGE, context]);
  assert.equal(bud.code, 0, bud.stdout.slice(-3000) + bud.stderr.slice(-3000));

  const inspect = JSON.parse((await exec(buildah, ['inspect', '--type', 'image', IMAGE])).stdout) as { OCIv1: { config: { User: string; Volumes: Record<string, unknown>; ExposedPorts: Record<string, unknown>; Entrypoint: string[]; Cmd: string[] } } };
  const config = inspect.OCIv1.config;
  // The Dockerfile runs node with npm start's flags.
  const flags = nodeFlags();
  assert.equal(config.User, '10001:10001');
  assert.deepEqual(Object.keys(config.Volumes), ['/data']);
  assert.deepEqual(Object.keys(config.ExposedPorts), ['5000/tcp']);
  assert.deepEqual([...config.Entrypoint, ...config.Cmd], ['node', ...flags, '/app/dist/cli.js', 'serve']);

  const registry = await startDistribution(t);
  if (!registry) return;
  const img = image({ 'hello.txt': Buffer.from('from the container\n') });
  await new Pusher({ url: registry.url }).pushImage('team/hello', 'v1', img);
  const port = await freePort();
  const dir = tempDir(t, 'image');
  const file = join(dir, 'config.yaml');
  writeFileSync(file, stringify({ server: { host: '127.0.0.1', port }, defaultUpstream: 'local.test', upstreams: [{ name: 'local.test', url: registry.url }] }));

  const ctr = (await exec(buildah, ['from', '--pull=never', IMAGE])).stdout.trim();
  assert.ok(ctr);
  t.after(async () => void (await exec(buildah, ['rm', ctr])));
  assert.equal((await exec(buildah, ['run', ctr, '--', 'id', '-u'])).stdout.trim(), '10001');
  // Host network: chroot isolation, like a container with --network host.
  const serve = spawn(buildah, ['run', '--isolation', 'chroot', '--network', 'host', '-v', `${file}:/etc/ocicache/config.yaml:ro`, ctr, '--', 'node', ...flags, '/app/dist/cli.js', 'serve', '--config', '/etc/ocicache/config.yaml'], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const exited = new Promise<number | null>((r) => serve.once('exit', (code) => r(code)));
  let log = '';
  serve.stdout.on('data', (d: Buffer) => (log += d.toString()));
  serve.stderr.on('data', (d: Buffer) => (log += d.toString()));
  t.after(async () => {
    // The whole process group: buildah's chroot runner and node in it.
    try {
      process.kill(-serve.pid!, 'SIGKILL');
    } catch {
      /* already gone */
    }
    await exec(buildah, ['rmi', '--prune']);
  });
  for (let i = 0; i < 200 && !log.includes('"ocicache ready"'); i++) await sleep(50);
  const ready = JSON.parse(log.split('\n').find((l) => l.includes('"ocicache ready"')) ?? 'null') as { storage: string } | null;
  assert.ok(ready, `the image did not start:\n${log}`);
  assert.equal(ready.storage, '/data', 'the cache lives in the volume');

  const out = join(dir, 'pulled');
  const copy = await exec(skopeo, ['copy', '--src-tls-verify=false', `docker://127.0.0.1:${port}/local.test/team/hello:v1`, `dir:${out}`]);
  assert.equal(copy.code, 0, copy.stderr);
  const inspected = await exec(skopeo, ['inspect', '--tls-verify=false', `docker://127.0.0.1:${port}/team/hello:v1`]);
  assert.equal((JSON.parse(inspected.stdout) as { Digest: string }).Digest, img.digest);
  // Request lines are buffered for up to 250 ms (app.ts).
  const blobLine = /"url":"\/v2\/local\.test\/team\/hello\/blobs\/sha256:[a-f0-9]{64}","status":200/;
  await until('the request log lines', () => blobLine.test(log), 2000).catch(() => assert.match(log, blobLine));

  // SIGTERM to ocicache in the container (PID 1 under a container engine, the exec-form ENTRYPOINT):
  // it drains and exits 0, and buildah run passes the status on.
  const pid = Number((await exec('pgrep', ['-u', '10001', '-f', `^/usr/bin/node ${flags.join(' ')} /app/dist/cli.js serve`])).stdout.trim().split('\n')[0]);
  assert.ok(pid > 0, 'found the node process in the container');
  process.kill(pid, 'SIGTERM');
  assert.equal(await Promise.race([exited, sleep(15_000).then(() => 'timeout')]), 0, log);
  assert.match(log, /shutting down/);
});
