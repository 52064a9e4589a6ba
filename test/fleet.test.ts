/**
 * A fleet (README, "Running a fleet"): three ocicache replicas as real processes behind Debian's
 * HAProxy running the configuration `ocicache haproxy` generates, real distribution registries
 * as the upstreams. Every routing form of one request lands on one replica; the fleet fetches each
 * blob from its upstream once however many clients pull; a replica killed with SIGKILL costs the
 * pulls a retry, leaves nothing corrupt, and gets its own keys back when it returns.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildConfig } from '../src/core/config.js';
import { startDistribution } from './helpers/distribution.js';
import { replicaFor, startFleet } from './helpers/fleet.js';
import { pullImage } from './helpers/proxy.js';
import { image, Pusher, randomLayer, sha256 } from './helpers/seed.js';
import { tempDir } from './helpers/tools.js';

const MiB = 1024 * 1024;
const DIGEST = (i: number): string => sha256(`key ${i}`);

/** Every blob file under a replica's cache hashes to its name. */
async function verifiedFiles(root: string): Promise<number> {
  const dir = join(root, 'blobs', 'sha256');
  let n = 0;
  for (const prefix of existsSync(dir) ? readdirSync(dir) : []) {
    for (const hex of readdirSync(join(dir, prefix))) {
      const h = createHash('sha256');
      await pipeline(createReadStream(join(dir, prefix, hex)), h);
      assert.equal(h.digest('hex'), hex, `${root}: blob file ${hex} hashes to its name`);
      n++;
    }
  }
  return n;
}

test('fleet: every routing form of a request lands on one replica, and the keys spread over all three', async (t) => {
  const hub = await startDistribution(t);
  const ghcr = await startDistribution(t);
  if (!hub || !ghcr) return;
  const fleet = await startFleet(t, tempDir(t, 'fleet'), {
    defaultUpstream: 'docker.io',
    upstreams: [
      { name: 'docker.io', url: hub.url, aliases: ['index.docker.io', 'registry-1.docker.io'], dockerHubLibrary: true },
      { name: 'ghcr.io', url: ghcr.url },
    ],
  });
  if (!fleet) return;
  const owners = new Map<string, number>();
  for (let i = 0; i < 24; i++) {
    const tag = `t${i}`;
    // [what, path]: the forms clients send for one request (docs/clients.md).
    const forms: Array<[string, string]> = [
      ['default upstream, one-component name', `/v2/alpine/manifests/${tag}`],
      ['default upstream', `/v2/library/alpine/manifests/${tag}`],
      ['ns (containerd)', `/v2/library/alpine/manifests/${tag}?ns=docker.io`],
      ['ns by alias, with :443', `/v2/library/alpine/manifests/${tag}?ns=Index.Docker.IO:443`],
      ['path prefix (podman, CRI-O)', `/v2/docker.io/library/alpine/manifests/${tag}`],
      ['override_path and ns (containerd)', `/v2/docker.io/library/alpine/manifests/${tag}?ns=docker.io`],
      ['k3s', `/docker.io/v2/library/alpine/manifests/${tag}`],
      ['alias prefix, one-component name', `/v2/registry-1.docker.io/alpine/manifests/${tag}`],
    ];
    const answered: Array<readonly [string, string]> = await Promise.all(forms.map(async ([what, path]): Promise<readonly [string, string]> => [what, await replicaFor(fleet.url, path)]));
    const first: string = answered[0]![1];
    for (const [what, replica] of answered) assert.equal(replica, first, `${tag}: ${what} went to ${replica}, not ${first}`);
    owners.set(first, (owners.get(first) ?? 0) + 1);

    // A blob by digest: the same replica whatever the repository, the upstream or the form.
    const digest = DIGEST(i);
    const blobForms = [`/v2/library/alpine/blobs/${digest}`, `/v2/team/app/blobs/${digest}?ns=ghcr.io`, `/v2/ghcr.io/x/y/blobs/${digest}`, `/docker.io/v2/alpine/blobs/${digest}`];
    const blobOwners = new Set<string>(await Promise.all(blobForms.map((p): Promise<string> => replicaFor(fleet.url, p))));
    assert.equal(blobOwners.size, 1, `${digest}: ${[...blobOwners].join(', ')}`);
  }
  assert.deepEqual([...owners.keys()].sort(), ['cache-0', 'cache-1', 'cache-2'], `24 tags over the replicas: ${JSON.stringify([...owners])}`);
  assert.ok(Math.max(...owners.values()) <= 16, `no replica takes two thirds of 24 keys: ${JSON.stringify([...owners])}`);

  // Each replica says who it is: the header on every answer, its metrics and its status page.
  const r0 = fleet.replicas[0]!;
  const base = `http://127.0.0.1:${r0.port}`;
  assert.equal(await replicaFor(base, '/v2/'), 'cache-0');
  assert.match(await (await fetch(`${base}/metrics`)).text(), /^ocicache_replica_info\{replica="cache-0"\} 1$/m);
  assert.match(await (await fetch(`${base}/`)).text(), /Replica <strong id="replica">cache-0<\/strong>/);
  assert.throws(() => buildConfig({ server: { replica: 'cache 0' }, upstreams: [{ name: 'docker.io', url: hub.url }] }, {}), {
    message: `config: server.replica: must be a name of letters, digits, '.', '_' and '-' (at most 63), got "cache 0"`,
  });
});

