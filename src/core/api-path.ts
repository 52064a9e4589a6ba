/**
 * Parses a distribution API request path into {upstream, name, kind, reference} and picks the
 * upstream. Paths are matched from the right because `manifests`, `blobs`, `tags` and
 * `referrers` are valid name components (spec: /v2/a/blobs/b/manifests/x is name `a/blobs/b`).
 *
 * Upstream resolution, in order (docs/clients.md, "Which upstream a request is for"):
 *   1. `?ns=<host>`: containerd sends it to every mirror (containerd docs/hosts.md, "Registry Host Namespace");
 *   2. a prefix before /v2, `/<host>/v2/<name>/…` (a containerd host URL with a path);
 *   3. a host as first name component, `/v2/<host>/<name>/…` (podman/CRI-O mirrors, override_path),
 *      or without /v2 at all, `/<host>/<name>/…` (k3s endpoints with a path);
 *   4. `defaultUpstream` (Docker's registry-mirrors sends neither ns nor a prefix).
 * `ns` and prefixes are keys into the configured upstreams, never hosts to dial.
 */
import type { Config, UpstreamConfig } from './config.js';
import { checkDigest } from './digest.js';
import { OciError } from './errors.js';

export type Kind = 'manifest' | 'blob' | 'tags' | 'referrers';

export interface Target {
  upstream: UpstreamConfig;
  /** The repository name on the upstream, e.g. `library/alpine`. */
  name: string;
}

export type ParsedPath =
  | { kind: 'base' }
  | { kind: 'upload' }
  | {
      kind: Kind;
      target: Target;
      reference: string;
      /** The name as the client sent it, and the path before it (`/v2`, `/docker.io/v2`): for Link headers. */
      clientName: string;
      clientRoot: string;
    };

// https://github.com/opencontainers/distribution-spec/blob/v1.1.1/spec.md#pulling-manifests
const NAME = /^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$/;
const TAG = /^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$/;
/** Many clients cap `host/name` at 255 characters (distribution/reference NameTotalLengthMax). */
const MAX_NAME = 255;

const ROUTES: Array<[RegExp, Kind]> = [
  [/^(.+)\/manifests\/([^/]+)$/, 'manifest'],
  [/^(.+)\/blobs\/([^/]+)$/, 'blob'],
  [/^(.+)\/tags\/(list)$/, 'tags'],
  [/^(.+)\/referrers\/([^/]+)$/, 'referrers'],
];

function checkReference(kind: Kind, reference: string): void {
  if (kind === 'blob' || kind === 'referrers') {
    checkDigest(reference);
  } else if (kind === 'manifest' && !TAG.test(reference)) {
    if (reference.includes(':')) checkDigest(reference);
    else throw new OciError('TAG_INVALID', `invalid tag ${JSON.stringify(reference.slice(0, 150))}`);
  }
}

/** Looks up upstreams by name and alias, case-insensitively, ignoring an explicit :443. */
export class UpstreamIndex {
  private readonly byKey = new Map<string, UpstreamConfig>();
  readonly fallback: UpstreamConfig | undefined;

  constructor(config: Pick<Config, 'upstreams' | 'defaultUpstream'>) {
    for (const u of config.upstreams) for (const key of [u.name, ...u.aliases]) this.byKey.set(key, u);
    this.fallback = config.defaultUpstream === undefined ? undefined : this.byKey.get(config.defaultUpstream);
  }

  get(key: string): UpstreamConfig | undefined {
    const k = key.toLowerCase();
    return this.byKey.get(k) ?? (k.endsWith(':443') ? this.byKey.get(k.slice(0, -4)) : undefined);
  }

  all(): UpstreamConfig[] {
    return [...new Set(this.byKey.values())];
  }
}

function unknownNs(ns: string): OciError {
  return new OciError('NAME_UNKNOWN', `ns ${JSON.stringify(ns.slice(0, 100))} is not a configured upstream of this cache`, { detail: { ns: ns.slice(0, 100) } });
}

