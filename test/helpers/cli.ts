/** Runs the `ocicache` command as a separate process, the way an operator does. */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';

/** How the tests run ocicache: from the sources, in the repository's root. */
export const CLI = ['--import', 'tsx', 'src/cli.ts'];

/**
 * The node flags `npm start` runs ocicache with (package.json). The Dockerfile, the README's
 * systemd unit and the benchmark use the same ones; test/cli.test.ts (the unit) and
 * test/image.test.ts (the image) check that they do.
 */
export function nodeFlags(): string[] {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { scripts: { start: string } };
  const m = /^node ((?:--\S+ )*)dist\/cli\.js serve$/.exec(pkg.scripts.start);
  if (!m) throw new Error(`package.json start is not "node [flags] dist/cli.js serve": ${pkg.scripts.start}`);
  return m[1]!.split(' ').filter(Boolean);
}

export interface Running {
  child: ChildProcess;
  exit: Promise<number | null>;
  out(): string;
  err(): string;
}

/** Runs `ocicache args` from the sources, or as `argv` says (e.g. npm start's flags and dist/cli.js). */
export function startCli(args: string[], env: NodeJS.ProcessEnv = {}, argv: string[] = CLI): Running {
  const child = spawn(process.execPath, [...argv, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exit = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return { child, exit, out: () => stdout, err: () => stderr };
}

/** Runs a one-shot command to the end. */
export async function runCli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const p = startCli(args, env);
  const code = await p.exit;
  return { code, stdout: p.out(), stderr: p.err() };
}

/** Writes a config file next to the cache and returns its path. */
export function writeConfig(dir: string, doc: Record<string, unknown>): string {
  const file = join(dir, `config-${Math.random().toString(36).slice(2)}.yaml`);
  writeFileSync(file, stringify({ log: { level: 'warn' }, ...doc }));
  return file;
}
