/**
 * Repository globs of access rules, matched against the upstream's own repository names
 * ('library/alpine', never the client's 'alpine'). '*' matches within one path component; '**'
 * as a whole component matches any number of them, as in .gitignore: 'myorg/**' is everything
 * under myorg/ (not 'myorg' itself), 'a/**\/b' is a/b, a/x/b, a/x/y/b, and '**' alone is
 * everything. The syntax is checked in core/access-config.ts.
 */

const escape = (s: string): string => s.replace(/[.+?^${}()|[\]\\-]/g, '\\$&');

export function compileGlob(glob: string): RegExp {
  const parts = glob.split('/');
  let re = '';
  // After a leading or middle '**', the next component brings no '/' of its own: '**' ate it.
  let slash = false;
  parts.forEach((part, i) => {
    const last = i === parts.length - 1;
    if (part === '**') {
      if (last) re += i === 0 ? '[^/]+(?:/[^/]+)*' : '(?:/[^/]+)+';
      else re += `${slash ? '/' : ''}(?:[^/]+/)*`;
      slash = false;
      return;
    }
    re += (slash ? '/' : '') + escape(part).replace(/\*/g, '[^/]*');
    slash = true;
  });
  return new RegExp(`^${re}$`);
}

/** One matcher for a rule's list of globs. */
export function compileGlobs(globs: readonly string[]): (name: string) => boolean {
  if (globs.includes('**')) return () => true;
  const res = globs.map(compileGlob);
  return (name) => res.some((re) => re.test(name));
}
