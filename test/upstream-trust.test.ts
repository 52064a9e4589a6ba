/**
 * The trust decisions as pure functions (src/upstream/trust.ts, addresses.ts, responses.ts
 * notAManifest): which token realm gets an upstream's credentials, which redirect hop is
 * followed, what kind of address a host is at, what a manifest may be served as; and the
 * per-upstream keys that widen them (tokenRealms, redirectHosts), in the config and the Helm
 * chart. End to end: test/token-realms.test.ts and test/redirects.test.ts.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import test from 'node:test';
import { parse, parseAllDocuments } from 'yaml';
import { buildConfig, type UpstreamConfig } from '../src/core/config.js';
import { DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, OCI_INDEX, OCI_MANIFEST } from '../src/core/media-types.js';
import { addressKind, literalKind, type AddressKind } from '../src/upstream/addresses.js';
import { notAManifest } from '../src/upstream/responses.js';
import { hostMatches, realmAccess, redirectRule, type Hop } from '../src/upstream/trust.js';
import { exec, tempDir, which } from './helpers/tools.js';

function upstream(url: string, extra: Record<string, unknown> = {}): UpstreamConfig {
  return buildConfig({ storage: { root: '/nonexistent' }, upstreams: [{ name: 'u.example', url, ...extra }] }, {}).upstreams[0]!;
}

/** A Hop as a word: what the table says. */
const said = (hop: Hop): string => ('refused' in hop ? 'refused' : hop.restrict ? 'restricted' : 'trusted');

test('token realms: credentials only to the own origin, tokenRealms and known pairs; never over HTTP for an HTTPS upstream', () => {
  const cases: Array<[string, string, string, boolean, string, Record<string, unknown>?]> = [
    // what, upstream, realm, with credentials, expected
    ['another tenant of the same service', 'https://myteam.azurecr.io', 'https://attacker.azurecr.io/oauth2/token', true, 'refused'],
    ['a neighbour under a public suffix', 'https://registry.example.co.uk', 'https://evil.co.uk/token', true, 'refused'],
    ['an ECR host and an S3 bucket', 'https://123456789012.dkr.ecr.us-east-1.amazonaws.com', 'https://s3.amazonaws.com/bucket/token', true, 'refused'],
    ['plain HTTP on the own host', 'https://registry.example.com', 'http://registry.example.com/token', true, 'refused'],
    ['plain HTTP on the own host, anonymous', 'https://registry.example.com', 'http://registry.example.com/token', false, 'refused'],
    ['the own origin', 'https://registry.example.com', 'https://registry.example.com/token?x=1', true, 'trusted'],
    ['the own origin, port spelled out', 'https://registry.example.com', 'https://registry.example.com:443/token', true, 'trusted'],
    ['the own host on another port', 'https://registry.example.com', 'https://registry.example.com:8443/token', true, 'refused'],
    ['the own origin of an HTTP upstream', 'http://127.0.0.1:5000', 'http://127.0.0.1:5000/token', true, 'trusted'],
    ['another port of an HTTP upstream\'s host', 'http://127.0.0.1:5000', 'http://127.0.0.1:5001/token', true, 'refused'],
    ['listed in tokenRealms', 'https://registry.example.com', 'https://auth.example.net/token', true, 'trusted', { tokenRealms: ['https://auth.example.net'] }],
    ['listed, but another port', 'https://registry.example.com', 'https://auth.example.net:8443/token', true, 'refused', { tokenRealms: ['https://auth.example.net'] }],
    ['listed over HTTP for an HTTPS upstream', 'https://registry.example.com', 'http://auth.example.net/token', true, 'refused', { tokenRealms: ['http://auth.example.net'] }],
    ['listed over HTTP for an HTTP upstream', 'http://registry.internal', 'http://auth.internal/token', true, 'trusted', { tokenRealms: ['http://auth.internal'] }],
    ['Docker Hub: registry-1.docker.io → auth.docker.io', 'https://registry-1.docker.io', 'https://auth.docker.io/token', true, 'restricted'],
    ['Docker Hub: index.docker.io → auth.docker.io', 'https://index.docker.io', 'https://auth.docker.io/token', true, 'restricted'],
    ['Docker Hub over HTTP', 'https://registry-1.docker.io', 'http://auth.docker.io/token', true, 'refused'],
    ['Docker Hub\'s pair is not a wildcard', 'https://registry-1.docker.io', 'https://evil.docker.io/token', true, 'refused'],
    ['the pair only for Docker Hub\'s hosts', 'https://registry.example.com', 'https://auth.docker.io/token', true, 'refused'],
    ['ghcr.io: its own origin', 'https://ghcr.io', 'https://ghcr.io/token', true, 'trusted'],
    ['quay.io: its own origin', 'https://quay.io', 'https://quay.io/v2/auth', true, 'trusted'],
    ['anonymous: another host over HTTPS, restricted', 'https://myteam.azurecr.io', 'https://attacker.azurecr.io/oauth2/token', false, 'restricted'],
    ['anonymous: GitLab\'s realm on gitlab.com', 'https://registry.gitlab.com', 'https://gitlab.com/jwt/auth', false, 'restricted'],
    ['anonymous: another host over HTTP', 'http://127.0.0.1:5000', 'http://127.0.0.2:5000/token', false, 'refused'],
    ['not HTTP at all', 'https://registry.example.com', 'file:///etc/passwd', false, 'refused'],
  ];
  for (const [what, up, realm, withCredentials, want, extra] of cases) {
    assert.equal(said(realmAccess(upstream(up, extra), new URL(realm), withCredentials)), want, what);
  }
});

