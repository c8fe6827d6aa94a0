// The dsdkit serving page: give an image and captions, rank them with POST /rank-captions, click a caption for its
// per-word heat maps from POST /explain. It talks only to the server that served it, and shows every refusal as
// the API's own one-line message.
"use strict";

const state = { image: null, imageName: "", health: null, demoCaptions: [], ranked: [], explaining: 0 };
const $ = (id) => document.getElementById(id);

// -- talking to the server -----------------------------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("the server cannot be reached (" + error.message + ")");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    throw new Error(data && typeof data.error === "string" ? data.error : "HTTP " + response.status);
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

// -- what the server is --------------------------------------------------------------------------------------------

function describeHealth(health) {
  const engine = health.engine || {};
  const what = engine.kind === "bundle" ? "bundle " + (engine.bundle || "") : "model " + (engine.model || "");
  const steps = (engine.timesteps || []).length;
  $("model-line").textContent = `${what.trim()} on ${engine.device || "?"}, S = ${steps} timesteps, ` +
    `${health.runner} runner` + (health.explain ? "" : " (heat maps need dsdkit serve --model)");
  const limits = (health.bounds || {}).per_request || {};
  const scoring = engine.scoring || {};
  const rows = [
    ["Engine", `${engine.kind} (${engine.model || engine.bundle || "?"})`],
    ["Device", engine.device || "?"],
    ["Timesteps", `${steps}: ${(engine.timesteps || []).join(", ")}`],
    ["Scoring", Object.entries(scoring).filter(([, v]) => v !== null && typeof v !== "object")
      .map(([k, v]) => `${k}=${v}`).join(", ")],
    ["Heat maps", health.explain ? "yes (PyTorch engine)" : "no: a bundle outputs pooled scores only"],
    ["Per request", `${limits.max_captions} captions, ${limits.max_images} images, ` +
      `${(limits.max_image_bytes / 1048576).toFixed(0)} MiB per image, ` +
      `${(limits.max_image_pixels / 1e6).toFixed(0)} Mpx per image, ` +
      `${limits.max_caption_chars} characters per caption, ${limits.max_work_items} work items`],
    ["Deadline", `${health.bounds.deadlines_s.request} s per request`],
  ];
  const list = $("about-list");
  list.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  $("search-section").hidden = !health.gallery;
}

async function loadExamples() {
  try {
    const data = await api("/examples");
    state.demoCaptions = data.captions || [];
    const select = $("example");
    for (const example of data.examples || []) {
      const option = document.createElement("option");
      option.value = example.url;
      option.textContent = example.caption;
      select.append(option);
    }
  } catch (error) {
    $("example").disabled = true;
  }
}

// -- the image -----------------------------------------------------------------------------------------------------

function useBlob(blob, name) {
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    state.imageName = name;
    const preview = $("preview");
    preview.hidden = false;
    preview.alt = "the image to rank captions for: " + name;
    preview.src = reader.result;
    $("drop-text").textContent = name + " (drop, paste or press Enter for another)";
    clearResults();
  };
  reader.onerror = () => showError("the file cannot be read by the browser");
  reader.readAsDataURL(blob);
}

function wireImageInputs() {
  const drop = $("drop");
  const file = $("file");
  file.addEventListener("change", () => {
    if (file.files && file.files[0]) useBlob(file.files[0], file.files[0].name);
  });
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      file.click();
    }
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const dropped = event.dataTransfer && event.dataTransfer.files[0];
    if (dropped) useBlob(dropped, dropped.name);
  });
  document.addEventListener("paste", (event) => {
    const items = (event.clipboardData && event.clipboardData.items) || [];
    for (const item of items) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        useBlob(item.getAsFile(), "pasted image");
        event.preventDefault();
        return;
      }
    }
  });
  $("example").addEventListener("change", async (event) => {
    const url = event.target.value;
    if (!url) return;
    const name = event.target.selectedOptions[0].textContent;
    try {
      const response = await fetch(url);
      if (!response.ok) throw new Error("HTTP " + response.status);
      useBlob(await response.blob(), name + " (demo example)");
      if (!$("captions").value.trim()) $("captions").value = state.demoCaptions.join("\n");
    } catch (error) {
      showError("the demo example cannot be loaded (" + error.message + ")");
    }
  });
  $("demo-captions").addEventListener("click", () => {
    $("captions").value = state.demoCaptions.join("\n");
  });
}

