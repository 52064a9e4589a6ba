/**
 * Upstreams that need credentials: a real distribution registry behind Basic auth (htpasswd) and
 * one behind token auth with a small token issuer. Secrets come from an env var or a file.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { startDistribution } from './helpers/distribution.js';
import { fetchComplete, ociError, pullImage, startProxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { startTokenIssuer } from './helpers/token-issuer.js';
import { tempDir } from './helpers/tools.js';

test('an upstream behind Basic auth, password from a file', async (t) => {
  const creds = { username: 'cache', password: 's3cret-basic' };
  const upstream = await startDistribution(t, { basic: creds });
  if (!upstream) return;
  const img = image({ 'private.txt': Buffer.from('behind basic auth\n') });
  await new Pusher({ url: upstream.url, basic: creds }).pushImage('private/app', 'v1', img);
  const secretFile = join(tempDir(t, 'secret'), 'password');
  writeFileSync(secretFile, `${creds.password}\n`);

  const proxy = await startProxy(t, { upstreams: [{ name: 'private.example', url: upstream.url, auth: { username: creds.username, passwordFile: secretFile } }] });
  const m = await pullImage(proxy.url, 'private/app', 'v1', 'private.example');
  assert.equal(m.manifest.status, 200);
  assert.deepEqual(m.manifest.body, img.manifest);
  for (const [i, b] of img.blobs.entries()) assert.equal(m.blobs[i]!.sha256, b.descriptor.digest);

  const wrong = await startProxy(t, { upstreams: [{ name: 'private.example', url: upstream.url, auth: { username: creds.username, passwordEnv: 'WRONG' } }], env: { WRONG: 'nope' } });
  const denied = await fetchComplete(`${wrong.url}/v2/private/app/manifests/v1?ns=private.example`, { accept: OCI_MANIFEST });
  assert.equal(denied.status, 403);
  assert.equal(ociError(denied).code, 'DENIED');
  const anonymous = await startProxy(t, { upstreams: [{ name: 'private.example', url: upstream.url }] });
  const refused = await fetchComplete(`${anonymous.url}/v2/private/app/manifests/v1?ns=private.example`, { accept: OCI_MANIFEST });
  assert.equal(refused.status, 403);
});

test('an upstream behind token auth: tokens fetched with credentials, cached per scope', async (t) => {
  const creds = { username: 'robot', password: 't0ken-pass' };
  const issuer = await startTokenIssuer(t, { [creds.username]: creds.password });
  if (!issuer) return;
  const upstream = await startDistribution(t, { token: issuer });
  if (!upstream) return;
  const img = image({ 'token.txt': Buffer.from('behind token auth\n') });
  const other = image({ 'other.txt': Buffer.from('another repository\n') });
  const pusher = new Pusher({ url: upstream.url, basic: creds });
  await pusher.pushImage('secure/app', 'v1', img);
  await pusher.pushImage('secure/other', 'v1', other);
  issuer.requests.length = 0;

  // The token server is another origin than the registry: it gets the credentials because it is listed.
  const proxy = await startProxy(t, { upstreams: [{ name: 'token.example', url: upstream.url, auth: { username: creds.username, passwordEnv: 'TOKEN_PASS' }, tokenRealms: [issuer.realm] }], env: { TOKEN_PASS: creds.password } });
  const m = await pullImage(proxy.url, 'secure/app', 'v1', 'token.example');
  assert.equal(m.manifest.status, 200);
  assert.deepEqual(m.manifest.body, img.manifest);
  for (const [i, b] of img.blobs.entries()) assert.equal(m.blobs[i]!.sha256, b.descriptor.digest);
  // One token for repository:secure/app:pull, reused for the HEAD, the GET and every blob.
  assert.equal(issuer.requests.length, 1);
  assert.deepEqual(issuer.requests[0]!.scopes, ['repository:secure/app:pull']);
  assert.equal(issuer.requests[0]!.user, creds.username);
  const o = await fetchComplete(`${proxy.url}/v2/secure/other/manifests/v1?ns=token.example`, { accept: OCI_MANIFEST });
  assert.equal(o.status, 200);
  assert.equal(issuer.requests.length, 2, 'another repository is another scope, so another token');
});