test('fleet: 3 clients x 16 concurrent pulls make one upstream GET per blob; kill -9 of a replica costs a retry, corrupts nothing, and its keys come back', { timeout: 240_000 }, async (t) => {
  const hub = await startDistribution(t);
  if (!hub) return;
  const big = image({ 'big.bin': randomLayer(48 * MiB), 'small.txt': Buffer.from('small\n') });
  const others = Array.from({ length: 6 }, (_, i) => image({ [`f${i}.bin`]: randomLayer(2 * MiB) }));
  const pusher = new Pusher({ url: hub.url });
  await pusher.pushImage('library/big', 'v1', big);
  for (const [i, img] of others.entries()) await pusher.pushImage(`team/app${i}`, 'v1', img);
  const fleet = await startFleet(t, tempDir(t, 'fleet'), { defaultUpstream: 'docker.io', upstreams: [{ name: 'docker.io', url: hub.url, dockerHubLibrary: true }] });
  if (!fleet) return;

  // 3 clients (distinct connections) x 16 concurrent pulls, every one by a different routing form.
  // [base, ns]: ?ns=docker.io (containerd), /docker.io/v2/ (k3s), the default upstream (Docker).
  const forms: Array<[string, string]> = [[fleet.url, 'docker.io'], [`${fleet.url}/docker.io`, ''], [fleet.url, '']];
  const pull = async ([base, ns]: [string, string]): Promise<void> => {
    const { manifest, blobs } = await pullImage(base, 'library/big', 'v1', ns);
    assert.equal(manifest.status, 200);
    for (const b of blobs) assert.deepEqual([b.status, b.sha256], [200, b.digest]);
  };
  await Promise.all(forms.flatMap((form) => Array.from({ length: 16 }, () => pull(form))));
  for (const b of big.blobs) {
    const gets: number = hub.accessLog.filter((l) => l.startsWith(`GET /v2/library/big/blobs/${b.descriptor.digest} `)).length;
    assert.equal(gets, 1, `${b.descriptor.digest}: ${gets} upstream GETs across the fleet (${hub.accessLog.length} requests in all)`);
  }

  // Who owns what before the kill: the blobs of the other images, and a set of tag keys.
  const keys = [...others.flatMap((img, i) => img.blobs.map((b) => `/v2/team/app${i}/blobs/${b.descriptor.digest}`)), ...Array.from({ length: 30 }, (_, i) => `/v2/team/x/manifests/k${i}`)];
  const ownerOf = async (): Promise<Map<string, string>> => new Map(await Promise.all(keys.map(async (k) => [k, await replicaFor(fleet.url, k)] as const)));
  const before = await ownerOf();
  // The victim holds the big layer, so the kill cuts transfers of it in flight.
  const bigLayer = big.blobs.find((b) => b.data.length > MiB)!.descriptor.digest;
  const victim = await replicaFor(fleet.url, `/v2/library/big/blobs/${bigLayer}`);
  const share = [...before.values()].filter((r) => r === victim).length / keys.length;
  assert.ok(share > 0.1 && share < 0.6, `${victim} owns ${(share * 100).toFixed(0)} % of ${keys.length} keys`);

  // Kill it in the middle of pulls of the other images: 24 clients pull over and over, and after
  // the kill each must complete a pull, retrying through the balancer as a client would.
  let killed = false;
  let failed = 0;
  const names = ['library/big', ...others.map((_, i) => `team/app${i}`)];
  const pulls = names.flatMap((name) =>
    Array.from({ length: 4 }, async () => {
      for (let attempt = 0; ; attempt++) {
        const afterKill = killed;
        const r = await pullImage(fleet.url, name, 'v1', 'docker.io').catch(() => undefined);
        const ok = r !== undefined && r.manifest.status === 200 && r.blobs.every((b) => b.status === 200 && b.sha256 === b.digest);
        if (ok && afterKill) return;
        if (!ok) failed++;
        assert.ok(attempt < 2000, `${name} did not complete a pull after the kill`);
        if (!ok) await sleep(50);
      }
    }),
  );
  await sleep(300);
  await fleet.kill(victim);
  killed = true;
  await Promise.all(pulls);
  t.diagnostic(`pulls cut by the kill, completed on retry: ${failed}`);
  assert.ok(failed > 0, 'the kill cut pulls in flight');

  // While it is down only its keys moved.
  await fleet.settled(fleet.replicas.filter((r) => r.name !== victim).map((r) => r.name));
  const during = await ownerOf();
  for (const [k, owner] of before) if (owner !== victim) assert.equal(during.get(k), owner, `${k} stayed on ${owner}`);

  // Nothing corrupt anywhere, the killed replica's directory included.
  for (const r of fleet.replicas) await verifiedFiles(r.root);

  // Back: exactly its keys return to it.
  await fleet.restart(victim);
  assert.deepEqual(await ownerOf(), before);
  for (const r of fleet.replicas) await verifiedFiles(r.root);
});

test('ocicache haproxy refuses what HAProxy could not use, naming it', async () => {
  const { runCli } = await import('./helpers/cli.js');
  const cases: Array<[string[], string]> = [
    [[], 'haproxy: name the replicas with --replica NAME=HOST:PORT (once each)'],
    [['--replica', 'cache-0'], '--replica cache-0: expected NAME=HOST:PORT'],
    [['--replica', 'cache 0=127.0.0.1:5000'], `haproxy: replica name "cache 0": letters, digits, '.', '_' and '-' only`],
    [['--replica', 'a=127.0.0.1'], 'haproxy: replica a: address "127.0.0.1" is not host:port'],
    [['--replica', 'a=127.0.0.1:1', '--replica', 'a=127.0.0.1:2'], 'haproxy: replica names must differ'],
    [['--replica', 'a=127.0.0.1:1', '--check-interval', 'often'], 'haproxy: check interval "often": expected a duration such as 500ms or 2s'],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(['haproxy', ...args]);
    assert.deepEqual([r.code, r.stderr.trim()], [2, message], args.join(' '));
  }
});
