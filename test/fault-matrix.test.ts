/**
 * The fault matrix (README, "Fault matrix"): every kind of exchange the cache has with an upstream
 * (a manifest by tag, a tag list, referrers, a token fetch, a blob) against every way an upstream
 * can fail (a reset or a truncation mid-body, a trickle, a hang, wrong bytes, an endless body, 429,
 * 500, a redirect loop). For each cell: what the client gets, that nothing partial is left in the
 * cache (no file under blobs/ or tmp/, no manifest, tag or blob row), that a tag cached before and
 * past its TTL is served STALE when the fault means "upstream unavailable", and that the next
 * request, with the upstream healthy again, is served normally. The breaker is kept out of the way
 * (breakerFailures high; test/resilience.test.ts and test/gate.test.ts cover it), blobs are not
 * resumed (blobRetries 0; test/resilience.test.ts covers resuming), and time moves with the proxy's
 * test clock where the cache decides by it (tagTtl, Retry-After).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import test from 'node:test';
import Database from 'better-sqlite3';
import { request } from 'undici';
import { MAX_MANIFEST_BYTES } from '../src/core/media-types.js';
import { startProxyWithFake, type FakeUpstream, type Handler } from './helpers/fake-upstream.js';
import { blobFile, testClock, type Proxy } from './helpers/proxy.js';
import { OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, sha256 } from './helpers/seed.js';
import { until, type Scope } from './helpers/tools.js';

const FAULTS = ['reset', 'truncation', 'trickle', 'hang', 'wrong bytes', 'endless body', '429', '500', 'redirect loop'] as const;
const KIND_NAMES = ['manifest by tag', 'tag list', 'referrers', 'token', 'blob'] as const;
type FaultName = (typeof FAULTS)[number];
type KindName = (typeof KIND_NAMES)[number];

/** What the client gets: an error (exact envelope, Retry-After or none), or a 200 whose body is cut before its end. */
type Outcome = { status: number; code: string; message?: string; detail?: unknown; retryAfter?: string } | 'cut body';

const UNREACHABLE: Outcome = { status: 503, code: 'UNAVAILABLE', message: 'upstream fake.example is unreachable' };
const TIMED_OUT: Outcome = { status: 504, code: 'UNAVAILABLE', message: 'upstream fake.example timed out' };
const LIMITED: Outcome = { status: 429, code: 'TOOMANYREQUESTS', message: 'upstream fake.example is rate limiting', retryAfter: '7' };
const failed = (what: string): Outcome => ({ status: 502, code: 'UNAVAILABLE', message: `upstream fake.example failed with 500 for ${what}` });
const tooLarge = (code: string, what: string, limit: number): Outcome => ({ status: 502, code, message: `upstream fake.example sent a ${what} larger than ${limit} bytes`, detail: { limit } });

function manifest(label: string): Buffer {
  return Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: sha256('{}'), size: 2 }, layers: [], annotations: { label } }));
}

/** The tag's manifest before (cached) and after it moved upstream, and v2's bytes with one label changed (same length, another digest). */
const V1 = manifest('v1');
const V2 = manifest('v2');
const V2_WRONG = manifest('vX');
const TAGS = Buffer.from('{"name":"app","tags":["latest","v2"]}');
const SUBJECT = sha256('the subject of the referrers');
const REFERRERS = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [] }));
const BLOB = randomBytes(64 * 1024);
const BLOB_DIGEST = sha256(BLOB);
/** The blob with its last byte changed: every byte but the last is right, so only the digest check can refuse it. */
const BLOB_WRONG = Buffer.from(BLOB);
BLOB_WRONG[BLOB_WRONG.length - 1]! ^= 0xff;
const MAX_TOKEN_BODY = 1024 * 1024;
const MAX_BLOB_SIZE = 1024 * 1024;

/**
 * The matrix: what the client gets for each kind and fault. `stale`: a tag cached before and past
 * its TTL is served STALE instead (manifest by tag, and token, whose client request is a manifest
 * by tag); otherwise that request gets the same answer as a cold one.
 */
