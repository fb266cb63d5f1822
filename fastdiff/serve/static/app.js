// fastdiff studio: plain JavaScript, no build step, no third-party code; talks only to this server.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const POLL_LIMIT_MS = 30 * 60 * 1000; // a job that takes longer is reported, not waited for forever
let MODELS = {};
let LIMITS = {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0] >>> 1; // 31 bits: exact in a JS number
}

// --- the form -------------------------------------------------------------------------------------------
function currentModel() { return MODELS[$("model").value]; }

function updateForm() {
  const m = currentModel();
  const cond = m && m.num_classes > 0;
  document.querySelectorAll(".cond-only").forEach((e) => { e.hidden = !cond; });
  document.querySelectorAll(".ddim-only").forEach((e) => { e.hidden = $("sampler").value !== "ddim"; });
  if (m) {
    $("model-info").textContent = `${m.kind} · ${m.image_shape.join("×")} · T=${m.num_train_timesteps}` +
      ` · ${cond ? m.num_classes + " classes" : "unconditional"} · ${m.backend} · sha256 ${m.sha256.slice(0, 12)}…`;
    $("steps").max = Math.min(LIMITS.max_steps, m.num_train_timesteps);
    const select = $("class_id");
    const wanted = select.value;
    select.replaceChildren(...Array.from({ length: m.num_classes }, (_, i) => el("option", { value: i, text: i })),
      el("option", { value: -1, text: "none (unconditional)" }));
    if (wanted !== "") select.value = wanted;
  }
}

function formBody() {
  const body = {
    model: $("model").value, sampler: $("sampler").value, steps: parseInt($("steps").value, 10),
    n: parseInt($("n").value, 10), seed: parseInt($("seed").value, 10),
  };
  if (body.sampler === "ddim") body.eta = parseFloat($("eta").value || "0");
  const m = currentModel();
  if (m && m.num_classes > 0) {
    body.class_id = parseInt($("class_id").value, 10);
    body.guidance = parseFloat($("guidance").value || "1");
  }
  return body;
}

function fillForm(p) {
  if (p.model && MODELS[p.model]) $("model").value = p.model;
  if (p.sampler) $("sampler").value = p.sampler;
  updateForm();
  if (p.steps != null) $("steps").value = p.steps;
  if (p.n != null) $("n").value = p.n;
  if (p.seed != null) $("seed").value = p.seed;
  $("eta").value = p.eta != null ? p.eta : 0;
  if (p.class_id != null) $("class_id").value = p.class_id;
  $("guidance").value = p.guidance != null ? p.guidance : 1;
  updateForm();
}

// --- a job ----------------------------------------------------------------------------------------------
function setProgress(done, total, text) {
  $("progress").hidden = total == null;
  if (total != null) { $("progress").max = Math.max(1, total); $("progress").value = done; }
  $("status-text").textContent = text;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(formBody()),
    });
    setProgress(0, job.params.steps, "queued");
    const started = Date.now();
    for (;;) {
      if (Date.now() - started > POLL_LIMIT_MS) throw new Error("gave up waiting for the job (30 min)");
      await new Promise((r) => setTimeout(r, POLL_MS));
      const s = await api(`/api/jobs/${encodeURIComponent(job.id)}`);
      if (s.status === "queued") {
        setProgress(0, s.steps_total, `queued${s.queue_position ? ` (${s.queue_position} ahead)` : ""}`);
      } else if (s.status === "running") {
        setProgress(s.steps_done, s.steps_total, s.live_progress
          ? `step ${s.steps_done}/${s.steps_total} · batch of ${s.batch_images} images`
          : `running ${s.steps_total} steps as one graph · batch of ${s.batch_images} images`);
      } else if (s.status === "done") {
        setProgress(s.steps_total, s.steps_total,
          `done in ${s.seconds} s · ${s.steps_total} steps · batch of ${s.batch_images} images` +
          (s.batch_jobs > 1 ? ` shared by ${s.batch_jobs} requests` : ""));
        showRun({ ...s, seed: s.params.seed });
        loadHistory();
        return;
      } else {
        throw new Error(s.error || s.status);
      }
    }
  } catch (e) {
    setProgress(null, null, "");
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function showRun(r) {
  $("result-title").textContent = `— ${r.run}`;
  const seed = Number(r.seed);
  const figures = r.images.map((url, i) => {
    const file = `${r.run}-${String(i).padStart(4, "0")}.png`;
    const img = el("img", { src: url, alt: `image ${i} (seed ${seed + i})`, loading: "eager" });
    return el("figure", {}, el("a", { href: url, download: file, title: `download ${file}` }, img),
      el("figcaption", {}, `seed ${seed + i} · `, el("a", { href: url, download: file, text: "download" })));
  });
  $("gallery").replaceChildren(...figures);
  $("result-links").replaceChildren(el("a", { href: r.grid, download: `${r.run}_grid.png`, text: "grid" }), " · ",
    el("a", { href: r.sidecar, download: `${r.run}.json`, text: "sidecar (JSON)" }));
}

// --- history --------------------------------------------------------------------------------------------
async function loadHistory() {
  try {
    const { runs } = await api("/api/history?limit=30");
    const items = runs.map((r) => {
      const p = (r.reproduce && r.reproduce.api) || r;
      const what = `${p.model || r.model || "?"} · ${p.sampler || r.sampler}-${p.steps || r.steps}` +
        `${p.eta ? ` η=${p.eta}` : ""} · seed ${p.seed != null ? p.seed : r.seed} · ${r.count} images` +
        `${p.class_id != null ? ` · class ${p.class_id} × ${p.guidance}` : ""}`;
      const show = el("button", { type: "button", text: "show" });
      show.addEventListener("click", () => showRun(r));
      const again = el("button", { type: "button", text: "reproduce", class: "reproduce" });
      again.addEventListener("click", () => { fillForm(p); window.scrollTo(0, 0); });
      return el("li", {}, el("img", { src: r.grid, alt: `grid of ${r.run}` }),
        el("span", { class: "what" }, what, el("br"), el("code", { text: `${r.run} · ${r.created || ""}` })), show, again);
    });
    $("history").replaceChildren(...(items.length ? items : [el("li", { class: "hint", text: "no runs yet" })]));
  } catch (e) {
    showError(`history: ${e.message}`);
  }
}

async function init() {
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
  $("seed").value = randomSeed();
  $("seed-random").addEventListener("click", () => { $("seed").value = randomSeed(); });
  $("model").addEventListener("change", updateForm);
  $("sampler").addEventListener("change", () => {
    const m = currentModel();
    $("steps").value = $("sampler").value === "ddpm" && m ? Math.min(m.num_train_timesteps, LIMITS.max_steps) : 50;
    updateForm();
  });
  $("form").addEventListener("submit", generate);
  $("history-refresh").addEventListener("click", loadHistory);
  try {
    const info = await api("/api/models");
    LIMITS = info.limits;
    MODELS = Object.fromEntries(info.models.map((m) => [m.name, m]));
    $("model").replaceChildren(...info.models.map((m) => el("option", { value: m.name, text: m.name })));
    $("model").value = info.default;
    $("n").max = LIMITS.max_n;
    updateForm();
  } catch (e) {
    showError(`could not load the models: ${e.message}`);
  }
  loadHistory();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", init);
