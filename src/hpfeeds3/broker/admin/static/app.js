// hpfeeds3 console. Everything shown that came from the API is put into the
// page with textContent, never parsed as markup: idents, channels, owners and
// payloads are chosen by clients and may hold markup.
"use strict";

const POLL_MS = 2000;
const state = { session: null, tab: "sensors", sort: { key: "ident", dir: 1 }, watch: null, timer: null };

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows) {
  const tbody = $(tableId).querySelector("tbody");
  tbody.replaceChildren(...rows);
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " d ago";
}

function clock(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "";
}

function list(items) {
  return (items || []).join(", ");
}

function channels(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, String(v));
  return q.toString();
}

function counted(id, shown, total, what) {
  $(id).textContent = shown < total ? `showing ${shown} of ${total} ${what}; filter to narrow` : `${total} ${what}`;
}

for (const f of document.querySelectorAll("input.filter")) f.addEventListener("input", () => refresh());

function isAdmin() {
  return state.session && state.session.role === "admin";
}

async function api(path, body) {
  const opts = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    if (state.session && state.session.csrf) opts.headers["X-CSRF-Token"] = state.session.csrf;
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    data = {};
  }
  if (r.status === 401 && path !== "/login") {
    showLogin();
    throw new Error("logged out");
  }
  if (!r.ok) throw new Error((data && data.error) || "HTTP " + r.status);
  return data;
}

function status(text) {
  $("status").textContent = text || "";
}

// --- login ----------------------------------------------------------------------------

function showLogin() {
  state.session = null;
  clearInterval(state.timer);
  $("app").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-view").hidden = false;
}

async function start() {
  try {
    state.session = await api("/api/v1/session");
  } catch (e) {
    showLogin();
    return;
  }
  $("login-view").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = state.session.name + " (" + state.session.role + ")";
  $("node").textContent = "node " + state.session.node;
  $("scope").textContent = state.session.cluster
    ? "This node only: each broker of the cluster has its own console."
    : "";
  if (!isAdmin()) {
    // A viewer gets no forms or buttons that change anything.
    for (const e of document.querySelectorAll(".admin-only")) e.remove();
  }
  $("keys-readonly").hidden = state.session.keys_writable;
  if (!state.session.keys_writable) {
    for (const f of [$("key-create-form"), $("key-channels-form")]) if (f) f.remove();
  }
  show(state.tab);
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    await api("/login", { token: $("login-token").value });
    $("login-token").value = "";
    await start();
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api("/logout", {});
  } finally {
    showLogin();
  }
});

// --- tabs -----------------------------------------------------------------------------

for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => show(b.dataset.tab));
}

function show(tab) {
  state.tab = tab;
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + tab;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  refresh();
}

async function refresh() {
  if (!state.session) return;
  try {
    await VIEWS[state.tab]();
    status("");
  } catch (e) {
    status(e.message);
  }
}

// --- sensors --------------------------------------------------------------------------

const silentInput = $("silent-minutes");
silentInput.value = localStorage.getItem("silentMinutes") || "15";
silentInput.addEventListener("change", () => {
  localStorage.setItem("silentMinutes", silentInput.value);
  refresh();
});

for (const th of document.querySelectorAll("#sensors-table th[data-sort]")) {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    refresh();
  });
}

$("only-silent").addEventListener("change", () => refresh());

async function sensors() {
  const { key, dir } = state.sort;
  const data = await api(
    "/api/v1/sensors?" +
      query({
        sort: (dir < 0 ? "-" : "") + key,
        silent_after: Number(silentInput.value || 15) * 60,
        only_silent: $("only-silent").checked ? 1 : "",
        q: $("sensors-filter").value,
      })
  );
  counted("sensors-count", data.sensors.length, data.total, "sensors");
  $("sensors-count").textContent += ", " + data.silent + " silent";
  fill(
    "sensors-table",
    data.sensors.map((s) => {
      const chans = Object.keys(s.channels)
        .map((c) => c + ": " + s.channels[c].last_5m)
        .join(", ");
      const tr = row([s.ident, s.owner, s.connected, ago(s.last_seen), ago(s.last_publish), s.last_5m, s.last_1h, chans]);
      if (s.silent) tr.classList.add("silent");
      tr.dataset.ident = s.ident;
      return tr;
    })
  );
}

// --- connections ----------------------------------------------------------------------

async function connections() {
  const data = await api("/api/v1/connections?" + query({ q: $("connections-filter").value }));
  counted("connections-count", data.connections.length, data.total, "connections");
  fill(
    "connections-table",
    data.connections.map((c) => {
      const pubs = Object.keys(c.publish)
        .map((k) => k + ": " + c.publish[k].messages + " / " + c.publish[k].bytes)
        .join(", ");
      const cells = [c.peer, c.ident, c.owner, clock(c.since), c.tls ? "yes" : "no", list(c.subscriptions), pubs, c.queued_bytes];
      if (isAdmin()) {
        const b = el("button", "Disconnect");
        b.type = "button";
        b.addEventListener("click", () => act("/api/v1/connections/close", { id: c.id }));
        cells.push(b);
      }
      const tr = row(cells);
      tr.dataset.ident = c.ident || "";
      return tr;
    })
  );
}

