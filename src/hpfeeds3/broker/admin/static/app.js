// hpfeeds3 console. Everything shown that came from the API is put into the
// page with textContent, never parsed as markup: idents, channels, owners and
// payloads are chosen by clients and may hold markup. Characters that would
// hide or reorder text (bidirectional overrides, zero-width and control
// characters) are shown escaped, marked, so two names that look alike differ.
"use strict";

const POLL_MS = 2000;
const PAGE = 100;
const state = {
  session: null,
  tab: "sensors",
  view: localStorage.getItem("sensorView") || "stopped",
  sort: { sensors: { key: "silent_since", dir: 1 }, connections: { key: "ident", dir: 1 } },
  csort: {},
  offset: {},
  total: {},
  watch: null,
  timer: null,
  asOf: null,
  downSince: null,
};

// Shown escaped: C0/C1 controls, soft hyphen, Arabic letter mark, zero-width and
// bidirectional marks and overrides, line/paragraph separators, invisible operators, BOM.
const HIDDEN = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]/g;

function $(id) {
  return document.getElementById(id);
}

function escaped(text) {
  return String(text).replace(HIDDEN, (c) => "\\u{" + c.codePointAt(0).toString(16).padStart(4, "0") + "}");
}

// A text node, or a span marked "escaped" when the text held hidden characters.
function textOf(value) {
  const s = value === null || value === undefined ? "" : String(value);
  const shown = escaped(s);
  if (shown === s) return document.createTextNode(s);
  const span = document.createElement("span");
  span.className = "escaped";
  span.title = "holds invisible or direction-changing characters, shown escaped";
  span.textContent = shown;
  return span;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.appendChild(textOf(text));
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else td.appendChild(textOf(c));
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows) {
  const tbody = $(tableId).querySelector("tbody");
  tbody.replaceChildren(...rows);
  const cs = state.csort[tableId];
  if (cs) sortRows(tableId, cs.index, cs.dir, cs.kind);
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " d ago";
}

// A duration in seconds, short: "40 s", "12 min", "3.5 h", "2.1 d".
function duration(s) {
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function size(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  if (n < 1073741824) return (n / 1048576).toFixed(1) + " MiB";
  return (n / 1073741824).toFixed(2) + " GiB";
}

// How close a durable key's stored backlog is to the bounds past which its oldest
// messages are dropped (bytes or age, whichever is nearer), 0 to 1.
function towardDrop(d) {
  const bytes = d.max_bytes ? d.backlog_bytes / d.max_bytes : 0;
  const age = d.max_age_s && d.backlog_messages ? d.oldest_unread_age_s / d.max_age_s : 0;
  return Math.min(1, Math.max(bytes, age));
}

// A durable key's stored backlog, in words; "" when it has none to say. While its
// collector is connected, what it has not acknowledged yet is what it is behind: the
// rest of what is stored for it was delivered, kept as the overlap a crash replays.
function durableText(d) {
  if (!d) return "";
  const stored = d.backlog_messages + " msgs stored (" + size(d.backlog_bytes) + ")";
  const parts = [];
  if (d.consuming && d.unacknowledged !== null && d.unacknowledged !== undefined) {
    parts.push("connected: " + d.unacknowledged + " msgs not yet acknowledged");
    if (d.backlog_messages) parts.push(stored + ", the last delivered kept for a replay after a crash");
  } else {
    parts.push((d.consuming ? "connected: " : "away: ") + stored);
    if (d.backlog_messages) parts.push("oldest unread " + duration(d.oldest_unread_age_s) + " old");
  }
  if (d.backlog_messages) {
    parts.push(Math.round(towardDrop(d) * 100) + " % toward the drop bound (" + size(d.max_bytes) + ", " + duration(d.max_age_s) + ")");
  }
  if (d.dropped) parts.push(d.dropped + " dropped");
  return parts.join("; ");
}

// A durable key that lost messages, or is half way to losing some.
function durableTrouble(d) {
  return !!d && (d.dropped > 0 || towardDrop(d) >= 0.5);
}

// Times are shown in UTC, and say so.
function clock(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";
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

function isAdmin() {
  return state.session && state.session.role === "admin";
}

// --- messages, "as of", the unreachable banner ---------------------------------------

// A message stays until it is dismissed.
function message(text, kind) {
  const box = el("div", null, "msg " + (kind || "error"));
  box.appendChild(el("span", text));
  const x = el("button", "Dismiss");
  x.type = "button";
  x.addEventListener("click", () => box.remove());
  box.appendChild(x);
  $("messages").appendChild(box);
}

function reachable() {
  state.asOf = Date.now() / 1000;
  state.downSince = null;
  $("banner").hidden = true;
  $("asof").textContent = "as of " + clock(state.asOf);
}

function unreachable() {
  if (state.downSince === null) state.downSince = Date.now() / 1000;
  $("banner").textContent =
    "The broker does not answer (since " + clock(state.downSince) + "): the values shown are as of " +
    (state.asOf ? clock(state.asOf) : "never") + ".";
  $("banner").hidden = false;
}

class Unreachable extends Error {}

async function api(path, body) {
  const opts = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    if (state.session && state.session.csrf) opts.headers["X-CSRF-Token"] = state.session.csrf;
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    unreachable();
    throw new Unreachable("the broker does not answer");
  }
  if (r.status >= 502 && r.status <= 504) {
    unreachable();
    throw new Unreachable("the broker does not answer");
  }
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
  reachable();
  if (!r.ok) {
    const err = new Error((data && data.error) || "HTTP " + r.status);
    err.status = r.status;
    throw err;
  }
  return data;
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
  showView(state.view);
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

// --- tabs, paging, sorting ------------------------------------------------------------

for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => show(b.dataset.tab));
}