/** A raw request URL split into its path (not decoded: see parseV2Path) and its query. */
export function splitUrl(raw: string): { path: string; query: URLSearchParams } {
  const q = raw.indexOf('?');
  return q < 0 ? { path: raw, query: new URLSearchParams() } : { path: raw.slice(0, q), query: new URLSearchParams(raw.slice(q + 1)) };
}

/**
 * Parse `path` (raw, not percent-decoded: names, tags and digests have no escapes, so anything
 * encoded is simply invalid) and the `ns` query value (already decoded once).
 */
export function parseV2Path(path: string, ns: string | undefined, upstreams: UpstreamIndex): ParsedPath {
  let rest: string;
  let prefix: UpstreamConfig | undefined;
  let clientRoot = '/v2';
  if (path === '/v2' || path === '/v2/') return { kind: 'base' };
  if (path.startsWith('/v2/')) {
    rest = path.slice(4);
  } else {
    // `/<host>/v2/<name>/…` or k3s's `/<host>/<name>/…`: the first segment must be an upstream.
    const slash = path.indexOf('/', 1);
    const head = slash < 0 ? path.slice(1) : path.slice(1, slash);
    prefix = upstreams.get(head);
    if (!prefix || slash < 0) throw new OciError('NAME_UNKNOWN', 'no such endpoint: registry API paths start with /v2/ or /<upstream>/v2/');
    rest = path.slice(slash + 1);
    clientRoot = `/${head}`;
    if (rest === 'v2' || rest === 'v2/') return { kind: 'base' };
    if (rest.startsWith('v2/')) {
      rest = rest.slice(3);
      clientRoot += '/v2';
    }
  }
  if (/\/blobs\/uploads(\/|$)/.test(rest)) return { kind: 'upload' };

  let kind: Kind | undefined;
  let rawName = '';
  let reference = '';
  for (const [re, k] of ROUTES) {
    const m = re.exec(rest);
    if (m) {
      kind = k;
      rawName = m[1]!;
      reference = m[2]!;
      break;
    }
  }
  if (!kind) throw new OciError('NAME_UNKNOWN', 'no such endpoint under /v2/');

  const { upstream, name } = resolveUpstream(rawName, ns, prefix, upstreams);
  if (name.length > MAX_NAME || !NAME.test(name)) {
    throw new OciError('NAME_INVALID', `invalid repository name ${JSON.stringify(name.slice(0, 300))}`);
  }
  checkReference(kind, reference);
  const finalName = upstream.dockerHubLibrary && !name.includes('/') ? `library/${name}` : name;
  return { kind, target: { upstream, name: finalName }, reference, clientName: rawName, clientRoot };
}

function resolveUpstream(
  rawName: string,
  ns: string | undefined,
  prefix: UpstreamConfig | undefined,
  upstreams: UpstreamIndex,
): { upstream: UpstreamConfig; name: string } {
  const slash = rawName.indexOf('/');
  const head = slash > 0 ? rawName.slice(0, slash) : undefined;
  const headUpstream = head === undefined ? undefined : upstreams.get(head);
  if (ns !== undefined && ns !== '') {
    const upstream = upstreams.get(ns);
    if (!upstream) throw unknownNs(ns);
    if (prefix && prefix !== upstream) throw new OciError('NAME_INVALID', `path prefix ${prefix.name} and ns ${ns.slice(0, 100)} name different upstreams`);
    // containerd override_path (`/v2/docker.io/library/alpine?ns=docker.io`): the prefix is redundant.
    if (headUpstream === upstream) return { upstream, name: rawName.slice(slash + 1) };
    return { upstream, name: rawName };
  }
  if (prefix) return { upstream: prefix, name: rawName };
  if (headUpstream) return { upstream: headUpstream, name: rawName.slice(slash + 1) };
  if (upstreams.fallback) return { upstream: upstreams.fallback, name: rawName };
  throw new OciError(
    'NAME_UNKNOWN',
    'no upstream named: send ?ns=<registry>, or put a configured registry first in the path (/v2/<registry>/<name>/…)',
  );
}
