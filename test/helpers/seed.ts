/**
 * Builds OCI content (tar layers, configs, manifests, indexes, artifacts) and pushes it to a real
 * registry with the distribution API, answering Basic or Bearer challenges like a client would.
 */
import { createHash, randomBytes } from 'node:crypto';
import { request } from 'undici';
import { OCI_INDEX, OCI_MANIFEST } from '../../src/core/media-types.js';

/** The media types the tests name, one spelling each: the proxy's own, plus what only tests build. */
export { DOCKER_MANIFEST, FULL_ACCEPT, OCI_INDEX, OCI_MANIFEST } from '../../src/core/media-types.js';
export const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const OCI_LAYER_TAR = 'application/vnd.oci.image.layer.v1.tar';

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os: string; architecture: string };
  artifactType?: string;
}

export interface Blob {
  descriptor: Descriptor;
  data: Buffer;
}

export interface Image {
  manifest: Buffer;
  digest: string;
  mediaType: string;
  blobs: Blob[];
}

export const sha256 = (data: Buffer | string): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;

export function blob(data: Buffer, mediaType: string): Blob {
  return { data, descriptor: { mediaType, digest: sha256(data), size: data.length } };
}

/** A ustar archive with one regular file: enough for containerd to unpack. */
export function tar(name: string, content: Buffer): Buffer {
  const header = Buffer.alloc(512);
  const put = (s: string, off: number, len: number): void => {
    header.write(s.slice(0, len), off, 'ascii');
  };
  const octal = (n: number, len: number): string => n.toString(8).padStart(len - 1, '0');
  put(name, 0, 100);
  put(octal(0o644, 8), 100, 8);
  put(octal(0, 8), 108, 8);
  put(octal(0, 8), 116, 8);
  put(octal(content.length, 12), 124, 12);
  put(octal(1_700_000_000, 12), 136, 12);
  header.fill(' ', 148, 156);
  put('0', 156, 1);
  put('ustar\0', 257, 6);
  put('00', 263, 2);
  let sum = 0;
  for (const b of header) sum += b;
  put(`${octal(sum, 7)}\0`, 148, 8);
  const pad = Buffer.alloc((512 - (content.length % 512)) % 512);
  return Buffer.concat([header, content, pad, Buffer.alloc(1024)]);
}

/** An OCI image for one platform whose layers each hold one file. */
export function image(files: Record<string, Buffer>, platform = { os: 'linux', architecture: 'amd64' }, extra: { annotations?: Record<string, string> } = {}): Image {
  const layers = Object.entries(files).map(([name, content]) => blob(tar(name, content), OCI_LAYER_TAR));
  const config = blob(
    Buffer.from(
      JSON.stringify({
        architecture: platform.architecture,
        os: platform.os,
        config: { Cmd: ['/bin/true'] },
        rootfs: { type: 'layers', diff_ids: layers.map((l) => l.descriptor.digest) },
      }),
    ),
    OCI_CONFIG,
  );
  const manifest = Buffer.from(
    JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: config.descriptor, layers: layers.map((l) => l.descriptor), ...extra }),
  );
  return { manifest, digest: sha256(manifest), mediaType: OCI_MANIFEST, blobs: [config, ...layers] };
}

/** An OCI artifact: custom config media type, arbitrary layers (e.g. a wasm module). */
export function artifact(configMediaType: string, config: Buffer, layers: Array<[string, Buffer]>): Image {
  const cfg = blob(config, configMediaType);
  const ls = layers.map(([type, data]) => blob(data, type));
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: cfg.descriptor, layers: ls.map((l) => l.descriptor) }));
  return { manifest, digest: sha256(manifest), mediaType: OCI_MANIFEST, blobs: [cfg, ...ls] };
}

export interface MultiArch {
  index: Buffer;
  digest: string;
  images: Image[];
}

export function multiArch(platforms: Array<{ os: string; architecture: string }>, label: string): MultiArch {
  const images = platforms.map((p) => image({ [`${p.architecture}.txt`]: Buffer.from(`${label} for ${p.os}/${p.architecture}\n`) }, p));
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_INDEX,
      manifests: images.map((img, i) => ({ mediaType: OCI_MANIFEST, digest: img.digest, size: img.manifest.length, platform: platforms[i] })),
    }),
  );
  return { index, digest: sha256(index), images };
}

export function randomLayer(bytes: number): Buffer {
  return tar('random.bin', randomBytes(bytes));
}

export interface PushTarget {
  url: string;
  basic?: { username: string; password: string };
}

/** A minimal registry client for seeding: answers 401 challenges with Basic or a bearer token. */
export class Pusher {
  private authorization: string | undefined;

  constructor(private readonly target: PushTarget) {}

  private async send(method: string, url: string, headers: Record<string, string>, body?: Buffer): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; text: string }> {
    for (let attempt = 0; attempt < 2; attempt++) {
      const res = await request(url, { method: method as 'GET', headers: { ...headers, ...(this.authorization ? { authorization: this.authorization } : {}) }, body });
      const text = await res.body.text();
      if (res.statusCode !== 401 || attempt === 1) return { status: res.statusCode, headers: res.headers, text };
      await this.authorize(String(res.headers['www-authenticate'] ?? ''));
    }
    throw new Error('unreachable');
  }

  private async authorize(challenge: string): Promise<void> {
    const basic = this.target.basic ? `Basic ${Buffer.from(`${this.target.basic.username}:${this.target.basic.password}`).toString('base64')}` : undefined;
    if (/^Basic/i.test(challenge)) {
      this.authorization = basic;
      return;
    }
    const params = Object.fromEntries([...challenge.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    const url = new URL(params.realm!);
    url.searchParams.set('service', params.service ?? '');
    if (params.scope) url.searchParams.set('scope', params.scope);
    const res = await request(url, { headers: basic ? { authorization: basic } : {} });
    const json = (await res.body.json()) as { token: string };
    this.authorization = `Bearer ${json.token}`;
  }

  async pushBlob(name: string, data: Buffer): Promise<string> {
    const digest = sha256(data);
    const start = await this.send('POST', `${this.target.url}/v2/${name}/blobs/uploads/`, {});
    if (start.status !== 202) throw new Error(`upload start ${start.status}: ${start.text}`);
    const location = new URL(String(start.headers.location), this.target.url);
    location.searchParams.set('digest', digest);
    const put = await this.send('PUT', location.toString(), { 'content-type': 'application/octet-stream', 'content-length': String(data.length) }, data);
    if (put.status !== 201) throw new Error(`upload ${put.status}: ${put.text}`);
    return digest;
  }

  async pushManifest(name: string, reference: string, body: Buffer, mediaType: string): Promise<void> {
    const res = await this.send('PUT', `${this.target.url}/v2/${name}/manifests/${reference}`, { 'content-type': mediaType }, body);
    if (res.status !== 201) throw new Error(`manifest push ${res.status}: ${res.text}`);
  }

  async pushImage(name: string, tag: string | undefined, img: Image): Promise<void> {
    for (const b of img.blobs) await this.pushBlob(name, b.data);
    await this.pushManifest(name, tag ?? img.digest, img.manifest, img.mediaType);
  }

  async pushMultiArch(name: string, tag: string, m: MultiArch): Promise<void> {
    for (const img of m.images) await this.pushImage(name, undefined, img);
    await this.pushManifest(name, tag, m.index, OCI_INDEX);
  }
}