function show(tab) {
  state.tab = tab;
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== "tab-" + tab;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  refresh();
}

// Each filter starts its list again from the first page.
for (const f of document.querySelectorAll("input.filter")) {
  f.addEventListener("input", () => {
    state.offset[state.tab] = 0;
    refresh();
  });
}

function pager(name, shown, total, offset) {
  state.total[name] = total;
  const p = document.querySelector(`.pager[data-pager="${name}"]`);
  if (!p) return;
  const prev = el("button", "\u25C0 Previous");
  prev.type = "button";
  prev.disabled = offset <= 0;
  prev.addEventListener("click", () => {
    state.offset[name] = Math.max(0, offset - PAGE);
    refresh();
  });
  const next = el("button", "Next \u25B6");
  next.type = "button";
  next.disabled = offset + shown >= total;
  next.addEventListener("click", () => {
    state.offset[name] = offset + PAGE;
    refresh();
  });
  const where = total ? `rows ${offset + 1}\u2013${offset + shown} of ${total}` : "no rows";
  p.replaceChildren(prev, el("span", where), next);
}

function page(name) {
  return { offset: state.offset[name] || 0, limit: PAGE };
}

// Server-sorted tables: a click on a header sorts by it, again for descending.
for (const name of ["sensors", "connections"]) {
  for (const th of document.querySelectorAll(`#${name}-table th[data-sort]`)) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      const cur = state.sort[name];
      state.sort[name] = { key, dir: cur.key === key ? -cur.dir : 1 };
      state.offset[name] = 0;
      refresh();
    });
  }
}

function arrows(name) {
  const { key, dir } = state.sort[name];
  for (const th of document.querySelectorAll(`#${name}-table th[data-sort]`)) {
    th.classList.toggle("asc", th.dataset.sort === key && dir > 0);
    th.classList.toggle("desc", th.dataset.sort === key && dir < 0);
  }
}

function sortParam(name) {
  const { key, dir } = state.sort[name];
  return (dir < 0 ? "-" : "") + key;
}

// Tables sorted in the page (the rows of the page shown): by text or by number.
function sortRows(tableId, index, dir, kind) {
  const tbody = $(tableId).querySelector("tbody");
  const rows = Array.from(tbody.rows);
  const value = (tr) => (tr.cells[index] ? tr.cells[index].textContent : "");
  rows.sort((a, b) => {
    const x = value(a);
    const y = value(b);
    const c = kind === "num" ? Number(x) - Number(y) : x.localeCompare(y);
    return dir * c;
  });
  tbody.replaceChildren(...rows);
  $(tableId).querySelectorAll("th").forEach((th, i) => {
    th.classList.toggle("asc", i === index && dir > 0);
    th.classList.toggle("desc", i === index && dir < 0);
  });
}

for (const th of document.querySelectorAll("th[data-csort]")) {
  th.addEventListener("click", () => {
    const table = th.closest("table").id;
    const index = Array.from(th.parentNode.children).indexOf(th);
    const cur = state.csort[table];
    const dir = cur && cur.index === index ? -cur.dir : 1;
    state.csort[table] = { index, dir, kind: th.dataset.csort };
    sortRows(table, index, dir, th.dataset.csort);
  });
}

