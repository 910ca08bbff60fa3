// The playground: every panel calls this server's API the way an app would (same origin, the API
// key from the field above when one is set), and shows the answer, the timing headers, or the error
// in words.
"use strict";

// The API this page calls: this server, or the one named by ?api= (the page hosted on another
// origin, which the server must allow with NEUROSERVE_CORS_ALLOW_ORIGINS).
const API = (new URLSearchParams(location.search).get("api") || "").replace(/\/$/, "");

const keyField = document.getElementById("api-key");
keyField.value = localStorage.getItem("neuroserve-key") || "";
keyField.addEventListener("change", () => localStorage.setItem("neuroserve-key", keyField.value));

function headers(extra) {
  const out = Object.assign({}, extra || {});
  if (keyField.value) out["X-API-Key"] = keyField.value;
  return out;
}

// A stream's headers go out before any decoding, so its timing is measured here, as the user sees it.
function streamTiming(response, started, first) {
  const now = performance.now();
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  parts.push(`total ${Math.round(now - started)} ms`);
  const id = response.headers.get("x-request-id");
  if (id) parts.push(`request ${id}`);
  return parts.join(" · ");
}

function timing(response) {
  const parts = [];
  const names = { "x-inference-time-ms": "inference", "x-queue-time-ms": "queue", "x-batch-size": "batch" };
  for (const [header, label] of Object.entries(names)) {
    const value = response.headers.get(header);
    if (value !== null) parts.push(`${label} ${value}${header.endsWith("ms") ? " ms" : ""}`);
  }
  const id = response.headers.get("x-request-id");
  if (id) parts.push(`request ${id}`);
  return parts.join(" · ");
}

async function call(path, init) {
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (err) {
    throw new Error(`the server could not be reached (${err.message})`);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      // The house shape, or OpenAI's on its compatible routes ({"error": {"message", "code"}}).
      message = typeof body.error === "object" ? `${body.error.message} (${body.error.code})` : `${body.error} (${body.error_type})`;
    } catch (_) { /* not the error shape: keep the status */ }
    if (response.status === 401 || response.status === 403) message += " — check the API key above";
    if (response.status === 429) message += ` — retry in ${response.headers.get("retry-after") || "a few"} s`;
    throw new Error(message);
  }
  return response;
}

function showError(target, meta, err) {
  target.textContent = err.message;
  target.classList.add("error");
  if (meta) meta.textContent = "";
}

function clearError(...elements) {
  for (const el of elements) el.classList.remove("error");
}

// --- Handwritten digit -------------------------------------------------------------------------
const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
}
clearPad();
let drawing = false;
function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * (pad.width / box.width), (event.clientY - box.top) * (pad.height / box.height)];
}
pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  pad.setPointerCapture(event.pointerId);
  ink.beginPath();
  ink.moveTo(...point(event));
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  ink.lineWidth = 18;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#111";
  ink.lineTo(...point(event));
  ink.stroke();
});
pad.addEventListener("pointerup", () => { drawing = false; });
document.getElementById("digit-clear").addEventListener("click", clearPad);