test('redirects: manifests, tags and referrers only to the own host, redirectHosts and built-ins; blobs anywhere, restricted; never HTTPS to HTTP', () => {
  const k8s = upstream('https://registry.k8s.io');
  const hub = upstream('https://registry-1.docker.io');
  const listed = upstream('https://registry.example.com', { redirectHosts: ['cdn.example.net', '*.storage.example.org'] });
  const cases: Array<[string, UpstreamConfig, string, string, string, string]> = [
    // what, upstream, kind, from, to, expected
    ['registry.k8s.io → a regional Artifact Registry', k8s, 'manifest', 'https://registry.k8s.io/v2/pause/manifests/3.9', 'https://us-west2-docker.pkg.dev/v2/k8s-artifacts-prod/images/pause/manifests/3.9', 'restricted'],
    ['registry.k8s.io tags → Artifact Registry', k8s, 'tags', 'https://registry.k8s.io/v2/pause/tags/list', 'https://europe-west1-docker.pkg.dev/v2/k8s-artifacts-prod/images/pause/tags/list', 'restricted'],
    ['registry.k8s.io → pkg.dev over HTTP', k8s, 'manifest', 'https://registry.k8s.io/v2/x', 'http://us-docker.pkg.dev/v2/x', 'refused'],
    ['registry.k8s.io → a look-alike domain', k8s, 'manifest', 'https://registry.k8s.io/v2/x', 'https://evilpkg.dev/v2/x', 'refused'],
    ['registry.k8s.io → an internal address', k8s, 'referrers', 'https://registry.k8s.io/v2/x', 'https://10.0.0.1/v2/x', 'refused'],
    ['Docker Hub manifests do not go to pkg.dev', hub, 'manifest', 'https://registry-1.docker.io/v2/x', 'https://us-docker.pkg.dev/v2/x', 'refused'],
    ['a manifest to an internal host', hub, 'manifest', 'https://registry-1.docker.io/v2/x', 'https://169.254.169.254/latest/meta-data', 'refused'],
    ['a tag list to another host', hub, 'tags', 'https://registry-1.docker.io/v2/x', 'https://example.net/tags', 'refused'],
    ['a manifest to the own host', hub, 'manifest', 'https://registry-1.docker.io/v2/a', 'https://registry-1.docker.io/v2/b', 'trusted'],
    ['a manifest to another port of the own host', hub, 'manifest', 'https://registry-1.docker.io/v2/a', 'https://registry-1.docker.io:2375/v2/b', 'refused'],
    ['a blob to another port of the own host is restricted', hub, 'blob', 'https://registry-1.docker.io/v2/a', 'https://registry-1.docker.io:8443/b', 'restricted'],
    ['a manifest to a listed host', listed, 'manifest', 'https://registry.example.com/v2/a', 'https://cdn.example.net/m', 'trusted'],
    ['a referrers list to a listed wildcard', listed, 'referrers', 'https://registry.example.com/v2/a', 'https://eu.storage.example.org/r', 'trusted'],
    ['the wildcard is not the domain itself', listed, 'referrers', 'https://registry.example.com/v2/a', 'https://storage.example.org/r', 'refused'],
    ['a listed host, but HTTPS to HTTP', listed, 'manifest', 'https://registry.example.com/v2/a', 'http://cdn.example.net/m', 'refused'],
    ['a blob to a CDN', hub, 'blob', 'https://registry-1.docker.io/v2/x/blobs/sha256:0', 'https://production.cloudflare.docker.com/registry-v2/x', 'restricted'],
    ['a blob to S3', hub, 'blob', 'https://registry-1.docker.io/v2/x', 'https://bucket.s3.amazonaws.com/x?X-Amz-Signature=1', 'restricted'],
    ['a blob from HTTPS to HTTP', hub, 'blob', 'https://registry-1.docker.io/v2/x', 'http://production.cloudflare.docker.com/x', 'refused'],
    ['a blob to a listed host is not restricted', listed, 'blob', 'https://registry.example.com/v2/x', 'https://cdn.example.net/b', 'trusted'],
    ['a blob from HTTP to HTTP', upstream('http://127.0.0.1:5000'), 'blob', 'http://127.0.0.1:5000/v2/x', 'http://127.0.0.2:9000/b', 'restricted'],
    ['a blob to another scheme', hub, 'blob', 'https://registry-1.docker.io/v2/x', 'ftp://example.net/b', 'refused'],
  ];
  for (const [what, up, kind, from, to, want] of cases) assert.equal(said(redirectRule(up, kind, new URL(from), new URL(to))), want, what);
  assert.equal(hostMatches('*.pkg.dev', 'us-docker.pkg.dev.'), true, 'a trailing dot is the same name');
  assert.equal(hostMatches('*.pkg.dev', 'pkg.dev'), false);
  assert.equal(hostMatches('CDN.example.net', 'cdn.example.net'), true);
});

