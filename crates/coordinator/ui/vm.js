// A VM's page: its record followed live (the API's long poll), its actions, its serial console
// (xterm.js over /api/v1/vms/{id}/console/ws: raw bytes both ways) and its graphical console
// (noVNC over /api/v1/vms/{id}/vnc/ws: the raw RFB stream of its VNC display).
import { Terminal } from "./vendor/xterm/xterm.mjs";
import RFB from "./vendor/novnc/core/rfb.js";
import { h, api, showError, stateBadge, vmImage, vmAddress, mib, ago, vmAction, session } from "./lib.js";

const wsUrl = (id, stream) => `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/vms/${encodeURIComponent(id)}/${stream}/ws`;

/// What the page holds open; closed when the user leaves it.
let open = { alive: false, term: null, ws: null, rfb: null };

/// Closes the page's consoles and stops following its VM.
export function closeAll() {
  open.alive = false;
  if (open.ws) open.ws.close();
  if (open.rfb) open.rfb.disconnect();
  if (open.term) open.term.dispose();
  open = { alive: false, term: null, ws: null, rfb: null };
}
window.addEventListener("hashchange", closeAll);

export async function vmPage(main, key) {
  closeAll();
  const mine = { alive: true, term: null, ws: null, rfb: null };
  open = mine;
  let v;
  try {
    v = await api("GET", `/api/v1/vms/${encodeURIComponent(key)}`);
  } catch (e) {
    main.replaceChildren(h("h1", {}, `VM ${key}`), h("p", { id: "vm-refused", class: "error" }, e.message));
    showError(e);
    return;
  }
  const head = h("div", { id: "vm-head" });
  const facts = h("dl", { id: "vm-facts", class: "facts" });
  const actions = h("div", { id: "vm-actions", class: "actions" });
  const termBox = h("div", { id: "terminal" });
  const consoleStatus = h("span", { id: "console-status", class: "muted" }, "not connected");
  const vncBox = h("div", { id: "vnc" });
  const vncStatus = h("span", { id: "vnc-status", class: "muted" }, "not connected");
  const vncButton = h("button", { id: "vnc-connect", type: "button", onclick: () => connectVnc(mine, v, vncBox, vncStatus) }, "Connect");
  main.append(
    head,
    actions,
    h("h2", {}, "Details"),
    facts,
    h("div", { class: "consoles" },
      h("section", {}, h("h2", {}, "Serial console"), h("div", { class: "bar" }, consoleStatus), termBox),
      h("section", {}, h("h2", {}, "Graphical console"), h("div", { class: "bar" }, vncButton, vncStatus), vncBox)),
  );
  const render = (rec) => {
    v = rec;
    head.replaceChildren(h("h1", {}, `VM ${v.name} `, stateBadge(v.state), " ", h("span", { id: "vm-phase", class: "muted" }, v.phase || "")));
    facts.replaceChildren(...details(v));
    actions.replaceChildren(...actionButtons(v, render));
    if (v.state === "running" && !mine.ws) connectConsole(mine, v, termBox, consoleStatus);
  };
  render(v);
  follow(mine, v, render);
}

function details(v) {
  const row = (k, val) => [h("dt", {}, k), h("dd", {}, val)];
  const m = v.migration;
  return [
    row("ID", h("span", { class: "mono" }, v.id)),
    row("Owner", v.owner),
    row("Image", h("span", { class: "mono" }, vmImage(v))),
    row("Host", v.host || ""),
    row("Address", h("span", { class: "mono" }, vmAddress(v))),
    row("CPUs / memory", `${v.config.cpus} / ${mib(v.config.memory_mib)}`),
    row("Accelerator", v.accel || ""),
    row("Created", ago(v.created)),
    row("In this state since", ago(v.state_since)),
    v.reason ? row("Reason", h("span", { class: "error" }, v.reason)) : [],
    v.saved_image ? row("Saved image", h("span", { class: "mono" }, v.saved_image)) : [],
    m ? row("Migration", `${m.from} → ${m.to}: ${m.status}${m.phase ? " (" + m.phase + ")" : ""}${m.downtime_ms != null ? `, downtime ${m.downtime_ms} ms` : ""}`) : [],
  ].flat();
}

