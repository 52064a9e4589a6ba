/**
 * Access control on the Fastify path (the decisions are src/access/'s): an onRequest hook that
 * finds out who sent each request, the /token endpoint, and the checks the routes call before
 * anything reaches cache/ (so nothing reaches an upstream for a refused request). The warm path
 * makes the same checks itself (warm-path.ts) and leaves whatever it cannot decide synchronously
 * to this one.
 *
 * The flow is distribution's token authentication, which every registry client speaks
 * (https://distribution.github.io/distribution/spec/auth/token/): a 401 names our /token as the
 * realm, the client fetches a token there with its Basic credentials (or none: an anonymous
 * token) and sends it back as a bearer. Basic credentials sent straight to /v2 work too.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { NO_CREDENTIALS, type Access, type Identity } from '../access/access.js';
import { SERVICE } from '../access/tokens.js';
import { OciError } from '../core/errors.js';
import { certificateUser } from './tls.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Who sent the request; null when access control is off or the route is open. */
    identity: Identity | null;
  }
}

/** Open to anyone: probes and scrapers, and /token, where credentials are presented. /admin keeps its own token. */
const OPEN = new Set(['/healthz', '/readyz', '/metrics', '/token']);
/** Only a valid Host (name or address, optional port) goes into a realm: nothing that could close the quoted string. */
const HOST = /^[A-Za-z0-9.:[\]-]+$/;

export interface AccessGuard {
  /** GET /v2/: 401 with the challenge unless the client sent credentials, so clients learn where to log in (as distribution does). */
  base(req: FastifyRequest): void;
  /** Content or names of repository `name` of `upstream`: throws 401 (with the challenge) or 403 unless the rules allow it. */
  check(req: FastifyRequest, upstream: string, name: string, clientName: string): void;
}

/**
 * The URL clients are told to fetch tokens from: access.realm, else this server as the request
 * reached it (Host, and the scheme; X-Forwarded-* only with server.trustProxy). Deriving it from
 * the request is safe: the client is told to send its credentials back to the very host it sent
 * this request to, so no third party can be named by a forged Host header; one behind a proxy
 * that rewrites Host should set access.realm.
 */
function realmOf(access: Access, req: FastifyRequest): string {
  if (access.realm !== undefined) return access.realm;
  const host = HOST.test(req.host) ? req.host : 'localhost';
  return `${req.protocol === 'https' ? 'https' : 'http'}://${host}/token`;
}

function unauthorized(access: Access, req: FastifyRequest, message: string, scope?: string): OciError {
  let challenge = `Bearer realm="${realmOf(access, req)}",service="${SERVICE}"`;
  if (scope !== undefined) challenge += `,scope="repository:${scope}:pull"`;
  return new OciError('UNAUTHORIZED', message, { headers: { 'www-authenticate': challenge } });
}

/** Decorates requests with their identity; with access control on, adds the hook and /token. */
export function registerAccess(app: FastifyInstance, access: Access | undefined): AccessGuard | undefined {
  app.decorateRequest('identity', null);
  if (!access) return undefined;

  app.addHook('onRequest', (req, _reply, done) => {
    const route = req.routeOptions.url;
    if (route !== undefined && (OPEN.has(route) || route.startsWith('/admin'))) return done();
    const settle = (id: Identity | null): void => {
      if (id === null) {
        access.denied('bad_credentials');
        return done(unauthorized(access, req, 'invalid credentials'));
      }
      req.identity = id;
      // The status page lists image names: any authenticated user, with a Basic challenge so a browser asks.
      if (route === '/' && id.user === undefined) {
        access.denied('unauthenticated');
        return done(new OciError('UNAUTHORIZED', 'the status page needs credentials', { headers: { 'www-authenticate': 'Basic realm="ocicache"' } }));
      }
      done();
    };
    const certificate = access.certificates ? certificateUser(req.raw.socket) : undefined;
    const known = access.identifySync(req.headers.authorization, certificate);
    if (known !== undefined) return settle(known);
    access.identify(req.headers.authorization, certificate).then(settle, done);
  });

  // The token names who the client is, whatever scope it asks for: the rules are applied to every
  // request, not baked into tokens. No credentials: an anonymous token, so clients that always
  // fetch one still read what the rules give anonymous.
  app.get('/token', async (req, reply) => {
    const id = await access.login(req.headers.authorization);
    if (id === null) {
      access.denied('bad_credentials');
      throw new OciError('UNAUTHORIZED', 'invalid username or password', { headers: { 'www-authenticate': `Basic realm="${SERVICE}"` } });
    }
    req.identity = id;
    return reply.type('application/json').header('cache-control', 'no-store').send(JSON.stringify(await access.issue(id)));
  });

  return {
    base(req) {
      // Not counted as a denial: this 401 is every client's first step, the challenge that tells it where to log in.
      if (!(req.identity ?? NO_CREDENTIALS).presented) throw unauthorized(access, req, 'authentication required');
    },
    check(req, upstream, name, clientName) {
      const id = req.identity ?? NO_CREDENTIALS;
      if (access.allowed(id, upstream, name)) return;
      if (id.user === undefined) {
        access.denied('unauthenticated');
        throw unauthorized(access, req, 'authentication required', clientName);
      }
      access.denied('forbidden');
      // 403, not 404: decided from the rules alone, before the cache or the upstream is asked, so it
      // says nothing about whether the repository exists, and it tells the user what to fix (the
      // rules, not the image name) instead of sending them looking for a missing image.
      throw new OciError('DENIED', `${id.user} may not read ${clientName}`);
    },
  };
}
