/** Pure pieces, table-driven: WWW-Authenticate, Range, Accept, config validation, path parsing. */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test, { after } from 'node:test';
import { Counter, Histogram, Registry } from 'prom-client';
import { Db } from '../src/storage/db.js';
import { buildConfig, ConfigError } from '../src/core/config.js';
import { OciError } from '../src/core/errors.js';
import { accepts, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, mediaTypeOf, OCI_INDEX, OCI_MANIFEST } from '../src/core/media-types.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { parseRange } from '../src/core/byte-range.js';
import { parseV2Path, UpstreamIndex } from '../src/core/api-path.js';
import { Stats } from '../src/http/status.js';
import { parseWwwAuthenticate } from '../src/upstream/www-authenticate.js';
import { tempDir } from './helpers/tools.js';
import { subjectOfTag } from '../src/core/digest.js';

test('WWW-Authenticate: quoted commas, several challenges, case', () => {
  const cases: Array<[string, Array<{ scheme: string; params: Record<string, string> }>]> = [
    [
      'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push"',
      [{ scheme: 'bearer', params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:samalba/my-app:pull,push' } }],
    ],
    ['Basic realm="Registry Realm"', [{ scheme: 'basic', params: { realm: 'Registry Realm' } }]],
    [
      'BEARER Realm="r", Service=s, Basic realm="b"',
      [
        { scheme: 'bearer', params: { realm: 'r', service: 's' } },
        { scheme: 'basic', params: { realm: 'b' } },
      ],
    ],
    ['Bearer realm="a\\"b",error="insufficient_scope"', [{ scheme: 'bearer', params: { realm: 'a"b', error: 'insufficient_scope' } }]],
    ['', []],
  ];
  for (const [header, expected] of cases) assert.deepEqual(parseWwwAuthenticate(header), expected, header);
});

test('Range: single ranges, suffixes, and 416s', () => {
  const size = 100;
  const ok: Array<[string | undefined, { start: number; end: number } | undefined]> = [
    [undefined, undefined],
    ['bytes=0-9', { start: 0, end: 9 }],
    ['bytes=90-', { start: 90, end: 99 }],
    ['bytes=90-500', { start: 90, end: 99 }],
    ['bytes=-10', { start: 90, end: 99 }],
    ['bytes=-500', { start: 0, end: 99 }],
    ['bytes=0-1,5-6', undefined], // several ranges: the whole blob
    ['items=0-1', undefined], // another unit: ignored
  ];
  for (const [h, r] of ok) assert.deepEqual(parseRange(h, size), r, h);
  for (const h of ['bytes=100-', 'bytes=5-1', 'bytes=x-', 'bytes=-0', 'bytes=-']) {
    assert.throws(() => parseRange(h, size), (e: unknown) => e instanceof OciError && e.status === 416 && e.headers['content-range'] === 'bytes */100', h);
  }
});

test('Accept negotiation: lists, parameters, wildcards', () => {
  const cases: Array<[string | undefined, boolean]> = [
    [undefined, true],
    ['', true],
    ['*/*', true],
    ['application/*', true],
    [`${DOCKER_MANIFEST}, ${OCI_INDEX}`, true],
    [`${OCI_INDEX}; q=0.5`, true],
    [DOCKER_MANIFEST, false],
    ['text/*', false],
  ];
  // Twice: the second round answers from the memo of parsed Accept lines.
  for (let round = 0; round < 2; round++) for (const [accept, want] of cases) assert.equal(accepts(accept, OCI_INDEX), want, String(accept));
  // Past the memo's 1 KiB line limit, still parsed.
  assert.equal(accepts(`${'x/y, '.repeat(300)}${OCI_INDEX}`, OCI_INDEX), true);
  assert.equal(accepts('x/y, '.repeat(300), OCI_INDEX), false);
});

test('media type served for a manifest: Content-Type, else the mediaType field, never a malformed one', () => {
  const body = (mediaType: unknown): Buffer => Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType }));
  const cases: Array<[string, Buffer, string | undefined, string]> = [
    ['a manifest Content-Type wins', body(OCI_INDEX), `${OCI_MANIFEST}; charset=utf-8`, OCI_MANIFEST],
    ['application/json: the field', body(DOCKER_MANIFEST), 'application/json', DOCKER_MANIFEST],
    ['no Content-Type: the field', body(OCI_INDEX), undefined, OCI_INDEX],
    ['no Content-Type, no field: OCI manifest', Buffer.from('{}'), undefined, OCI_MANIFEST],
    ['text/plain, no field: schema1 as containerd does', Buffer.from('{}'), 'text/plain', DOCKER_SCHEMA1_SIGNED],
    ['a line break in the field is ignored', body('application/x\r\nset-cookie: a=b'), 'application/json', 'application/json'],
    ['a field that is no media type is ignored', body('not a media type'), undefined, OCI_MANIFEST],
    ['a non-string field is ignored', body({ evil: 1 }), undefined, OCI_MANIFEST],
    ['a malformed Content-Type is ignored', body(OCI_MANIFEST), 'application/x y', OCI_MANIFEST],
  ];
  for (const [name, b, ct, want] of cases) assert.equal(mediaTypeOf(b, ct), want, name);
});

