# Build stage: compile TypeScript with the dev toolchain.
FROM node:22-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build

# Runtime: production dependencies and the compiled code only, on the image's own Node 22.
FROM node:22-bookworm-slim
ENV NODE_ENV=production DATA_DIR=/data SERVICEDIR=dist/services
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY --from=build /app/dist ./dist
VOLUME /data
# 3000: the gateway (nodes running `api`); 3030: Prometheus /metrics and the /live, /ready probes.
EXPOSE 3000 3030
# node:sqlite (the embedded store) still prints an ExperimentalWarning on Node 22: not a log line.
CMD ["node", "--disable-warning=ExperimentalWarning", "node_modules/moleculer/bin/moleculer-runner.js", "--config", "dist/moleculer.config.js"]