// A refresh leaves the page alone while the operator selects text in it.
function selecting() {
  const sel = window.getSelection();
  return sel && !sel.isCollapsed && $("app").contains(sel.anchorNode);
}

async function refresh() {
  if (!state.session || selecting()) return;
  if (document.querySelector("#app button[data-armed]")) return; // keep an armed button in place
  try {
    await VIEWS[state.tab]();
  } catch (e) {
    if (!(e instanceof Unreachable) && e.status !== 429 && e.message !== "logged out") message(e.message);
  }
}

// --- charts ---------------------------------------------------------------------------

// Drawn by the broker (SVG); asked for again once a minute.
function chart(what, name, minutes, cls) {
  const img = document.createElement("img");
  img.className = cls || "spark";
  img.alt = "messages per minute";
  img.src = "/api/v1/chart?" + query({ [what]: name, minutes, m: Math.floor(Date.now() / 60000) });
  return img;
}

function detail(what, name) {
  $("detail-what").replaceChildren(textOf((what === "ident" ? "Sensor " : "Channel ") + name));
  $("detail-chart").src = "/api/v1/chart?" + query({ [what]: name, minutes: 1440, m: Math.floor(Date.now() / 60000) });
  $("detail-note").textContent = "Times in UTC; the right edge is now.";
  $("detail-box").showModal();
}

$("detail-dismiss").addEventListener("click", () => $("detail-box").close());

function nameLink(what, name) {
  const span = el("span", name, "ident-link");
  span.title = "the last 24 hours";
  span.addEventListener("click", () => detail(what, name));
  return span;
}

// --- sensors --------------------------------------------------------------------------

const silentInput = $("silent-minutes");
silentInput.value = localStorage.getItem("silentMinutes") || "15";
silentInput.addEventListener("change", () => {
  localStorage.setItem("silentMinutes", silentInput.value);
  refresh();
});

// The landing view: the sensors that stopped, longest silent first.
const SENSOR_VIEWS = {
  stopped: { role: "sensor", only_silent: 1, show: "active" },
  sensors: { role: "sensor", show: "active" },
  collectors: { role: "collector", show: "active" },
  never: { show: "never" },
  all: { show: "all" },
};

function showView(view) {
  state.view = SENSOR_VIEWS[view] ? view : "stopped";
  localStorage.setItem("sensorView", state.view);
  for (const b of document.querySelectorAll("#sensor-views button")) {
    b.classList.toggle("active", b.dataset.view === state.view);
  }
}

for (const b of document.querySelectorAll("#sensor-views button")) {
  b.addEventListener("click", () => {
    showView(b.dataset.view);
    state.offset.sensors = 0;
    refresh();
  });
}

function stateCell(s) {
  if (s.state === "never_used") return el("span", "never used");
  if (!s.last_seen && !s.connected) return el("span", "never logged in", "trouble");
  if (s.silent) {
    const span = el("span", "silent since " + clock(s.silent_since) + " (" + ago(s.silent_since) + ")", "trouble");
    return span;
  }
  return el("span", s.role === "collector" ? "collector" : "publishing");
}

function troubleCell(s) {
  const t = s.trouble;
  if (!t) return "";
  const parts = [];
  if (t.refused) parts.push(`${t.refused} refused publishes, last ${ago(t.refused_at)}: ${t.refused_reason}`);
  if (t.failed_logins) parts.push(`${t.failed_logins} failed logins, last ${ago(t.failed_at)}: ${t.failed_reason}`);
  if (t.cuts) parts.push(`cut ${t.cuts} times as a slow consumer, last ${ago(t.cut_at)}: ${t.cut_reason}`);
  return el("span", parts.join("; "), "trouble");
}

// What a collector gets: messages per second, the live backlog, a durable key's stored one.
function deliveryCell(s) {
  if (s.role !== "collector" && !s.durable && !s.delivered_messages_per_s) return "";
  const parts = [];
  if (s.connected) parts.push(s.delivered_messages_per_s + " msgs/s, backlog " + size(s.backlog_bytes));
  if (s.cut_fraction >= 0.01) parts.push(Math.round(s.cut_fraction * 100) + " % toward the slow-consumer cut");
  const stored = durableText(s.durable);
  if (stored) parts.push("durable, " + stored);
  const bad = durableTrouble(s.durable) || s.cut_fraction >= 0.5;
  return el("span", parts.join("; "), bad ? "trouble" : null);
}

