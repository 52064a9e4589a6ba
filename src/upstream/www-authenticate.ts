/**
 * Parses `WWW-Authenticate` challenges (RFC 9110 §11.6.1, auth-params per RFC 7235 §2.1).
 * Quoted values contain commas (`scope="repository:a:pull,push"`), several challenges may share
 * one header, and scheme and parameter names are case-insensitive.
 */

export interface Challenge {
  /** Lower-cased scheme: `bearer`, `basic`, … */
  scheme: string;
  /** Lower-cased parameter names → unquoted values. */
  params: Record<string, string>;
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+/;

export function parseWwwAuthenticate(header: string | string[] | undefined): Challenge[] {
  if (header === undefined) return [];
  const text = Array.isArray(header) ? header.join(', ') : header;
  const challenges: Challenge[] = [];
  let i = 0;
  const skipSpace = (): void => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t')) i++;
  };
  const token = (): string => {
    const m = TOKEN.exec(text.slice(i));
    if (!m) return '';
    i += m[0].length;
    return m[0];
  };
  while (i < text.length) {
    skipSpace();
    if (text[i] === ',') {
      i++;
      continue;
    }
    const scheme = token();
    if (!scheme) break;
    const challenge: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    challenges.push(challenge);
    for (;;) {
      skipSpace();
      const start = i;
      const name = token();
      skipSpace();
      if (!name || text[i] !== '=') {
        // Not an auth-param: either a token68 or the next challenge's scheme.
        i = start;
        if (name && Object.keys(challenge.params).length === 0 && /^[A-Za-z0-9._~+/-]+=*/.test(text.slice(i))) {
          const t68 = /^[A-Za-z0-9._~+/-]+=*/.exec(text.slice(i))!;
          // token68 only when nothing but a comma or the end follows
          const after = text.slice(i + t68[0].length).trimStart();
          if (after === '' || after.startsWith(',')) {
            challenge.params.token68 = t68[0];
            i += t68[0].length;
          }
        }
        break;
      }
      i++; // '='
      skipSpace();
      let value = '';
      if (text[i] === '"') {
        i++;
        while (i < text.length && text[i] !== '"') {
          if (text[i] === '\\' && i + 1 < text.length) i++;
          value += text[i];
          i++;
        }
        i++; // closing quote
      } else {
        value = token();
      }
      challenge.params[name.toLowerCase()] = value;
      skipSpace();
      if (text[i] === ',') {
        i++;
        continue;
      }
      break;
    }
  }
  return challenges;
}
