// The eventpipe console: GET /status two seconds after each answer, and the dead-letter
// queue through the DLQ API with the operator's token. Everything shown is set as text, never
// as markup: dead letters hold whatever bytes producers sent.
"use strict";

const REFRESH_MS = 2000;
const STATUS_TIMEOUT_MS = 15000; // the API answers /status within about 10 s, or 503
const PAGE = 50;
const TOKEN_KEY = "eventpipe.dlqToken";

const $ = (id) => document.getElementById(id);

function cell(value, className) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  if (className) td.className = className;
  return td;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells.map((c) => (c instanceof Node ? c : cell(c))));
    return tr;
  }));
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "now";
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

function sum(values) {
  return values.reduce((total, v) => total + (v || 0), 0);
}

// "–" when nothing is known (no bridge reports), rather than a reassuring 0.
function total(values) {
  return values.some((v) => v !== null && v !== undefined) ? sum(values) : "–";
}

async function call(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const reason = body && body.message ? body.message : response.statusText;
    throw new Error(`${response.status}: ${reason}`);
  }
  return body;
}

// -- status -------------------------------------------------------------------------------

async function refreshStatus() {
  try {
    // Bounded: an answer that never comes would end the refreshes, each waiting for the last.
    const status = await call("/status", { signal: AbortSignal.timeout(STATUS_TIMEOUT_MS) });
    $("status-error").hidden = true;
    showStatus(status);
  } catch (error) {
    $("status-error").textContent = `status unavailable (${error.message})`;
    $("status-error").hidden = false;
  }
}

function showStatus(s) {
  $("updated").textContent = `updated ${new Date(s.at).toLocaleTimeString()}`;
  $("topic").textContent = `topic ${s.topic}, group ${s.group}`;
  $("problems").replaceChildren(...s.problems.map((p) => {
    const li = document.createElement("li");
    li.textContent = p;
    return li;
  }));
  $("rate").textContent = sum(Object.values(s.eventsPerSecond)).toFixed(1);
  $("lag").textContent = total(s.partitions.map((p) => p.lag));
  $("inflight").textContent = total(s.partitions.map((p) => p.inFlight));
  $("dlq-open").textContent = s.dlq.open;
  fill($("partitions").tBodies[0], s.partitions.map((p) => [
    p.partition, p.committed, p.highWatermark, p.lag, p.inFlight, p.queued,
    p.paused ? cell(p.pausedFor || "paused", "paused") : (p.paused === false ? "" : null),
    p.bridge, p.workers.length ? p.workers.join(", ") : null,
    p.lastBatchBy ? `${ago(p.lastBatchAgoS)} by ${p.lastBatchBy}` : null,
  ]));
  fill($("processes").tBodies[0], [
    ...s.bridges.map((b) => ["bridge", b.name, ago(b.seenAgoS), b.partitions.join(","), null]),
    ...s.workers.map((w) => ["worker", w.name, ago(w.seenAgoS), w.partitions.join(","),
                             w.eventsPerSecond.toFixed(1)]),
  ]);
  fill($("rates").tBodies[0],
       Object.entries(s.eventsPerSecond).map(([type, rate]) => [type, rate.toFixed(1)]));
  fill($("dlq-classes").tBodies[0], Object.entries(s.dlq.byErrorClass));
  fill($("dlq-types").tBodies[0], Object.entries(s.dlq.byEventType));
}

// -- dead letters ---------------------------------------------------------------------------

const dlq = { cursor: null, shown: null };

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function guarded(path, options = {}) {
  return call(path, { ...options, headers: { Authorization: `Bearer ${token()}` } });
}

function say(message, isError = false) {
  $("dlq-message").textContent = message;
  $("dlq-message").className = isError ? "error" : "muted";
}

function query(after) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  const type = $("filter-type").value.trim();
  const errorClass = $("filter-class").value.trim();
  if (type) params.set("eventType", type);
  if (errorClass) params.set("errorClass", errorClass);
  if (after) params.set("after", after);
  return `/dlq/entries?${params}`;
}

async function loadEntries(after = null) {
  if (!token()) {
    say("enter the DLQ token (DLQ_API_TOKEN) to see the dead letters");
    return;
  }
  try {
    const page = await guarded(query(after));
    const rows = page.items.map(entryRow);
    const tbody = $("entries").tBodies[0];
    if (after) tbody.append(...rows); else tbody.replaceChildren(...rows);
    dlq.cursor = page.nextCursor;
    $("next-page").hidden = !page.nextCursor;
    $("dlq-depth").textContent = `${page.depth} in the DLQ`;
    if (!after) say(page.items.length ? "" : "no dead letters match");
  } catch (error) {
    say(error.message, true);
  }
}

