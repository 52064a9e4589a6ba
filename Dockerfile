# ocicache container image.
#   docker build -t ocicache .            (or: buildah bud --isolation chroot -t ocicache .)
#   docker run -p 5000:5000 -v ocicache-data:/data ocicache
# BASE is any Debian-based image with Node.js (20 or newer) on the PATH; the default is the
# official Node LTS slim image. The tests build with a locally assembled base (no registry here).
ARG BASE=docker.io/library/node:24-bookworm-slim

# ---- build: compile better-sqlite3 and the TypeScript, then drop the dev dependencies ----
FROM ${BASE} AS build
# Without network access to nodejs.org, node-gyp needs Node's headers on the base image: set
# ENV npm_config_nodedir there (the tests' base sets /usr). No ARG for it here: an ARG given a
# value on the command line makes buildah's layer cache miss every later step.
RUN if ! command -v make >/dev/null || ! command -v g++ >/dev/null || ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

# ---- runtime: no compilers, non-root, cache in a volume ----
FROM ${BASE}
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY config ./config
RUN groupadd --system --gid 10001 ocicache && useradd --system --uid 10001 --gid ocicache --home-dir /data --shell /usr/sbin/nologin ocicache \
 && mkdir -p /data && chown ocicache:ocicache /data
USER 10001:10001
# The embedded config's storage.root is ./data: from / that is the volume. No OCICACHE_* env is set
# here, so a mounted config file is taken as written (env overrides win over the file).
WORKDIR /
VOLUME ["/data"]
EXPOSE 5000
# Config: the embedded config/default.yaml, or mount a file and pass --config /etc/ocicache/config.yaml
# (or set OCICACHE_CONFIG). SIGTERM drains requests and downloads before exiting.
# --max-semi-space-size=4: the node flags of `npm start`; README "Performance", figure 5, says why.
ENTRYPOINT ["node", "--max-semi-space-size=4", "/app/dist/cli.js"]
CMD ["serve"]
