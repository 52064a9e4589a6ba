/**
 * A fleet on loopback, as README "Running a fleet" sets one up: ocicache replicas as real
 * processes, each with its own cache directory, and Debian's HAProxy in front of them running the
 * configuration `ocicache haproxy` prints for the same config file.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { runCli, startCli, writeConfig, type Running } from './cli.js';
import { freePort, need, stopChild, type Scope } from './tools.js';

export interface Replica {
  name: string;
  port: number;
  root: string;
  proc: Running | undefined;
}

export interface Fleet {
  /** The balancer's URL: what clients use. */
  url: string;
  host: string;
  replicas: Replica[];
  config: string;
  haproxy: ChildProcess;
  /** Kills a replica with SIGKILL. */
  kill(name: string): Promise<void>;
  /** Starts a replica again on its port and cache directory; resolves once HAProxy has it back in the ring. */
  restart(name: string): Promise<void>;
  /** Resolves once HAProxy sees `up` replicas ready. */
  settled(up: string[]): Promise<void>;
}

async function startReplica(config: string, r: Replica, argv?: string[]): Promise<void> {
  const proc = startCli(['serve', '--config', config], { OCICACHE_PORT: String(r.port), OCICACHE_STORAGE_ROOT: r.root, OCICACHE_REPLICA: r.name }, argv);
  r.proc = proc;
  for (let i = 0; i < 400; i++) {
    const ready = await request(`http://127.0.0.1:${r.port}/readyz`).then(
      async (res) => (await res.body.dump(), res.statusCode === 200),
      () => false,
    );
    if (ready) return;
    if (proc.child.exitCode !== null) break;
    await sleep(25);
  }
  proc.child.kill('SIGKILL');
  throw new Error(`replica ${r.name} did not start:\n${proc.out()}\n${proc.err()}`);
}

/** Which replica answers `path` through the balancer (its X-Ocicache-Replica header). */
export async function replicaFor(url: string, path: string, headers: Record<string, string> = {}): Promise<string> {
  const res = await request(`${url}${path}`, { method: 'HEAD', headers });
  await res.body.dump();
  return String(res.headers['x-ocicache-replica']);
}

/**
 * `count` replicas of the config `doc` (its server and storage are set per replica) behind
 * HAProxy; all stopped when the test ends. undefined when haproxy is missing (a skip; CI fails).
 */
export async function startFleet(t: Scope, dir: string, doc: Record<string, unknown>, count = 3, options: { argv?: string[]; log?: string } = {}): Promise<Fleet | undefined> {
  const haproxyBin = need(t, 'haproxy', 'apt-get install haproxy');
  if (!haproxyBin) return undefined;
  const config = writeConfig(dir, { ...doc, server: { host: '127.0.0.1', port: 0 }, log: { level: options.log ?? 'info' } });
  const replicas: Replica[] = [];
  for (let i = 0; i < count; i++) {
    const root = join(dir, `replica-${i}`);
    mkdirSync(root, { recursive: true });
    replicas.push({ name: `cache-${i}`, port: await freePort(), root, proc: undefined });
  }
  t.after(() => Promise.all(replicas.map((r) => r.proc && stopChild(r.proc.child, 'SIGKILL'))));
  await Promise.all(replicas.map((r) => startReplica(config, r, options.argv)));

  const port = await freePort();
  const generated = await runCli(['haproxy', '--config', config, '--bind', `127.0.0.1:${port}`, '--check-interval', '200ms', ...replicas.flatMap((r) => ['--replica', `${r.name}=127.0.0.1:${r.port}`])]);
  assert.equal(generated.code, 0, generated.stderr);
  const cfg = join(dir, 'haproxy.cfg');
  writeFileSync(cfg, generated.stdout);
  const check = await new Promise<{ code: number | null; out: string }>((resolve) => {
    const c = spawn(haproxyBin, ['-c', '-f', cfg], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (out += d.toString()));
    c.once('exit', (code) => resolve({ code, out }));
  });
  assert.equal(check.code, 0, `haproxy -c refused the generated config:\n${check.out}\n${generated.stdout}`);
  // -db: stay in the foreground; -Ws would need a master; a plain worker is enough here.
  const haproxy = spawn(haproxyBin, ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  let haproxyLog = '';
  haproxy.stderr!.on('data', (d: Buffer) => (haproxyLog += d.toString()));
  t.after(() => stopChild(haproxy, 'SIGTERM', 2000));
  const url = `http://127.0.0.1:${port}`;

  const fleet: Fleet = {
    url,
    host: `127.0.0.1:${port}`,
    replicas,
    config,
    haproxy,
    async kill(name) {
      const r = replicas.find((x) => x.name === name)!;
      r.proc!.child.kill('SIGKILL');
      await r.proc!.exit;
    },
    async restart(name) {
      const r = replicas.find((x) => x.name === name)!;
      await startReplica(config, r, options.argv);
      await fleet.settled(replicas.filter((x) => x.proc?.child.exitCode === null).map((x) => x.name));
    },
    async settled(up) {
      // The replicas HAProxy routes to: every one in `up` answers some key, none other does.
      const end = Date.now() + 10_000;
      for (;;) {
        const seen = new Set<string>();
        for (let i = 0; i < 60; i++) seen.add(await replicaFor(url, `/v2/settle/manifests/t${i}`).catch(() => 'none'));
        if ([...seen].sort().join() === [...up].sort().join()) return;
        if (Date.now() > end) throw new Error(`HAProxy routes to ${[...seen].join(', ')}, expected ${up.join(', ')}\n${haproxyLog.slice(-2000)}`);
        await sleep(100);
      }
    },
  };
  await fleet.settled(replicas.map((r) => r.name));
  return fleet;
}