async function classify(blob, name) {
  const result = document.getElementById("digit-result");
  const meta = document.getElementById("digit-meta");
  clearError(result);
  result.textContent = "…";
  const form = new FormData();
  form.append("files", blob, name);
  form.append("top_k", "3");
  try {
    const response = await call("/v1/image-classification", { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    result.innerHTML = "";
    for (const { label, score } of body.predictions[0]) {
      const item = document.createElement("li");
      item.textContent = `${label} (${(score * 100).toFixed(1)} %)`;
      result.appendChild(item);
    }
    const ood = body.ood ? body.ood[0] : null;
    const warning = ood && ood.flagged ? `not like a digit (score ${ood.score.toFixed(2)}) · ` : "";
    meta.textContent = `${warning}${body.model} v${body.version} · ${timing(response)}`;
  } catch (err) {
    showError(result, meta, err);
  }
}
document.getElementById("digit-classify").addEventListener("click", () => {
  pad.toBlob((blob) => classify(blob, "drawing.png"), "image/png");
});
document.getElementById("digit-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) classify(file, file.name);
});

// --- Generation --------------------------------------------------------------------------------
document.getElementById("generate-run").addEventListener("click", async () => {
  const result = document.getElementById("generate-result");
  const meta = document.getElementById("generate-meta");
  clearError(result);
  result.textContent = "…";
  const request = { digits: document.getElementById("generate-digits").value.trim(), n: 4, scale: 3, polarity: "dark-on-light" };
  const seed = document.getElementById("generate-seed").value;
  if (seed !== "") request.seed = Number(seed);
  let started = null;
  let first = null;
  try {
    const response = await call("/v1/image-generation", {
      method: "POST",
      body: JSON.stringify(request),
      headers: headers({ "Content-Type": "application/json" }),
    });
    const body = await response.json();
    result.innerHTML = "";
    for (const image of body.images) {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${image.png}`;
      img.alt = `${image.digits}, seed ${image.seed}`;
      img.title = `seed ${image.seed}`;
      result.appendChild(img);
    }
    meta.textContent = `seeds ${body.images[0].seed}-${body.images[body.images.length - 1].seed} · ${body.model} v${body.version} · ${timing(response)}`;
  } catch (err) {
    showError(result, meta, err);
  }
});

// --- Detection ---------------------------------------------------------------------------------
document.getElementById("detect-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  const image = document.getElementById("detect-image");
  const meta = document.getElementById("detect-meta");
  if (!file) return;
  clearError(meta);
  meta.textContent = "…";
  const form = new FormData();
  form.append("files", file, file.name);
  const drawn = new FormData();
  drawn.append("files", file, file.name);
  drawn.append("render", "jpeg");
  try {
    // The boxes as JSON (what was found, in words) and the picture with them drawn, side by side.
    const [listed, response] = await Promise.all([
      call("/v1/object-detection", { method: "POST", body: form, headers: headers() }),
      call("/v1/object-detection", { method: "POST", body: drawn, headers: headers() }),
    ]);
    const found = (await listed.json()).images[0].detections;
    image.src = URL.createObjectURL(await response.blob());
    image.hidden = false;
    const words = found.length
      ? `found ${found.length}: ${[...found].sort((a, b) => a.box.x1 - b.box.x1).map((d) => d.label).join(" ")} (left to right)`
      : "no digits found at the model's threshold (a photo of one large digit: use Digit classification)";
    meta.textContent = `${words} · ${timing(response)}`;
  } catch (err) {
    image.hidden = true;
    showError(meta, null, err);
  }
});

// --- Faces ---------------------------------------------------------------------------------------
document.getElementById("faces-run").addEventListener("click", async () => {
  const result = document.getElementById("faces-result");
  const meta = document.getElementById("faces-meta");
  const files = ["faces-a", "faces-b"].map((id) => document.getElementById(id).files[0]);
  clearError(result);
  if (!files[0] || !files[1]) {
    showError(result, meta, new Error("choose two photos first"));
    return;
  }
  result.textContent = "…";
  const form = new FormData();
  files.forEach((file) => form.append("files", file, file.name));
  try {
    const response = await call("/v1/face-verification", { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    const verdict = body.same_person ? "the same person" : "two different people";
    result.textContent = `Probably ${verdict} (similarity ${body.score.toFixed(3)}, threshold ${body.threshold.toFixed(3)})`;
    meta.textContent = timing(response);
  } catch (err) {
    showError(result, meta, err);
  }
});

// --- Sentiment ---------------------------------------------------------------------------------
document.getElementById("sentiment-run").addEventListener("click", async () => {
  const result = document.getElementById("sentiment-result");
  const meta = document.getElementById("sentiment-meta");
  clearError(result);
  result.textContent = "…";
  const texts = document.getElementById("sentiment-text").value.split("\n").filter((t) => t.trim());
  if (!texts.length) {
    showError(result, meta, new Error("type a sentence first (one per line)"));
    return;
  }
  try {
    const response = await call("/v1/sentiment", {
      method: "POST",
      body: JSON.stringify({ texts }),
      headers: headers({ "Content-Type": "application/json" }),
    });
    const body = await response.json();
    result.innerHTML = "";
    body.predictions.forEach((p, i) => {
      const line = document.createElement("div");
      line.textContent = `${p.label} (${(p.score * 100).toFixed(1)} %, ${p.model}): ${texts[i]}`;
      result.appendChild(line);
    });
    meta.textContent = timing(response);
  } catch (err) {
    showError(result, meta, err);
  }
});

// --- Translation, streamed ----------------------------------------------------------------------
document.getElementById("translate-run").addEventListener("click", async () => {
  const result = document.getElementById("translate-result");
  const meta = document.getElementById("translate-meta");
  clearError(result);
  result.textContent = "";
  meta.textContent = "…";
  // One text per line, as the sentiment panel does (two lines sent as one text lost the second).
  const texts = document.getElementById("translate-text").value.split("\n").filter((t) => t.trim());
  if (!texts.length) {
    showError(result, meta, new Error("type an English sentence first"));
    return;
  }
  const lines = texts.map(() => "");
  const show = () => { result.textContent = lines.join("\n"); };
  const started = performance.now();
  let first = null;
  try {
    const response = await call("/v1/translation", {
      method: "POST",
      body: JSON.stringify({ texts, stream: true }),
      headers: headers({ "Content-Type": "application/json" }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const name = (event.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((event.match(/^data: (.*)$/m) || [null, "{}"])[1]);
        if (name === "token") {
          if (first === null) first = performance.now();
          lines[data.index] = data.text;
          show();
        }
        if (name === "done") {
          data.translations.forEach((t, i) => { lines[i] = t.text + (t.truncated ? ` [too long: only the start of its ${t.source_tokens} tokens was read]` : ""); });
          show();
          const tokens = data.translations.reduce((n, t) => n + t.generated_tokens, 0);
          const unknown = data.translations.flatMap((t) => t.unknown_characters);
          meta.textContent = `${data.model} v${data.version} · ${tokens} tokens · ${streamTiming(response, started, first)}${unknown.length ? ` · not in its vocabulary: ${unknown.join(" ")}` : ""}`;
        }
        if (name === "error") throw new Error(`${data.error} (${data.error_type})`);
      }
    }
  } catch (err) {
    showError(result, meta, err);
  }
});

// --- Text generation, streamed (OpenAI's completions API) ----------------------------------------
document.getElementById("write-run").addEventListener("click", async () => {
  const result = document.getElementById("write-result");
  const meta = document.getElementById("write-meta");
  clearError(result);
  const prompt = document.getElementById("write-text").value;
  result.textContent = prompt;
  meta.textContent = "…";
  const request = { prompt, max_tokens: 40, temperature: Number(document.getElementById("write-temperature").value || 0), stream: true, stream_options: { include_usage: true } };
  const seed = document.getElementById("write-seed").value;
  if (seed !== "") request.seed = Number(seed);
  let started = null;
  let first = null;
  try {
    const models = await (await call("/v1/models", { headers: headers() })).json();
    if (!models.data.length) throw new Error("this server has no text-generation model");
    request.model = models.data[0].id;
    started = performance.now();
    const response = await call("/v1/completions", {
      method: "POST",
      body: JSON.stringify(request),
      headers: headers({ "Content-Type": "application/json" }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let reason = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(`${chunk.error.message} (${chunk.error.code})`);
        for (const choice of chunk.choices) {
          if (first === null && choice.text) first = performance.now();
          result.textContent += choice.text;
          if (choice.finish_reason) reason = choice.finish_reason === "stop" ? "ended by the model" : "stopped at 40 tokens";
        }
        if (chunk.usage) meta.textContent = `${chunk.model} · ${chunk.usage.completion_tokens} tokens · ${reason} · ${streamTiming(response, started, first)}`;
      }
    }
  } catch (err) {
    showError(result, meta, err);
  }
});

// --- Recommendations ---------------------------------------------------------------------------
document.getElementById("recommend-run").addEventListener("click", async () => {
  const result = document.getElementById("recommend-result");
  const meta = document.getElementById("recommend-meta");
  clearError(result);
  result.textContent = "…";
  try {
    const response = await call("/v1/recommendations", {
      method: "POST",
      body: JSON.stringify({ user_id: document.getElementById("recommend-user").value, k: 5 }),
      headers: headers({ "Content-Type": "application/json" }),
    });
    const body = await response.json();
    result.innerHTML = "";
    for (const item of body.items) {
      const li = document.createElement("li");
      li.textContent = `${item.title || item.item_id} (score ${item.score.toFixed(2)}; predicted rating ${item.rating.toFixed(1)})`;
      result.appendChild(li);
    }
    meta.textContent = `${body.cold_start ? "popular movies (unknown user) · " : ""}${timing(response)}`;
  } catch (err) {
    showError(result, meta, err);
  }
});