// Without default labels on the registry: with them, only the order of labels would differ.
test('metrics: the per-request counters and histogram render exactly as prom-client renders its own', async () => {
  const ours = new Metrics();
  const reference = new Registry();
  const refRequests = new Counter({ name: 'ocicache_cache_requests_total', help: 'x', labelNames: ['upstream', 'kind', 'result'], registers: [reference] });
  const refDuration = new Histogram({ name: 'ocicache_http_request_duration_seconds', help: 'x', labelNames: ['kind', 'method', 'status'], buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120], registers: [reference] });
  const requests: Array<[string, string, string]> = [['docker.io', 'manifest', 'hit'], ['docker.io', 'manifest', 'hit'], ['ghcr.io', 'blob', 'miss']];
  const durations: Array<[[string, string, string], number]> = [[['manifest', 'GET', '200'], 0.0004], [['manifest', 'GET', '200'], 0.02], [['blob', 'HEAD', '404'], 0.001], [['blob', 'GET', '200'], 200]];
  const render = async (): Promise<[string[], string[]]> => {
    const pick = (text: string): string[] => text.split('\n').filter((l) => /^ocicache_(cache_requests_total|http_request_duration_seconds)/.test(l));
    return [pick(await ours.registry.metrics()), pick(await reference.metrics())];
  };
  for (const [u, k, r] of requests) {
    ours.cacheRequests.inc([u, k, r]);
    refRequests.inc({ upstream: u, kind: k, result: r });
  }
  for (const [[k, m, st], v] of durations) {
    ours.httpDuration.observe([k, m, st], v);
    refDuration.observe({ kind: k, method: m, status: st }, v);
  }
  let [got, want] = await render();
  assert.equal(got.length, 2 + 3 * 13); // two request label sets; three histogram ones of 10 buckets, +Inf, sum and count
  assert.deepEqual(got, want);
  // Increments between scrapes add to what was scraped before.
  ours.cacheRequests.inc(['docker.io', 'manifest', 'hit'], 2);
  refRequests.inc({ upstream: 'docker.io', kind: 'manifest', result: 'hit' }, 2);
  [got, want] = await render();
  assert.ok(got.includes('ocicache_cache_requests_total{upstream="docker.io",kind="manifest",result="hit"} 4'));
  assert.deepEqual(got, want);
  // A reset drops what was not scraped yet, as prom-client's does.
  ours.cacheRequests.inc(['docker.io', 'manifest', 'hit'], 5);
  ours.registry.resetMetrics();
  [got] = await render();
  assert.deepEqual(got, []);
  // Bad values are refused when made, not at the next scrape.
  assert.throws(() => ours.servedBytes.inc(['docker.io', 'cache'], -1), /cannot be increased by -1/);
  assert.throws(() => ours.httpDuration.observe(['blob', 'GET', '200'], NaN), /cannot observe NaN/);
  assert.throws(() => ours.cacheRequests.inc(['docker.io', 'manifest']), /ocicache_cache_requests_total: 2 label values for 3 labels/);
});

