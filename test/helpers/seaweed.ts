/**
 * A real S3-compatible server for the object-storage tests: SeaweedFS (`weed server -s3`), built
 * from its Go module by scripts/build-weed.sh into .tools/weed, on loopback with ports picked here
 * (each also has a gRPC port 10000 above it). With `identities` it checks credentials and what
 * each may do; without, it takes anonymous requests.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { request } from 'undici';
import { stopChild, tempDir, type Scope } from './tools.js';

const WEED = resolve('.tools/weed');

export interface Identity {
  name: string;
  accessKey: string;
  secretKey: string;
  /** SeaweedFS actions: Read, Write, List, Tagging, Admin; `Read:bucket` for one bucket. */
  actions: string[];
}

export interface Seaweed {
  /** The S3 API, http://127.0.0.1:PORT */
  endpoint: string;
  /** Creates a bucket (as the admin identity when there are identities). */
  createBucket(name: string): Promise<void>;
  /** Stops it hard (SIGKILL: no grace, ports free at once); start() brings it back on the same ports and data. */
  kill(): Promise<void>;
  start(): Promise<void>;
}

/** A port p where p and p + 10000 (weed's gRPC port) are both free on loopback. */
async function freePort(): Promise<number> {
  const free = (port: number): Promise<boolean> =>
    new Promise((r) => {
      const s = createServer();
      s.once('error', () => r(false));
      s.listen(port, '127.0.0.1', () => s.close(() => r(true)));
    });
  for (;;) {
    const p = 20000 + Math.floor(Math.random() * 20000);
    if ((await free(p)) && (await free(p + 10000))) return p;
  }
}

/** Starts SeaweedFS; undefined when .tools/weed is missing outside CI (the test is skipped). */
export async function startSeaweed(t: Scope, options: { identities?: Identity[] } = {}): Promise<Seaweed | undefined> {
  if (!existsSync(WEED)) {
    const msg = '.tools/weed missing: run scripts/build-weed.sh';
    if (process.env.CI) throw new Error(`${msg} (required under CI)`);
    t.skip(msg);
    return undefined;
  }
  const dir = tempDir(t, 'seaweed');
  mkdirSync(join(dir, 'data'));
  const [master, volume, filer, s3] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const args = ['server', '-ip=127.0.0.1', '-ip.bind=127.0.0.1', `-dir=${join(dir, 'data')}`, `-master.port=${master}`, `-volume.port=${volume}`, '-filer', `-filer.port=${filer}`, '-s3', `-s3.port=${s3}`, '-master.volumeSizeLimitMB=64', '-s3.port.iceberg=0', '-s3.port.lance=0', '-master.electionTimeout=1s', '-volume.max=0'];
  const admin = options.identities && { name: 'admin', accessKey: 'admin-key', secretKey: 'admin-secret', actions: ['Admin', 'Read', 'Write', 'List', 'Tagging'] };
  if (options.identities) {
    const identities = [admin!, ...options.identities].map((i) => ({ name: i.name, credentials: [{ accessKey: i.accessKey, secretKey: i.secretKey }], actions: i.actions }));
    writeFileSync(join(dir, 's3.json'), JSON.stringify({ identities }));
    args.push(`-s3.config=${join(dir, 's3.json')}`);
  }
  const endpoint = `http://127.0.0.1:${s3}`;
  let child: ChildProcess | undefined;
  const buckets: string[] = [];
  const start = async (): Promise<void> => {
    await listening();
    // A restarted master elects itself leader some seconds later; writes hang until then.
    for (const b of buckets) await ready(b);
  };
  const listening = async (): Promise<void> => {
    child = spawn(WEED, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    if (process.env.OCICACHE_TEST_WEED_LOG) child.stderr?.pipe((await import('node:fs')).createWriteStream(process.env.OCICACHE_TEST_WEED_LOG, { flags: 'a' }));
    else child.stderr?.resume();
    // The S3 port answers before the filer is ready: a listing succeeds once it is.
    for (const end = Date.now() + 60_000; ; await new Promise((r) => setTimeout(r, 200))) {
      if (Date.now() > end) throw new Error('SeaweedFS did not become ready within 60 s');
      if (child.exitCode !== null) throw new Error(`SeaweedFS exited with ${child.exitCode}`);
      const ok = await request(`${endpoint}/`, { headersTimeout: 2000 }).then(
        async (r) => {
          await r.body.dump();
          return r.statusCode < 500;
        },
        () => false,
      );
      if (ok) return;
    }
  };
  const kill = async (): Promise<void> => {
    if (child) await stopChild(child, 'SIGKILL');
  };
  /** Creates `bucket` if need be, and waits until an object can be written to it (a volume server registered, a leader elected). */
  const ready = async (bucket: string): Promise<void> => {
    const { S3Client, CreateBucketCommand, PutObjectCommand, DeleteObjectCommand } = await import('@aws-sdk/client-s3');
    const credentials = admin ? { accessKeyId: admin.accessKey, secretAccessKey: admin.secretKey } : { accessKeyId: 'any', secretAccessKey: 'any' };
    const client = new S3Client({ endpoint, region: 'us-east-1', forcePathStyle: true, credentials, requestHandler: { socketTimeout: 2000 }, maxAttempts: 1 });
    try {
      for (const end = Date.now() + 60_000; ; await new Promise((r) => setTimeout(r, 200))) {
        try {
          await client.send(new CreateBucketCommand({ Bucket: bucket })).catch((err: Error) => {
            if (err.name !== 'BucketAlreadyOwnedByYou' && err.name !== 'BucketAlreadyExists') throw err;
          });
          await client.send(new PutObjectCommand({ Bucket: bucket, Key: 'ready', Body: 'ready' }));
          await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: 'ready' }));
          return;
        } catch (err) {
          if (Date.now() > end) throw err;
        }
      }
    } finally {
      client.destroy();
    }
  };
  t.after(kill);
  await start();
  return {
    endpoint,
    kill,
    start,
    async createBucket(name) {
      await ready(name);
      buckets.push(name);
    },
  };
}
