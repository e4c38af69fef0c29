// Wave's "Integrations → Microsoft Dynamics 365" page. It talks only to Wave's own backend
// (/integrations/dynamics365/<account>/api/...), which forwards to the integration's public
// connections API server-side with the function key: the browser never sees a key or a token.
// Every call needs the user's Wave session (an HttpOnly cookie); after Microsoft sign-in the browser comes
// back with ?dynamics=confirm&completion=..., and the page asks Wave to confirm that sign-in for its user.
"use strict";

const account = location.pathname.split("/").filter(Boolean)[2] || "";
const api = `/integrations/dynamics365/${encodeURIComponent(account)}/api`;
const $ = (id) => document.getElementById(id);
let lastStatus = null;

function banner(kind, text) {
  const el = $("banner");
  el.className = `banner ${kind}`;
  el.textContent = text;
  el.hidden = !text;
}

async function call(method, path, body) {
  const res = await fetch(api + path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  let data = {};
  try { data = await res.json(); } catch (e) { data = {}; }
  if (!res.ok) {
    const err = data.error || {};
    const code = typeof err === "string" ? err : (err.code || `HTTP ${res.status}`);
    const message = data.message || err.message || "";
    const error = new Error(message ? `${code}: ${message}` : code);
    error.code = code;
    throw error;
  }
  return data;
}

function signInPrompt(what) {
  const el = $("banner");
  el.className = "banner error";
  el.hidden = false;
  const link = document.createElement("a");
  link.id = "sign-in-link";
  link.href = `/integrations/login?next=${encodeURIComponent(location.pathname)}`;
  link.textContent = "Sign in to Wave";
  el.replaceChildren(link, document.createTextNode(` ${what}`));
  $("connect").disabled = true;
}

function text(id, value) { $(id).textContent = value === null || value === undefined || value === "" ? "–" : value; }

function render(s) {
  const state = s.state || "not_connected";
  $("state").textContent = state.replace("_", " ");
  $("state").dataset.state = state;
  text("status-instance", s.instance_url);
  text("status-connected-by", s.connected_by);
  text("status-connected-at", s.connected_at);
  text("status-last-sync", s.last_sync_at);
  text("status-reason", s.reason ? `${s.reason.category}: ${s.reason.message}` : "");
  text("wave-user", s.wave_user);
  if (!lastStatus && s.state && s.state !== "not_connected") {  // the first answer fills the form once
    if (s.instance_url) $("instance-url").value = s.instance_url;
    $("auto-sync").checked = Boolean(s.auto_sync);
  }
  $("disconnect").hidden = !(state === "connected" || state === "needs_reauth");
  $("connect").textContent = state === "needs_reauth" || state === "disconnected" ? "Reconnect" : "Connect";
  $("connect").disabled = state === "connected";

  const b = s.backfill || {};
  const bstate = b.state || "idle";
  $("backfill-state").textContent = bstate;
  $("backfill-state").dataset.state = bstate;
  const total = s.wave_contacts_total;
  const done = b.contacts || 0;
  const bar = $("backfill-progress");
  if (bstate === "done") { bar.max = 100; bar.value = 100; }
  else if (total) { bar.max = total; bar.value = Math.min(done, total); }
  else if (bstate === "running") { bar.removeAttribute("value"); }
  else { bar.max = 100; bar.value = 0; }
  const of = total ? ` of ${total}` : "";
  $("backfill-text").textContent = bstate === "idle" ? "Not started"
    : `${done}${of} contacts in ${b.pages || 0} page${b.pages === 1 ? "" : "s"}` + (b.finished_at ? `, finished ${b.finished_at}` : "");

  const c = s.counters || {};
  for (const k of ["synced", "deleted", "failed", "skipped"]) $(`count-${k}`).textContent = c[k] || 0;

  const failures = s.failures || [];
  const body = $("failures").tBodies[0];
  body.replaceChildren();
  if (!failures.length) {
    const tr = body.insertRow(); tr.className = "empty";
    const td = tr.insertCell(); td.colSpan = 4; td.textContent = "None";
  }
  for (const f of failures) {
    const tr = body.insertRow();
    for (const v of [f.contact_id, f.category, f.reason, f.last_attempt_at]) {
      tr.insertCell().textContent = v === undefined || v === null ? "" : v;
    }
  }
  lastStatus = s;
}

async function refresh() {
  try {
    render(await call("GET", "/status"));
  } catch (e) {
    if (e.code === "not_signed_in") { if ($("banner").hidden) signInPrompt("to manage this integration."); }
    else if (!lastStatus) banner("error", `Could not load the status: ${e.message}`);
  }
}

async function confirmSignIn(completion) {
  try {
    const s = await call("POST", "/confirm", { completion });
    banner("ok", `Connected Wave account ${account} to ${s.instance_url} as ${s.connected_by}.`);
  } catch (e) {
    if (e.code === "not_signed_in") signInPrompt("and connect again: a connection is only confirmed for the Wave user who started it.");
    else banner("error", `The connection was not confirmed: ${e.message}`);
  }
}

$("connect").addEventListener("click", async () => {
  $("connect").disabled = true;
  banner("", "");
  try {
    const res = await call("POST", "/connect", {
      instance_url: $("instance-url").value.trim(),
      auto_sync: $("auto-sync").checked,
    });
    location.assign(res.authorize_url); // Microsoft sign-in, then back here via the callback
  } catch (e) {
    banner("error", `Could not connect: ${e.message}`);
    $("connect").disabled = false;
  }
});

$("disconnect").addEventListener("click", async () => {
  $("disconnect").disabled = true;
  try {
    await call("POST", "/disconnect");
    banner("ok", "Disconnected. Contacts already in Dynamics 365 stay there.");
  } catch (e) {
    banner("error", `Could not disconnect: ${e.message}`);
  } finally {
    $("disconnect").disabled = false;
    refresh();
  }
});

(async function init() {
  const params = new URLSearchParams(location.search);
  const outcome = params.get("dynamics");
  if (params.has("completion")) history.replaceState(null, "", location.pathname); // a one-time code: off the URL
  if (outcome === "confirm" && params.get("completion")) await confirmSignIn(params.get("completion"));
  else if (outcome === "error") banner("error", `Connection failed: ${params.get("reason") || "unknown reason"}`);
  refresh();
  setInterval(refresh, 1000);
})();