// -- ranking -------------------------------------------------------------------------------------------------------

function clearResults() {
  state.ranked = [];
  $("results").replaceChildren();
  $("results-section").hidden = true;
  $("maps").replaceChildren();
  $("maps-section").hidden = true;
}

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

async function rank() {
  showError("");
  const captions = $("captions").value.split("\n").map((c) => c.trim()).filter((c) => c);
  if (!state.image) {
    showError("give an image first: a file, a drop, a paste or a demo example");
    return;
  }
  if (!captions.length) {
    showError("give at least one caption, one per line");
    return;
  }
  const adaptive = document.querySelector('input[name="mode"]:checked').value === "adaptive";
  const button = $("rank");
  button.disabled = true;
  setStatus("Ranking " + captions.length + " captions…");
  try {
    const answer = await api("/rank-captions", { image: { base64: state.image }, captions, adaptive });
    showResults(answer, adaptive);
    setStatus("");
  } catch (error) {
    clearResults();
    setStatus("");
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

function showResults(answer, adaptive) {
  clearResults();
  state.ranked = answer.ranking;
  const list = $("results");
  for (const entry of answer.ranking) {
    const item = document.createElement("li");
    const caption = document.createElement("button");
    caption.type = "button";
    caption.className = "caption";
    caption.textContent = entry.caption;
    caption.setAttribute("aria-pressed", "false");
    caption.title = "Show where each word of this caption looks";
    caption.addEventListener("click", () => explainCaption(entry.caption, caption));
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = fmt(entry.score);
    const margin = document.createElement("span");
    margin.className = "margin";
    margin.textContent = entry.margin === null ? "" : "+" + fmt(entry.margin) + " over the next";
    item.append(caption, score, margin);
    if (adaptive) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = entry.exact ? "exact" : `partial: ${entry.timesteps_held} timesteps`;
      item.append(badge);
    }
    list.append(item);
  }
  const steps = answer.timesteps.length;
  let note = `DSD scores, higher is better; means over ${steps} timesteps. Click a caption for its heat maps.`;
  if (adaptive && answer.adaptive) {
    const spent = answer.adaptive.evaluations;
    note = `Adaptive: ${spent.conditional} of ${spent.exhaustive_conditional} pair evaluations. ` + note;
  }
  $("results-note").textContent = note;
  $("results-section").hidden = false;
}

// -- heat maps -----------------------------------------------------------------------------------------------------

// The explain sheet's colour scale (dsdkit.pytorch.explain): dark blue to yellow, more opaque where higher.
const ANCHORS = [[48, 18, 59], [40, 120, 220], [30, 200, 140], [190, 220, 40], [250, 240, 30]];

function colour(value) {
  const v = Math.min(1, Math.max(0, value));
  const position = v * (ANCHORS.length - 1);
  const low = Math.min(ANCHORS.length - 2, Math.floor(position));
  const frac = position - low;
  return ANCHORS[low].map((c, i) => c * (1 - frac) + ANCHORS[low + 1][i] * frac);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot draw this image"));
    image.src = url;
  });
}