const MATRIX: Record<FaultName, { stale: boolean } & Record<KindName, Outcome>> = {
  reset: { stale: true, 'manifest by tag': UNREACHABLE, 'tag list': UNREACHABLE, referrers: UNREACHABLE, token: UNREACHABLE, blob: 'cut body' },
  truncation: { stale: true, 'manifest by tag': UNREACHABLE, 'tag list': UNREACHABLE, referrers: UNREACHABLE, token: UNREACHABLE, blob: 'cut body' },
  trickle: { stale: true, 'manifest by tag': TIMED_OUT, 'tag list': TIMED_OUT, referrers: TIMED_OUT, token: TIMED_OUT, blob: 'cut body' },
  hang: { stale: true, 'manifest by tag': TIMED_OUT, 'tag list': TIMED_OUT, referrers: TIMED_OUT, token: TIMED_OUT, blob: TIMED_OUT },
  'wrong bytes': {
    stale: true,
    'manifest by tag': { status: 502, code: 'UNKNOWN', message: `upstream fake.example sent manifest bytes hashing to ${sha256(V2_WRONG)} for ${sha256(V2)}` },
    'tag list': { status: 502, code: 'UNKNOWN', message: 'upstream fake.example sent an invalid tag list' },
    referrers: { status: 502, code: 'UNKNOWN', message: 'upstream fake.example sent an invalid referrers index' },
    token: { status: 502, code: 'UNKNOWN', message: 'token server for fake.example sent an invalid answer' },
    blob: 'cut body',
  },
  'endless body': {
    stale: true,
    'manifest by tag': tooLarge('MANIFEST_INVALID', 'manifest', MAX_MANIFEST_BYTES),
    'tag list': tooLarge('UNKNOWN', 'tag list', MAX_MANIFEST_BYTES),
    referrers: tooLarge('MANIFEST_INVALID', 'referrers index', MAX_MANIFEST_BYTES),
    token: tooLarge('UNKNOWN', 'token response', MAX_TOKEN_BODY),
    blob: 'cut body',
  },
  '429': { stale: true, 'manifest by tag': LIMITED, 'tag list': LIMITED, referrers: LIMITED, token: LIMITED, blob: LIMITED },
  '500': { stale: true, 'manifest by tag': failed('manifest'), 'tag list': failed('tags'), referrers: failed('referrers'), token: failed('token'), blob: failed('blob') },
  // undici refuses a redirect to a URL it has already been to: a transport error.
  'redirect loop': { stale: true, 'manifest by tag': UNREACHABLE, 'tag list': UNREACHABLE, referrers: UNREACHABLE, token: UNREACHABLE, blob: UNREACHABLE },
};

/** Cells where the proxy does not yet do what the matrix says: the observed behaviour, for src/ to fix. */
const TODO: Partial<Record<string, string>> = {};

/** A healthy answer at one upstream path, and the wrong bytes the "wrong bytes" fault sends instead. */
interface Answer {
  body: Buffer;
  headers: Record<string, string>;
  wrong: Buffer;
}

const json = (body: Buffer, wrong: Buffer, type = 'application/json'): Answer => ({ body, wrong, headers: { 'content-type': type } });
const manifestAnswer = (body: Buffer): Answer => ({ body, wrong: body === V2 ? V2_WRONG : Buffer.from('{"schemaVersion":'), headers: { 'content-type': OCI_MANIFEST, 'docker-content-digest': sha256(body) } });
const tokenAnswer = (token: string): Answer => json(Buffer.from(`{"token":"${token}","expires_in":300}`), Buffer.from('{"token":'));

function healthy(a: Answer): Handler {
  return (req, res) => res.writeHead(200, { ...a.headers, 'content-length': String(a.body.length) }).end(req.method === 'HEAD' ? undefined : a.body);
}

type Response = Parameters<Handler>[1];

/**
 * A fault in the body: a HEAD (which has none) is answered healthily. `started` resolves once the
 * client has received the first bytes of its answer: a blob's fault waits for it, so that it
 * happens mid-body for the client too (the proxy buffers the other kinds whole, so for them it is
 * resolved from the start).
 */
function inBody(fn: (a: Answer, res: Response, started: Promise<void>) => void): (a: Answer, started: Promise<void>) => Handler {
  return (a, started) => (req, res) => (req.method === 'HEAD' ? healthy(a)(req, res) : fn(a, res, started));
}

/** Half the body, then (once the client has bytes) `end` the connection. */
function half(a: Answer, res: Response, started: Promise<void>, end: (socket: NonNullable<Response['socket']>) => void): void {
  res.writeHead(200, { ...a.headers, 'content-length': String(a.body.length) });
  res.write(a.body.subarray(0, a.body.length >> 1), () => {
    void started.then(() => res.socket && end(res.socket));
  });
}

