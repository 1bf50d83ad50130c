// The vgrid dashboard: plain ES modules, no build step. Every figure comes from the REST API
// (/api/v1) with the session cookie; the API decides what the user may see and do.
import { vmPage, closeAll } from "./vm.js";
import { $, h, api, showError, mib, bytes, ago, stateBadge, vmImage, vmAddress, session, every, stopTimers, vmAction, onSessionEnd } from "./lib.js";

function showLogin(why) {
  stopTimers();
  closeAll();
  session.user = null;
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  const token = h("textarea", { id: "token", rows: 3, placeholder: "vgt_…", autocomplete: "off", spellcheck: "false" });
  const err = h("p", { id: "login-error", class: "muted" }, why || "");
  const form = h(
    "form",
    { id: "login-form", class: "login", onsubmit: (e) => (e.preventDefault(), login(token.value, err)) },
    h("h1", {}, "Log in to vgrid"),
    h("p", {}, "Make a token for this browser with your key, as the CLI logs in, and paste it here:"),
    h("pre", {}, h("code", {}, "vgrid login --print-token")),
    token,
    h("p", {}, h("button", { id: "login-button", class: "primary", type: "submit" }, "Log in")),
    h("p", { class: "muted" }, "The token becomes an HttpOnly session cookie of this page; logging out ends it."),
    err,
  );
  $("#main").replaceChildren(form);
  showError(null);
}

async function login(token, err) {
  try {
    await api("POST", "/api/v1/auth/session", { token: token.trim() });
    location.hash = "#/vms";
    await start();
  } catch (e) {
    err.textContent = e.message;
    err.className = "error";
  }
}

async function logout() {
  try {
    await api("POST", "/api/v1/auth/logout", {});
  } catch (_) {
    // The cookie is cleared by the answer; a failure leaves nothing to do but log in again.
  }
  showLogin("Logged out.");
}

async function start() {
  let me;
  try {
    me = await api("GET", "/api/v1/whoami");
  } catch (e) {
    showLogin(e.status === 401 ? "" : e.message);
    return;
  }
  session.user = me.name;
  session.admin = me.admin;
  $("#who").textContent = `${me.name}${me.admin ? " (admin)" : ""}`;
  $("#who").dataset.user = me.name;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  route();
}

// ---- pages ----
function route() {
  if (!session.user) return;
  stopTimers();
  showError(null);
  const [page, arg] = location.hash.replace(/^#\/?/, "").split("/");
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === (page || "vms"));
  const main = $("#main");
  main.replaceChildren();
  if (page === "hosts") hostsPage(main);
  else if (page === "images") imagesPage(main);
  else if (page === "vm" && arg) vmPage(main, decodeURIComponent(arg));
  else vmsPage(main);
}

