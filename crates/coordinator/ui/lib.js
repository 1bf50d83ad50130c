// The dashboard's shared parts (no page of its own): elements, the REST API with the session
// cookie, errors, formatting, the session and the page timer, VM actions. The pages (app.js,
// vm.js) import from here; this imports no page.

export const $ = (sel, root = document) => root.querySelector(sel);

/// h("tag", {attr: value, onclick: fn}, child, ...): an element (text children are escaped).
export function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/// An API error: the server's message and status, shown as the CLI shows them.
export class ApiError extends Error {
  constructor(status, message) {
    super(`${message} (HTTP ${status})`);
    this.status = status;
  }
}

/// What to do when a call finds the session ended (the page shows its login form).
let sessionEnded = () => {};
export function onSessionEnd(f) {
  sessionEnded = f;
}

/// Calls the REST API; JSON in and out. A 401 of a signed-in session calls `onSessionEnd`'s hook.
export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!r.ok) {
    const err = new ApiError(r.status, (data && data.error) || text || r.statusText);
    // A session that ended (expired, revoked, the user removed): back to the login page.
    if (r.status === 401 && session.user && !path.startsWith("/api/v1/auth/")) sessionEnded(`Your session ended: ${err.message}`);
    throw err;
  }
  return data;
}

export function showError(e) {
  const box = $("#error");
  // Refusals because the session ended lead to the login page, which says so.
  if (e && e.status === 401 && !session.user) return;
  if (!e) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = e.message || String(e);
  box.hidden = false;
}

// ---- formatting ----
export function mib(n) {
  return n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)} GiB` : `${n} MiB`;
}
export function bytes(n) {
  if (n === undefined || n === null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${u[i]}`;
}
export function ago(secs) {
  if (!secs) return "";
  const d = Math.max(0, Date.now() / 1000 - secs);
  if (d < 90) return `${Math.round(d)} s ago`;
  if (d < 5400) return `${Math.round(d / 60)} min ago`;
  if (d < 172800) return `${Math.round(d / 3600)} h ago`;
  return `${Math.round(d / 86400)} d ago`;
}
export function stateBadge(s) {
  return h("span", { class: `state state-${s}`, "data-state": s }, s);
}
/// A VM's image (`NAME@VERSION`), whichever way the record spells it.
export function vmImage(v) {
  const i = v.config && v.config.boot && v.config.boot.image;
  if (!i) return "";
  return typeof i === "string" ? i : `${i.name}${i.version ? "@" + i.version : ""}`;
}
/// A VM's network addresses: site addresses, else its interfaces' kinds.
export function vmAddress(v) {
  const nics = (v.config && v.config.net && v.config.net.nics) || [];
  return nics
    .map((n) => n.address || (n.mode === "user" ? "user-mode" : `${n.mode}:${n.network || ""}`))
    .join(", ");
}

// ---- session ----
export const session = { user: null, admin: false };
let timer = null;
/// Runs `f` now and every `ms` while the page stays the same (replaced at each navigation).
export function every(ms, f) {
  clearInterval(timer);
  f();
  timer = setInterval(f, ms);
}
export function stopTimers() {
  clearInterval(timer);
  timer = null;
}

/// Runs a lifecycle action on VM `v`; refusals are shown as the API words them.
export async function vmAction(v, what, body) {
  showError(null);
  try {
    if (what === "rm") {
      if (!confirm(`Remove VM ${v.name}? Its disk and saved state are deleted.`)) return null;
      return await api("DELETE", `/api/v1/vms/${encodeURIComponent(v.id)}?force=true`);
    }
    return await api("POST", `/api/v1/vms/${encodeURIComponent(v.id)}/${what}`, body || {});
  } catch (e) {
    showError(e);
    return null;
  }
}
