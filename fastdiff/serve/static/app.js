// fastdiff studio: plain JavaScript, no build step, no third-party code; talks only to this server.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const POLL_LIMIT_MS = 30 * 60 * 1000; // a job that takes longer is reported, not waited for forever
const LOST = "lost the connection to the server (is it still running?)";
// the sampler options a request may set; each has a control of the same id in index.html
const OPTIONS = ["eta", "spacing", "variance_type", "solver_order", "final_sigmas_type", "clip_sample",
  "use_clipped_model_output", "lower_order_final"];
const SAMPLER_NAMES = {
  ddim: "DDIM", ddpm: "DDPM", "dpmpp-2m": "DPM-Solver++ 2M", "dpmpp-2m-sde": "DPM-Solver++ 2M SDE",
};
let MODELS = {};
let LIMITS = {};
let SAMPLERS = {}; // sampler -> its options' defaults (as a job runs them)

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// JSON.parse, except that integers a JS number cannot hold exactly (seeds go up to 2^63 - 1) become strings
function parseJSON(text) {
  return JSON.parse(text.replace(/"(?:[^"\\]|\\.)*"|(?<![\d.eE+-])-?\d{16,}(?![\d.eE])/g,
    (m) => (m[0] === '"' || Number.isSafeInteger(Number(m)) ? m : `"${m}"`)));
}

// JSON.stringify of a flat object, writing BigInt values (the seed) as exact JSON integers
function toJSON(body) {
  return `{${Object.entries(body).map(([k, v]) =>
    `${JSON.stringify(k)}:${typeof v === "bigint" ? v.toString() : JSON.stringify(v)}`).join(",")}}`;
}

async function api(path, options = {}) {
  let response, text;
  try {
    response = await fetch(path, { credentials: "same-origin", ...options });
    text = await response.text();
  } catch (_) {
    throw new Error(LOST); // fetch rejects only when no answer came
  }
  let body = null;
  try { body = parseJSON(text); } catch (_) { /* not JSON */ }
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
  return crypto.getRandomValues(new Uint32Array(1))[0] >>> 1; // 31 bits
}

// --- the form -------------------------------------------------------------------------------------------
function currentModel() { return MODELS[$("model").value]; }

function setOption(name, value) {
  if ($(name).type === "checkbox") $(name).checked = Boolean(value);
  else $(name).value = String(value);
}

function getOption(name) {
  const input = $(name);
  if (input.type === "checkbox") return input.checked;
  if (name === "eta") return parseFloat(input.value);
  return name === "solver_order" ? parseInt(input.value, 10) : input.value;
}

function resetOptions() {
  const defaults = SAMPLERS[$("sampler").value] || {};
  for (const name of OPTIONS) if (name in defaults) setOption(name, defaults[name]);
}

function toggle(node, visible) { // hidden controls are disabled too: the form's validity ignores them
  node.hidden = !visible;
  node.querySelectorAll("input, select").forEach((e) => { e.disabled = !visible; });
}

function updateForm() {
  const m = currentModel();
  const cond = Boolean(m && m.num_classes > 0);
  const defaults = SAMPLERS[$("sampler").value] || {};
  document.querySelectorAll(".cond-only").forEach((e) => toggle(e, cond));
  document.querySelectorAll("[data-option]").forEach((e) => toggle(e, e.dataset.option in defaults));
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
  const m = currentModel();
  const body = {
    model: $("model").value, sampler: $("sampler").value, steps: parseInt($("steps").value, 10),
    n: parseInt($("n").value, 10), seed: /^[0-9]{1,19}$/.test($("seed").value) ? BigInt($("seed").value) : null,
  };
  const defaults = SAMPLERS[body.sampler] || {};
  for (const name of OPTIONS) if (name in defaults) body[name] = getOption(name);
  if (m && m.num_classes > 0) body.class_id = parseInt($("class_id").value, 10);
  body.guidance = m && m.num_classes > 0 ? parseFloat($("guidance").value) : 1;
  return body;
}

// Fill the form with a run's parameters; a list of those it cannot hold exactly (then it must not be re-run)
function fillForm(p) {
  if (p.model != null) $("model").value = p.model;
  if (p.sampler != null) $("sampler").value = p.sampler;
  updateForm();
  resetOptions();
  for (const name of ["steps", "n", "seed", "class_id", "guidance", ...OPTIONS]) {
    if (p[name] != null && $(name)) setOption(name, p[name]);
  }
  updateForm();
  const body = formBody();
  return Object.keys(p).filter((k) => p[k] != null && String(body[k]) !== String(p[k]));
}

