/**
 * A small token server for distribution's token auth (docs/spec/auth/token.md): JWTs signed
 * with ES256 whose header carries the certificate (x5c), which distribution 2.8 verifies against
 * its rootcertbundle. The key pair is made per test run with openssl.
 */
import { spawnSync } from 'node:child_process';
import { createPrivateKey, randomUUID, sign, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { need, tempDir, type Scope } from './tools.js';

export interface TokenIssuer {
  realm: string;
  service: string;
  issuer: string;
  certFile: string;
  /** Every token request: its scopes and the user it authenticated (or undefined). */
  requests: Array<{ scopes: string[]; user: string | undefined; authorization: string | undefined }>;
}

const b64url = (data: Buffer | string): string => Buffer.from(data).toString('base64url');

/** Grants pull to anyone and push to `users`; a wrong password gets 401. */
export async function startTokenIssuer(t: Scope, users: Record<string, string>): Promise<TokenIssuer | undefined> {
  const openssl = need(t, 'openssl', 'apt-get install openssl');
  if (!openssl) return undefined;
  const dir = tempDir(t, 'token');
  const keyFile = join(dir, 'key.pem');
  const certFile = join(dir, 'cert.pem');
  const r = spawnSync(openssl, ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', certFile, '-subj', '/CN=ocicache-test-token', '-days', '2'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
  const key = createPrivateKey(readFileSync(keyFile));
  const certDer = new X509Certificate(readFileSync(certFile)).raw;
  const service = 'ocicache-test-registry';
  const issuer = 'ocicache-test-issuer';
  const requests: TokenIssuer['requests'] = [];

  const userOf = (req: IncomingMessage): string | undefined | null => {
    const h = req.headers.authorization;
    if (!h) return undefined;
    const [user, pass] = Buffer.from(h.replace(/^Basic /, ''), 'base64').toString().split(':');
    return user !== undefined && users[user] === pass ? user : null;
  };

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    const scopes = url.searchParams.getAll('scope');
    const user = userOf(req);
    requests.push({ scopes, user: user ?? undefined, authorization: req.headers.authorization });
    if (user === null) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
      return;
    }
    const access = scopes.flatMap((s) => {
      const m = /^repository:(.+):([a-z,*]+)$/.exec(s);
      if (!m) return [];
      const actions = m[2]!.split(',').filter((a) => a === 'pull' || (user !== undefined && (a === 'push' || a === '*')));
      return [{ type: 'repository', name: m[1], actions }];
    });
    const now = Math.floor(Date.now() / 1000);
    const header = b64url(JSON.stringify({ typ: 'JWT', alg: 'ES256', x5c: [certDer.toString('base64')] }));
    const claims = b64url(JSON.stringify({ iss: issuer, sub: user ?? '', aud: service, exp: now + 300, nbf: now - 10, iat: now, jti: randomUUID(), access }));
    const signature = sign('sha256', Buffer.from(`${header}.${claims}`), { key, dsaEncoding: 'ieee-p1363' });
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: `${header}.${claims}.${b64url(signature)}`, expires_in: 300 }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as AddressInfo;
  return { realm: `http://127.0.0.1:${port}/token`, service, issuer, certFile, requests };
}