function vmsPage(main) {
  const tbody = h("tbody");
  const table = h(
    "table",
    { id: "vms" },
    h("thead", {}, h("tr", {}, ["Name", "State", "Phase", "Owner", "Host", "Address", "Image", "CPUs", "Memory", "CPU time", ""].map((t) => h("th", {}, t)))),
    tbody,
  );
  main.append(h("h1", {}, "Virtual machines"), runForm(), table);
  every(2000, async () => {
    try {
      const [vms, usage] = await Promise.all([api("GET", "/api/v1/vms"), api("GET", "/api/v1/usage").catch(() => ({ vms: [] }))]);
      const used = new Map((usage.vms || []).map((u) => [u.vm, u.usage]));
      vms.sort((a, b) => b.created - a.created);
      tbody.replaceChildren(...vms.map((v) => vmRow(v, used.get(v.id))));
      if (!vms.length) tbody.append(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No VMs yet: run one above.")));
    } catch (e) {
      showError(e);
    }
  });
}

function vmRow(v, usage) {
  const act = (label, f, cls) => h("button", { type: "button", class: cls, "data-action": label.toLowerCase(), onclick: f }, label);
  const running = v.state === "running";
  return h(
    "tr",
    { "data-vm": v.name, "data-id": v.id },
    h("td", {}, h("a", { href: `#/vm/${encodeURIComponent(v.id)}` }, v.name)),
    h("td", {}, stateBadge(v.state)),
    h("td", { class: "muted" }, v.phase || "", v.reason ? h("div", { class: "error" }, v.reason) : null),
    h("td", {}, v.owner),
    h("td", {}, v.host || ""),
    h("td", { class: "mono" }, vmAddress(v)),
    h("td", { class: "mono" }, vmImage(v)),
    h("td", { class: "num" }, v.config.cpus),
    h("td", { class: "num" }, mib(v.config.memory_mib)),
    h("td", { class: "num" }, usage ? `${usage.cpu_seconds.toFixed(1)} s` : ""),
    h(
      "td",
      { class: "actions" },
      running ? act("Stop", () => vmAction(v, "stop")) : null,
      running ? act("Suspend", () => vmAction(v, "suspend")) : null,
      v.state === "suspended" ? act("Resume", () => vmAction(v, "resume")) : null,
      act("Remove", () => vmAction(v, "rm"), "danger"),
    ),
  );
}

function runForm() {
  const field = (label, input) => h("label", {}, label, input);
  const image = h("input", { id: "run-image", name: "image", list: "run-images", required: true, placeholder: "sample" });
  const images = h("datalist", { id: "run-images" });
  api("GET", "/api/v1/images")
    .then((l) => images.replaceChildren(...[...new Set(l.map((i) => i.name))].map((n) => h("option", { value: n }))))
    .catch(() => {});
  const name = h("input", { id: "run-name", name: "name", placeholder: "(generated)" });
  const cpus = h("input", { id: "run-cpus", name: "cpus", type: "number", min: 1, value: 1 });
  const memory = h("input", { id: "run-memory", name: "memory", type: "number", min: 16, value: 256 });
  const require = h("input", { id: "run-require", name: "require", size: 28, placeholder: 'e.g. host.accel == "kvm"' });
  const submit = async (e) => {
    e.preventDefault();
    showError(null);
    const req = { image: image.value.trim(), cpus: Number(cpus.value), memory_mib: Number(memory.value) };
    if (name.value.trim()) req.name = name.value.trim();
    if (require.value.trim()) req.require = require.value.trim();
    try {
      const v = await api("POST", "/api/v1/vms", req);
      $("#notice").textContent = `VM ${v.name} created: ${v.state}${v.phase ? " (" + v.phase + ")" : ""}`;
    } catch (err) {
      showError(err);
    }
  };
  return h(
    "div",
    {},
    h(
      "form",
      { id: "run-form", class: "inline", onsubmit: submit },
      field("Image", image),
      images,
      field("Name", name),
      field("CPUs", cpus),
      field("Memory (MiB)", memory),
      field("Requirement (CEL)", require),
      h("button", { id: "run-button", class: "primary", type: "submit" }, "Run"),
    ),
    h("div", { id: "notice" }),
  );
}

function hostsPage(main) {
  const tbody = h("tbody");
  main.append(
    h("h1", {}, "Hosts"),
    h(
      "table",
      { id: "hosts" },
      h("thead", {}, h("tr", {}, ["Name", "State", "CPUs free / total", "Memory free / total", "Load now / predicted / 1-min", "VMs", "Accel", "Cached images", "Last seen"].map((t) => h("th", {}, t)))),
      tbody,
    ),
  );
  every(3000, async () => {
    try {
      const hosts = await api("GET", "/api/v1/hosts");
      tbody.replaceChildren(...hosts.map(hostRow));
      if (!hosts.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No host has registered.")));
    } catch (e) {
      showError(e);
    }
  });
}

function hostRow(r) {
  const a = r.ad;
  const cache = Object.entries(a.image_cache || {}).map(([img, f]) => h("div", { class: "cache mono" }, `${img} ${(f * 100).toFixed(0)}%`));
  return h(
    "tr",
    { "data-host": a.name },
    h("td", {}, a.name, h("div", { class: "muted mono" }, a.url)),
    h("td", {}, stateBadge(r.state), r.draining ? h("div", { class: "muted" }, "draining") : null),
    h("td", { class: "num" }, `${a.free_cpus} / ${a.cpus}`),
    h("td", { class: "num" }, `${mib(a.free_memory_mib)} / ${mib(a.memory_mib)}`),
    h("td", { class: "num" }, `${a.load_now.toFixed(2)} / ${a.load_predicted.toFixed(2)} / ${a.load_avg.toFixed(2)}`),
    h("td", { class: "num" }, a.running_vms),
    h("td", {}, a.accel),
    h("td", {}, cache.length ? cache : h("span", { class: "muted" }, "none")),
    h("td", { class: "muted" }, `${r.last_seen_secs.toFixed(1)} s`),
  );
}

function imagesPage(main) {
  const tbody = h("tbody");
  main.append(
    h("h1", {}, "Images"),
    h(
      "table",
      { id: "images" },
      h("thead", {}, h("tr", {}, ["Image", "Size", "Stored", "Boot", "Warm", "Owner", "Public", "Created", "Image servers"].map((t) => h("th", {}, t)))),
      tbody,
    ),
  );
  every(5000, async () => {
    try {
      const images = await api("GET", "/api/v1/images");
      tbody.replaceChildren(
        ...images.map((i) =>
          h(
            "tr",
            { "data-image": `${i.name}@${i.version}` },
            h("td", { class: "mono" }, `${i.name}@${i.version}`, i.parent ? h("div", { class: "muted" }, `from ${i.parent}`) : null),
            h("td", { class: "num" }, bytes(i.size)),
            h("td", { class: "num" }, bytes(i.stored_bytes)),
            h("td", {}, i.boot),
            h("td", {}, i.warm ? "warm" : ""),
            h("td", {}, i.owner || h("span", { class: "muted" }, "admins")),
            h("td", {}, i.public ? "public" : ""),
            h("td", { class: "muted" }, ago(i.created)),
            h("td", {}, i.servers.join(", ")),
          ),
        ),
      );
      if (!images.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No image you may run.")));
    } catch (e) {
      showError(e);
    }
  });
}

onSessionEnd(showLogin);
window.addEventListener("hashchange", route);
// A module runs once the document is parsed (DOMContentLoaded may have passed already).
$("#logout").addEventListener("click", logout);
start();