test('status page counts: pulls are manifest GETs by tag, per upstream and name; past 10,000 images the least pulled half goes', () => {
  const stats = new Stats();
  const pull = (upstream: string, name: string, times = 1): void => {
    for (let i = 0; i < times; i++) stats.record(upstream, 'manifest', 'hit', name, true, 'GET');
  };
  pull('docker.io', 'library/alpine', 3);
  pull('ghcr.io', 'library/alpine', 2);
  stats.record('docker.io', 'manifest', 'hit', 'library/busybox', false, 'GET'); // by digest: not a pull
  stats.record('docker.io', 'manifest', 'hit', 'library/busybox', true, 'HEAD');
  stats.record('docker.io', 'blob', 'miss', 'library/busybox', false, 'GET');
  stats.record('docker.io', 'manifest', 'error', 'library/busybox', true, 'GET');
  assert.deepEqual(stats.topPulls(10), [['docker.io/library/alpine', 3], ['ghcr.io/library/alpine', 2]]);
  assert.equal(stats.hitRatio('docker.io'), 5 / 6);
  assert.equal(stats.hitRatio(), 7 / 8);
  for (let i = 0; i < 9_998; i++) pull('docker.io', `n${i}`);
  assert.equal(stats.topPulls(20_000).length, 10_000);
  pull('quay.io', 'one-too-many');
  const kept = stats.topPulls(20_000);
  assert.equal(kept.length, 5_000);
  assert.deepEqual(kept.slice(0, 2), [['docker.io/library/alpine', 3], ['ghcr.io/library/alpine', 2]]);
  pull('docker.io', 'library/alpine');
  assert.deepEqual(stats.topPulls(1), [['docker.io/library/alpine', 4]]);
});

const UNITS_DIR = mkdtempSync(join(tmpdir(), 'ocicache-units-'));
after(() => rmSync(UNITS_DIR, { recursive: true, force: true }));
const EMPTY_FILE = join(UNITS_DIR, 'empty-token');
writeFileSync(EMPTY_FILE, '\n');

test('config: errors name the bad key', () => {
  const base = { upstreams: [{ name: 'docker.io', url: 'https://registry-1.docker.io' }] };
  const cases: Array<[unknown, string]> = [
    [{}, 'config: upstreams: must list at least one upstream'],
    [{ ...base, server: { port: 'x' } }, 'config: server.port: must be a port number 0-65535, got "x"'],
    [{ ...base, cache: { tagTtl: 'soon' } }, 'config: cache.tagTtl: expected a duration such as 30s, 5m or 24h, got "soon"'],
    [{ ...base, cache: { tagTl: '5m' } }, 'config: cache.tagTl: unknown key (known: tagTtl, manifestMemory, fillMemory, notFoundTtl)'],
    [{ upstreams: [{ name: 'docker.io', url: 'ftp://x' }] }, 'config: upstreams[0].url: must use http or https'],
    [{ upstreams: [{ name: 'Not A Host!', url: 'https://x' }] }, 'config: upstreams[0].name: must be a registry host name such as docker.io or registry.example.com:5000, got "Not A Host!"'],
    [{ ...base, defaultUpstream: 'quay.io' }, 'config: defaultUpstream: quay.io is not the name or alias of a configured upstream'],
    [{ upstreams: [{ name: 'a.io', url: 'https://a' }, { name: 'b.io', url: 'https://b', aliases: ['a.io'] }] }, 'config: upstreams[1]: a.io is already used by a.io'],
    [{ upstreams: [{ name: 'a.io', url: 'https://a', auth: { username: 'u', password: 'p' } }] }, 'config: upstreams[0].auth.password: secrets are never written in the config: use passwordEnv or passwordFile'],
    [{ upstreams: [{ name: 'a.io', url: 'https://a', auth: { username: 'u', passwordEnv: 'NOPE' } }] }, 'config: upstreams[0].auth.passwordEnv: environment variable NOPE is not set'],
    [{ ...base, storage: { maxSize: '10 gigs' } }, 'config: storage.maxSize: expected a size such as 512MiB or 50GiB, got "10 gigs"'],
    [{ ...base, storage: { highWatermark: 80, lowWatermark: 80 } }, 'config: storage.lowWatermark: must be below storage.highWatermark'],
    [{ ...base, storage: { highWatermark: 120 } }, 'config: storage.highWatermark: must be a percentage above 0 and at most 100'],
    [{ ...base, offline: 'yes' }, 'config: offline: must be true or false'],
    [{ ...base, upstreamDefaults: { maxConcurrent: 0 } }, 'config: upstreamDefaults.maxConcurrent: must be a whole number >= 1'],
    [{ ...base, upstreamDefaults: { breakerCoolDown: '1m' } }, 'config: upstreamDefaults.breakerCoolDown: unknown key (known: offline, maxAge, maxConcurrent, maxRequestsPerSecond, breakerFailures, breakerCooldown, blobRetries, maxRetryAfter)'],
    [{ upstreams: [{ name: 'a.io', url: 'https://a', maxAge: 'forever' }] }, 'config: upstreams[0].maxAge: expected a duration such as 30s, 5m or 24h, got "forever"'],
    [{ upstreams: [{ name: 'a.io', url: 'https://a', maxRequestsPerSecond: -1 }] }, 'config: upstreams[0].maxRequestsPerSecond: must be a number >= 0 (0: unlimited)'],
    [{ ...base, admin: { token: 'hunter2' } }, 'config: admin.token: secrets are never written in the config: use tokenEnv or tokenFile'],
    [{ ...base, admin: { tokenFile: EMPTY_FILE } }, `config: admin.tokenFile: ${EMPTY_FILE} is empty`],
  ];
  for (const [doc, message] of cases) assert.throws(() => buildConfig(doc, {}), (e: unknown) => e instanceof ConfigError && e.message === message, message);
});