async function sensors() {
  arrows("sensors");
  const data = await api(
    "/api/v1/sensors?" +
      query({
        ...SENSOR_VIEWS[state.view],
        ...page("sensors"),
        sort: sortParam("sensors"),
        silent_after: Number(silentInput.value || 15) * 60,
        q: $("sensors-filter").value,
      })
  );
  $("sensors-count").textContent = `${data.total} shown, ${data.silent} silent`;
  pager("sensors", data.sensors.length, data.total, data.offset);
  fill(
    "sensors-table",
    data.sensors.map((s) => {
      const chans = Object.keys(s.channels)
        .map((c) => c + " (" + ago(s.channels[c].last_publish) + ")")
        .join(", ");
      const spark = s.state === "never_used" ? "" : chart("ident", s.ident, 60);
      const tr = row([
        nameLink("ident", s.ident),
        s.owner,
        stateCell(s),
        s.connected,
        ago(s.last_seen),
        ago(s.last_publish),
        s.last_5m,
        s.last_1h,
        spark,
        troubleCell(s),
        deliveryCell(s),
        chans,
      ]);
      if (s.silent || durableTrouble(s.durable) || s.cut_fraction >= 0.5) tr.classList.add("silent");
      else if (s.durable && !s.durable.consuming && s.durable.backlog_messages) tr.classList.add("behind");
      if (s.state === "never_used") tr.classList.add("never");
      tr.dataset.ident = s.ident;
      return tr;
    })
  );
}

// --- connections ----------------------------------------------------------------------

async function connections() {
  arrows("connections");
  const data = await api(
    "/api/v1/connections?" +
      query({ q: $("connections-filter").value, sort: sortParam("connections"), ...page("connections") })
  );
  $("connections-count").textContent = `${data.total} connections`;
  pager("connections", data.connections.length, data.total, data.offset);
  fill(
    "connections-table",
    data.connections.map((c) => {
      const pubs = Object.keys(c.publish)
        .map((k) => k + ": " + c.publish[k].messages + " / " + c.publish[k].bytes)
        .join(", ");
      const kernel = c.kernel_queued_bytes === null ? "?" : c.kernel_queued_bytes;
      const cut = c.cut_fraction === null ? "" : Math.round(c.cut_fraction * 100) + " %";
      const cells = [
        c.peer,
        c.ident,
        c.owner,
        clock(c.since),
        c.tls ? "yes" : "no",
        list(c.subscriptions),
        pubs,
        `${c.backlog_bytes} (${c.queued_bytes} + ${kernel})` +
          (c.durable ? `; stored ${c.durable.backlog_messages} msgs (${size(c.durable.backlog_bytes)})` : ""),
        cut,
        `${c.delivered_messages_per_s} (${c.delivered_bytes_per_s} B/s)`,
      ];
      if (isAdmin()) {
        cells.push(
          confirmButton("Disconnect", async () => {
            const r = await act("/api/v1/connections/close", { id: c.id });
            if (r) message("Disconnected " + r.closed + (c.ident ? " (" + c.ident + ")" : ""), "ok");
          })
        );
      }
      const tr = row(cells);
      if (c.cut_fraction !== null && c.cut_fraction >= 0.5) tr.classList.add("silent");
      tr.dataset.ident = c.ident || "";
      return tr;
    })
  );
}

// --- channels -------------------------------------------------------------------------

async function channelsView() {
  const data = await api("/api/v1/channels?" + query({ q: $("channels-filter").value, ...page("channels") }));
  $("channels-count").textContent = `${data.total} channels`;
  pager("channels", data.channels.length, data.total, data.offset);
  fill(
    "channels-table",
    data.channels.map((c) => {
      const names = (side) => list(c[side]) + (c[side + "_total"] > c[side].length ? ` … (${c[side + "_total"]} in all)` : "");
      const cells = [
        nameLink("channel", c.channel),
        names("publishers"),
        names("subscribers"),
        c.last_5m,
        c.last_1h,
        c.rate_per_s,
        chart("channel", c.channel, 60),
      ];
      if (isAdmin()) {
        const b = el("button", "Watch");
        b.type = "button";
        b.addEventListener("click", () => startWatch(c.channel));
        cells.push(b);
      }
      const tr = row(cells);
      if (c.unheard) {
        tr.classList.add("unheard");
        tr.title = "published to, and nobody subscribes";
      }
      tr.dataset.channel = c.channel;
      return tr;
    })
  );
}