test('address kinds: loopback, link-local and private ranges, mapped and NAT64 forms, names that say loopback', () => {
  const cases: Array<[string, AddressKind]> = [
    ['127.0.0.1', 'loopback'], ['127.0.0.2', 'loopback'], ['0.0.0.0', 'loopback'], ['::1', 'loopback'], ['::', 'loopback'], ['[::1]', 'loopback'],
    ['::ffff:127.0.0.1', 'loopback'], ['[::ffff:7f00:1]', 'loopback'],
    ['169.254.169.254', 'link-local'], ['fe80::1', 'link-local'], ['fe80::1%eth0', 'link-local'],
    ['10.0.0.1', 'private'], ['172.16.0.1', 'private'], ['172.31.255.255', 'private'], ['192.168.1.1', 'private'], ['100.64.0.1', 'private'],
    ['fd00::2', 'private'], ['::ffff:10.1.2.3', 'private'], ['64:ff9b::a00:1', 'private'], ['64:ff9b::7f00:1', 'loopback'],
    ['192.0.2.1', 'reserved'], ['224.0.0.1', 'reserved'], ['255.255.255.255', 'reserved'], ['ff02::1', 'reserved'], ['2001:db8::1', 'reserved'],
    ['::127.0.0.1', 'reserved'], ['::8.8.8.8', 'reserved'], ['::ffff:0:127.0.0.1', 'reserved'], ['::ffff:0:a00:1', 'reserved'],
    ['172.32.0.1', 'public'], ['8.8.8.8', 'public'], ['100.128.0.1', 'public'], ['2606:4700::1111', 'public'], ['64:ff9b::808:808', 'public'],
    ['not an address', 'reserved'],
  ];
  for (const [address, want] of cases) assert.equal(addressKind(address), want, address);
  // As URL hosts: the parser turns 0x7f.1 and 2130706433 into 127.0.0.1.
  for (const host of ['localhost', 'a.localhost', 'LOCALHOST.', '0x7f.1', '2130706433', '[::ffff:127.0.0.1]']) assert.equal(literalKind(new URL(`http://${host}/`).hostname), 'loopback', host);
  for (const host of ['registry.example.com', 'localhost.example.com']) assert.equal(literalKind(host), undefined, host);
});