function invalidMessage() {
  const bad = $("form").querySelector("input:invalid, select:invalid");
  if (!bad) return null;
  bad.focus();
  const label = bad.closest("label");
  const name = (label && label.firstChild.textContent.trim()) || bad.name;
  return `${name}: ${bad.validationMessage || "invalid value"}`;
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
  const invalid = invalidMessage();
  if (invalid) { showError(invalid); return; }
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: toJSON(formBody()),
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
  const seed = BigInt(String(r.seed)); // exact, whatever its size
  const figures = r.images.map((url, i) => {
    const file = `${r.run}-${String(i).padStart(4, "0")}.png`;
    const s = seed + BigInt(i);
    const img = el("img", { src: url, alt: `image ${i} (seed ${s})`, loading: "eager" });
    return el("figure", {}, el("a", { href: url, download: file, title: `download ${file}` }, img),
      el("figcaption", {}, `seed ${s} · `, el("a", { href: url, download: file, text: "download" })));
  });
  $("gallery").replaceChildren(...figures);
  $("result-links").replaceChildren(el("a", { href: r.grid, download: `${r.run}_grid.png`, text: "grid" }), " · ",
    el("a", { href: r.sidecar, download: `${r.run}.json`, text: "sidecar (JSON)" }));
}

// --- history --------------------------------------------------------------------------------------------
function describe(p, r) {
  const defaults = SAMPLERS[p.sampler] || {};
  const options = OPTIONS.filter((k) => p[k] != null && k in defaults && String(p[k]) !== String(defaults[k]))
    .map((k) => (k === "eta" ? ` η=${p[k]}` : ` ${k}=${p[k]}`)).join("");
  return `${p.model || r.model || "?"} · ${p.sampler || r.sampler}-${p.steps || r.steps}${options}` +
    ` · seed ${p.seed != null ? p.seed : r.seed} · ${r.count} images` +
    `${p.class_id != null ? ` · class ${p.class_id} × ${p.guidance}` : ""}`;
}

function reproduce(p) {
  showError("");
  const lost = fillForm(p);
  window.scrollTo(0, 0);
  if (lost.length) showError(`this run cannot be reproduced exactly here: ${lost.join(", ")} cannot be set`);
}

async function loadHistory() {
  try {
    const { runs } = await api("/api/history?limit=30");
    const items = runs.map((r) => {
      const p = (r.reproduce && r.reproduce.api) || r;
      const show = el("button", { type: "button", text: "show" });
      show.addEventListener("click", () => showRun(r));
      const again = el("button", { type: "button", text: "reproduce", class: "reproduce" });
      again.addEventListener("click", () => reproduce(p));
      return el("li", {}, el("img", { src: r.grid, alt: `grid of ${r.run}` }),
        el("span", { class: "what" }, describe(p, r), el("br"), el("code", { text: `${r.run} · ${r.created || ""}` })),
        show, again);
    });
    $("history").replaceChildren(...(items.length ? items : [el("li", { class: "hint", text: "no runs yet" })]));
  } catch (e) {
    showError(`history: ${e.message}`);
  }
}

function setDefaults() { // the server's defaults for this model and sampler, within its limits
  const m = currentModel();
  if (m) $("steps").value = m.default_steps[$("sampler").value];
  resetOptions();
  updateForm();
}

async function init() {
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);
  $("seed").value = randomSeed();
  $("seed-random").addEventListener("click", () => { $("seed").value = randomSeed(); });
  $("model").addEventListener("change", updateForm);
  $("sampler").addEventListener("change", setDefaults);
  $("form").addEventListener("submit", generate);
  $("history-refresh").addEventListener("click", loadHistory);
  try {
    const info = await api("/api/models");
    LIMITS = info.limits;
    SAMPLERS = info.samplers;
    MODELS = Object.fromEntries(info.models.map((m) => [m.name, m]));
    $("model").replaceChildren(...info.models.map((m) => el("option", { value: m.name, text: m.name })));
    $("model").value = info.default;
    $("sampler").replaceChildren(...Object.keys(SAMPLERS).map((s) =>
      el("option", { value: s, text: SAMPLER_NAMES[s] || s })));
    $("sampler").value = "ddim" in SAMPLERS ? "ddim" : Object.keys(SAMPLERS)[0];
    for (const [name, values] of Object.entries(info.choices)) {
      $(name).replaceChildren(...values.map((v) => el("option", { value: v, text: v })));
    }
    $("n").max = LIMITS.max_n;
    $("n").value = Math.min(4, LIMITS.max_n);
    $("guidance").max = LIMITS.max_guidance;
    setDefaults();
  } catch (e) {
    showError(`could not load the models: ${e.message}`);
  }
  loadHistory();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", init);