// --- keys -----------------------------------------------------------------------------

async function act(path, body) {
  try {
    const r = await api(path, body);
    refresh();
    return r;
  } catch (e) {
    message(e.message);
    return null;
  }
}

function snippets(target, deploy) {
  const parts = [];
  for (const [name, text] of Object.entries(deploy || {})) {
    parts.push(el("h4", name));
    parts.push(el("pre", text));
  }
  target.replaceChildren(...parts);
}

function showSecret(ident, secret, deploy) {
  $("secret-ident").replaceChildren(textOf(ident));
  $("secret-value").textContent = secret;
  snippets($("secret-deploy"), deploy);
  $("secret-box").showModal();
}

$("secret-dismiss").addEventListener("click", () => {
  $("secret-value").textContent = "";
  $("secret-deploy").replaceChildren();
  $("secret-box").close();
});

$("deploy-dismiss").addEventListener("click", () => $("deploy-box").close());

async function showDeploy(ident) {
  try {
    const r = await api("/api/v1/keys/deploy?" + query({ ident }));
    $("deploy-ident").replaceChildren(textOf(ident));
    snippets($("deploy-snippets"), r.deploy);
    $("deploy-box").showModal();
  } catch (e) {
    message(e.message);
  }
}

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
      message("Key " + r.key.ident + " added", "ok");
      showSecret(r.key.ident, r.secret, r.deploy);
      createForm.reset();
    }
  });
}

const channelsForm = $("key-channels-form");
if (channelsForm) {
  channelsForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const verb = ev.submitter && ev.submitter.value === "revoke" ? "revoke" : "grant";
    const pub = channels($("chg-pub").value);
    const sub = channels($("chg-sub").value);
    const r = await act("/api/v1/keys/" + verb, { ident: $("chg-ident").value, pubchans: pub, subchans: sub });
    if (r) {
      const what = [pub.length ? "publish " + pub.join(", ") : "", sub.length ? "subscribe " + sub.join(", ") : ""];
      message(
        (verb === "grant" ? "Granted " : "Revoked ") + what.filter((x) => x).join("; ") + " for " + r.key.ident,
        "ok"
      );
    }
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
  const data = await api("/api/v1/keys?" + query({ q: $("keys-filter").value, ...page("keys") }));
  $("keys-count").textContent = `${data.total} keys`;
  pager("keys", data.keys.length, data.total, data.offset);
  fill(
    "keys-table",
    data.keys.map((k) => {
      const span = el("span");
      if (isAdmin()) {
        const dep = el("button", "Deploy");
        dep.type = "button";
        dep.addEventListener("click", () => showDeploy(k.ident));
        span.appendChild(dep);
      }
      if (isAdmin() && data.writable) {
        span.appendChild(
          confirmButton("Rotate", async () => {
            const r = await act("/api/v1/keys/rotate", { ident: k.ident });
            if (r) showSecret(k.ident, r.secret, r.deploy);
          })
        );
        span.appendChild(
          confirmButton("Remove", async () => {
            const r = await act("/api/v1/keys/remove", { ident: k.ident });
            if (r) message("Key " + r.removed + " removed", "ok");
          })
        );
      }
      const stored = k.durable ? el("span", "yes" + (k.durable_state ? "; " + durableText(k.durable_state) : ""),
        durableTrouble(k.durable_state) ? "trouble" : null) : "no";
      const tr = row([k.ident, k.owner, list(k.pubchans), list(k.subchans), stored, span]);
      if (durableTrouble(k.durable_state)) tr.classList.add("silent");
      else if (k.durable_state && !k.durable_state.consuming && k.durable_state.backlog_messages) tr.classList.add("behind");
      tr.dataset.ident = k.ident;
      return tr;
    })
  );
}

// --- events ---------------------------------------------------------------------------

$("events-kind").addEventListener("change", () => {
  state.offset.events = 0;
  refresh();
});

async function events() {
  const kind = $("events-kind").value;
  const data = await api("/api/v1/events?" + query({ kind, q: $("events-filter").value, ...page("events") }));
  const select = $("events-kind");
  if (select.options.length === 1) {
    for (const k of data.kinds) {
      const o = document.createElement("option");
      o.value = k;
      o.textContent = k;
      select.appendChild(o);
    }
  }
  $("events-count").textContent = `${data.total} events`;
  pager("events", data.events.length, data.total, data.offset);
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