function drawMap(image, heat, region, low, high, size) {
  const scale = size / Math.max(image.naturalWidth, image.naturalHeight);
  const width = Math.max(1, Math.round(image.naturalWidth * scale));
  const height = Math.max(1, Math.round(image.naturalHeight * scale));
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, width, height);
  // Grey, compressed to mid tones, so the colours read over any image; dimmed where the model saw nothing.
  const base = ctx.getImageData(0, 0, width, height);
  const grid = heat.length;
  const [left, topFrac, right, bottom] = region;
  const x0 = left * width, y0 = topFrac * height, w = (right - left) * width, h = (bottom - topFrac) * height;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 4;
      const d = base.data;
      const grey = 48 + (0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]) * (160 / 255);
      let out = [grey, grey, grey];
      const u = (x + 0.5 - x0) / w, v = (y + 0.5 - y0) / h;
      if (u >= 0 && u < 1 && v >= 0 && v < 1) {
        // Bilinear over the map's grid cells.
        const gx = Math.min(grid - 1, Math.max(0, u * grid - 0.5)), gy = Math.min(grid - 1, Math.max(0, v * grid - 0.5));
        const ax = Math.floor(gx), ay = Math.floor(gy);
        const bx = Math.min(grid - 1, ax + 1), by = Math.min(grid - 1, ay + 1);
        const fx = gx - ax, fy = gy - ay;
        const value = (heat[ay][ax] * (1 - fx) + heat[ay][bx] * fx) * (1 - fy) +
          (heat[by][ax] * (1 - fx) + heat[by][bx] * fx) * fy;
        const t = high > low ? (value - low) / (high - low) : 0;
        const alpha = 0.8 * Math.sqrt(Math.min(1, Math.max(0, t)));
        const c = colour(t);
        out = out.map((g, k) => g * (1 - alpha) + c[k] * alpha);
      } else {
        out = out.map((g) => g * 0.55);
      }
      d[i] = out[0];
      d[i + 1] = out[1];
      d[i + 2] = out[2];
      d[i + 3] = 255;
    }
  }
  ctx.putImageData(base, 0, 0);
  return canvas;
}

async function explainCaption(caption, button) {
  showError("");
  for (const other of document.querySelectorAll("#results button.caption")) {
    other.setAttribute("aria-pressed", String(other === button));
  }
  const section = $("maps-section");
  const maps = $("maps");
  section.hidden = false;
  maps.replaceChildren();
  if (state.health && !state.health.explain) {
    $("maps-note").textContent = "Heat maps need the PyTorch engine: serve a model with dsdkit serve --model MODEL " +
      "(a bundle outputs pooled scores only).";
    return;
  }
  const ticket = ++state.explaining;
  $("maps-note").textContent = `Computing the heat maps of “${caption}”…`;
  try {
    const answer = await api("/explain", { image: { base64: state.image }, caption });
    if (ticket !== state.explaining) return; // another caption was clicked meanwhile
    const image = await loadImage(state.image);
    $("maps-note").textContent = `“${answer.caption}”: score ${fmt(answer.score)}; per word token, the attention ` +
      `the score pools (mean over heads, layers and ${answer.timesteps.length} timesteps); one colour scale for all, ` +
      `dark blue ${fmt(answer.min, 3)} to yellow ${fmt(answer.max, 3)}.`;
    answer.tokens.forEach((token, index) => {
      const figure = document.createElement("figure");
      const canvas = drawMap(image, answer.maps[index], answer.region, answer.min, answer.max, 160);
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `heat map of the word “${token}”`);
      canvas.className = "heat";
      const label = document.createElement("figcaption");
      label.textContent = token;
      figure.append(canvas, label);
      maps.append(figure);
    });
  } catch (error) {
    if (ticket !== state.explaining) return;
    $("maps-note").textContent = "";
    showError(error.message);
  }
}

// -- gallery search (shown only when the server reports a gallery) ---------------------------------------------------

async function search() {
  showError("");
  const caption = $("search-caption").value.trim();
  if (!caption) {
    showError("give a caption to search for");
    return;
  }
  const route = (state.health.gallery && state.health.gallery.route) || "/search";
  try {
    const answer = await api(route, { caption });
    const list = $("search-results");
    list.replaceChildren();
    for (const hit of answer.ranking || []) {
      const item = document.createElement("li");
      if (hit.url) {
        const image = document.createElement("img");
        image.src = hit.url;
        image.alt = hit.name || "gallery image";
        item.append(image);
      }
      const text = document.createElement("span");
      text.textContent = `${hit.name || hit.index}: ${fmt(hit.score)}`;
      item.append(text);
      list.append(item);
    }
  } catch (error) {
    showError(error.message);
  }
}

// -- start ---------------------------------------------------------------------------------------------------------

async function start() {
  wireImageInputs();
  $("rank").addEventListener("click", rank);
  $("search").addEventListener("click", search);
  try {
    state.health = await api("/health");
    describeHealth(state.health);
  } catch (error) {
    $("model-line").textContent = "";
    showError(error.message);
  }
  await loadExamples();
}

start();
