/**
 * Fill and TailReader (src/storage/fill.ts) on a real BlobStore in a temp dir, driven by hand:
 * readers tail a growing fill, the last byte is held back until the digest is checked, and a
 * wrong, short or long body fails every reader and leaves nothing under blobs/ or tmp/.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import test, { type TestContext } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { OciError } from '../src/core/errors.js';
import { BlobStore } from '../src/storage/blob-store.js';
import type { Fill, TailReader } from '../src/storage/fill.js';
import { sha256 } from './helpers/seed.js';
import { tempDir, until } from './helpers/tools.js';

/** A fill of `digest` (announced `size`) in a fresh store; failed (a no-op once settled) when the test ends. */
async function newFill(t: TestContext, digest: string, size: number | undefined): Promise<{ store: BlobStore; fill: Fill }> {
  const store = new BlobStore(tempDir(t, 'fill'));
  await store.init();
  const fill = await store.createFill(digest, size);
  t.after(() => fill.fail(new Error('test over')));
  return { store, fill };
}

interface Watched {
  reader: TailReader;
  /** Bytes received so far. */
  body(): Buffer;
  /** Whether 'end' was emitted. */
  ended(): boolean;
  /** Resolves with undefined on a clean end, or with the reader's error. */
  done: Promise<Error | undefined>;
}

/** Reads a reader in flowing mode, keeping what arrives; destroyed when the test ends. */
function watch(t: TestContext, reader: TailReader): Watched {
  const chunks: Buffer[] = [];
  let ended = false;
  const done = new Promise<Error | undefined>((resolve) => {
    reader.on('data', (c: Buffer) => chunks.push(c));
    reader.once('end', () => {
      ended = true;
      resolve(undefined);
    });
    reader.once('error', resolve);
  });
  t.after(() => void reader.destroy());
  return { reader, body: () => Buffer.concat(chunks), ended: () => ended, done };
}

/**
 * Resolves once every open reader has taken all it may and is blocked waiting for the fill to
 * move on: a waiting reader is exactly one listener on the fill's 'progress' event.
 */
async function blocked(fill: Fill, readers: number): Promise<void> {
  await until(`${readers} readers waiting for more`, () => fill.listenerCount('progress') === readers);
}

function write(fill: Fill, chunks: Buffer[]): Promise<void> {
  return pipeline(Readable.from(chunks), fill.sink());
}

function split(data: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < data.length; i += size) out.push(data.subarray(i, i + size));
  return out;
}

/** Every file under dir, recursively. */
function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => e.name);
}

test('a reader started before any data tails the growing fill, holds back the last byte, and ends with every byte after commit', async (t) => {
  const data = randomBytes(200_000);
  const digest = sha256(data);
  const { store, fill } = await newFill(t, digest, data.length);
  const early = watch(t, fill.reader(0, data.length - 1));
  const sink = fill.sink();
  const send = (chunk: Buffer): Promise<void> => new Promise((resolve, reject) => sink.write(chunk, (err) => (err ? reject(err) : resolve())));

  let sent = 0;
  let late: Watched | undefined;
  for (const chunk of split(data, 50_000)) {
    await send(chunk);
    sent += chunk.length;
    // Joins half way: starts from byte 0 all the same.
    if (sent === 100_000) late = watch(t, fill.reader());
    const expected = Math.min(sent, data.length - 1);
    await until(`the reader to have ${expected} bytes`, () => early.body().length === expected);
    assert.deepEqual(early.body(), data.subarray(0, expected));
  }
  await new Promise<void>((resolve, reject) => sink.end((err?: Error | null) => (err ? reject(err) : resolve())));
  await blocked(fill, 2);
  assert.equal(fill.received, data.length);
  assert.equal(fill.written, data.length);
  assert.equal(fill.state, 'filling');
  assert.equal(fill.deliverable, data.length - 1, 'the last byte waits for the digest check');
  await tick();
  assert.equal(early.body().length, data.length - 1);
  assert.equal(late!.body().length, data.length - 1);
  assert.equal(early.ended(), false);
  assert.equal(existsSync(store.path(digest)), false, 'nothing under blobs/ before the commit');

  assert.equal(await fill.commit(), data.length);
  assert.equal(fill.state, 'committed');
  assert.equal(await early.done, undefined);
  assert.equal(await late!.done, undefined);
  assert.deepEqual(early.body(), data);
  assert.deepEqual(late!.body(), data);
  assert.deepEqual(readFileSync(store.path(digest)), data);
  assert.deepEqual(readdirSync(store.tmpDir), [], 'the temp file was renamed into place');
  await fill.settled();
});