/** How each fault answers instead of `a`. */
const FAULT_HANDLERS: Record<FaultName, (a: Answer, started: Promise<void>) => Handler> = {
  // A TCP reset half-way through the announced body.
  reset: inBody((a, res, started) => half(a, res, started, (s) => s.resetAndDestroy())),
  // Content-Length larger than what is sent, then a clean end of the connection (FIN).
  truncation: inBody((a, res, started) => half(a, res, started, (s) => s.end())),
  // One byte every 100 ms: never idle long enough for an idle timeout, and never done (small bodies are padded).
  trickle: inBody((a, res) => {
    const body = a.body.length >= 1000 ? a.body : Buffer.concat([a.body, Buffer.alloc(1000, 0x20)]);
    res.writeHead(200, { ...a.headers, 'content-length': String(body.length) });
    let at = 0;
    const timer = setInterval(() => (at < body.length ? res.write(body.subarray(at, ++at)) : res.end()), 100);
    res.once('close', () => clearInterval(timer));
  }),
  // No response headers, ever (the fake upstream's sockets are destroyed when the test ends).
  hang: () => () => undefined,
  // A complete, well-formed answer with the wrong bytes: a digest mismatch, or invalid JSON.
  'wrong bytes': inBody((a, res, started) => {
    res.writeHead(200, { ...a.headers, 'content-length': String(a.wrong.length) });
    res.write(a.wrong.subarray(0, a.wrong.length >> 1), () => void started.then(() => res.end(a.wrong.subarray(a.wrong.length >> 1))));
  }),
  // No Content-Length, and a body that never ends.
  'endless body': inBody((a, res, started) => {
    const chunk = Buffer.alloc(64 * 1024, 0x20);
    res.writeHead(200, { 'content-type': a.headers['content-type'] });
    const pump = (): void => {
      while (!res.destroyed && res.write(chunk));
      if (!res.destroyed) res.once('drain', pump);
    };
    res.write(chunk, () => void started.then(pump));
  }),
  '429': () => (_req, res) => res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '7' }).end('{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'),
  '500': () => (_req, res) => res.writeHead(500, { 'content-type': 'application/json' }).end('{"errors":[{"code":"UNKNOWN","message":"boom"}]}'),
  // A 302 to itself: the cache follows it a few times, then has a 302 for an answer.
  'redirect loop': () => (req, res) => res.writeHead(302, { location: req.url ?? '/' }).end(),
};

interface Kind {
  name: KindName;
  /** The client's request, at the proxy. */
  path: string;
  /** Where on the upstream the fault sits. */
  faultAt: (upstreamPath: string) => boolean;
  /** The upstream wants a bearer token from its /token for every registry request. */
  auth?: true;
  /** The healthy answer the client gets (cold). */
  healthy: { cache: string; body: Buffer };
}

const TAG_PATH = '/v2/app/manifests/latest';
const KINDS: Kind[] = [
  { name: 'manifest by tag', path: TAG_PATH, faultAt: (p) => p.startsWith('/v2/app/manifests/'), healthy: { cache: 'MISS', body: V2 } },
  { name: 'tag list', path: '/v2/app/tags/list', faultAt: (p) => p === '/v2/app/tags/list', healthy: { cache: 'PASSTHROUGH', body: TAGS } },
  { name: 'referrers', path: `/v2/app/referrers/${SUBJECT}`, faultAt: (p) => p.startsWith('/v2/app/referrers/'), healthy: { cache: 'PASSTHROUGH', body: REFERRERS } },
  { name: 'token', path: TAG_PATH, auth: true, faultAt: (p) => p === '/token', healthy: { cache: 'MISS', body: V2 } },
  { name: 'blob', path: `/v2/app/blobs/${BLOB_DIGEST}`, faultAt: (p) => p.startsWith('/v2/app/blobs/'), healthy: { cache: 'MISS', body: BLOB } },
];

/** What the upstream is now: the tag's manifest, the token it issues and wants, and the fault (none: healthy). */
interface World {
  manifest: Buffer;
  token: string;
  fault: FaultName | undefined;
  /** Requests the fault answered: a cell must have met its fault. */
  met: number;
  /** Of those, the ones whose connection is still open. */
  open: number;
  /** Resolves once the client has the first bytes of its answer (blobs; see inBody). */
  started: Promise<void>;
}

