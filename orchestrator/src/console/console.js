// Aloft console: follows live changes. The page is complete without this script; it only
// rewrites the cells the server marked with data-c (campaign) and data-k (what the cell shows)
// from the /events stream. It sends nothing but the stream's GET and writes text only
// (textContent, never HTML).
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!window.EventSource || !live) return;
  // The tab says the page is live and, on a campaign's page, where the campaign stands.
  const baseTitle = document.title;
  const set = (el, v) => {
    if (el.tagName === "PROGRESS") {
      el.value = v;
    } else if (el.textContent !== String(v)) {
      el.textContent = String(v);
    }
  };
  const clock = (ms) => new Date(ms).toISOString().slice(11, 19) + " UTC";
  const apply = (u) => {
    const cells = new Map();
    for (const el of document.querySelectorAll("[data-c][data-k]")) {
      const key = el.dataset.c + "|" + el.dataset.k;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(el);
    }
    const put = (c, k, v) => (cells.get(c + "|" + k) || []).forEach((el) => set(el, v));
    for (const c of u.campaigns || []) {
      const id = c.campaign;
      put(id, "status", c.status);
      put(id, "reason", c.reason || "-");
      put(id, "bar", (c.counts && c.counts.succeeded) || 0);
      for (const el of document.querySelectorAll("[data-k^='n:']")) {
        if (el.dataset.c !== id) continue;
        const s = el.dataset.k.slice(2);
        set(el, (c.counts && c.counts[s]) || 0);
      }
      (c.waves || []).forEach((w, i) => {
        for (const f of ["size", "notified", "downloading", "installing", "succeeded", "unhealthy", "failed"]) {
          put(id, "w:" + i + ":" + f, w[f] || 0);
        }
        put(id, "w:" + i + ":bar", w.succeeded || 0);
        if (w.opened_ms) put(id, "w:" + i + ":opened", new Date(w.opened_ms).toISOString().replace("T", " ").slice(0, 19) + " UTC");
      });
    }
    const r = document.getElementById("registered");
    const n = document.getElementById("connected");
    if (r && typeof u.registered === "number") set(r, u.registered);
    if (n && typeof u.connected === "number") set(n, u.connected);
    live.dataset.state = "live";
    live.textContent = "live, updated " + clock(u.at_ms);
    const headline = document.querySelector("[data-title][data-k='status']");
    document.title = "\u25cf " + (headline ? headline.textContent + " \u00b7 " : "") + baseTitle;
  };
  const source = new EventSource("/events");
  source.onmessage = (e) => {
    try {
      apply(JSON.parse(e.data));
    } catch (_) {
      live.dataset.state = "error";
    }
  };
  source.onerror = () => {
    live.dataset.state = "reconnecting";
    live.textContent = "reconnecting";
    document.title = baseTitle;
  };
})();