test('a reader of a range ends as soon as the range is in, unless it holds the last byte', async (t) => {
  const data = randomBytes(10_000);
  const cases = [
    { what: 'the whole blob, as a client without Range gets it', start: 0, end: 9999, beforeCommit: 9999 },
    { what: 'a range in the middle', start: 100, end: 199, beforeCommit: 100 },
    { what: 'the first byte', start: 0, end: 0, beforeCommit: 1 },
    { what: 'a range up to the last byte', start: 9000, end: 9999, beforeCommit: 999 },
    { what: 'only the last byte', start: 9999, end: 9999, beforeCommit: 0 },
    { what: 'from an offset to the end, no end given', start: 5000, end: undefined, beforeCommit: 4999 },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { fill } = await newFill(t, sha256(data), data.length);
      const r = watch(t, fill.reader(c.start, c.end));
      const want = data.subarray(c.start, c.end === undefined ? undefined : c.end + 1);
      await write(fill, split(data, 1000));
      const endsEarly = c.beforeCommit === want.length;
      if (endsEarly) {
        assert.equal(await r.done, undefined, 'ended before the commit');
        assert.equal(fill.state, 'filling');
      } else {
        await blocked(fill, 1);
        assert.equal(r.ended(), false);
      }
      assert.deepEqual(r.body(), want.subarray(0, c.beforeCommit));
      await fill.commit();
      assert.equal(await r.done, undefined);
      assert.deepEqual(r.body(), want);
    });
  }
});

test('with no size announced every byte goes out as it arrives, and readers end only after the commit', async (t) => {
  const data = randomBytes(30_000);
  const { fill } = await newFill(t, sha256(data), undefined);
  const r = watch(t, fill.reader());
  await write(fill, split(data, 7000));
  await blocked(fill, 1);
  assert.equal(fill.deliverable, data.length);
  assert.deepEqual(r.body(), data);
  assert.equal(r.ended(), false, 'the end is not known before the commit');
  assert.equal(await fill.commit(), data.length);
  assert.equal(await r.done, undefined);
  assert.deepEqual(r.body(), data);
});

test('readers that join after the commit read the final file', async (t) => {
  const data = randomBytes(70_000);
  const digest = sha256(data);
  const { store, fill } = await newFill(t, digest, data.length);
  await write(fill, split(data, 16_384));
  await fill.commit();
  assert.equal(existsSync(fill.tmpPath), false);
  const cases = [
    { start: 0, end: undefined },
    { start: 0, end: data.length - 1 },
    { start: 12_345, end: 54_321 },
    { start: data.length - 1, end: data.length - 1 },
  ];
  for (const c of cases) {
    const r = watch(t, fill.reader(c.start, c.end));
    assert.equal(await r.done, undefined, `[${c.start}, ${c.end}]`);
    assert.deepEqual(r.body(), data.subarray(c.start, c.end === undefined ? undefined : c.end + 1), `[${c.start}, ${c.end}]`);
  }
  assert.deepEqual(files(store.blobsDir), [digest.slice(7)]);
});

