// MSFlow web page: send an image to POST /predict and show the verdict. No external assets.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const fileInput = $("file");
  const drop = $("drop");
  const keyInput = $("api-key");
  const statusEl = $("status");
  const resultEl = $("result");

  let lastFile = null;
  let lastStatus = 0;
  let requestSeq = 0;
  let originalUrl = null;

  // The score shown on the page; tests format the API's JSON score the same way (Python f"{x:.4f}").
  function formatScore(x) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(4) : "–";
  }

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
  }

  function headers() {
    const key = keyInput.value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
      if (body && body.detail !== undefined) return JSON.stringify(body.detail);
    } catch (e) {
      /* not JSON */
    }
    return response.statusText || "request failed";
  }

  function setNumber(id, value, text) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }

  function showResult(r, fileName) {
    const defective = r.decision === "defective";
    const decision = $("result-decision");
    decision.textContent = defective ? "DEFECTIVE" : "GOOD";
    decision.dataset.decision = r.decision;
    decision.className = "decision " + (defective ? "defective" : "good");

    setNumber("result-score", r.score, formatScore(r.score));
    setNumber("result-normalized", r.normalized_score, formatScore(r.normalized_score));
    setNumber("result-threshold", r.threshold, formatScore(r.threshold));
    $("result-defect-pixels").textContent = String(r.defect_pixels);
    $("result-size").textContent = r.width + " × " + r.height + " px";
    $("result-time").textContent = (typeof r.timing_ms === "number" ? r.timing_ms.toFixed(1) : "–") + " ms";

    const fill = $("meter-fill");
    const norm = typeof r.normalized_score === "number" ? Math.min(1, Math.max(0, r.normalized_score)) : 0;
    fill.style.width = (norm * 100).toFixed(1) + "%";
    fill.className = "meter-fill" + (defective ? " defective" : "");

    if (r.overlay_png) $("overlay").src = "data:image/png;base64," + r.overlay_png;
    $("original-name").textContent = "Uploaded image: " + fileName;
    resultEl.hidden = false;
  }

  async function predict(file) {
    if (!file) return;
    lastFile = file;
    const seq = ++requestSeq;
    if (originalUrl) URL.revokeObjectURL(originalUrl);
    originalUrl = URL.createObjectURL(file);
    $("original").src = originalUrl;
    setStatus("busy", "Analysing " + file.name + "…");

    const form = new FormData();
    form.append("file", file, file.name || "image");
    let response;
    try {
      response = await fetch("/predict?overlay=true", { method: "POST", body: form, headers: headers() });
    } catch (e) {
      if (seq === requestSeq) setStatus("error", "Cannot reach the server: " + e.message);
      return;
    }
    if (seq !== requestSeq) return; // a newer image was chosen meanwhile
    lastStatus = response.status;
    if (!response.ok) {
      const detail = await errorText(response);
      if (seq !== requestSeq) return;
      let hint = "";
      if (response.status === 401) {
        hint = " Type the API key above.";
        keyInput.focus();
      }
      setStatus("error", "Error " + response.status + ": " + detail + hint);
      return;
    }
    const result = await response.json();
    if (seq !== requestSeq) return;
    showResult(result, file.name || "image");
    setStatus("done", "Done: " + (file.name || "image") + ".");
  }

  async function loadModelInfo() {
    const info = $("model-info");
    try {
      const response = await fetch("/model", { headers: headers() });
      if (response.status === 401) {
        info.textContent = "This server needs an API key: type it above to see the model and analyse images.";
        return;
      }
      if (!response.ok) {
        info.textContent = "Model details unavailable (" + response.status + ").";
        return;
      }
      const m = await response.json();
      const model = (m.config && m.config.model) || {};
      const auroc = m.metrics && typeof m.metrics.image_auroc === "number"
        ? " · image AUROC " + m.metrics.image_auroc.toFixed(1) + " %" : "";
      info.textContent = "Model: " + (model.backbone || "?") + ", " + (Array.isArray(model.image_size) ? model.image_size.join("x") : (model.image_size || "?")) + " px" +
        (m.dataset ? " · trained on " + m.dataset : "") + auroc + " · msflow " + (m.msflow_version || "?");
    } catch (e) {
      info.textContent = "Cannot reach the server.";
    }
  }

  fileInput.addEventListener("change", () => {
    if (fileInput.files && fileInput.files.length) predict(fileInput.files[0]);
    fileInput.value = ""; // choosing the same file again still triggers a prediction
  });

  drop.addEventListener("click", (e) => {
    // The label and the input open the picker themselves (their clicks bubble up here too).
    if (e.target === fileInput || e.target.closest("label")) return;
    fileInput.click();
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      fileInput.click();
    }
  });
  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    }));
  ["dragleave", "dragend"].forEach((type) =>
    drop.addEventListener(type, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) predict(files[0]);
  });
  // A file dropped next to the drop zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  document.addEventListener("paste", (e) => {
    const items = (e.clipboardData && e.clipboardData.files) || [];
    if (items.length) predict(items[0]);
  });

  keyInput.addEventListener("change", () => {
    loadModelInfo();
    if (lastStatus === 401 && lastFile) predict(lastFile); // retry with the key just typed
  });

  loadModelInfo();
})();
