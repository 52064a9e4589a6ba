/**
 * Referrers cached beside their subject: `prefetch --with-referrers` and `keep.withReferrers`
 * fetch a manifest's signatures, SBOMs and attestations (the referrers API, or the referrers tag
 * schema where the upstream has none), they are served when the upstream is gone, and a listed
 * referrer whose own subject is another manifest is refused. Debian's distribution 2.8 has no
 * referrers API, so it is the real upstream for the tag schema; the fake lists referrers.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import test from 'node:test';
import { request } from 'undici';
import { formatBytes } from '../src/core/units.js';
import { runCli, writeConfig } from './helpers/cli.js';
import { startDistribution } from './helpers/distribution.js';
import { blobHandler, startFakeUpstream, type FakeUpstream } from './helpers/fake-upstream.js';
import { blobFile, fetchBody, jsonBody, startProxy } from './helpers/proxy.js';
import { blob, image, OCI_INDEX, OCI_MANIFEST, Pusher, sha256, type Image } from './helpers/seed.js';
import { tempDir, until } from './helpers/tools.js';

const EMPTY = 'application/vnd.oci.empty.v1+json';

/** An OCI 1.1 artifact: an empty config, one layer, `artifactType`, and a subject when given. */
function artifactOf(artifactType: string, layerType: string, payload: string, subject?: Image): Image {
  const config = blob(Buffer.from('{}'), EMPTY);
  const layer = blob(Buffer.from(payload), layerType);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      artifactType,
      config: config.descriptor,
      layers: [layer.descriptor],
      ...(subject ? { subject: { mediaType: OCI_MANIFEST, digest: subject.digest, size: subject.manifest.length } } : {}),
    }),
  );
  return { manifest, digest: sha256(manifest), mediaType: OCI_MANIFEST, blobs: [config, layer] };
}

/** cosign's signature: no subject field, found by its `sha256-<hex>.sig` tag. */
const signatureOf = (subject: Image): Image => artifactOf('application/vnd.dev.cosign.artifact.sig.v1+json', 'application/vnd.dev.cosign.simplesigning.v1+json', `{"critical":{"image":{"docker-manifest-digest":"${subject.digest}"}}}`);
const tagOf = (subject: Image, suffix = ''): string => `${subject.digest.replace(':', '-')}${suffix}`;

/** The referrers tag schema's index of `referrers` (what oras and notation push to a registry without the API). */
function tagSchemaIndex(referrers: Image[]): Buffer {
  return Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: referrers.map((r) => ({ mediaType: OCI_MANIFEST, digest: r.digest, size: r.manifest.length, artifactType: JSON.parse(r.manifest.toString()).artifactType })) }));
}