function entryRow(entry) {
  const tr = document.createElement("tr");
  tr.dataset.id = entry.id;
  const position = entry.partition === null ? null : `p${entry.partition}@${entry.offset}`;
  tr.append(cell(new Date(entry.lastFailureAt).toLocaleString()), cell(entry.eventType),
            cell(entry.errorClass), cell(entry.errorMessage, "wrap"), cell(entry.attempts),
            cell(position));
  const actions = document.createElement("td");
  for (const [label, run] of [["Show", showEntry], ["Replay", replay], ["Delete", remove]]) {
    const button = document.createElement("button");
    button.textContent = label;
    button.addEventListener("click", () => run(entry.id));
    actions.append(button);
  }
  tr.append(actions);
  return tr;
}

async function showEntry(id) {
  try {
    const entry = await guarded(`/dlq/entries/${encodeURIComponent(id)}`);
    dlq.shown = id;
    $("entry-id").textContent = entry.id;
    const fields = [
      ["DLQ key", entry.dlqKey], ["Event id", entry.eventId], ["Event type", entry.eventType],
      ["Error class", entry.errorClass], ["Error", entry.errorMessage],
      ["Attempts", entry.attempts], ["First failure", entry.firstFailureAt],
      ["Last failure", entry.lastFailureAt], ["Worker", entry.worker],
      ["Position", entry.partition === null ? null
        : `${entry.topic} p${entry.partition} offset ${entry.offset}`],
      ["Key", entry.key === null ? "(none)" : bytes(entry.key)],
      ...(entry.headers || []).map((header) => [
        `Header ${header.name}`, header.value === null ? "(null)" : bytes(header.value)]),
    ];
    $("entry-fields").replaceChildren(...fields.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value === null || value === undefined ? "–" : String(value);
      return [dt, dd];
    }));
    $("entry-value").textContent = entry.tombstone ? "(null: a tombstone)" : bytes(entry.value);
    $("entry-traceback").textContent = entry.traceback || "–";
    $("entry-history").replaceChildren(...entry.history.map((life) => {
      const li = document.createElement("li");
      li.textContent = `${life.errorClass}: ${life.reason} (${life.attempts} attempt(s), ` +
                       `${life.firstFailureAt} to ${life.lastFailureAt}) — ${life.ended} ` +
                       `at ${life.endedAt}`;
      return li;
    }));
    $("entry").hidden = false;
  } catch (error) {
    say(error.message, true);
  }
}

function bytes(value) {
  if (value === null || value === undefined) return "(not in the stream: eventpipe dlq restore)";
  return value.text !== undefined ? value.text : `base64: ${value.base64}`;
}

async function replay(id) {
  try {
    const result = await guarded(`/dlq/entries/${encodeURIComponent(id)}/replay`,
                                 { method: "POST" });
    say(result.replayed ? `replayed ${id}: published to Kafka, out of the DLQ`
                        : `${id} was not replayed (refused ${result.refused}, ` +
                          `rejected ${result.rejected}, ` +
                          `skipped ${result.skipped}, without bytes ${result.noBytes})`,
        !result.replayed);
    afterChange(id);
  } catch (error) {
    say(error.message, true);
  }
}

async function remove(id) {
  if (!window.confirm(`Delete dead letter ${id} for good? Its fate stays recorded as purged.`)) {
    return;
  }
  try {
    await guarded(`/dlq/entries/${encodeURIComponent(id)}`, { method: "DELETE" });
    say(`deleted ${id}`);
    afterChange(id);
  } catch (error) {
    say(error.message, true);
  }
}

function afterChange(id) {
  if (dlq.shown === id) closeEntry();
  const message = $("dlq-message").textContent;
  loadEntries().then(() => { if (message) $("dlq-message").textContent = message; });
}

function closeEntry() {
  dlq.shown = null;
  $("entry").hidden = true;
}

// -- navigation ---------------------------------------------------------------------------

let timer = null;
let shown = 0; // which showing of the status view a pending refresh belongs to

// The next refresh two seconds after the last answer, never beside it: while the database
// does not answer, /status takes up to ten seconds, and requests sent every two would queue.
async function pollStatus(showing) {
  await refreshStatus();
  if (showing === shown) timer = setTimeout(() => pollStatus(showing), REFRESH_MS);
}

function route() {
  const view = location.hash === "#dlq" ? "dlq" : "status";
  $("view-status").hidden = view !== "status";
  $("view-dlq").hidden = view !== "dlq";
  $("tab-status").classList.toggle("current", view === "status");
  $("tab-dlq").classList.toggle("current", view === "dlq");
  clearTimeout(timer);
  shown += 1;
  if (view === "status") {
    pollStatus(shown);
  } else {
    loadEntries();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    loadEntries();
  });
  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadEntries();
  });
  $("next-page").addEventListener("click", () => loadEntries(dlq.cursor));
  $("entry-replay").addEventListener("click", () => dlq.shown && replay(dlq.shown));
  $("entry-delete").addEventListener("click", () => dlq.shown && remove(dlq.shown));
  $("entry-close").addEventListener("click", closeEntry);
  window.addEventListener("hashchange", route);
  route();
});