test('a manifest answer is refused unless its type, as the cache would serve it, is a manifest type', () => {
  const up = upstream('https://registry.example.com');
  const body = (mediaType?: string): Buffer => Buffer.from(JSON.stringify({ schemaVersion: 2, ...(mediaType ? { mediaType } : {}) }));
  const cases: Array<[string, Buffer | undefined, string | undefined, boolean]> = [
    ['OCI manifest', body(), OCI_MANIFEST, true],
    ['OCI index with charset', body(), `${OCI_INDEX}; charset=utf-8`, true],
    ['Docker schema 2', body(), DOCKER_MANIFEST, true],
    ['schema 1 signed', body(), DOCKER_SCHEMA1_SIGNED, true],
    ['application/json naming a manifest type', body(DOCKER_MANIFEST), 'application/json', true],
    ['application/json without a field', body(), 'application/json', true],
    ['no Content-Type', body(), undefined, true],
    ['text/plain: schema 1, as containerd reads it', body(), 'text/plain', true],
    ['text/html', Buffer.from('<html></html>'), 'text/html', false],
    ['application/json whose field says text/html', body('text/html'), 'application/json', false],
    ['no Content-Type, field says image/svg+xml', body('image/svg+xml'), undefined, false],
    ['application/octet-stream without a field', body(), 'application/octet-stream', false],
    ['HEAD: OCI manifest', undefined, OCI_MANIFEST, true],
    ['HEAD: no Content-Type', undefined, undefined, true],
    ['HEAD: text/html', undefined, 'text/html', false],
  ];
  for (const [what, b, ct, ok] of cases) {
    const err = notAManifest(up, b, ct);
    assert.equal(err === undefined, ok, what);
    if (err) assert.deepEqual([err.code, err.status], ['MANIFEST_INVALID', 502], what);
  }
});

test('config: redirectHosts, validated with the key named', () => {
  assert.deepEqual(upstream('https://r.example', { redirectHosts: ['CDN.example.net', '*.pkg.dev', '10.0.0.5', '[fd00::5]'] }).redirectHosts, ['cdn.example.net', '*.pkg.dev', '10.0.0.5', '[fd00::5]']);
  assert.deepEqual(upstream('https://r.example').redirectHosts, []);
  for (const bad of ['https://cdn.example.net', 'cdn.example.net:443', '*', 'a.*.example', '']) {
    assert.throws(() => upstream('https://r.example', { redirectHosts: [bad] }), { message: new RegExp(`^config: upstreams\\[0\\]\\.redirectHosts\\[0\\]: must be a host name`) }, bad);
  }
  assert.throws(() => upstream('https://r.example', { redirectHosts: 'cdn.example.net' }), { message: 'config: upstreams[0].redirectHosts: must be a list of host names' });
});

test('helm chart: tokenRealms and redirectHosts pass the schema into the config; a URL as a redirect host does not', async (t) => {
  const helm = resolve('.tools/helm');
  if (!which(helm)) {
    if (process.env.CI) throw new Error('.tools/helm missing: run scripts/build-helm.sh (required under CI)');
    return t.skip('.tools/helm missing: run scripts/build-helm.sh');
  }
  const env = { ...process.env, HELM_CACHE_HOME: '/tmp/helm-cache', HELM_CONFIG_HOME: '/tmp/helm-config', HELM_DATA_HOME: '/tmp/helm-data' };
  const values = join(tempDir(t, 'helm-trust'), 'values.yaml');
  const render = (redirectHost: string): ReturnType<typeof exec> => {
    writeFileSync(values, `config:\n  defaultUpstream: registry.example.com\n  upstreams:\n    - name: registry.example.com\n      url: https://registry.example.com\n      tokenRealms: [https://auth.example.net]\n      redirectHosts: ["${redirectHost}", "*.storage.example.org"]\n`);
    return exec(helm, ['template', 'cache', resolve('helm/ocicache'), '-f', values], env);
  };
  const out = await render('cdn.example.net');
  assert.equal(out.code, 0, out.stderr);
  const configMap = parseAllDocuments(out.stdout).map((d) => d.toJSON() as { kind: string; data?: Record<string, string> }).find((d) => d?.kind === 'ConfigMap')!;
  const config = buildConfig(parse(configMap.data!['config.yaml']!), {}, { upstreamAuth: false, adminToken: false });
  assert.deepEqual([config.upstreams[0]!.tokenRealms, config.upstreams[0]!.redirectHosts], [['https://auth.example.net'], ['cdn.example.net', '*.storage.example.org']]);
  const bad = await render('https://cdn.example.net');
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /redirectHosts/);
});
