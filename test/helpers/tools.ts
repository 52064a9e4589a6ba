/**
 * Finding the external programs the integration tests drive. Under CI (CI=true) a missing
 * program fails the test; on a developer machine it skips with a message saying what to install.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * What the helpers need of a test: somewhere to register clean-up, and a way to skip. node:test's
 * TestContext is one; bench/run.ts makes its own.
 */
export interface Scope {
  after(fn: () => unknown): void;
  skip(message: string): void;
}

export function which(name: string): string | undefined {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

/** The path of `name`, or: under CI an error, elsewhere a skip (returns undefined). */
export function need(t: Scope, name: string, hint: string): string | undefined {
  const path = which(name);
  if (path) return path;
  const msg = `${name} not found: ${hint}`;
  if (process.env.CI) throw new Error(`${msg} (required under CI)`);
  t.skip(msg);
  return undefined;
}

/** Whether this process is root, or: under CI an error, elsewhere a skip (returns false). */
export function needRoot(t: Scope, why: string): boolean {
  if (process.getuid?.() === 0) return true;
  const msg = `${why} needs root`;
  if (process.env.CI) throw new Error(`${msg} (required under CI)`);
  t.skip(msg);
  return false;
}

/** Stops a child with `signal`, then SIGKILL after `graceMs`; nothing if it already exited (by code or by signal). */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM', graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

/** A fresh directory under the system temp dir, removed when the test ends. */
export function tempDir(t: Scope, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `ocicache-${prefix}-`));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A fresh tmpfs of `size` (e.g. '24m') mounted on a new directory, unmounted and removed when the test ends (needs root). */
export function mountTmpfs(t: Scope, size: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'ocicache-tmpfs-'));
  const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { encoding: 'utf8' });
  assert.equal(mount.status, 0, `mount tmpfs: ${mount.stderr}`);
  t.after(() => {
    spawnSync('umount', ['-l', dir]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/** A loopback port that was free a moment ago (for programs that cannot be told to use port 0). */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Polls `check` every 20 ms until it holds, failing the test after `ms`. */
export async function until(what: string, check: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(20)) if (await check()) return;
  assert.fail(`timed out waiting for ${what}`);
}

/** Runs a program to the end, capturing its output (never spawnSync: servers under test run in this process). */
export function exec(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}