function world(kind: Kind, manifest: Buffer, token: string, fault: FaultName | undefined): World & { clientHasBytes: () => void } {
  let clientHasBytes = (): void => undefined;
  const started = kind.name === 'blob' ? new Promise<void>((resolve) => (clientHasBytes = resolve)) : Promise.resolve();
  return { manifest, token, fault, met: 0, open: 0, started, clientHasBytes: () => clientHasBytes() };
}

function install(fake: FakeUpstream, kind: Kind, world: World): void {
  const answers: Record<string, () => Answer> = {
    [TAG_PATH]: () => manifestAnswer(world.manifest),
    [`/v2/app/manifests/${sha256(V1)}`]: () => manifestAnswer(V1),
    [`/v2/app/manifests/${sha256(V2)}`]: () => manifestAnswer(V2),
    '/v2/app/tags/list': () => json(TAGS, Buffer.from('{"name":"app","tags":[')),
    [`/v2/app/referrers/${SUBJECT}`]: () => json(REFERRERS, Buffer.from('{"schemaVersion":2,"manifests":['), OCI_INDEX),
    [`/v2/app/blobs/${BLOB_DIGEST}`]: () => ({ body: BLOB, wrong: BLOB_WRONG, headers: { 'content-type': 'application/octet-stream' } }),
    '/token': () => tokenAnswer(world.token),
  };
  for (const [path, answer] of Object.entries(answers)) {
    fake.route(path, (req, res) => {
      if (kind.auth && path !== '/token' && req.headers.authorization !== `Bearer ${world.token}`) {
        res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': `Bearer realm="${fake.url}/token",service="fake"` });
        return void res.end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
      }
      if (world.fault && kind.faultAt(path)) {
        world.met++;
        world.open++;
        res.once('close', () => world.open--);
        return FAULT_HANDLERS[world.fault](answer(), world.started)(req, res);
      }
      healthy(answer())(req, res);
    });
  }
}

/** A client request read to its end or to where the proxy cut it (`cut`); it fails the test if no answer comes within 10 s. */
async function ask(url: string, gotBytes = (): void => undefined): Promise<{ status: number; headers: Record<string, unknown>; body: Buffer; cut: boolean }> {
  const res = await request(url, { headers: { accept: OCI_MANIFEST }, headersTimeout: 10_000, bodyTimeout: 10_000 });
  const chunks: Buffer[] = [];
  let cut = false;
  try {
    for await (const chunk of res.body) {
      chunks.push(chunk as Buffer);
      gotBytes();
    }
  } catch {
    cut = true;
  }
  return { status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks), cut };
}

/** What the cache holds: the files under blobs/ and tmp/, and the index's rows. */
function cacheState(root: string): { blobs: string[]; tmp: string[]; rows: Record<string, unknown[]> } {
  const files = (dir: string): string[] => (existsSync(dir) ? readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => relative(dir, join(e.parentPath ?? e.path, e.name))).sort() : []);
  const db = new Database(join(root, 'index.db'), { readonly: true, fileMustExist: true });
  try {
    const rows = Object.fromEntries(
      [
        ['manifests', 'SELECT digest FROM manifests ORDER BY digest'],
        ['manifest_repos', 'SELECT upstream, name, digest FROM manifest_repos ORDER BY digest'],
        ['tags', 'SELECT upstream, name, tag, digest, checked_at FROM tags ORDER BY tag'],
        ['blobs', 'SELECT digest FROM blobs ORDER BY digest'],
        ['blob_repos', 'SELECT upstream, name, digest FROM blob_repos ORDER BY digest'],
      ].map(([table, sql]) => [table, db.prepare(sql!).all()]),
    );
    return { blobs: files(join(root, 'blobs')), tmp: files(join(root, 'tmp')), rows };
  } finally {
    db.close();
  }
}

async function startCell(t: Scope, kind: Kind, world: World): Promise<{ fake: FakeUpstream; proxy: Proxy; clock: ReturnType<typeof testClock> }> {
  const clock = testClock();
  const { fake, proxy } = await startProxyWithFake(
    t,
    { tagTtl: '1m', breakerFailures: 1000, blobRetries: 0 },
    { clock, storage: { maxBlobSize: MAX_BLOB_SIZE }, timeouts: { manifest: '1s', blobIdle: '1s', fill: '2s' } },
  );
  install(fake, kind, world);
  return { fake, proxy, clock };
}

