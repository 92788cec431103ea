#!/usr/bin/env node
// Responsiveness probe: GETs the given loopback URLs in turn at a fixed rate (open loop, so a
// slow answer does not slow the probe down) while something else loads the server, and prints
// one JSON line with the latency percentiles.
//
//   node probe.mjs --duration 12 --rate 40 URL [URL...]
import http from 'node:http';

const argv = process.argv.slice(2);
let duration = 10;
let rate = 40;
const urls = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--duration') duration = Number(argv[++i]);
  else if (argv[i] === '--rate') rate = Number(argv[++i]);
  else urls.push(new URL(argv[i]));
}
if (!urls.length || urls.some((u) => u.hostname !== '127.0.0.1')) {
  console.error('usage: node probe.mjs [--duration S] [--rate N] http://127.0.0.1:PORT/path ...');
  process.exit(2);
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
const latencies = [];
let errors = 0;
let firstError = null;

function get(u) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const req = http.get(u, { agent, timeout: 10_000 }, (res) => {
      res.resume();
      res.on('end', () => {
        if (res.statusCode === 200) latencies.push(performance.now() - t0);
        else {
          errors++;
          firstError ??= `HTTP ${res.statusCode} ${u.pathname}`;
        }
        resolve();
      });
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (e) => {
      errors++;
      firstError ??= e.message;
      resolve();
    });
  });
}

const pending = [];
const interval = 1000 / rate;
const start = performance.now();
for (let i = 0; performance.now() - start < duration * 1000; i++) {
  pending.push(get(urls[i % urls.length]));
  const next = start + (i + 1) * interval;
  await new Promise((r) => setTimeout(r, Math.max(0, next - performance.now())));
}
await Promise.all(pending);
agent.destroy();
latencies.sort((a, b) => a - b);
const pct = (q) => (latencies.length ? Number(latencies[Math.min(latencies.length - 1, Math.ceil(q * latencies.length) - 1)].toFixed(2)) : null);
process.stdout.write(
  `${JSON.stringify({ requests: latencies.length, errors, first_error: firstError, p50_ms: pct(0.5), p99_ms: pct(0.99), max_ms: pct(1) })}\n`,
);
