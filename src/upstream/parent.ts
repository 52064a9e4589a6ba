/**
 * A cache with a parent (the `parent` section; README, "Running a fleet") reaches every upstream
 * through it: requests carry `ns=<upstream>` (core/upstream-config.ts throughParent, and
 * client.ts), and these decide what the parent's answers mean.
 */
import type { Dispatcher } from 'undici';
import type { UpstreamConfig } from '../core/config.js';
import { OciError } from '../core/errors.js';
import type { Gate } from './gate.js';
import { header } from './responses.js';

/**
 * A parent's content answer must say it is `upstream`'s (OCI-Namespace, which the distribution
 * spec's registry proxying has a proxy echo for `ns`; the parent may name it by an alias of ours):
 * content of one upstream is never taken for another's. The body is left to the caller, which
 * destroys it when this throws.
 */
export function checkNamespace(upstream: UpstreamConfig, res: Dispatcher.ResponseData): void {
  if (res.statusCode < 200 || res.statusCode >= 300) return;
  const said = header(res.headers, 'oci-namespace')?.toLowerCase();
  if (said !== undefined && (said === upstream.name || upstream.aliases.includes(said))) return;
  throw new OciError('UNKNOWN', `the parent cache answered for ${upstream.name} with OCI-Namespace ${JSON.stringify(said ?? null)}`, { status: 502 });
}

/**
 * Whether `err` says the parent could not be reached, which is when parent.fallback asks the
 * upstream itself: a transport failure (refused, reset, timed out: client.ts transportError keeps
 * it as the cause), or the parent's breaker open while such a failure is recent (within its
 * cooldown). Not an answer from the parent, right or wrong (a 404, a 502, a 503 of its own: a
 * breaker opened by those does not count), and never for an upstream set offline.
 */
export function parentUnreachable(err: unknown, gate: Gate, lastTransportFailure: number | undefined, now: number): boolean {
  if (!(err instanceof OciError) || err.code !== 'UNAVAILABLE' || gate.offline) return false;
  if (err.cause !== undefined) return true;
  const recent = lastTransportFailure !== undefined && now - lastTransportFailure <= gate.upstream.breakerCooldown;
  return gate.state !== 'closed' && recent;
}
