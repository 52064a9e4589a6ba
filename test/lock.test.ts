/**
 * One process per cache directory: while a server has it open, a second server, `gc`, `verify`
 * and `prefetch` refuse with a message that says what to do; the lock goes with the process, even
 * after kill -9.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { runCli, startCli, writeConfig } from './helpers/cli.js';
import { startProxy } from './helpers/proxy.js';
import { stopChild, tempDir, until } from './helpers/tools.js';

const IN_USE = /^ocicache: \/\S+ is in use by another ocicache process \(a server, gc, verify or prefetch\): stop it first, or ask the running server through its admin API/;

test('a live cache directory refuses a second server and the one-shot commands', async (t) => {
  const root = tempDir(t, 'lock');
  const upstreams = [{ name: 'docker.io', url: 'http://127.0.0.1:9' }];
  const config = writeConfig(root, { storage: { root }, upstreams });
  const proxy = await startProxy(t, { root, upstreams });

  for (const args of [['gc'], ['verify'], ['prefetch', 'docker.io/library/alpine:3.20']]) {
    await t.test(args[0]!, async () => {
      const r = await runCli([...args, '--config', config]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, IN_USE);
      assert.equal(r.stdout, '');
    });
  }
  await assert.rejects(startProxy(t, { root, upstreams }), { name: 'CacheInUse', message: `${root} is in use by another ocicache process (a server, gc, verify or prefetch): stop it first, or ask the running server through its admin API (POST /admin/gc, POST /admin/prefetch, ocicache prefetch --server)` });

  await proxy.app.close();
  const gc = await runCli(['gc', '--config', config]);
  assert.equal(gc.code, 0, gc.stderr);
  assert.match(gc.stdout, /^gc: freed 0 blobs/);
});

test('the lock goes with a server killed by SIGKILL', async (t) => {
  const root = tempDir(t, 'lock');
  const config = writeConfig(root, { server: { host: '127.0.0.1', port: 0 }, log: { level: 'info' }, storage: { root }, upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }] });
  const server = startCli(['serve', '--config', config]);
  t.after(() => stopChild(server.child, 'SIGKILL'));
  await until('the server is ready', () => server.out().includes('"ocicache ready"'), 20_000);
  assert.match((await runCli(['verify', '--config', config])).stderr, IN_USE);
  server.child.kill('SIGKILL');
  await server.exit;
  const verify = await runCli(['verify', '--config', config]);
  assert.equal(verify.code, 0, verify.stderr);
  assert.match(verify.stdout, /all good/);
});