function actionButtons(v, render) {
  const run = async (what, body) => {
    const r = await vmAction(v, what, body);
    if (r && r.id === v.id) render(r);
    if (r && what === "rm") location.hash = "#/vms";
  };
  const b = (label, what, f, cls) => h("button", { type: "button", class: cls, "data-action": what, onclick: f }, label);
  const running = v.state === "running";
  const out = [];
  if (running) {
    out.push(b("Stop", "stop", () => run("stop")));
    out.push(b("Force stop", "force-stop", () => run("stop", { force: true }), "danger"));
    out.push(b("Suspend", "suspend", () => run("suspend")));
    const to = h("input", { id: "migrate-to", placeholder: "any host", size: 10 });
    out.push(h("span", { class: "actions" }, b("Migrate", "migrate", () => run("migrate", to.value.trim() ? { to: to.value.trim() } : {})), to));
    const snap = h("input", { id: "snapshot-name", placeholder: "image name", size: 12 });
    out.push(h("span", { class: "actions" }, b("Snapshot", "snapshot", () => {
      if (!snap.value.trim()) return showError(new Error("give the snapshot an image name"));
      run("snapshot", { name: snap.value.trim() }).then(() => showError(null));
    }), snap));
  }
  if (v.state === "suspended") {
    const host = h("input", { id: "resume-host", placeholder: "any host", size: 10 });
    out.push(h("span", { class: "actions" }, b("Resume", "resume", () => run("resume", host.value.trim() ? { host: host.value.trim() } : {})), host));
  }
  out.push(b("Remove", "rm", () => run("rm"), "danger"));
  return out;
}

/// Follows the record with the API's long poll: an answer as soon as state or phase change.
async function follow(mine, v, render) {
  let seen = v;
  while (mine.alive && session.user) {
    try {
      const q = `wait_ms=25000&state=${encodeURIComponent(seen.state)}&phase=${encodeURIComponent(seen.phase || "")}`;
      const r = await api("GET", `/api/v1/vms/${encodeURIComponent(seen.id)}?${q}`);
      if (!mine.alive) return;
      if (r.state !== seen.state || r.phase !== seen.phase || r.host !== seen.host) render(r);
      seen = r;
    } catch (e) {
      if (!mine.alive) return;
      showError(e);
      if (e.status === 404 || e.status === 401 || e.status === 403) return;
      await new Promise((ok) => setTimeout(ok, 3000));
    }
  }
}

async function connectConsole(mine, v, box, status) {
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, rows: 24, cols: 100, scrollback: 5000 });
  mine.term = term;
  box.replaceChildren();
  term.open(box);
  // What the console printed before: the tail of its log.
  try {
    const tail = await api("GET", `/api/v1/vms/${encodeURIComponent(v.id)}/console?offset=-8192`);
    if (tail && tail.data) term.write(tail.data.replace(/\r?\n/g, "\r\n"));
  } catch (_) {
    // The live stream still works.
  }
  if (!mine.alive) return;
  const ws = new WebSocket(wsUrl(v.id, "console"));
  ws.binaryType = "arraybuffer";
  mine.ws = ws;
  const enc = new TextEncoder();
  ws.onopen = () => {
    status.textContent = "connected";
    status.dataset.state = "connected";
    term.focus();
  };
  ws.onmessage = (m) => term.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
  ws.onclose = () => {
    status.textContent = "disconnected";
    status.dataset.state = "closed";
    if (mine.ws === ws) mine.ws = null;
  };
  term.onData((d) => ws.readyState === WebSocket.OPEN && ws.send(enc.encode(d)));
}

function connectVnc(mine, v, box, status) {
  if (mine.rfb) mine.rfb.disconnect();
  box.replaceChildren();
  status.textContent = "connecting…";
  status.dataset.state = "connecting";
  const rfb = new RFB(box, wsUrl(v.id, "vnc"));
  mine.rfb = rfb;
  rfb.scaleViewport = false;
  rfb.resizeSession = false;
  rfb.addEventListener("connect", () => {
    status.textContent = "connected";
    status.dataset.state = "connected";
  });
  rfb.addEventListener("disconnect", (e) => {
    status.textContent = e.detail.clean ? "disconnected" : "connection failed";
    status.dataset.state = "closed";
    if (mine.rfb === rfb) mine.rfb = null;
  });
  rfb.addEventListener("securityfailure", (e) => {
    status.textContent = `refused: ${e.detail.reason || e.detail.status}`;
  });
}