function assertOutcome(r: Awaited<ReturnType<typeof ask>>, expected: Outcome, kind: Kind): void {
  if (expected === 'cut body') {
    assert.deepEqual({ status: r.status, cache: r.headers['x-cache'], cut: r.cut }, { status: 200, cache: 'MISS', cut: true }, 'a 200 whose body is cut off, not ended');
    if (r.headers['content-length'] === undefined) {
      // An endless body of unknown size: cut at storage.maxBlobSize.
      assert.ok(r.body.length <= MAX_BLOB_SIZE, `at most storage.maxBlobSize: ${r.body.length} bytes`);
    } else {
      // Right bytes as far as they go, never the last one (the digest check holds it back).
      assert.equal(r.headers['content-length'], String(kind.healthy.body.length));
      assert.ok(r.body.length < kind.healthy.body.length, `never the whole body: ${r.body.length} bytes`);
      assert.ok(kind.healthy.body.subarray(0, r.body.length).equals(r.body), 'the bytes sent are the blob\'s');
    }
    return;
  }
  const error = { code: expected.code, ...(expected.message === undefined ? {} : { message: expected.message }), ...(expected.detail === undefined ? {} : { detail: expected.detail }) };
  let body: unknown;
  try {
    body = JSON.parse(r.body.toString());
  } catch {
    body = r.body.toString(); // not JSON: compared as text, and fails
  }
  // The message is asserted only where the matrix names one.
  if (expected.message === undefined) for (const e of (body as { errors?: Array<{ message?: string }> }).errors ?? []) delete e.message;
  assert.deepEqual(
    { status: r.status, body, retryAfter: r.headers['retry-after'], type: r.headers['content-type'], cut: r.cut },
    { status: expected.status, body: { errors: [error] }, retryAfter: expected.retryAfter, type: 'application/json; charset=utf-8', cut: false },
  );
}

/** After a fault: nothing partial kept, and the healthy upstream is served normally (past any Retry-After). */
async function afterFault(proxy: Proxy, clock: ReturnType<typeof testClock>, kind: Kind, world: World, before: ReturnType<typeof cacheState>, expect: { cache: string; body: Buffer }): Promise<void> {
  assert.ok(world.met > 0, 'the request met the fault');
  await until('tmp/ to be empty', () => cacheState(proxy.root).tmp.length === 0);
  assert.deepEqual(cacheState(proxy.root), before, 'nothing new in blobs/, tmp/ or the index');
  // The faulty exchanges end (a hung token fetch is shared by every request for its scope until
  // its own deadline: one arriving meanwhile joins it); then the upstream is healthy again.
  await until('the upstream connections of the fault to be let go', () => world.open === 0);
  world.fault = undefined;
  clock.advance(60_000);
  const r = await ask(`${proxy.url}${kind.path}?ns=fake.example`);
  assert.deepEqual({ status: r.status, cache: r.headers['x-cache'], body: r.body, cut: r.cut }, { status: 200, cache: expect.cache, body: expect.body, cut: false }, 'served normally once healthy');
  if (kind.name === 'blob') await until('the blob to be cached', () => existsSync(blobFile(proxy.root, BLOB_DIGEST)));
}

test('fault matrix: what the client gets for each kind and fault, with nothing cached', async (t) => {
  for (const fault of FAULTS) {
    for (const kind of KINDS) {
      const cell = `${kind.name} × ${fault}`;
      const todo = TODO[cell];
      await t.test(cell, todo ? { todo } : {}, async (t) => {
        const w = world(kind, V2, 'good', fault);
        const { proxy, clock } = await startCell(t, kind, w);
        const before = cacheState(proxy.root);
        assertOutcome(await ask(`${proxy.url}${kind.path}?ns=fake.example`, w.clientHasBytes), MATRIX[fault][kind.name], kind);
        await afterFault(proxy, clock, kind, w, before, kind.healthy);
      });
    }
  }
});

