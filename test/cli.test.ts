/** The `ocicache` command as an operator runs it: embedded default config, bad config, SIGTERM. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { request, type Dispatcher } from 'undici';
import { nodeFlags, startCli } from './helpers/cli.js';
import { readmeSnippet } from './helpers/readme.js';
import { freePort, need, tempDir, until } from './helpers/tools.js';

const start = startCli;

test('serve runs on the embedded default config and shuts down cleanly on SIGTERM', async (t) => {
  const root = tempDir(t, 'cli');
  const p = start(['serve'], { OCICACHE_HOST: '127.0.0.1', OCICACHE_PORT: '0', OCICACHE_STORAGE_ROOT: root, OCICACHE_CONFIG: '' });
  t.after(() => p.child.kill('SIGKILL'));
  let port: string | undefined;
  for (let i = 0; i < 200 && !port; i++) {
    port = /"msg":"Server listening at http:\/\/127\.0\.0\.1:(\d+)"/.exec(p.out())?.[1];
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.ok(port, `did not start:\n${p.out()}\n${p.err()}`);
  const ready = JSON.parse(p.out().split('\n').find((l) => l.includes('"ocicache ready"'))!) as { upstreams: string[]; defaultUpstream: string };
  assert.equal(ready.defaultUpstream, 'docker.io');
  assert.deepEqual(ready.upstreams.map((u) => u.split('=')[0]), ['docker.io', 'ghcr.io', 'quay.io', 'registry.k8s.io', 'gcr.io', 'mcr.microsoft.com', 'public.ecr.aws']);
  for (const [path, status] of [['/v2/', 200], ['/healthz', 200], ['/readyz', 200], ['/metrics', 200]] as const) {
    const res: Dispatcher.ResponseData = await request(`http://127.0.0.1:${port}${path}`);
    await res.body.dump();
    assert.equal(res.statusCode, status, path);
  }
  p.child.kill('SIGTERM');
  assert.equal(await p.exit, 0);
  assert.match(p.out(), /shutting down/);
});

test('serve logs one JSON line per request on stdout at info, none at warn', async (t) => {
  for (const level of ['info', 'warn']) {
    await t.test(level, async () => {
      const root = tempDir(t, 'cli');
      // At warn, start-up says nothing on stdout: the port is chosen here.
      const port = await freePort();
      // Offline: a manifest the cache does not hold gets a quick, known answer without any network.
      const p = start(['serve'], { OCICACHE_HOST: '127.0.0.1', OCICACHE_PORT: String(port), OCICACHE_STORAGE_ROOT: root, OCICACHE_CONFIG: '', OCICACHE_OFFLINE: 'true', OCICACHE_LOG_LEVEL: level });
      t.after(() => p.child.kill('SIGKILL'));
      const healthy = (): Promise<boolean> =>
        request(`http://127.0.0.1:${port}/healthz`).then(
          (r) => r.body.dump().then(() => r.statusCode === 200),
          () => false,
        );
      await until('the server to listen', healthy, 10_000);
      const res = await request(`http://127.0.0.1:${port}/v2/library/alpine/manifests/3.20`);
      assert.equal(res.statusCode, 503);
      const body = await res.body.text();
      // Lines are batched for at most 250 ms; SIGTERM flushes the rest.
      p.child.kill('SIGTERM');
      assert.equal(await p.exit, 0);
      const lines = p.out().trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      const requests = lines.filter((l) => l.msg === 'request');
      if (level === 'warn') return assert.deepEqual(requests, []);
      assert.equal(requests.length, 1);
      const { time, pid, hostname, durationMs, reqId, ...rest } = requests[0]!;
      assert.deepEqual([typeof time, typeof pid, typeof hostname, typeof durationMs], ['number', 'number', 'string', 'number']);
      assert.match(String(reqId), /^req-[0-9a-z]+$/);
      assert.deepEqual(rest, { level: 30, method: 'GET', url: '/v2/library/alpine/manifests/3.20', status: 503, client: '127.0.0.1', upstream: 'docker.io', name: 'library/alpine', reference: '3.20', cache: 'error', bytes: Buffer.byteLength(body), msg: 'request' });
    });
  }
});

test('a bad config stops start-up with a message that names the key', async (t) => {
  const dir = tempDir(t, 'cli');
  const file = join(dir, 'bad.yaml');
  writeFileSync(file, 'upstreams:\n  - name: docker.io\n    url: https://registry-1.docker.io\ncache:\n  tagTTL: 5m\n');
  const p = start(['serve', '--config', file], {});
  assert.equal(await p.exit, 2);
  assert.equal(p.err().trim(), 'config: cache.tagTTL: unknown key (known: tagTtl, manifestMemory, fillMemory, notFoundTtl)');
});

test("the README's systemd unit passes systemd-analyze verify", async (t) => {
  const analyze = need(t, 'systemd-analyze', 'apt-get install systemd');
  if (!analyze) return;
  const unit = join(tempDir(t, 'systemd'), 'ocicache.service');
  writeFileSync(unit, readmeSnippet('ocicache.service'));
  const r = spawnSync(analyze, ['verify', unit], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  // With the node flags of npm start.
  const execStart = readmeSnippet('ocicache.service').split('\n').find((l) => l.startsWith('ExecStart='));
  assert.equal(execStart, `ExecStart=/usr/bin/node ${nodeFlags().join(' ')} /opt/ocicache/dist/cli.js serve --config /etc/ocicache/config.yaml`);
});
