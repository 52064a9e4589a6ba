/**
 * Real upstream registries for the tests: the CNCF distribution registry from Debian's
 * `docker-registry` package, on loopback with a port the kernel picks, optionally behind Basic
 * auth (htpasswd) or token auth (a small issuer in token-issuer.ts).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { need, stopChild, type Scope } from './tools.js';
import type { TokenIssuer } from './token-issuer.js';

export interface Distribution {
  url: string;
  /** host:port, as clients name it */
  host: string;
  dir: string;
  process: ChildProcess;
  /** Every access-log line so far (method, path, status): to count what reached the upstream. */
  accessLog: string[];
  stop(): Promise<void>;
}

export interface DistributionOptions {
  basic?: { username: string; password: string };
  token?: TokenIssuer;
}

/** Starts docker-registry; returns undefined when it is missing outside CI (the test is skipped). */
export async function startDistribution(t: Scope, options: DistributionOptions = {}): Promise<Distribution | undefined> {
  const bin = need(t, 'docker-registry', 'apt-get install docker-registry');
  if (!bin) return undefined;
  const dir = mkdtempSync(join(tmpdir(), 'ocicache-upstream-'));
  let auth = '';
  if (options.basic) {
    const htpasswd = need(t, 'htpasswd', 'apt-get install apache2-utils');
    if (!htpasswd) return undefined;
    const r = spawnSync(htpasswd, ['-Bbn', options.basic.username, options.basic.password], { encoding: 'utf8' });
    writeFileSync(join(dir, 'htpasswd'), r.stdout);
    auth = `auth:\n  htpasswd:\n    realm: test\n    path: ${join(dir, 'htpasswd')}\n`;
  } else if (options.token) {
    auth = `auth:\n  token:\n    realm: ${options.token.realm}\n    service: ${options.token.service}\n    issuer: ${options.token.issuer}\n    rootcertbundle: ${options.token.certFile}\n`;
  }
  writeFileSync(
    join(dir, 'config.yml'),
    `version: 0.1
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: ${join(dir, 'storage')}}
  delete: {enabled: true}
http:
  addr: "127.0.0.1:0"
  secret: test-secret
${auth}`,
  );
  const child = spawn(bin, ['serve', join(dir, 'config.yml')], { stdio: ['ignore', 'pipe', 'pipe'] });
  const accessLog: string[] = [];
  const host = await new Promise<string>((resolve, reject) => {
    let buffered = '';
    const onData = (chunk: Buffer): void => {
      buffered += chunk.toString();
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        const listening = /listening on (\S+?)"?(\s|$)/.exec(line);
        if (listening) resolve(listening[1]!.replace(/"$/, ''));
        // combined-log access lines: 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...
        const access = /"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP\/[\d.]+" (\d+)/.exec(line);
        if (access) accessLog.push(`${access[1]} ${access[2]} ${access[3]}`);
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', (code) => reject(new Error(`docker-registry exited with ${code} before listening`)));
    setTimeout(() => reject(new Error('docker-registry did not start within 10 s')), 10_000).unref();
  });
  const stop = (): Promise<void> => stopChild(child, 'SIGTERM', 3000);
  t.after(async () => {
    await stop();
    rmSync(dir, { recursive: true, force: true });
  });
  return { url: `http://${host}`, host, dir, process: child, accessLog, stop };
}
