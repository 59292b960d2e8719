// The live server panel, read from GET /metrics (Prometheus text) every two seconds.

import { APIError, getText } from "./api.js";

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 2000;

/** {name: value} of the exposition's samples without labels (labelled ones are summed under the name). */
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    values[match[1]] = (match[2] ? values[match[1]] || 0 : 0) + value;
  }
  return values;
}

const count = (v) => (v === undefined ? "–" : String(Math.round(v)));

export class MetricsPanel {
  constructor() {
    this.previous = null; // {at, sampled}
    this.timer = null;
  }

  start() {
    if (this.timer === null) {
      this.poll();
      this.timer = setInterval(() => this.poll(), PERIOD_MS);
    }
  }

  async poll() {
    if (document.hidden) return;
    let values;
    try {
      values = parseMetrics(await getText("/metrics"));
    } catch (err) {
      $("metrics-status").textContent = err instanceof APIError ? err.describe() : String(err);
      return;
    }
    $("metrics-status").textContent = "";
    this.show(values);
  }

  show(m) {
    $("m-running").textContent = count(m.foundry_requests_running);
    $("m-waiting").textContent = count(m.foundry_requests_waiting);
    const used = m.foundry_kv_cache_used_tokens || 0;
    const capacity = m.foundry_kv_cache_capacity_tokens || 0;
    $("m-kv").textContent = capacity ? `${used} / ${capacity} tokens (${(100 * used / capacity).toFixed(1)}%)` : "–";
    $("m-kv-bar").value = capacity ? used / capacity : 0;
    $("m-prefix").textContent = `${count(m.foundry_prefix_cache_hit_tokens_total)} tokens`;
    const now = performance.now();
    const sampled = m.foundry_sampled_tokens_total;
    if (this.previous && sampled !== undefined) {
      const rate = (sampled - this.previous.sampled) / ((now - this.previous.at) / 1000);
      $("m-rate").textContent = rate.toFixed(1);
    }
    if (sampled !== undefined) this.previous = { at: now, sampled };
    const n = m.foundry_time_to_first_token_seconds_count;
    $("m-ttft").textContent = n ? `${Math.round(1000 * m.foundry_time_to_first_token_seconds_sum / n)} ms (${n} request${n === 1 ? "" : "s"})` : "–";
  }
}
