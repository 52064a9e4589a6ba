/**
 * OCI error codes, their HTTP status, and the one error class the whole proxy throws.
 *
 * Codes and statuses follow the distribution spec's error table
 * (https://github.com/opencontainers/distribution-spec/blob/v1.1.1/spec.md#error-codes) with the
 * statuses distribution assigns (registry/api/errcode/register.go); RANGE_INVALID, TAG_INVALID,
 * UNAVAILABLE and UNKNOWN are distribution's extras.
 */

export const STATUS = {
  BLOB_UNKNOWN: 404,
  DIGEST_INVALID: 400,
  MANIFEST_INVALID: 400,
  MANIFEST_UNKNOWN: 404,
  NAME_INVALID: 400,
  NAME_UNKNOWN: 404,
  SIZE_INVALID: 400,
  TAG_INVALID: 400,
  PAGINATION_NUMBER_INVALID: 400,
  RANGE_INVALID: 416,
  UNAUTHORIZED: 401,
  DENIED: 403,
  UNSUPPORTED: 405,
  TOOMANYREQUESTS: 429,
  UNKNOWN: 500,
  UNAVAILABLE: 503,
} as const;

export type ErrorCode = keyof typeof STATUS;

const MESSAGE: Record<ErrorCode, string> = {
  BLOB_UNKNOWN: 'blob unknown to registry',
  DIGEST_INVALID: 'provided digest is invalid',
  MANIFEST_INVALID: 'manifest invalid',
  MANIFEST_UNKNOWN: 'manifest unknown',
  NAME_INVALID: 'invalid repository name',
  NAME_UNKNOWN: 'repository name not known to registry',
  SIZE_INVALID: 'provided length did not match content length',
  TAG_INVALID: 'invalid tag',
  PAGINATION_NUMBER_INVALID: 'invalid number of results requested',
  RANGE_INVALID: 'requested range not satisfiable',
  UNAUTHORIZED: 'authentication required',
  DENIED: 'requested access to the resource is denied',
  UNSUPPORTED: 'The operation is unsupported.',
  TOOMANYREQUESTS: 'too many requests',
  UNKNOWN: 'unknown error',
  UNAVAILABLE: 'service unavailable',
};

export interface OciErrorOptions {
  /** Overrides the table's status, e.g. 502/504 for UNAVAILABLE. */
  status?: number;
  detail?: unknown;
  /** Response headers that belong to the error, e.g. Retry-After or Content-Range on a 416. */
  headers?: Record<string, string>;
  cause?: unknown;
}

/** The only error type the proxy answers with; anything else is a bug and becomes UNKNOWN 500. */
export class OciError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly detail: unknown;
  readonly headers: Record<string, string>;

  constructor(code: ErrorCode, message: string = MESSAGE[code], options: OciErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'OciError';
    this.code = code;
    this.status = options.status ?? STATUS[code];
    this.detail = options.detail;
    this.headers = options.headers ?? {};
  }

  /** The spec's JSON envelope: {"errors":[{"code","message","detail"}]}. */
  toJSON(): { errors: Array<{ code: ErrorCode; message: string; detail?: unknown }> } {
    const entry: { code: ErrorCode; message: string; detail?: unknown } = { code: this.code, message: this.message };
    if (this.detail !== undefined) entry.detail = this.detail;
    return { errors: [entry] };
  }
}

/**
 * True for failures where serving a cached (stale) copy beats failing: the upstream is not
 * authoritative now. That is every upstream fault (502, 503, 504: unreachable, timed out, 5xx,
 * wrong bytes, an answer too large or malformed) and a 429; not its refusals (401/403) or 404s.
 */
export function isUpstreamUnavailable(err: unknown): boolean {
  return err instanceof OciError && (err.code === 'TOOMANYREQUESTS' || err.status >= 502);
}
