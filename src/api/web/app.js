// The web view of opamp-gitops: reads the JSON API (docs/api.md), follows it
// with long polls (?after=N) and renders plain DOM. No build step.
"use strict";

const TOKEN_KEY = "opamp-gitops.token";
const STATES = ["in_sync", "pending", "applying", "failed", "drifted", "unmanaged", "unsupported", "offline"];
const PER_PAGE = 50;

const app = {
  token: sessionStorage.getItem(TOKEN_KEY),
  readOnly: false,
  view: null,
  groups: null, // the newest /api/v1/groups answer
};

// ---- small pure helpers ----------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const short = (id) => (id ? String(id).slice(0, 12) : "—");
const name = (author) => (author || "").split(" <")[0];

function duration(ms) {
  if (ms < 0) ms = 0;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${m % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

function ago(time) {
  if (!time) return "—";
  return `${duration(Date.now() - Date.parse(time))} ago`;
}

function when(time) {
  if (!time) return "—";
  return h("time", { datetime: time, title: time }, ago(time));
}

function phaseWord(phase) {
  return h("span", { class: `phase phase-${phase || "none"}` }, phase || "not planned");
}

function counts(agents) {
  const a = agents || {};
  return {
    targeted: a.targeted || 0,
    applied: a.applied || 0,
    applying: a.applying || 0,
    pending: a.pending || 0,
    failed: a.failed || 0,
    offline: a.offline || 0,
  };
}

function progress(group) {
  const c = counts(group.agents);
  const r = group.rollout || {};
  const total = Math.max(c.targeted, 1);
  const pct = (n) => `${((100 * n) / total).toFixed(2)}%`;
  const wave = r.waves ? `wave ${r.wave} of ${r.waves}` : "no waves";
  const text = `${wave}: ${c.applied} applied, ${c.applying} applying, ${c.pending} pending, ${c.failed} failed`;
  return h(
    "div",
    { class: "progress" },
    h(
      "div",
      { class: "bar", role: "img", "aria-label": text },
      h("span", { class: "applied", style: `width:${pct(c.applied)}` }),
      h("span", { class: "applying", style: `width:${pct(c.applying)}` }),
      h("span", { class: "failed", style: `width:${pct(c.failed)}` }),
    ),
    h("span", { class: "bar-text" }, text),
  );
}

function change(r) {
  if (!r || !r.commit) return "—";
  const ch = r.change;
  return h(
    "span",
    {},
    h("a", { href: `#/history/${r.commit}`, class: "mono" }, short(r.commit)),
    ch ? [" ", h("q", {}, ch.subject), " by ", name(ch.author), ", ", when(ch.time)] : "",
  );
}

function waveTimes(r) {
  if (!r) return "—";
  const parts = [];
  if (r.wave_opened && (r.phase === "progressing" || r.phase === "paused")) {
    parts.push(`in wave ${duration(Date.now() - Date.parse(r.wave_opened))}`);
  }
  if (r.bake_ends) parts.push(`bake left ${duration(Date.parse(r.bake_ends) - Date.now())}`);
  if (r.stalled) parts.push("stalled");
  return parts.length ? parts.join(", ") : "—";
}

function diffBlock(text) {
  if (!text) return h("p", {}, "No difference: the target is the stable config.");
  const lines = text.split("\n").map((line) => {
    const cls = line.startsWith("@@")
      ? "hunk"
      : line.startsWith("+") && !line.startsWith("+++")
        ? "add"
        : line.startsWith("-") && !line.startsWith("---")
          ? "del"
          : null;
    return [h("span", { class: cls }, line), "\n"];
  });
  return h("pre", { class: "diff", tabindex: "0", "aria-label": "diff from stable to target" }, lines);
}

function table(headers, rows, attrs) {
  return h(
    "table",
    { class: "stack", ...(attrs || {}) },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h(
      "tbody",
      {},
      rows.map((cells) => h("tr", {}, cells.map((c, i) => h("td", { "data-label": headers[i] }, c)))),
    ),
  );
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

// ---- the API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  if (app.token) headers.Authorization = `Bearer ${app.token}`;
  const response = await fetch(path, { ...(options || {}), headers });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) askToken(body && body.error);
  if (!response.ok) throw new ApiError(response.status, (body && body.error) || response.statusText);
  return body;
}

function askToken(why) {
  const form = document.getElementById("token-form");
  document.getElementById("token-why").textContent = why
    ? `${why}. Enter an API token.`
    : "This controller requires an API token.";
  form.hidden = false;
  document.getElementById("token").focus();
}

function setToken(token) {
  app.token = token || null;
  app.readOnly = false;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// ---- following the controller --------------------------------------------------

function live(text, down) {
  const el = document.getElementById("live");
  el.textContent = text;
  el.classList.toggle("down", !!down);
}

// Long-polls the groups (the driver's plans and the git source); every new
// answer refreshes the open view. At most one request in flight, at least
// half a second apart; after a failure (a restart) it retries with backoff.
async function follow() {
  let version = null;
  let backoff = 1000;
  for (;;) {
    const started = Date.now();
    try {
      const query = version === null ? "" : `?after=${version}&wait=25s`;
      const groups = await api(`/api/v1/groups${query}`);
      backoff = 1000;
      live("live: following the controller");
      if (groups.version !== version || version === null) {
        version = groups.version;
        app.groups = groups;
        await refresh();
      } else {
        app.groups = groups;
      }
    } catch (e) {
      live(e.status === 401 ? "an API token is needed" : "disconnected: retrying…", true);
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 10000);
      version = null;
      continue;
    }
    const spent = Date.now() - started;
    if (spent < 500) await sleep(500 - spent);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function refresh() {
  if (!app.view || !app.view.refresh) return;
  try {
    await app.view.refresh();
  } catch (e) {
    if (app.view.error) app.view.error(e);
  }
}

// ---- views --------------------------------------------------------------------

function errorNote(e) {
  return h("p", { class: "alert", role: "alert" }, `Could not load: ${e.message}`);
}

function overview(main) {
  const body = h("div", { id: "overview" });
  main.replaceChildren(h("h2", {}, "Fleet"), body);
  return {
    async refresh() {
      const g = app.groups || (await api("/api/v1/groups"));
      body.replaceChildren(...renderOverview(g));
    },
    error(e) {
      body.replaceChildren(errorNote(e));
    },
  };
}

function renderOverview(g) {
  const out = [];
  const src = g.source || {};
  const sourceFacts = [
    ["Commit in force", g.commit ? h("a", { href: `#/history/${g.commit}`, class: "mono" }, short(g.commit)) : "none loaded"],
    ["Newest commit", g.head ? h("span", { class: "mono" }, `${short(g.head)} (not in force)`) : "the commit in force"],
    ["Last fetch", when(src.last_fetch)],
    ["Last success", when(src.last_success)],
  ];
  if (src.error) sourceFacts.push(["Fetch error", src.error]);
  if (src.stale_since) sourceFacts.push(["Stale since", when(src.stale_since)]);
  out.push(h("section", { "aria-labelledby": "source-h" }, h("h3", { id: "source-h" }, "Git source"), facts(sourceFacts)));
  if (g.head && g.head_errors && g.head_errors.length) {
    out.push(
      h(
        "section",
        { class: "alert", role: "alert", id: "head-errors" },
        h("h3", {}, `The newest commit ${short(g.head)} is invalid and was not rolled out`),
        h("ul", {}, g.head_errors.map((e) => h("li", { class: "mono" }, e))),
      ),
    );
  }
  const byState = g.agents_by_state || {};
  out.push(
    h(
      "section",
      { "aria-labelledby": "agents-h" },
      h("h3", { id: "agents-h" }, "Agents"),
      h(
        "ul",
        { class: "counts", id: "state-counts" },
        STATES.map((s) =>
          h("li", { "data-state": s }, h("a", { href: `#/agents?state=${s}` }, `${s.replace("_", " ")}: ${byState[s] || 0}`)),
        ),
      ),
    ),
  );
  const rows = (g.groups || []).map((group) => {
    const r = group.rollout;
    return [
      h("a", { href: `#/groups/${encodeURIComponent(group.name)}` }, group.name),
      group.selector || "—",
      String(counts(group.agents).targeted),
      h("span", { class: "mono", title: group.config_hash }, short(group.config_hash)),
      phaseWord(r && r.phase),
      r ? progress(group) : "—",
      change(r),
      waveTimes(r),
    ];
  });
  out.push(
    h(
      "section",
      { "aria-labelledby": "groups-h" },
      h("h3", { id: "groups-h" }, "Groups"),
      rows.length
        ? table(["Group", "Selects", "Agents", "Config", "Phase", "Waves", "Commit", "Timing"], rows, { id: "groups" })
        : h("p", {}, "No groups."),
    ),
  );
  return out;
}

function groupView(main, groupName) {
  const status = h("div", { id: "group-status" });
  const message = h("p", { class: "message", role: "status", "aria-live": "polite" });
  const controls = h(
    "div",
    { class: "controls", id: "controls" },
    ["pause", "resume", "promote"].map((action) =>
      h("button", { type: "button", "data-action": action, onclick: () => control(action) }, action[0].toUpperCase() + action.slice(1)),
    ),
  );
  const diff = h("div", { id: "diff" });
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← Fleet")),
    h("h2", {}, `Group ${groupName}`),
    status,
    h("section", { "aria-labelledby": "controls-h" }, h("h3", { id: "controls-h" }, "Rollout controls"), controls, message),
    h("section", { "aria-labelledby": "diff-h" }, h("h3", { id: "diff-h" }, "Config: stable → target"), diff),
  );
  let diffHash = null;

  function showControls() {
    controls.hidden = app.readOnly;
    if (app.readOnly) message.textContent = "Read-only: this token may not change rollouts.";
  }

  async function control(action) {
    message.textContent = `${action}…`;
    try {
      await api(`/api/v1/groups/${encodeURIComponent(groupName)}/${action}`, { method: "POST" });
      message.textContent = `${action}: done`;
      app.groups = await api("/api/v1/groups");
      await view.refresh();
    } catch (e) {
      if (e.status === 403) {
        app.readOnly = true;
        showControls();
      } else {
        message.textContent = `${action} refused: ${e.message}`;
      }
    }
  }

  const view = {
    async refresh() {
      const all = app.groups || (await api("/api/v1/groups"));
      const group = (all.groups || []).find((g) => g.name === groupName);
      if (!group) {
        status.replaceChildren(h("p", { role: "alert" }, `No group ${groupName} at the commit in force.`));
        return;
      }
      status.replaceChildren(...renderGroup(group));
      showControls();
      if (group.config_hash !== diffHash) {
        diffHash = group.config_hash;
        const d = await api(`/api/v1/groups/${encodeURIComponent(groupName)}/diff`);
        diff.replaceChildren(
          facts([
            ["Stable", d.stable_hash ? h("span", { class: "mono" }, short(d.stable_hash)) : "none yet (first rollout)"],
            ["Target", h("span", { class: "mono" }, short(d.config_hash))],
          ]),
          diffBlock(d.diff),
        );
      }
    },
    error(e) {
      status.replaceChildren(errorNote(e));
    },
  };
  return view;
}

function renderGroup(group) {
  const r = group.rollout || {};
  const c = counts(group.agents);
  const out = [
    facts([
      ["Phase", h("span", { id: "phase" }, phaseWord(r.phase))],
      ["Selects", group.selector || "—"],
      ["Config", h("span", { class: "mono" }, group.config_hash)],
      ["Stable config", h("span", { class: "mono" }, group.stable_hash || "none yet")],
      ["Rolling out", change(r)],
      ["Started", when(r.started)],
      ["Finished", when(r.finished)],
      ["Timing", waveTimes(r)],
    ]),
    h("h3", {}, "Waves"),
    progress(group),
    table(
      ["Targeted", "Applied", "Applying", "Pending", "Failed", "Offline"],
      [[c.targeted, c.applied, c.applying, c.pending, c.failed, c.offline].map(String)],
      { id: "wave-counts" },
    ),
  ];
  const failures = r.failures || [];
  out.push(h("h3", {}, `Failures (${r.failed || 0})`));
  out.push(
    failures.length
      ? table(
          ["Agent", "Error", "When"],
          failures.map((f) => [h("a", { href: `#/agents/${f.agent}`, class: "mono" }, f.agent), f.error, when(f.at)]),
          { id: "failures" },
        )
      : h("p", {}, "None."),
  );
  if ((r.actions || []).length) {
    out.push(h("h3", {}, "Operator actions"));
    out.push(h("ul", {}, r.actions.map((a) => h("li", {}, `${a.action}${a.by ? ` by ${a.by}` : ""} `, when(a.at)))));
  }
  return out;
}

function agentsView(main, params) {
  const state = {
    group: params.get("group") || "",
    state: params.get("state") || "",
    q: params.get("q") || "",
    page: Number(params.get("page")) || 1,
  };
  const groupSelect = h("select", { id: "f-group", name: "group" });
  const stateSelect = h(
    "select",
    { id: "f-state", name: "state" },
    h("option", { value: "" }, "any"),
    STATES.map((s) => h("option", { value: s }, s)),
  );
  stateSelect.value = state.state;
  const search = h("input", { id: "f-q", name: "q", type: "search", value: state.q, placeholder: "uid or attribute" });
  const form = h(
    "form",
    { class: "filters", role: "search", onsubmit: (ev) => (ev.preventDefault(), apply()) },
    h("label", { for: "f-group" }, "Group", groupSelect),
    h("label", { for: "f-state" }, "State", stateSelect),
    h("label", { for: "f-q" }, "Search", search),
    h("button", { type: "submit" }, "Filter"),
  );
  const results = h("div", { id: "agents", "aria-live": "polite" });
  main.replaceChildren(h("h2", {}, "Agents"), form, results);

  function apply(page) {
    const q = new URLSearchParams();
    if (groupSelect.value) q.set("group", groupSelect.value);
    if (stateSelect.value) q.set("state", stateSelect.value);
    if (search.value.trim()) q.set("q", search.value.trim());
    if (page && page > 1) q.set("page", page);
    location.hash = `#/agents?${q}`;
  }
  groupSelect.addEventListener("change", () => apply());
  stateSelect.addEventListener("change", () => apply());

  return {
    async refresh() {
      const groups = (app.groups && app.groups.groups) || [];
      const options = [["", "any"], ...groups.map((g) => [g.name, g.name]), ["-", "no group"]];
      if (groupSelect.options.length !== options.length) {
        groupSelect.replaceChildren(...options.map(([v, t]) => h("option", { value: v }, t)));
        groupSelect.value = state.group;
      }
      const q = new URLSearchParams({ page: state.page, per_page: PER_PAGE });
      for (const k of ["group", "state", "q"]) if (state[k]) q.set(k, state[k]);
      const list = await api(`/api/v1/agents?${q}`);
      const pages = Math.max(1, Math.ceil(list.total / list.per_page));
      const rows = list.agents.map((a) => {
        const rc = a.remote_config_status;
        return [
          h("a", { href: `#/agents/${a.instance_uid}`, class: "mono" }, a.instance_uid),
          a.group || "—",
          h("span", { class: `state state-${a.state}` }, a.state),
          a.health ? (a.health.healthy ? "healthy" : "unhealthy") : "—",
          (rc && rc.error_message) || (a.health && a.health.last_error) || "",
          Object.entries({ ...a.identifying_attributes, ...a.non_identifying_attributes })
            .map(([k, v]) => `${k}=${v}`)
            .join(", "),
        ];
      });
      results.replaceChildren(
        h("p", { id: "agents-total" }, `${list.total} agents match; page ${list.page} of ${pages}.`),
        rows.length ? table(["Agent", "Group", "State", "Health", "Error", "Attributes"], rows, { id: "agent-table" }) : h("p", {}, "No agent matches."),
        h(
          "div",
          { class: "pager" },
          h("button", { type: "button", disabled: list.page <= 1, onclick: () => apply(list.page - 1) }, "← Previous"),
          h("button", { type: "button", disabled: list.page >= pages, onclick: () => apply(list.page + 1) }, "Next →"),
        ),
      );
    },
    error(e) {
      results.replaceChildren(errorNote(e));
    },
  };
}

function agentView(main, uid) {
  const body = h("div", { id: "agent" });
  main.replaceChildren(h("p", {}, h("a", { href: "#/agents" }, "← Agents")), h("h2", {}, `Agent ${uid}`), body);
  return {
    async refresh() {
      const a = await api(`/api/v1/agents/${encodeURIComponent(uid)}`);
      const rc = a.remote_config_status || {};
      const reported = rc.last_remote_config_hash;
      const attrs = (m) =>
        Object.keys(m || {}).length ? table(["Attribute", "Value"], Object.entries(m)) : h("p", {}, "None.");
      body.replaceChildren(
        facts([
          ["State", h("span", { id: "agent-state" }, a.state)],
          ["Group", a.group ? h("a", { href: `#/groups/${encodeURIComponent(a.group)}` }, a.group) : "none"],
          ["Connected", a.connected ? `yes, over ${a.transport}` : "no"],
          ["Last seen", when(a.last_seen)],
          ["Desired config", h("span", { class: "mono" }, a.desired_config_hash || "—")],
          ["Reported config", h("span", { class: "mono" }, reported || "—")],
          ["Config matches", a.desired_config_hash ? (reported === a.desired_config_hash ? "yes" : "no") : "—"],
          ["Config status", rc.status || "—"],
          ["Config error", rc.error_message || "—"],
          ["Health", a.health ? `${a.health.healthy ? "healthy" : "unhealthy"} ${a.health.status || ""}` : "not reported"],
          ["Health error", (a.health && a.health.last_error) || "—"],
          ["Identity", a.identity || "—"],
          ["Unsupported because", a.unsupported_reason || "—"],
        ]),
        h("h3", {}, "Capabilities"),
        h("ul", {}, (a.capabilities || []).map((c) => h("li", {}, c))),
        h("h3", {}, "Identifying attributes"),
        attrs(a.identifying_attributes),
        h("h3", {}, "Other attributes"),
        attrs(a.non_identifying_attributes),
        h("h3", {}, "Effective config"),
        Object.keys(a.effective_config || {}).length
          ? Object.entries(a.effective_config).map(([file, text]) => [
              h("h4", {}, file || "(the only file)"),
              h("pre", { tabindex: "0" }, text),
            ])
          : h("p", {}, "Not reported."),
      );
    },
    error(e) {
      body.replaceChildren(errorNote(e));
    },
  };
}

function outcome(note) {
  if (!note) return "not processed";
  if (!note.valid) return `invalid: ${(note.errors || []).join("; ")}`;
  const groups = Object.entries(note.groups || {});
  if (!groups.length) return "no groups";
  return h(
    "ul",
    {},
    groups.map(([g, n]) =>
      h("li", {}, `${g}: `, phaseWord(n.phase), ` wave ${n.wave}/${n.waves}, ${n.agents.applied}/${n.agents.targeted} applied, ${n.agents.failed} failed`),
    ),
  );
}

function historyView(main) {
  const body = h("div", { id: "history" });
  main.replaceChildren(h("h2", {}, "History"), body);
  return {
    async refresh() {
      const hist = await api("/api/v1/history?limit=30");
      body.replaceChildren(
        hist.commits.length
          ? table(
              ["Commit", "When", "Author", "Subject", "Outcome"],
              hist.commits.map((c) => [
                h("a", { href: `#/history/${c.commit}`, class: "mono" }, short(c.commit)),
                when(c.time),
                name(c.author),
                c.summary,
                c.note_error ? `unreadable note: ${c.note_error}` : outcome(c.note),
              ]),
              { id: "history-table" },
            )
          : h("p", {}, "No commits yet."),
      );
    },
    error(e) {
      body.replaceChildren(errorNote(e));
    },
  };
}

function commitView(main, id) {
  const body = h("div", { id: "commit" });
  main.replaceChildren(h("p", {}, h("a", { href: "#/history" }, "← History")), h("h2", {}, `Commit ${short(id)}`), body);
  return {
    async refresh() {
      const c = await api(`/api/v1/history/${encodeURIComponent(id)}`);
      const note = c.note;
      const groups = Object.entries((note && note.groups) || {});
      body.replaceChildren(
        facts([
          ["Commit", h("span", { class: "mono" }, c.commit)],
          ["Subject", c.summary],
          ["Author", c.author],
          ["Committer", c.committer],
          ["When", when(c.time)],
          ["Outcome", c.note_error ? `unreadable note: ${c.note_error}` : outcome(note)],
        ]),
        groups.length
          ? [
              h("h3", {}, "Groups"),
              table(
                ["Group", "Phase", "Waves", "Applied", "Failed", "Failures"],
                groups.map(([g, n]) => [
                  h("a", { href: `#/groups/${encodeURIComponent(g)}` }, g),
                  phaseWord(n.phase),
                  `${n.wave}/${n.waves}`,
                  `${n.agents.applied}/${n.agents.targeted}`,
                  String(n.agents.failed),
                  (n.failures || []).map((f) => h("div", {}, h("span", { class: "mono" }, f.agent), `: ${f.error}`)),
                ]),
              ),
            ]
          : "",
        h("h3", {}, "Note"),
        c.note_text ? h("pre", { tabindex: "0", id: "note-text" }, c.note_text) : h("p", {}, "No note: the controller has not processed this commit."),
      );
    },
    error(e) {
      body.replaceChildren(errorNote(e));
    },
  };
}

// ---- routing ------------------------------------------------------------------

function route() {
  const main = document.getElementById("main");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  let nav = "fleet";
  if (parts[0] === "groups" && parts[1]) app.view = groupView(main, parts[1]);
  else if (parts[0] === "agents" && parts[1]) ((app.view = agentView(main, parts[1])), (nav = "agents"));
  else if (parts[0] === "agents") ((app.view = agentsView(main, params)), (nav = "agents"));
  else if (parts[0] === "history" && parts[1]) ((app.view = commitView(main, parts[1])), (nav = "history"));
  else if (parts[0] === "history") ((app.view = historyView(main)), (nav = "history"));
  else app.view = overview(main);
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-open").addEventListener("click", () => askToken());
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(document.getElementById("token").value.trim());
    document.getElementById("token-form").hidden = true;
    route();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    setToken(null);
    document.getElementById("token").value = "";
    route();
  });
  window.addEventListener("hashchange", route);
  route();
  follow();
});