test('a wrong, short or long body fails the fill and every reader, and leaves nothing on disk', async (t) => {
  const data = randomBytes(300_000);
  const digest = sha256(data);
  const wrong = randomBytes(data.length);
  const cases = [
    {
      what: 'wrong bytes of the announced length',
      body: wrong,
      received: data.length,
      // All of it arrived: everything but the last byte went out.
      readerBytes: data.length - 1,
      at: 'commit',
      message: `upstream content for ${digest} hashes to ${sha256(wrong)}`,
    },
    {
      what: 'a body that ends early',
      body: data.subarray(0, 200_000),
      received: 200_000,
      readerBytes: 200_000,
      at: 'commit',
      message: `upstream body ended after 200000 of ${data.length} bytes`,
    },
    {
      what: 'a body longer than announced',
      body: Buffer.concat([data, randomBytes(10)]),
      // The chunk that goes past the announced size is refused whole, before it is hashed: 4 x 64 KiB got in.
      received: 4 * 65_536,
      readerBytes: 4 * 65_536,
      at: 'body',
      message: `upstream sent more than the ${data.length} bytes it announced`,
    },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { store, fill } = await newFill(t, digest, data.length);
      const early = watch(t, fill.reader(0, data.length - 1));
      const open = watch(t, fill.reader());

      // What the fill's owner (src/cache/blobs.ts) does: body into the sink, then commit; on any error, fail.
      let at = 'body';
      let error: Error | undefined;
      try {
        await write(fill, split(c.body, 65_536));
        at = 'commit';
        await fill.commit();
      } catch (err) {
        error = err as Error;
      }
      assert.ok(error instanceof OciError, `an OciError, not ${error}`);
      assert.equal(at, c.at);
      assert.equal(error.message, c.message);
      assert.equal(error.code, 'UNKNOWN');
      assert.equal(error.status, 502);
      assert.equal(fill.received, c.received);
      assert.equal(fill.state, 'filling', 'nothing was verified');
      await blocked(fill, 2);
      assert.equal(early.body().length, c.readerBytes);

      await fill.fail(error);
      assert.equal(fill.state, 'failed');
      for (const r of [early, open]) {
        assert.equal(await r.done, error, 'the reader errors with the fill’s error');
        assert.equal(r.ended(), false, 'never a clean end');
        assert.deepEqual(r.body(), c.body.subarray(0, c.readerBytes), 'what went out was never past the checked bytes');
      }
      // One that arrives after the failure fails too.
      const after = watch(t, fill.reader());
      assert.equal(await after.done, error);
      assert.deepEqual(after.body(), Buffer.alloc(0));
      await assert.rejects(fill.settled(), error);

      assert.equal(existsSync(fill.tmpPath), false, 'temp file removed');
      assert.deepEqual(readdirSync(store.tmpDir), []);
      assert.deepEqual(files(store.blobsDir), [], 'nothing under blobs/');
    });
  }
});

test('readers that stop reading do not make fills keep memory: all fills share one budget, and the stuck readers read from disk', async (t) => {
  const store = new BlobStore(tempDir(t, 'fill'), 1024 * 1024);
  await store.init();
  const downloads = [randomBytes(8 * 1024 * 1024), randomBytes(8 * 1024 * 1024)];
  const fills = await Promise.all(downloads.map((d) => store.createFill(sha256(d), d.length)));
  for (const fill of fills) t.after(() => fill.fail(new Error('test over')));
  // Each reader takes what fits its buffer, then its client reads nothing more.
  const readers = fills.map((fill) => fill.reader());
  for (const r of readers) t.after(() => void r.destroy());
  await Promise.all(fills.map((fill, i) => write(fill, split(downloads[i]!, 64 * 1024))));
  assert.ok(store.retainedBytes <= 1024 * 1024, `${store.retainedBytes} bytes kept for readers that read nothing`);
  await Promise.all(fills.map((fill) => fill.commit()));
  const bodies = await Promise.all(readers.map(async (r) => {
    const chunks: Buffer[] = [];
    for await (const c of r) chunks.push(c as Buffer);
    return Buffer.concat(chunks);
  }));
  bodies.forEach((body, i) => assert.ok(body.equals(downloads[i]!), `reader ${i} got every byte, in order`));
  assert.equal(store.retainedBytes, 0, 'nothing is kept once the readers are done');
});

test('chunks kept for readers and chunks not yet on disk share the one budget', async (t) => {
  const budget = 4 * 1024 * 1024;
  const chunk = 64 * 1024;
  const store = new BlobStore(tempDir(t, 'fill'), budget);
  await store.init();
  const downloads = Array.from({ length: 8 }, () => randomBytes(8 * 1024 * 1024));
  const fills = await Promise.all(downloads.map((d) => store.createFill(sha256(d), d.length)));
  for (const fill of fills) t.after(() => fill.fail(new Error('test over')));
  // Readers that take one buffer and stop: every chunk on disk would be worth keeping for them.
  for (const fill of fills) {
    const r = fill.reader();
    r.once('readable', () => r.read());
    t.after(() => void r.destroy());
  }
  let most = 0;
  const measured = (chunks: Buffer[]): Readable =>
    Readable.from(
      (async function* () {
        for (const c of chunks) {
          // Kept for readers, plus received and not yet on disk.
          most = Math.max(most, fills.reduce((sum, f) => sum + f.received - f.written, store.retainedBytes));
          yield c;
        }
      })(),
    );
  await Promise.all(fills.map((fill, i) => pipeline(measured(split(downloads[i]!, chunk)), fill.sink())));
  // A chunk arrives before the next trim: one chunk per fill over the budget at most.
  assert.ok(most <= budget + fills.length * chunk, `${most} bytes in memory, budget ${budget}`);
  assert.ok(most > budget / 2, `the budget is used (${most} bytes)`);
});