test('config: env overrides', () => {
  const c = buildConfig({ upstreams: [{ name: 'docker.io', url: 'https://r' }], defaultUpstream: 'docker.io' }, { OCICACHE_PORT: '6000', OCICACHE_STORAGE_ROOT: '/tmp/x', OCICACHE_DEFAULT_UPSTREAM: '' });
  assert.equal(c.server.port, 6000);
  assert.equal(c.storage.root, '/tmp/x');
  assert.equal(c.defaultUpstream, undefined);
  assert.equal(c.offline, false);
  assert.equal(buildConfig({ upstreams: [{ name: 'a.io', url: 'https://a' }] }, { OCICACHE_OFFLINE: 'true' }).offline, true);
});

test('config: upstreamDefaults apply to every upstream; an upstream overrides them', () => {
  const c = buildConfig({
    upstreamDefaults: { maxConcurrent: 8, breakerCooldown: '1m', maxAge: '30d' },
    upstreams: [{ name: 'a.io', url: 'https://a' }, { name: 'b.io', url: 'https://b', maxConcurrent: 2, offline: true }],
  }, {});
  const [a, b] = c.upstreams;
  assert.deepEqual([a!.maxConcurrent, a!.breakerCooldown, a!.maxAge, a!.offline, a!.blobRetries], [8, 60_000, 30 * 86_400_000, false, 5]);
  assert.deepEqual([b!.maxConcurrent, b!.breakerCooldown, b!.offline], [2, 60_000, true]);
});