test('referrers by the tag schema: prefetch --with-referrers and keep.withReferrers fetch them, and they are served with the upstream gone', { timeout: 120_000 }, async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const pusher = new Pusher({ url: registry.url });
  const app = image({ 'app.bin': Buffer.from('the application\n') });
  const signature = signatureOf(app);
  const sbom = artifactOf('application/spdx+json', 'application/spdx+json', '{"spdxVersion":"SPDX-2.3"}', app);
  const sbomSignature = signatureOf(sbom);
  const index = tagSchemaIndex([sbom]);
  await pusher.pushImage('team/app', 'v1', app);
  await pusher.pushImage('team/app', tagOf(app, '.sig'), signature);
  await pusher.pushImage('team/app', undefined, sbom);
  await pusher.pushManifest('team/app', tagOf(app), index, OCI_INDEX);
  await pusher.pushImage('team/app', tagOf(sbom, '.sig'), sbomSignature);
  const referrerBlobs = [signature, sbom, sbomSignature].flatMap((r) => r.blobs);
  const upstreams = [{ name: 'docker.io', url: registry.url, dockerHubLibrary: true }];

  // The one-shot command: each referrer named with its subject, depth first.
  const root = tempDir(t, 'referrers-cli');
  const r = await runCli(['prefetch', '--config', writeConfig(root, { storage: { root }, upstreams }), '--with-referrers', 'docker.io/team/app:v1']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const manifestLines = r.stdout.split('\n').filter((l) => l.includes(' manifest '));
  const size = (b: Buffer): string => formatBytes(b.length);
  assert.deepEqual(manifestLines, [
    `docker.io/team/app:v1  manifest ${app.digest} ${size(app.manifest)} fetched`,
    `docker.io/team/app:v1  manifest ${sha256(index)} ${size(index)} fetched (referrer of ${app.digest})`,
    `docker.io/team/app:v1  manifest ${sbom.digest} ${size(sbom.manifest)} fetched (referrer of ${app.digest})`,
    `docker.io/team/app:v1  manifest ${sbomSignature.digest} ${size(sbomSignature.manifest)} fetched (referrer of ${sbom.digest})`,
    `docker.io/team/app:v1  manifest ${signature.digest} ${size(signature.manifest)} fetched (referrer of ${app.digest})`,
  ]);
  assert.match(r.stdout, /prefetch: 1 images, 8 blobs \(\d fetched\)/);
  for (const b of [...app.blobs, ...referrerBlobs]) assert.ok(existsSync(blobFile(root, b.descriptor.digest)), `${b.descriptor.digest} cached`);

  // The keep list with referrers: each one counted among the kept digests.
  const proxy = await startProxy(t, {
    // Tags due for revalidation at once: with the upstream gone they are served STALE.
    upstreams: [{ ...upstreams[0], tagTtl: '1s' }],
    keep: { images: ['docker.io/team/app:v1'], withReferrers: true },
    admin: { tokenEnv: 'ADMIN' },
    env: { ADMIN: 'admin-token' },
  });
  type Entries = { entries: Array<{ refs: Array<{ ref: string; digests: number }>; refreshedAt?: number; error?: string }> };
  const entries = async (): Promise<Entries['entries']> => jsonBody<Entries>(await fetchBody(`${proxy.url}/admin/keep`, { authorization: 'Bearer admin-token' })).entries;
  await until('the keep list is fetched', async () => (await entries())[0]!.refreshedAt !== undefined, 30_000);
  const [entry] = await entries();
  assert.equal(entry!.error, undefined);
  // app and its 2 blobs; the tag-schema index; sbom, signature and the sbom's signature, each with 2 blobs (one the shared empty config).
  assert.deepEqual(entry!.refs, [{ ref: 'docker.io/team/app:v1', digests: 3 + 1 + 3 * 1 + new Set(referrerBlobs.map((b) => b.descriptor.digest)).size }]);

  await registry.stop();
  await new Promise((resolve) => setTimeout(resolve, 1100));
  const get = (path: string, accept = `${OCI_MANIFEST}, ${OCI_INDEX}`): ReturnType<typeof fetchBody> => fetchBody(`${proxy.url}/v2/team/app/${path}?ns=docker.io`, { accept });
  const served: Array<[string, number, unknown, Buffer | undefined]> = [];
  for (const [what, path] of [
    ['signature by tag', `manifests/${tagOf(app, '.sig')}`],
    ['tag-schema index', `manifests/${tagOf(app)}`],
    ['sbom by digest', `manifests/${sbom.digest}`],
    ['sbom signature by tag', `manifests/${tagOf(sbom, '.sig')}`],
  ] as const) {
    const res = await get(path);
    served.push([what, res.status, res.headers['x-cache'], res.body]);
  }
  assert.deepEqual(served, [
    ['signature by tag', 200, 'STALE', signature.manifest],
    ['tag-schema index', 200, 'STALE', index],
    ['sbom by digest', 200, 'HIT', sbom.manifest],
    ['sbom signature by tag', 200, 'STALE', sbomSignature.manifest],
  ]);
  for (const b of referrerBlobs) {
    const res = await get(`blobs/${b.descriptor.digest}`);
    assert.deepEqual([res.status, res.headers['x-cache'], res.body], [200, 'HIT', b.data], b.descriptor.digest);
  }
});

/** Serves `img` (manifest by digest, blobs) on the fake under `name`. */
function serve(fake: FakeUpstream, name: string, img: Image): void {
  fake.route(`/v2/${name}/manifests/${img.digest}`, (req, res) =>
    res.writeHead(200, { 'content-type': img.mediaType, 'content-length': String(img.manifest.length), 'docker-content-digest': img.digest }).end(req.method === 'HEAD' ? undefined : img.manifest),
  );
  for (const b of img.blobs) fake.route(`/v2/${name}/blobs/${b.descriptor.digest}`, blobHandler(b.data));
}