// --- channels -------------------------------------------------------------------------

async function channelsView() {
  const data = await api("/api/v1/channels");
  counted("channels-count", data.channels.length, data.total, "channels");
  fill(
    "channels-table",
    data.channels.map((c) => {
      const names = (side) => list(c[side]) + (c[side + "_total"] > c[side].length ? ` … (${c[side + "_total"]} in all)` : "");
      const cells = [c.channel, names("publishers"), names("subscribers"), c.last_5m, c.last_1h, c.rate_per_s];
      if (isAdmin()) {
        const b = el("button", "Watch");
        b.type = "button";
        b.addEventListener("click", () => startWatch(c.channel));
        cells.push(b);
      }
      return row(cells);
    })
  );
}

// --- keys -----------------------------------------------------------------------------

async function act(path, body) {
  try {
    const r = await api(path, body);
    status("");
    refresh();
    return r;
  } catch (e) {
    status(e.message);
    return null;
  }
}

function showSecret(ident, secret) {
  $("secret-ident").textContent = ident;
  $("secret-value").textContent = secret;
  $("secret-box").hidden = false;
}

$("secret-dismiss").addEventListener("click", () => {
  $("secret-value").textContent = "";
  $("secret-box").hidden = true;
});

const createForm = $("key-create-form");
if (createForm) {
  createForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await act("/api/v1/keys", {
      ident: $("new-ident").value,
      owner: $("new-owner").value,
      pubchans: channels($("new-pub").value),
      subchans: channels($("new-sub").value),
    });
    if (r) {
      showSecret(r.key.ident, r.secret);
      createForm.reset();
    }
  });
}

const channelsForm = $("key-channels-form");
if (channelsForm) {
  channelsForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const verb = ev.submitter && ev.submitter.value === "revoke" ? "revoke" : "grant";
    await act("/api/v1/keys/" + verb, {
      ident: $("chg-ident").value,
      pubchans: channels($("chg-pub").value),
      subchans: channels($("chg-sub").value),
    });
  });
}

function confirmButton(label, onConfirm) {
  // Two clicks: the first arms the button for a few seconds.
  const b = el("button", label);
  b.type = "button";
  b.addEventListener("click", () => {
    if (b.dataset.armed) {
      delete b.dataset.armed;
      onConfirm();
      return;
    }
    b.dataset.armed = "1";
    b.textContent = "Really " + label.toLowerCase() + "?";
    setTimeout(() => {
      delete b.dataset.armed;
      b.textContent = label;
    }, 5000);
  });
  return b;
}

async function keys() {
  if (document.querySelector("#keys-table button[data-armed]")) return; // keep an armed button in place
  const data = await api("/api/v1/keys?" + query({ q: $("keys-filter").value }));
  counted("keys-count", data.keys.length, data.total, "keys");
  fill(
    "keys-table",
    data.keys.map((k) => {
      const cells = [k.ident, k.owner, list(k.pubchans), list(k.subchans)];
      if (isAdmin() && data.writable) {
        const span = el("span");
        span.appendChild(
          confirmButton("Rotate", async () => {
            const r = await act("/api/v1/keys/rotate", { ident: k.ident });
            if (r) showSecret(k.ident, r.secret);
          })
        );
        span.appendChild(confirmButton("Remove", () => act("/api/v1/keys/remove", { ident: k.ident })));
        cells.push(span);
      }
      const tr = row(cells);
      tr.dataset.ident = k.ident;
      return tr;
    })
  );
}

// --- events ---------------------------------------------------------------------------

async function events() {
  const data = await api("/api/v1/events");
  fill("failed-by-address", data.failed_auth_by_address.map((p) => row(p)));
  fill("failed-by-ident", data.failed_auth_by_ident.map((p) => row(p)));
  fill("blocked", data.blocked.map((b) => row([b.address, b.what, clock(b.until)])));
  fill(
    "events-table",
    data.events.map((e) => row([clock(e.time), e.event, e.peer, e.ident, e.reason, e.message]))
  );
}

// --- watch ----------------------------------------------------------------------------

async function startWatch(channel) {
  $("watch-channel").value = channel;
  const r = await act("/api/v1/watch", { channel });
  if (r) {
    state.watch = channel;
    show("watch");
  }
}

const watchForm = $("watch-form");
if (watchForm) {
  watchForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    startWatch($("watch-channel").value);
  });
  $("watch-stop").addEventListener("click", async () => {
    if (state.watch !== null) await act("/api/v1/watch/stop", { channel: state.watch });
    state.watch = null;
  });
  $("watch-mode").addEventListener("change", refresh);
}

async function watch() {
  if (state.watch === null) {
    fill("watch-table", []);
    return;
  }
  const data = await api("/api/v1/watch?channel=" + encodeURIComponent(state.watch));
  const hex = $("watch-mode").value === "hex";
  fill(
    "watch-table",
    data.messages
      .slice()
      .reverse()
      .map((m) => {
        const payload = el("pre", (hex ? m.hex : m.text) + (m.truncated ? " …" : ""));
        return row([clock(m.time), m.ident, m.size, payload]);
      })
  );
}

const VIEWS = { sensors, connections, channels: channelsView, keys, events, watch };

start();