test('path parsing: routes from the right, upstream from ns, prefix or default', () => {
  const config = buildConfig(
    { defaultUpstream: 'docker.io', upstreams: [{ name: 'docker.io', url: 'https://r', aliases: ['index.docker.io'], dockerHubLibrary: true }, { name: 'ghcr.io', url: 'https://g' }] },
    {},
  );
  const idx = new UpstreamIndex(config);
  const cases: Array<[string, string | undefined, string, string, string, string]> = [
    // path, ns, kind, upstream, name, reference
    ['/v2/a/blobs/b/manifests/latest', 'ghcr.io', 'manifest', 'ghcr.io', 'a/blobs/b', 'latest'],
    ['/v2/alpine/manifests/3', 'docker.io', 'manifest', 'docker.io', 'library/alpine', '3'],
    ['/v2/alpine/manifests/3', 'INDEX.DOCKER.IO:443', 'manifest', 'docker.io', 'library/alpine', '3'],
    ['/v2/ghcr.io/org/tool/tags/list', undefined, 'tags', 'ghcr.io', 'org/tool', 'list'],
    ['/ghcr.io/v2/org/tool/manifests/v1', undefined, 'manifest', 'ghcr.io', 'org/tool', 'v1'],
    ['/ghcr.io/org/tool/manifests/v1', 'ghcr.io', 'manifest', 'ghcr.io', 'org/tool', 'v1'],
    ['/v2/org/tool/manifests/v1', undefined, 'manifest', 'docker.io', 'org/tool', 'v1'],
    ['/v2/ghcr.io/manifests/v1', undefined, 'manifest', 'docker.io', 'library/ghcr.io', 'v1'], // one segment: a name, not a prefix
  ];
  for (const [path, ns, kind, upstream, name, reference] of cases) {
    const p = parseV2Path(path, ns, idx);
    if (!('target' in p)) throw new Error(`${path} did not parse as a repository path`);
    assert.deepEqual([p.kind, p.target.upstream.name, p.target.name, p.reference], [kind, upstream, name, reference], path);
  }
  assert.deepEqual(parseV2Path('/v2/', undefined, idx), { kind: 'base' });
  assert.deepEqual(parseV2Path('/ghcr.io/v2/', undefined, idx), { kind: 'base' });
});

test('db: batched access times only update; a use recorded after eviction brings no row back', (t) => {
  const db = new Db(join(tempDir(t, 'db'), 'index.db'));
  try {
    const digest = `sha256:${'a'.repeat(64)}`;
    db.touchBlobs([{ digest, size: 10, upstream: 'docker.io', at: 1000 }]);
    assert.equal(db.hasBlob(digest), false);
    db.putBlob(digest, 10, 'docker.io', 'team/app', 1000);
    db.touchBlobs([{ digest, size: 10, upstream: 'ghcr.io', at: 2000 }]);
    assert.deepEqual(db.oldestBlobs(10), [{ digest, size: 10, lastAccess: 2000 }]);
    assert.deepEqual(db.expiredBlobs({ 'docker.io': 1500, 'ghcr.io': 1500 }, 0), [], 'ghcr.io used it at 2000');
    assert.deepEqual(db.expiredBlobs({ 'docker.io': 2500, 'ghcr.io': 2500 }, 0), [{ digest, size: 10, lastAccess: 2000 }]);
    assert.deepEqual(db.expiredBlobs({ 'docker.io': 2500 }, 0), [], 'ghcr.io has no maxAge: kept');
    db.dropBlob(digest);
    db.touchBlobs([{ digest, size: 10, upstream: 'docker.io', at: 3000 }]);
    assert.equal(db.hasBlob(digest), false);
    assert.equal(db.pruneDangling(), 0);
  } finally {
    db.close();
  }
});

test('the subject a referrers-tag-schema tag names: sha256-<hex> and cosign suffixes only', () => {
  const hex = 'a'.repeat(64);
  const cases: Array<[string, string | undefined]> = [
    [`sha256-${hex}`, `sha256:${hex}`],
    [`sha256-${hex}.sig`, `sha256:${hex}`],
    [`sha256-${hex}.att`, `sha256:${hex}`],
    [`sha256-${hex}.sbom`, `sha256:${hex}`],
    [`sha512-${'b'.repeat(128)}`, `sha512:${'b'.repeat(128)}`],
    [`sha256-${'A'.repeat(64)}`, undefined],
    [`sha256-${hex.slice(1)}`, undefined],
    [`sha256-${hex}extra`, undefined],
    [`sha256-${hex}.`, undefined],
    [`md5-${'a'.repeat(32)}`, undefined],
    ['latest', undefined],
  ];
  for (const [tag, subject] of cases) assert.equal(subjectOfTag(tag), subject, tag);
});
