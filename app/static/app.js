// The demo page's client: draws or loads an image, downsamples it to the model's input in the
// browser (so the preview is exactly the array the model gets), and shows every block's answer.
"use strict";

(() => {
  const KEY_STORAGE = "hff-serve-api-key";
  const API_KEY_HEADER = "X-API-Key";
  // Drawing resolution is a whole multiple of the model's H and W near this size, so the
  // area downsampling of a drawing averages exact square cells.
  const DRAW_TARGET_PX = 256;
  // Stroke width as a share of the drawing's long side: about one cell of an 8x8 digit, which
  // makes a full-height digit cover roughly the ink share of scikit-learn's digits.
  const STROKE_SHARE = 0.11;
  // Empty border left when a drawing is centred and scaled, as a share of each side.
  const FIT_MARGIN = 0.03;
  const MAX_UPSCALE = 6;
  const MAX_IMAGE_SIDE = 1024; // larger uploads are first reduced by the browser
  const MAX_BARS = 20; // more classes than this: a block's chart shows its top 10 only

  const $ = (id) => document.getElementById(id);

  const state = {
    model: null,
    models: [], // every served model (/v1/models), the default first
    C: 1, H: 8, W: 8, scale: 32,
    strokes: [], // each stroke is a list of [x, y] in drawing-canvas pixels
    image: null, // uploaded image: {name, width, height, rgb: Float32Array (3, h, w)}
    instance: null, // nested [C][H][W] array: exactly what the next request sends
    seq: 0, // requests sent (and results cleared); only the newest answer is shown
    shown: 0, // the seq whose answer is on screen
    retry: null, // what to run again once an API key is entered
    lastRequest: null,
  };

  // ---------- API ----------

  class NeedKeyError extends Error {}

  async function api(path, init = {}) {
    const headers = Object.assign({}, init.headers);
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers[API_KEY_HEADER] = key;
    let resp;
    try {
      resp = await fetch(path, Object.assign({}, init, { headers }));
    } catch (err) {
      throw new Error(`Cannot reach the service (${err.message}).`);
    }
    if (resp.status === 401) throw new NeedKeyError(key ? "rejected" : "missing");
    let body = null;
    try {
      body = await resp.json();
    } catch (err) {
      body = null;
    }
    if (!resp.ok) {
      const what = body && typeof body.error === "string" ? body.error : resp.statusText;
      throw new Error(`The service answered ${resp.status}: ${what}`);
    }
    return body;
  }

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  function handleFailure(err, retry) {
    if (err instanceof NeedKeyError) {
      state.retry = retry;
      const panel = $("key-panel");
      panel.hidden = false;
      showError(err.message === "rejected"
        ? "The API key was not accepted. Enter the right key."
        : "");
      $("api-key").value = "";
      $("api-key").focus();
      return;
    }
    showError(err.message);
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-panel").hidden = true;
    showError("");
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  });

  // ---------- model metadata ----------

  async function loadModel() {
    $("model-status").textContent = "Loading model metadata…";
    let body;
    try {
      body = await api("v1/models");
    } catch (err) {
      $("model-status").textContent = "Model metadata unavailable.";
      handleFailure(err, loadModel);
      return;
    }
    const models = body && Array.isArray(body.models)
      ? body.models.filter((m) => m && m.input && Array.isArray(m.input.shape)) : [];
    if (!models.length) {
      $("model-status").textContent = "The service lists no model.";
      return;
    }
    // A model repository serves several: the selector picks the one predictions go to
    // (the first is the server's default, the one plain /predict answers from).
    state.models = models;
    const select = $("model-select");
    select.replaceChildren(...models.map((m, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = `${m.name} (version ${m.version})`;
      return option;
    }));
    $("model-picker").hidden = models.length < 2;
    setModel(models[0]);
  }

  $("model-select").addEventListener("change", (e) => {
    const model = state.models[Number(e.target.value)];
    if (model) setModel(model);
  });

  function fmtPct(p) {
    return `${(100 * p).toFixed(1)}%`;
  }

  function setModel(model) {
    const shape = model.input.shape;
    state.model = model;
    state.C = shape.length === 3 ? shape[0] : 1;
    state.H = shape[shape.length - 2];
    state.W = shape[shape.length - 1];
    state.scale = Math.max(1, Math.round(DRAW_TARGET_PX / Math.max(state.H, state.W)));

    $("model-status").textContent = "Ready.";
    $("meta-name").textContent = model.name;
    $("meta-version").textContent = model.version;
    const range = model.input.range ? ` in [${model.input.range.join(", ")}]` : "";
    $("meta-input").textContent = `${shape.join("×")} ${model.input.dtype || ""}${range}`;
    const names = model.class_names || [];
    const shown = names.slice(0, 12).join(" ");
    $("meta-classes").textContent =
      `${model.num_classes}: ${shown}${names.length > 12 ? " …" : ""}`;
    $("meta-blocks").textContent = String(model.num_blocks);
    const ee = model.early_exit || {};
    const th = (ee.thresholds || []).map((t) => (t === null ? "never" : t.toFixed(3)));
    $("meta-thresholds").textContent = th.length
      ? `${th.join(", ")} (default ${ee.default_mode || "auto"})`
      : "none";
    const points = ee.operating_points || [];
    showPoint(typeof ee.current_point === "number" ? ee.current_point : 0,
              points.length && points[ee.current_point || 0]
                ? points[ee.current_point || 0].expected_accuracy : null);
    const acc = model.test_accuracy_per_block || [];
    $("meta-accuracy").textContent = acc.length ? acc.map(fmtPct).join(" · ") : "n/a";
    const eps = (model.execution_providers || []).join(", ");
    $("meta-device").textContent = `${model.device || "?"}${eps ? ` (${eps})` : ""}`;
    $("model-meta").hidden = false;

    // Start the switch where the service's own default is (HFF_EARLY_EXIT).
    const firstT = (ee.thresholds || []).find((t) => t !== null);
    if (typeof firstT === "number") setThreshold(firstT);
    let mode = "auto";
    if (ee.default_mode === "off") mode = "off";
    if (typeof ee.default_mode === "number") {
      mode = "threshold";
      setThreshold(ee.default_mode);
    }
    document.querySelector(`input[name="exit-mode"][value="${mode}"]`).checked = true;
    syncExitControls();

    const canvas = $("draw-canvas");
    canvas.width = state.W * state.scale;
    canvas.height = state.H * state.scale;
    canvas.style.aspectRatio = `${state.W} / ${state.H}`;
    const preview = $("preview-canvas");
    preview.width = state.W;
    preview.height = state.H;
    preview.style.aspectRatio = `${state.W} / ${state.H}`;
    $("preview-caption").textContent =
      `Model input, ${state.C}×${state.H}×${state.W}, drawn large`;
    state.strokes = [];
    state.image = null;
    redrawCanvas();
    updateInput();
  }

  // ---------- drawing ----------

  function lineWidth() {
    const canvas = $("draw-canvas");
    return STROKE_SHARE * Math.max(canvas.width, canvas.height);
  }

  function strokeStyle(ctx, width) {
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineWidth = width;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
  }

  function drawStroke(ctx, pts, map = (p) => p) {
    if (!pts.length) return;
    const a = map(pts[0]);
    if (pts.length === 1) {
      ctx.beginPath();
      ctx.arc(a[0], a[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    for (let i = 1; i < pts.length; i++) {
      const p = map(pts[i]);
      ctx.lineTo(p[0], p[1]);
    }
    ctx.stroke();
  }

  function redrawCanvas() {
    const canvas = $("draw-canvas");
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (state.image) {
      // Display only: the model input is computed from the image's own pixels.
      const img = state.image;
      const tmp = document.createElement("canvas");
      tmp.width = img.width;
      tmp.height = img.height;
      tmp.getContext("2d").putImageData(toImageData(img.rgb, 3, img.height, img.width,
                                                   $("invert-check").checked), 0, 0);
      ctx.imageSmoothingEnabled = img.width > canvas.width;
      ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
      return;
    }
    strokeStyle(ctx, lineWidth());
    for (const s of state.strokes) drawStroke(ctx, s);
  }

  function canvasPoint(ev) {
    const canvas = $("draw-canvas");
    const r = canvas.getBoundingClientRect();
    return [
      ((ev.clientX - r.left) / r.width) * canvas.width,
      ((ev.clientY - r.top) / r.height) * canvas.height,
    ];
  }

  let drawing = null; // the stroke being drawn, while a pointer is down

  function onPointerDown(ev) {
    if (ev.button !== 0 && ev.pointerType === "mouse") return;
    ev.preventDefault();
    const canvas = $("draw-canvas");
    canvas.setPointerCapture(ev.pointerId);
    if (state.image) {
      // Drawing replaces an uploaded image rather than scribbling over it.
      state.image = null;
      state.strokes = [];
      redrawCanvas();
    }
    drawing = [canvasPoint(ev)];
    state.strokes.push(drawing);
    const ctx = canvas.getContext("2d");
    strokeStyle(ctx, lineWidth());
    drawStroke(ctx, drawing);
  }

  function onPointerMove(ev) {
    if (!drawing) return;
    ev.preventDefault();
    const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
    const ctx = $("draw-canvas").getContext("2d");
    strokeStyle(ctx, lineWidth());
    for (const e of events.length ? events : [ev]) {
      const last = drawing[drawing.length - 1];
      const p = canvasPoint(e);
      drawing.push(p);
      drawStroke(ctx, [last, p]);
    }
  }

  function onPointerUp(ev) {
    if (!drawing) return;
    ev.preventDefault();
    drawing = null;
    inputChanged();
  }

  const drawCanvas = $("draw-canvas");
  drawCanvas.addEventListener("pointerdown", onPointerDown);
  drawCanvas.addEventListener("pointermove", onPointerMove);
  drawCanvas.addEventListener("pointerup", onPointerUp);
  drawCanvas.addEventListener("pointercancel", onPointerUp);

  $("clear-btn").addEventListener("click", () => {
    state.strokes = [];
    state.image = null;
    $("file-input").value = "";
    redrawCanvas();
    updateInput();
    clearResults();
  });

  // ---------- images ----------

  async function loadFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name} is not an image (${file.type}).`);
      return;
    }
    const url = URL.createObjectURL(file);
    const img = new Image();
    try {
      img.src = url;
      await img.decode();
    } catch (err) {
      showError(`Cannot read ${file.name} as an image.`);
      return;
    } finally {
      URL.revokeObjectURL(url);
    }
    const f = Math.min(1, MAX_IMAGE_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const w = Math.max(1, Math.round(img.naturalWidth * f));
    const h = Math.max(1, Math.round(img.naturalHeight * f));
    const tmp = document.createElement("canvas");
    tmp.width = w;
    tmp.height = h;
    const ctx = tmp.getContext("2d");
    ctx.fillStyle = "#000"; // transparent parts read as background (black, no ink)
    ctx.fillRect(0, 0, w, h);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    const rgb = new Float32Array(3 * h * w);
    for (let i = 0; i < h * w; i++) {
      for (let c = 0; c < 3; c++) rgb[c * h * w + i] = data[4 * i + c] / 255;
    }
    // Fit, not stretch: pad the photo to the model's aspect ratio with its own border colour, so
    // a garment keeps its shape in the 28x28 input (Fashion-MNIST's images are made that way).
    const fitted = letterbox(rgb, h, w, state.H / state.W);
    state.image = { name: file.name, width: fitted.w, height: fitted.h, rgb: fitted.rgb };
    state.strokes = [];
    // Photos of paper (and product shots) are dark on a light background, the inverse of the
    // training images (light ink or garment on black).
    $("invert-check").checked = borderMean(rgb, h, w) > 0.5;
    showError("");
    redrawCanvas();
    inputChanged();
  }

  // (3, h, w) planes padded, centred, to aspect ratio h/w = `aspect`, each channel filled with
  // the mean of its border pixels (the photo's background).
  function letterbox(rgb, h, w, aspect) {
    const H = Math.max(h, Math.round(w * aspect));
    const W = Math.max(w, Math.round(h / aspect));
    if (H === h && W === w) return { rgb, h, w };
    const out = new Float32Array(3 * H * W);
    const top = Math.floor((H - h) / 2);
    const left = Math.floor((W - w) / 2);
    for (let c = 0; c < 3; c++) {
      const src = rgb.subarray(c * h * w, (c + 1) * h * w);
      let sum = 0;
      let n = 0;
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          if (y !== 0 && y !== h - 1 && x !== 0 && x !== w - 1) continue;
          sum += src[y * w + x];
          n++;
        }
      }
      const plane = out.subarray(c * H * W, (c + 1) * H * W);
      plane.fill(n ? sum / n : 0);
      for (let y = 0; y < h; y++) plane.set(src.subarray(y * w, (y + 1) * w), (top + y) * W + left);
    }
    return { rgb: out, h: H, w: W };
  }

  function borderMean(rgb, h, w) {
    let sum = 0;
    let n = 0;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (y !== 0 && y !== h - 1 && x !== 0 && x !== w - 1) continue;
        const i = y * w + x;
        sum += (rgb[i] + rgb[h * w + i] + rgb[2 * h * w + i]) / 3;
        n++;
      }
    }
    return n ? sum / n : 0;
  }

  $("file-input").addEventListener("change", (ev) => loadFile(ev.target.files[0]));

  const dropZone = $("drop-zone");
  dropZone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dropZone.classList.remove("dragging");
    loadFile(ev.dataTransfer.files[0]);
  });
  // A file dropped beside the drop zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  // ---------- from pixels to the model input ----------

  // For each output index, the source indices it covers and their overlap weights, so that a
  // resize from n to m averages exactly the source area under each output cell.
  function areaWeights(n, m) {
    const out = [];
    const step = n / m;
    for (let i = 0; i < m; i++) {
      const lo = i * step;
      const hi = (i + 1) * step;
      const taps = [];
      for (let j = Math.floor(lo); j < Math.min(n, Math.ceil(hi)); j++) {
        const w = Math.min(hi, j + 1) - Math.max(lo, j);
        if (w > 1e-9) taps.push([j, w / step]);
      }
      out.push(taps);
    }
    return out;
  }

  // (h0, w0) plane -> (H, W) plane by area averaging.
  function areaResize(src, h0, w0, H, W) {
    const wy = areaWeights(h0, H);
    const wx = areaWeights(w0, W);
    const rows = new Float32Array(H * w0); // (H, w0): rows averaged first
    for (let i = 0; i < H; i++) {
      for (const [j, w] of wy[i]) {
        const s = j * w0;
        const d = i * w0;
        for (let x = 0; x < w0; x++) rows[d + x] += w * src[s + x];
      }
    }
    const out = new Float32Array(H * W);
    for (let i = 0; i < H; i++) {
      for (let k = 0; k < W; k++) {
        let v = 0;
        for (const [j, w] of wx[k]) v += w * rows[i * w0 + j];
        out[i * W + k] = v;
      }
    }
    return out;
  }

  function strokesBox(strokes) {
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -Infinity;
    let y1 = -Infinity;
    for (const s of strokes) {
      for (const [x, y] of s) {
        x0 = Math.min(x0, x);
        y0 = Math.min(y0, y);
        x1 = Math.max(x1, x);
        y1 = Math.max(y1, y);
      }
    }
    return [x0, y0, x1, y1];
  }

  // The drawing as a (height, width) grey plane at drawing resolution; with "centre and
  // scale" the strokes are re-drawn so their ink box fills the frame at the same stroke width.
  function drawingPlane() {
    const main = $("draw-canvas");
    const cw = main.width;
    const ch = main.height;
    const tmp = document.createElement("canvas");
    tmp.width = cw;
    tmp.height = ch;
    const ctx = tmp.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, cw, ch);
    const lw = lineWidth();
    strokeStyle(ctx, lw);
    let map = (p) => p;
    if ($("fit-check").checked) {
      const [x0, y0, x1, y1] = strokesBox(state.strokes);
      const bw = x1 - x0;
      const bh = y1 - y0;
      const availW = cw * (1 - 2 * FIT_MARGIN) - lw;
      const availH = ch * (1 - 2 * FIT_MARGIN) - lw;
      const f = Math.min(MAX_UPSCALE, bw > 0 ? availW / bw : Infinity,
                         bh > 0 ? availH / bh : Infinity);
      const k = Number.isFinite(f) ? f : 1;
      const cx = (x0 + x1) / 2;
      const cy = (y0 + y1) / 2;
      map = ([x, y]) => [cw / 2 + (x - cx) * k, ch / 2 + (y - cy) * k];
    }
    for (const s of state.strokes) drawStroke(ctx, s, map);
    const data = ctx.getImageData(0, 0, cw, ch).data;
    const plane = new Float32Array(cw * ch);
    for (let i = 0; i < cw * ch; i++) plane[i] = data[4 * i] / 255;
    return { plane, h: ch, w: cw };
  }

  function hasInput() {
    return Boolean(state.image) || state.strokes.length > 0;
  }

  // The model input as C planes of H*W values, rounded as they will be sent.
  function computePlanes() {
    const { C, H, W } = state;
    let planes;
    if (state.image) {
      const { rgb, height: h, width: w } = state.image;
      const n = h * w;
      const inv = $("invert-check").checked;
      const chan = (c) => {
        const p = rgb.subarray(c * n, (c + 1) * n);
        return inv ? p.map((v) => 1 - v) : p;
      };
      if (C === 3) {
        planes = [0, 1, 2].map((c) => areaResize(chan(c), h, w, H, W));
      } else {
        // ITU-R 601 luma, the grey conversion Pillow applies to server-side uploads too.
        const r = chan(0);
        const g = chan(1);
        const b = chan(2);
        const grey = new Float32Array(n);
        for (let i = 0; i < n; i++) grey[i] = 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i];
        const one = areaResize(grey, h, w, H, W);
        planes = Array.from({ length: C }, () => one);
      }
    } else {
      const { plane, h, w } = drawingPlane();
      const one = areaResize(plane, h, w, H, W);
      planes = Array.from({ length: C }, () => one);
    }
    return planes.map((p) => Array.from(p, (v) => Math.round(Math.min(1, Math.max(0, v)) * 1000) / 1000));
  }

  function toImageData(planes, C, H, W, invert = false) {
    const img = new ImageData(W, H);
    const n = H * W;
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < 3; c++) {
        let v = C === 3 ? planes[c * n + i] : planes[i];
        if (invert) v = 1 - v;
        img.data[4 * i + c] = Math.round(255 * v);
      }
      img.data[4 * i + 3] = 255;
    }
    return img;
  }

  function renderPreview(planes) {
    const { C, H, W } = state;
    const canvas = $("preview-canvas");
    const ctx = canvas.getContext("2d");
    if (!planes) {
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, W, H);
      return;
    }
    const flat = new Float32Array(planes.length * H * W);
    planes.forEach((p, c) => flat.set(p, c * H * W));
    ctx.putImageData(toImageData(flat, C === 3 ? 3 : 1, H, W), 0, 0);
  }

  function updateInput() {
    const note = $("source-note");
    if (state.image) {
      note.textContent = `Image: ${state.image.name} (${state.image.width}×${state.image.height}). Draw to replace it.`;
      note.hidden = false;
    } else {
      note.hidden = true;
    }
    if (!state.model || !hasInput()) {
      state.instance = null;
      renderPreview(null);
    } else {
      const planes = computePlanes();
      renderPreview(planes);
      const { H, W } = state;
      state.instance = planes.map((p) =>
        Array.from({ length: H }, (_, y) => p.slice(y * W, (y + 1) * W)));
    }
    $("predict-btn").disabled = !state.instance;
  }

  function inputChanged() {
    updateInput();
    if (!state.instance) return;
    if ($("live-check").checked) {
      predict();
    } else {
      $("result-title").dataset.stale = "true";
      document.querySelector(".result-panel").classList.add("stale");
    }
  }

  $("fit-check").addEventListener("change", inputChanged);
  $("invert-check").addEventListener("change", () => {
    redrawCanvas();
    inputChanged();
  });

  // ---------- early-exit controls ----------

  function setThreshold(t) {
    $("threshold-range").value = String(t);
    $("threshold-value").textContent = Number($("threshold-range").value).toFixed(2);
  }

  function exitMode() {
    const mode = document.querySelector('input[name="exit-mode"]:checked').value;
    if (mode === "threshold") return { threshold: Number($("threshold-range").value) };
    return mode;
  }

  function syncExitControls() {
    const mode = document.querySelector('input[name="exit-mode"]:checked').value;
    $("threshold-range").disabled = mode !== "threshold";
  }

  document.querySelectorAll('input[name="exit-mode"]').forEach((el) =>
    el.addEventListener("change", () => {
      syncExitControls();
      if (state.instance) predict();
    }));
  $("threshold-range").addEventListener("input", () =>
    setThreshold($("threshold-range").value));
  $("threshold-range").addEventListener("change", () => {
    if (state.instance) predict();
  });

  // ---------- prediction ----------

  async function predict() {
    if (!state.model || !state.instance) return;
    const seq = ++state.seq;
    const request = {
      instances: [state.instance],
      early_exit: exitMode(),
      top_k: Math.min(3, state.model.num_classes || 3),
      return_blocks: true,
    };
    state.lastRequest = request;
    const btn = $("predict-btn");
    btn.textContent = "Predicting…";
    document.querySelector(".result-panel").setAttribute("aria-busy", "true");
    try {
      const path = `v1/models/${encodeURIComponent(state.model.name)}:predict`;
      const body = await api(path, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
      });
      if (seq !== state.seq) return; // a newer request is on its way
      showError("");
      renderPrediction(body.predictions[0], request.early_exit);
      state.shown = seq;
    } catch (err) {
      if (seq === state.seq) handleFailure(err, predict);
    } finally {
      if (seq === state.seq) {
        btn.textContent = "Predict";
        document.querySelector(".result-panel").removeAttribute("aria-busy");
      }
    }
  }

  $("predict-btn").addEventListener("click", predict);

  function clearResults() {
    state.seq++;
    $("prediction").innerHTML =
      '<p class="placeholder">Draw something or choose an image, then press Predict.</p>';
    $("blocks").innerHTML = "";
    document.querySelector(".result-panel").classList.remove("stale");
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  // The operating point 'auto' uses now: 0 is the calibrated one; the service moves to cheaper
  // ones under load when it has a latency target (HFF_LATENCY_TARGET_MS).
  function showPoint(index, accuracy) {
    const ee = (state.model && state.model.early_exit) || {};
    const count = (ee.operating_points || []).length;
    const target = ee.latency_target_ms ? `, target ${ee.latency_target_ms} ms` : ", no latency target";
    $("meta-point").textContent =
      `#${index}${index === 0 ? " (calibrated)" : " (cheaper, under load)"}` +
      (typeof accuracy === "number" ? `, expected accuracy ${fmtPct(accuracy)}` : "") +
      ` — ${count} point${count === 1 ? "" : "s"}${target}`;
  }

  function renderPrediction(pred, mode) {
    document.querySelector(".result-panel").classList.remove("stale");
    const L = state.model.num_blocks;
    const early = pred.exit_block < L;
    const saved = L - pred.exit_block;
    const box = $("prediction");
    box.replaceChildren(
      el("p", { class: "pred-main" },
        el("span", { class: "pred-class", id: "pred-class" }, String(pred.class_name)),
        el("span", { class: "pred-confidence", id: "pred-confidence" },
          `${fmtPct(pred.confidence)} confident`)),
      el("p", { class: `pred-exit${early ? " early" : ""}`, id: "pred-exit",
                "data-exit-block": String(pred.exit_block) },
        `Exited at block ${pred.exit_block} of ${L}`,
        early ? ` — early exit, ${saved} block${saved > 1 ? "s" : ""} skipped` : ""),
    );
    const point = pred.operating_point;
    if (point && typeof point.index === "number") {
      showPoint(point.index, point.expected_accuracy);
      box.append(el("p", { class: "pred-point", id: "pred-point" },
        `Operating point #${point.index}` + (typeof point.expected_accuracy === "number"
          ? ` (expected accuracy ${fmtPct(point.expected_accuracy)})` : "")));
    }
    if (pred.deadline_missed) {
      box.append(el("p", { class: "pred-point" },
        "Answered from the block it reached: its deadline passed"));
    }
    if (Array.isArray(pred.top_k) && pred.top_k.length > 1) {
      const list = el("ol", { class: "topk", "aria-label": "Top classes" });
      for (const t of pred.top_k) {
        list.append(el("li", {}, el("span", {}, String(t.class_name)), " ",
                       el("span", { class: "num" }, fmtPct(t.probability))));
      }
      box.append(list);
    }
    renderBlocks(pred, mode);
  }

  function blockStatus(b, pred, L, mode) {
    const top = Math.max(...b.probabilities);
    const t = b.threshold;
    if (mode === "off") return b.block === L ? "final block" : "early exit off: continued";
    if (b.block === pred.exit_block) {
      if (b.block === L) return "final block: answered here";
      return typeof t === "number" ? `exited here: top ${top.toFixed(3)} ≥ ${t.toFixed(3)}` : "exited here";
    }
    if (t === null || t === undefined) return "no exit at this block: continued";
    return `continued: top ${top.toFixed(3)} < ${t.toFixed(3)}`;
  }

  function barChart(b, names) {
    let idx = b.probabilities.map((_, i) => i);
    let note = "";
    if (idx.length > MAX_BARS) {
      idx = idx.sort((i, j) => b.probabilities[j] - b.probabilities[i]).slice(0, 10);
      note = `top 10 of ${b.probabilities.length} classes`;
    }
    const best = b.probabilities.indexOf(Math.max(...b.probabilities));
    const label = idx.map((i) => `${names[i] ?? i} ${(100 * b.probabilities[i]).toFixed(1)}%`)
      .join(", ");
    const chart = el("div", {
      class: "chart", role: "img",
      "aria-label": `Block ${b.block} class probabilities: ${label}` +
        (typeof b.threshold === "number" ? `; threshold ${b.threshold.toFixed(3)}` : ""),
      "data-block": String(b.block),
    });
    const plot = el("div", { class: "plot" });
    for (const i of idx) {
      const p = b.probabilities[i];
      plot.append(el("div", { class: `bar-col${i === best ? " best" : ""}` },
        el("div", { class: "bar", style: `height:${(100 * p).toFixed(2)}%`,
                    title: `${names[i] ?? i}: ${(100 * p).toFixed(1)}%` })));
    }
    if (typeof b.threshold === "number") {
      plot.append(el("div", { class: "threshold-line",
                              style: `bottom:${(100 * b.threshold).toFixed(2)}%` },
        el("span", {}, b.threshold.toFixed(2))));
    }
    const labels = el("div", { class: "bar-labels", "aria-hidden": "true" });
    for (const i of idx) labels.append(el("span", {}, String(names[i] ?? i)));
    chart.append(plot, labels);
    if (note) chart.append(el("p", { class: "hint" }, note));
    return chart;
  }

  function renderBlocks(pred, mode) {
    const L = state.model.num_blocks;
    const names = state.model.class_names || [];
    const ran = new Map((pred.blocks || []).map((b) => [b.block, b]));
    const list = $("blocks");
    list.replaceChildren();
    if (!Array.isArray(pred.blocks)) {
      list.append(el("li", { class: "block skipped" },
        el("p", { class: "block-status" },
          "This service does not return per-block probabilities (return_blocks).")));
      return;
    }
    for (let k = 1; k <= L; k++) {
      const b = ran.get(k);
      if (!b) {
        list.append(el("li", { class: "block skipped" },
          el("h4", {}, `Block ${k}`),
          el("p", { class: "block-status" }, `not run: the request exited at block ${pred.exit_block}`)));
        continue;
      }
      const exitedHere = k === pred.exit_block;
      list.append(el("li", { class: `block ran${exitedHere ? " exit" : ""}` },
        el("h4", {}, `Block ${k}`),
        el("p", { class: "block-status" }, blockStatus(b, pred, L, mode)),
        barChart(b, names)));
    }
  }

  // A handle for tests and for curious users in the console.
  window.hffDemo = { state, areaResize, letterbox };

  syncExitControls();
  loadModel();
})();
