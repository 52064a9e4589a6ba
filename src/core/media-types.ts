/**
 * Manifest media types, Accept negotiation, and what a manifest points to.
 * Manifests are passed through byte for byte: the digest is over the bytes, so any
 * re-serialisation would break Docker-Content-Digest (docs/upstreams.md, "Manifests are bytes,
 * not JSON").
 */
import { isDigest } from './digest.js';
export const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
export const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const DOCKER_SCHEMA1_SIGNED = 'application/vnd.docker.distribution.manifest.v1+prettyjws';
export const DOCKER_SCHEMA1 = 'application/vnd.docker.distribution.manifest.v1+json';

/**
 * What we ask every upstream for. Never the client's header and never none: Docker Hub answers a
 * missing or schema2-only Accept with schema1 or the amd64 child of a multi-arch tag
 * (distribution#2348; docs/upstreams.md, "Accept: always the full list").
 */
export const INDEX_TYPES: ReadonlySet<string> = new Set([OCI_INDEX, DOCKER_LIST]);
export const FULL_ACCEPT = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(', ');

/**
 * Containerd refuses manifests above this during resolve: 4 * 1048 * 1048, not 4 MiB
 * (containerd core/remotes/docker/resolver.go MaxManifestSize).
 */
export const MAX_MANIFEST_BYTES = 4 * 1048 * 1048;

export function stripParams(contentType: string | undefined): string {
  return (contentType ?? '').split(';')[0]!.trim().toLowerCase();
}

/**
 * Whether a client's Accept header admits `mediaType`. Node joins repeated Accept lines with
 * ", " (Docker sends one line per type, in random order); parameters and q-values are ignored
 * as distribution does; no Accept at all means anything.
 */
export function accepts(accept: string | undefined, mediaType: string): boolean {
  if (accept === undefined) return true;
  // Clients send a handful of distinct Accept lines, and this runs on every warm manifest answer:
  // memoised per line (README, Performance). Bounded: at most 256 lines of up to 1 KiB, each with up
  // to 16 media types (they come from upstream content) of up to 255 characters.
  if (accept.length > 1024 || mediaType.length > 255) return parseAccepts(accept, mediaType);
  let byType = acceptMemo.get(accept);
  if (!byType) {
    if (acceptMemo.size >= 256) acceptMemo.clear();
    acceptMemo.set(accept, (byType = new Map()));
  }
  let ok = byType.get(mediaType);
  if (ok === undefined) {
    if (byType.size >= 16) byType.clear();
    byType.set(mediaType, (ok = parseAccepts(accept, mediaType)));
  }
  return ok;
}
const acceptMemo = new Map<string, Map<string, boolean>>();

function parseAccepts(accept: string, mediaType: string): boolean {
  if (accept.trim() === '') return true;
  const type = mediaType.toLowerCase();
  const major = type.split('/')[0];
  for (const part of accept.split(',')) {
    const t = stripParams(part);
    if (t === type || t === '*/*' || t === `${major}/*`) return true;
  }
  return false;
}

interface ManifestJson {
  mediaType?: unknown;
  config?: { digest?: unknown; size?: unknown };
  layers?: Array<{ digest?: unknown; size?: unknown }>;
  manifests?: Array<{ digest?: unknown }>;
  subject?: { digest?: unknown };
  fsLayers?: Array<{ blobSum?: unknown }>;
}

function parse(body: Uint8Array): ManifestJson | undefined {
  try {
    const v: unknown = JSON.parse(Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as ManifestJson) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * type "/" subtype, RFC 6838 §4.2 restricted names. The upstream's body is not trusted to hold
 * one: a `mediaType` field with a line break once reached a Content-Type header (Node refuses it
 * with an exception).
 */
const MEDIA_TYPE = /^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$/i;

export function isMediaType(value: string): boolean {
  return MEDIA_TYPE.test(value);
}

/**
 * The media type to serve: the upstream's Content-Type when it names a manifest, else the
 * manifest's own `mediaType` field (some registries answer application/json), else schema1
 * for text/plain as containerd does. Never anything but a well-formed media type.
 */
export function mediaTypeOf(body: Uint8Array, contentType: string | undefined): string {
  const stripped = stripParams(contentType);
  const ct = isMediaType(stripped) ? stripped : '';
  if (ct !== '' && ct !== 'application/json' && ct !== 'text/plain' && ct !== 'application/octet-stream') return ct;
  const field = parse(body)?.mediaType;
  if (typeof field === 'string' && isMediaType(field)) return field;
  if (ct === 'text/plain') return DOCKER_SCHEMA1_SIGNED;
  return ct === '' ? OCI_MANIFEST : ct;
}

/** Digests a manifest points to (config, layers, child manifests, subject): the refs used by eviction. */
export function childrenOf(body: Uint8Array): string[] {
  const m = parse(body);
  if (!m) return [];
  const out = new Set<string>();
  const add = (d: unknown): void => {
    if (typeof d === 'string') out.add(d);
  };
  add(m.config?.digest);
  add(m.subject?.digest);
  for (const l of Array.isArray(m.layers) ? m.layers : []) add(l?.digest);
  for (const c of Array.isArray(m.manifests) ? m.manifests : []) add(c?.digest);
  for (const l of Array.isArray(m.fsLayers) ? m.fsLayers : []) add(l?.blobSum);
  return [...out];
}

/** What a manifest's config and layers add up to, by their descriptors (0 for what has none). */
export function blobBytesOf(body: Uint8Array): number {
  const m = parse(body);
  const size = (d: { size?: unknown } | undefined): number => (typeof d?.size === 'number' && Number.isSafeInteger(d.size) && d.size > 0 ? d.size : 0);
  return size(m?.config) + (Array.isArray(m?.layers) ? m.layers.reduce((n, l) => n + size(l), 0) : 0);
}

/** The digest a manifest's `subject` names (image-spec manifest.md "subject"): it is a referrer of that manifest. */
export function subjectOf(body: Uint8Array): string | undefined {
  const d = parse(body)?.subject?.digest;
  return typeof d === 'string' && isDigest(d) ? d : undefined;
}
