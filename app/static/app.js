// clipforge web page: plain JS against the service's own API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);

// The key field is only needed when the server protects reads (CLIPFORGE_PROTECT_READS); the page itself is
// always served without a key, so it can ask for one.
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// An <img src> cannot send a header: with a key, images are fetched with it and shown from a blob.
async function showImage(img, url) {
  const headers = authHeaders();
  if (!headers.Authorization) { img.src = url; return; }
  try {
    const response = await fetch(url, { headers });
    if (response.ok) {
      img.onload = () => URL.revokeObjectURL(img.src);  // the bytes are decoded; free the blob
      img.src = URL.createObjectURL(await response.blob());
    }
  } catch (err) { /* the card keeps its caption and score */ }
}

function renderGrid(container, results) {
  container.replaceChildren();
  for (const hit of results) {
    const card = document.createElement("figure");
    card.className = "card result";
    const img = document.createElement("img");
    showImage(img, `${hit.url}?size=256`);
    img.alt = hit.caption || hit.path;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(score, " ", hit.caption || hit.path);
    card.append(img, caption);
    container.append(card);
  }
}

async function loadInfo() {
  try {
    const info = await api("/info");
    const index = info.index ? `${info.index.size} images indexed` : "no index";
    $("model-info").textContent = `${info.preset} · model ${info.model.slice(0, 12)} · ${info.dim}-d · ${index}`;
  } catch (err) {
    $("model-info").textContent = `model info unavailable: ${err.message}`;
  }
}

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  const status = $("search-status");
  setStatus(status, "searching…");
  try {
    const params = new URLSearchParams({ q, k: $("k").value || "12" });
    for (const [id, name] of [["path-prefix", "path_prefix"], ["caption-contains", "caption_contains"],
                              ["added-after", "added_after"], ["min-width", "min_width"], ["min-height", "min_height"]]) {
      const value = $(id).value.trim();
      if (value) params.set(name, value);
    }
    const body = await api(`/search?${params}`);
    renderGrid($("results"), body.results);
    setStatus(status, `${body.results.length} results for “${body.query}”`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(status, err.message, true);
  }
});

function chosenFile() {
  const files = $("image").files;
  return files && files.length ? files[0] : null;
}

function showPreview(file) {
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

$("image").addEventListener("change", () => { const f = chosenFile(); if (f) showPreview(f); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) { $("image").files = e.dataTransfer.files; showPreview(e.dataTransfer.files[0]); }
});

$("classify-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = chosenFile();
  const status = $("classify-status");
  if (!file) { setStatus(status, "choose an image first", true); return; }
  setStatus(status, "classifying…");
  const form = new FormData();
  form.append("image", file);
  for (const label of $("labels").value.split(",").map((s) => s.trim()).filter(Boolean)) form.append("labels", label);
  try {
    const body = await api("/classify", { method: "POST", body: form });
    const list = $("predictions");
    list.replaceChildren();
    for (const p of body.predictions) {
      const li = document.createElement("li");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(p.probability * 200)}px`;
      li.append(`${p.label} ${(p.probability * 100).toFixed(1)}%`, bar);
      list.append(li);
    }
    setStatus(status, "");
  } catch (err) {
    setStatus(status, err.message, true);
    return;
  }
  const similar = new FormData();
  similar.append("image", file);
  similar.append("k", "8");
  try {
    const body = await api("/search/image", { method: "POST", body: similar });
    $("similar-title").hidden = false;
    renderGrid($("similar"), body.results);
  } catch (err) {
    $("similar-title").hidden = true;
    $("similar").replaceChildren();
  }
});

$("api-key").addEventListener("change", loadInfo);
loadInfo();
