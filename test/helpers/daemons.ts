/**
 * Client daemons of the tests' own (containerd, dockerd) and a runner for client commands, shared
 * by test/clients.test.ts and test/access-clients.test.ts. Each daemon has its own state under a
 * fresh directory and is stopped when the test ends.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { exec, need, needRoot, stopChild, tempDir, until } from './tools.js';

/** Runs a client to completion and asserts it succeeded. Asynchronous on purpose: the proxy answers from this same process. */
export async function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  clearTimeout(timer);
  assert.equal(code, 0, `${cmd} ${args.join(' ')} failed:\n${stdout.slice(-3000)}\n${stderr.slice(-3000)}`);
  return stdout;
}

/** A containerd daemon of its own (no CRI), stopped when the test ends; undefined when skipped. */
export async function startContainerd(t: TestContext): Promise<{ ctr: string; socket: string; dir: string } | undefined> {
  const containerd = need(t, 'containerd', 'apt-get install containerd');
  const ctr = need(t, 'ctr', 'apt-get install containerd');
  if (!containerd || !ctr) return undefined;
  if (!needRoot(t, 'the containerd test')) return undefined;
  const dir = tempDir(t, 'ctrd');
  const socket = join(dir, 'containerd.sock');
  writeFileSync(
    join(dir, 'config.toml'),
    `version = 2
root = "${join(dir, 'root')}"
state = "${join(dir, 'state')}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "${socket}"
[ttrpc]
  address = "${socket}.ttrpc"
`,
  );
  const daemon = spawn(containerd, ['--config', join(dir, 'config.toml')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let daemonLog = '';
  daemon.stderr.on('data', (d: Buffer) => (daemonLog += d.toString()));
  t.after(() => stopChild(daemon));
  for (let i = 0; i < 100 && !readdirSync(dir).includes('containerd.sock'); i++) await sleep(100);
  assert.ok(readdirSync(dir).includes('containerd.sock'), `containerd did not start:\n${daemonLog.slice(-3000)}`);
  return { ctr, socket, dir };
}

/** Mount points at or under `dir`, deepest first (dockerd bind-mounts its plugins dir, and at times its data root, onto themselves). */
export function mountsUnder(dir: string): string[] {
  const root = realpathSync(dir);
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m === root || m.startsWith(`${root}/`))
    .sort((a, b) => b.length - a.length);
}

export interface Dockerd {
  docker: string;
  dir: string;
  /** DOCKER_HOST and DOCKER_CONFIG (the client's config.json lives in `${dir}/client`) for the docker CLI. */
  env: NodeJS.ProcessEnv;
  log(): string;
}

/**
 * A Docker Engine of its own, started with `daemonJson` as its config file: no iptables or bridge
 * (nothing runs), vfs (no kernel overlay support needed), its own managed containerd under the
 * exec root. Stopped, unmounted and removed when the test ends; undefined when skipped.
 */
export async function startDockerd(t: TestContext, daemonJson: string): Promise<Dockerd | undefined> {
  const dockerd = need(t, 'dockerd', 'apt-get install docker.io');
  const docker = need(t, 'docker', 'apt-get install docker.io');
  if (!dockerd || !docker) return undefined;
  if (!needRoot(t, 'the Docker test')) return undefined;
  // Not tempDir: the daemon's data root must be unmounted before the directory can go.
  const dir = mkdtempSync(join(tmpdir(), 'ocicache-dockerd-'));
  let daemon: ChildProcess | undefined;
  t.after(async () => {
    if (daemon) await stopChild(daemon, 'SIGTERM', 20_000);
    // A killed dockerd leaves its own containerd running and its bind mounts in place.
    try {
      process.kill(Number(readFileSync(join(dir, 'exec', 'containerd', 'containerd.pid'), 'utf8')), 'SIGKILL');
    } catch {
      /* stopped with dockerd */
    }
    for (const m of mountsUnder(dir)) await exec('umount', ['-l', m]);
    rmSync(dir, { recursive: true, force: true });
  });
  writeFileSync(join(dir, 'daemon.json'), daemonJson);
  const socket = join(dir, 'docker.sock');
  daemon = spawn(
    dockerd,
    ['--config-file', join(dir, 'daemon.json'), '--data-root', join(dir, 'root'), '--exec-root', join(dir, 'exec'), '--pidfile', join(dir, 'docker.pid'),
      '-H', `unix://${socket}`, '--iptables=false', '--ip-masq=false', '--bridge=none', '--storage-driver=vfs'],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let daemonLog = '';
  daemon.stderr!.on('data', (d: Buffer) => (daemonLog += d.toString()));
  const env = { ...process.env, DOCKER_HOST: `unix://${socket}`, DOCKER_CONFIG: join(dir, 'client') };
  await until('dockerd to answer', async () => (await exec(docker, ['info'], env)).code === 0, 60_000).catch(() => {
    assert.fail(`dockerd did not start:\n${daemonLog.slice(-3000)}`);
  });
  return { docker, dir, env, log: () => daemonLog };
}
