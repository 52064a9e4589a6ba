/**
 * Image references as people write them (`docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:…`),
 * for prefetch: the registry host picks a configured upstream exactly as a path prefix does, so a
 * reference can name only what a client could pull through the API.
 */
import { parseV2Path, type Target, type UpstreamIndex } from './api-path.js';
import { OciError } from './errors.js';

/** `[host/]name[:tag|@digest]` → the upstream, repository name and reference, validated like an API path. */
export function parseImageReference(ref: string, upstreams: UpstreamIndex): { target: Target; reference: string } {
  let rest = ref.trim();
  let reference = 'latest';
  const at = rest.indexOf('@');
  if (at >= 0) {
    reference = rest.slice(at + 1);
    rest = rest.slice(0, at);
  } else {
    const colon = rest.lastIndexOf(':');
    if (colon > rest.lastIndexOf('/')) {
      reference = rest.slice(colon + 1);
      rest = rest.slice(0, colon);
    }
  }
  const parsed = parseV2Path(`/v2/${rest}/manifests/${reference}`, undefined, upstreams);
  if (parsed.kind !== 'manifest') throw new OciError('NAME_INVALID', `not an image reference: ${ref}`);
  return { target: parsed.target, reference: parsed.reference };
}
