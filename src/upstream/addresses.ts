/**
 * What kind of address a host is at: public, or one that reaches the cache's own machine or
 * network (loopback, link-local such as a cloud's metadata service at 169.254.169.254, private).
 * A host an upstream chose (a blob's CDN, an anonymous token realm) is dialled only at a public
 * address or at the same kind of address as the upstream's own (docs/upstreams.md, "Tokens,
 * redirects and credentials"). The check is made on the address the connection goes to: a DNS
 * lookup that drops every other address (`filteredLookup`), so a name that resolves to
 * 127.0.0.1 is refused as the literal would be.
 */
import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { BlockList, isIP, type LookupFunction } from 'node:net';

export type AddressKind = 'public' | 'loopback' | 'link-local' | 'private' | 'reserved';

/** IANA special-purpose ranges (RFC 6890 and its updates) by what reaching them means here. */
const RANGES: ReadonlyArray<[Exclude<AddressKind, 'public'>, string, number]> = [
  // 0.0.0.0 and :: connect to the local host on Linux.
  ['loopback', '127.0.0.0', 8],
  ['loopback', '0.0.0.0', 8],
  ['loopback', '::1', 128],
  ['loopback', '::', 128],
  ['link-local', '169.254.0.0', 16],
  ['link-local', 'fe80::', 10],
  ['private', '10.0.0.0', 8],
  ['private', '172.16.0.0', 12],
  ['private', '192.168.0.0', 16],
  ['private', '100.64.0.0', 10], // shared address space, carrier-grade NAT (RFC 6598)
  ['private', 'fc00::', 7], // unique local (RFC 4193)
  ['private', 'fec0::', 10], // site-local, deprecated but routable inside a site
  ['reserved', '192.0.0.0', 24],
  ['reserved', '192.0.2.0', 24],
  ['reserved', '198.18.0.0', 15],
  ['reserved', '198.51.100.0', 24],
  ['reserved', '203.0.113.0', 24],
  ['reserved', '224.0.0.0', 3], // multicast, 240/4 and the broadcast address
  ['reserved', '100::', 64],
  ['reserved', '2001:db8::', 32],
  ['reserved', '64:ff9b:1::', 48],
  ['reserved', 'ff00::', 8],
  // IPv4-compatible (::a.b.c.d, deprecated) and IPv4-translated (::ffff:0:a.b.c.d) forms: an
  // IPv4 address in disguise, not a public IPv6 one.
  ['reserved', '::', 96],
  ['reserved', '::ffff:0:0:0', 96],
];

const LISTS = new Map<AddressKind, BlockList>();
for (const [kind, network, prefix] of RANGES) {
  let list = LISTS.get(kind);
  if (!list) LISTS.set(kind, (list = new BlockList()));
  list.addSubnet(network, prefix, isIP(network) === 4 ? 'ipv4' : 'ipv6');
}

/**
 * The kind of an IP address (v4, v6, bracketed or with a zone). IPv4-mapped IPv6 addresses
 * (::ffff:127.0.0.1) are judged by their IPv4 address (BlockList does), and so are NAT64 ones
 * (64:ff9b::a00:1 reaches 10.0.0.1 through the translator). Not an address: 'reserved'.
 */
export function addressKind(address: string): AddressKind {
  let a = address.replace(/^\[|\]$/g, '').replace(/%.*$/, '');
  let family = isIP(a);
  if (family === 0) return 'reserved';
  if (family === 6) {
    a = new URL(`http://[${a}]/`).hostname.slice(1, -1);
    const nat64 = /^64:ff9b::([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(a);
    if (nat64) {
      const [hi, lo] = [parseInt(nat64[1]!, 16), parseInt(nat64[2]!, 16)];
      a = [hi >> 8, hi & 255, lo >> 8, lo & 255].join('.');
      family = 4;
    }
  }
  for (const [kind, list] of LISTS) if (list.check(a, family === 4 ? 'ipv4' : 'ipv6')) return kind;
  return 'public';
}

/**
 * The kind of a URL's host when the name alone says it: an IP literal, or `localhost` and its
 * subdomains (RFC 6761 §6.3). Undefined for any other name: only its lookup tells.
 */
export function literalKind(hostname: string): AddressKind | undefined {
  const h = hostname.toLowerCase().replace(/\.$/, '');
  if (h === 'localhost' || h.endsWith('.localhost')) return 'loopback';
  return isIP(h.replace(/^\[|\]$/g, '').replace(/%.*$/, '')) === 0 ? undefined : addressKind(h);
}

/** A connection refused because its host resolved only to addresses of kinds it may not reach. */
export class AddressRefused extends Error {
  readonly code = 'ERR_OCICACHE_ADDRESS_REFUSED';
  constructor(
    readonly hostname: string,
    readonly kinds: AddressKind[],
  ) {
    super(`${hostname} resolves to ${kinds.length ? [...new Set(kinds)].join(' and ') : 'no'} addresses only`);
    this.name = 'AddressRefused';
  }
}

/**
 * A DNS lookup for net.connect and tls.connect that keeps only the addresses of the `allowed`
 * kinds, and fails with AddressRefused when none is left. The connection is made to what it
 * returns, so the check holds for the address actually dialled (a name that resolved to a public
 * address for one check and to 127.0.0.1 for the connection cannot slip through).
 */
export function filteredLookup(base: LookupFunction, allowed: ReadonlySet<AddressKind>): LookupFunction {
  return (hostname, options, callback) => {
    base(hostname, { ...options, all: true }, (err, found) => {
      if (err) return callback(err, '');
      const all = (Array.isArray(found) ? found : [{ address: found, family: isIP(found) }]) as LookupAddress[];
      const ok = all.filter((a) => allowed.has(addressKind(a.address)));
      if (ok.length === 0) return callback(new AddressRefused(hostname, all.map((a) => addressKind(a.address))), '');
      if (options.all) callback(null, ok);
      else callback(null, ok[0]!.address, ok[0]!.family);
    });
  };
}

export const systemLookup: LookupFunction = dnsLookup as unknown as LookupFunction;

/** How long the kinds of an upstream's own addresses are remembered. */
const KINDS_TTL_MS = 60_000;

/**
 * The kinds of address a host an upstream chose may be at: public, and whatever kinds the
 * upstream's own addresses are (a registry on 10.0.0.5 may send blobs to a store on 10.0.0.6; one
 * on a public address may not send them to 127.0.0.1 or 169.254.169.254). Looked up when first
 * needed and kept for a minute; a failed lookup allows public addresses only.
 */
export class UpstreamAddressKinds {
  private readonly known = new Map<string, { until: number; kinds: Promise<ReadonlySet<AddressKind>> }>();

  constructor(private readonly lookup: LookupFunction = systemLookup) {}

  allowed(hostname: string): Promise<ReadonlySet<AddressKind>> {
    const literal = literalKind(hostname);
    if (literal !== undefined) return Promise.resolve(new Set<AddressKind>(['public', literal]));
    const now = Date.now();
    const hit = this.known.get(hostname);
    if (hit && hit.until > now) return hit.kinds;
    const kinds = new Promise<ReadonlySet<AddressKind>>((resolve) => {
      this.lookup(hostname, { all: true }, (err, found) => {
        const all = err ? [] : Array.isArray(found) ? found.map((a) => a.address) : [found];
        resolve(new Set<AddressKind>(['public', ...all.map(addressKind)]));
      });
    });
    if (this.known.size >= 1000) this.known.clear();
    this.known.set(hostname, { until: now + KINDS_TTL_MS, kinds });
    return kinds;
  }
}