test('fault matrix: a tag cached before and past its TTL is served STALE when the upstream is unavailable', async (t) => {
  for (const fault of FAULTS) {
    for (const kind of KINDS.filter((k) => k.path === TAG_PATH)) {
      const cell = `${kind.name} × ${fault}, cached tag past its TTL`;
      const todo = TODO[cell];
      await t.test(cell, todo ? { todo } : {}, async (t) => {
        const w = world(kind, V1, 't1', undefined);
        const { proxy, clock } = await startCell(t, kind, w);
        const url = `${proxy.url}${kind.path}?ns=fake.example`;
        const warm = await ask(url);
        assert.deepEqual({ status: warm.status, cache: warm.headers['x-cache'], body: warm.body }, { status: 200, cache: 'MISS', body: V1 });
        const before = cacheState(proxy.root);
        // The tag moves upstream (and the token rotates), the fault starts, and the cached tag is due for revalidation.
        Object.assign(w, { manifest: V2, token: 't2', fault });
        clock.advance(60_000);
        const r = await ask(url);
        if (MATRIX[fault].stale) assert.deepEqual({ status: r.status, cache: r.headers['x-cache'], body: r.body, cut: r.cut }, { status: 200, cache: 'STALE', body: V1, cut: false });
        else assertOutcome(r, MATRIX[fault][kind.name], kind);
        await afterFault(proxy, clock, kind, w, before, { cache: 'MISS', body: V2 });
      });
    }
  }
});

test('fault matrix: a blob whose upstream body breaks before any byte reached the client is an error, not a 500', async (t) => {
  const kind = KINDS.find((k) => k.name === 'blob')!;
  const early: Record<string, (socket: NonNullable<Response['socket']>) => void> = { reset: (s) => s.resetAndDestroy(), truncation: (s) => s.end() };
  for (const [fault, end] of Object.entries(early)) {
    const cell = `blob × ${fault} before the first byte`;
    const todo = TODO[cell];
    await t.test(cell, todo ? { todo } : {}, async (t) => {
      const w = world(kind, V2, 'good', undefined);
      const { fake, proxy, clock } = await startCell(t, kind, w);
      // The headers, announcing the whole blob, and not one byte of it.
      fake.route(`/v2/app/blobs/${BLOB_DIGEST}`, (_req, res) => {
        w.met++;
        w.open++;
        res.once('close', () => w.open--);
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(BLOB.length) });
        res.write(Buffer.alloc(0), () => res.socket && end(res.socket));
      });
      const before = cacheState(proxy.root);
      assertOutcome(await ask(`${proxy.url}${kind.path}?ns=fake.example`), UNREACHABLE, kind);
      install(fake, kind, w);
      await afterFault(proxy, clock, kind, w, before, kind.healthy);
    });
  }
});

/** The faults as the README names them. */
const LABEL: Record<FaultName, string> = {
  reset: 'reset mid-body',
  truncation: 'truncated (short of Content-Length)',
  trickle: 'trickle (1 byte / 100 ms)',
  hang: 'hang (no headers)',
  'wrong bytes': 'wrong bytes (digest mismatch, invalid JSON)',
  'endless body': 'endless body (no Content-Length)',
  '429': '429 with Retry-After',
  '500': '500',
  'redirect loop': 'redirect loop (302 to itself)',
};

/** The README's table, as rendered from MATRIX and TODO. */
function readmeTable(): string {
  const cell = (kind: KindName, fault: FaultName): string => {
    const o = MATRIX[fault][kind];
    let text = o === 'cut body' ? 'cut body' : `${o.status} ${o.code}${o.retryAfter ? ' + Retry-After' : ''}`;
    if ((kind === 'manifest by tag' || kind === 'token') && MATRIX[fault].stale) text += ', or STALE';
    const todo = TODO[`${kind} × ${fault}`] !== undefined || TODO[`${kind} × ${fault}, cached tag past its TTL`] !== undefined;
    return todo ? `${text} (todo)` : text;
  };
  return [`| upstream fault | ${KIND_NAMES.join(' | ')} |`, `|---|${KIND_NAMES.map(() => '---|').join('')}`, ...FAULTS.map((f) => `| ${LABEL[f]} | ${KIND_NAMES.map((k) => cell(k, f)).join(' | ')} |`)].join('\n');
}

test("the README's fault matrix is this test's", () => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  assert.ok(readme.includes(readmeTable()), `README.md's "Fault matrix" should contain:\n${readmeTable()}`);
});