test('referrers by the API: each listed referrer must name the subject itself; one that names another manifest is refused', async (t) => {
  const fake = await startFakeUpstream(t);
  const app = image({ 'app.bin': Buffer.from('app\n') });
  const other = image({ 'other.bin': Buffer.from('other\n') });
  const sbom = artifactOf('application/spdx+json', 'application/spdx+json', '{"spdxVersion":"SPDX-2.3"}', app);
  // Listed for app, but its subject is another manifest: the upstream's list is not proof.
  const stranger = artifactOf('application/spdx+json', 'application/spdx+json', '{"stranger":true}', other);
  for (const img of [app, sbom, stranger]) serve(fake, 'team/app', img);
  fake.route(`/v2/team/app/manifests/v1`, (req, res) =>
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': String(app.manifest.length), 'docker-content-digest': app.digest }).end(req.method === 'HEAD' ? undefined : app.manifest),
  );
  const list = tagSchemaIndex([sbom, stranger]);
  fake.route(`/v2/team/app/referrers/${app.digest}`, (_req, res) => res.writeHead(200, { 'content-type': OCI_INDEX, 'content-length': String(list.length) }).end(list));
  const empty = tagSchemaIndex([]);
  for (const r of [sbom, stranger]) fake.route(`/v2/team/app/referrers/${r.digest}`, (_req, res) => res.writeHead(200, { 'content-type': OCI_INDEX, 'content-length': String(empty.length) }).end(empty));
  const proxy = await startProxy(t, { upstreams: [{ name: 'fake.example', url: fake.url }], admin: { tokenEnv: 'ADMIN' }, env: { ADMIN: 'admin-token' } });

  const res = await request(`${proxy.url}/admin/prefetch`, {
    method: 'POST',
    headers: { authorization: 'Bearer admin-token', 'content-type': 'application/json' },
    body: JSON.stringify({ references: ['fake.example/team/app:v1'], withReferrers: true }),
  });
  assert.equal(res.statusCode, 200);
  const events = (await res.body.text()).trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(
    events.filter((e) => e.event !== 'blob').map((e) => [e.event, e.digest, e.subject, e.error]),
    [
      ['manifest', app.digest, undefined, undefined],
      ['manifest', sbom.digest, app.digest, undefined],
      ['error', stranger.digest, app.digest, `upstream fake.example listed ${stranger.digest} as a referrer of ${app.digest}, but its subject is not that manifest`],
      ['done', undefined, undefined, undefined],
    ],
  );
  assert.equal((events.at(-1)!.summary as { failedRefs: number }).failedRefs, 1);
  // The genuine referrer's blobs are cached; the stranger's were never fetched.
  for (const b of sbom.blobs) assert.equal(fake.count('GET', `/v2/team/app/blobs/${b.descriptor.digest}`), 1);
  assert.equal(fake.count('GET', `/v2/team/app/blobs/${stranger.blobs[1]!.descriptor.digest}`), 0);

  // The keep list with referrers: the refused one is reported, and the image and its genuine referrer are kept all the same.
  const kept = await startProxy(t, { upstreams: [{ name: 'fake.example', url: fake.url }], keep: { images: ['fake.example/team/app:v1'], withReferrers: true }, admin: { tokenEnv: 'ADMIN' }, env: { ADMIN: 'admin-token' } });
  type Entries = { entries: Array<{ refs: Array<{ ref: string; digests: number }>; refreshedAt?: number; error?: string }> };
  const entries = async (): Promise<Entries['entries']> => jsonBody<Entries>(await fetchBody(`${kept.url}/admin/keep`, { authorization: 'Bearer admin-token' })).entries;
  await until('the keep list is fetched', async () => (await entries())[0]!.refreshedAt !== undefined, 30_000);
  const [entry] = await entries();
  assert.deepEqual(entry!.refs, [{ ref: 'fake.example/team/app:v1', digests: 1 + app.blobs.length + 1 + sbom.blobs.length }]);
  assert.equal(entry!.error, `fake.example/team/app:v1: a referrer: upstream fake.example listed ${stranger.digest} as a referrer of ${app.digest}, but its subject is not that manifest`);
});
