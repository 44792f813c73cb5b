// deepfeat serve: the search page. Plain JavaScript, no dependencies; every text from the server is
// set with textContent (never parsed as HTML), so record ids and labels cannot inject markup.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const state = { info: null, query: null, seq: 0, timer: null, examples: [] };
  // fields a hit card does not list (shown elsewhere on the card, or not useful there)
  const CARD_SKIP = new Set(["rank", "pk", "score", "image", "record_id", "label", "path"]);
  // the evaluation flags of the record contract: in the tooltip, not on the card
  const TOOLTIP_ONLY = new Set(["is_query", "is_gallery"]);

  // ----------------------------------------------------------------------------------------------
  // talking to the server

  function detailOf(body) {
    if (!body || body.detail === undefined) return null;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    return JSON.stringify(body.detail);
  }

  async function api(url, options) {
    let resp;
    try {
      resp = await fetch(url, options);
    } catch (err) {
      throw new Error(`the server did not answer (${err.message}); is 'deepfeat serve' still running?`);
    }
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (!resp.ok) throw new Error(detailOf(body) || `${resp.status} ${resp.statusText}: ${text.slice(0, 200)}`);
    return body;
  }

  // ----------------------------------------------------------------------------------------------
  // messages

  function showError(message) {
    $("#error-text").textContent = message;
    $("#error").hidden = false;
  }

  function clearError() {
    $("#error").hidden = true;
    $("#error-text").textContent = "";
  }

  function setStatus(text, busy) {
    const status = $("#status");
    status.textContent = text;
    status.classList.toggle("busy", Boolean(busy));
  }

  function formatBytes(n) {
    return n >= 1048576 ? `${(n / 1048576).toFixed(0)} MB` : `${(n / 1024).toFixed(0)} KB`;
  }

  // ----------------------------------------------------------------------------------------------
  // controls: top-k, group-by, filters

  function fieldInfo(name) {
    return (state.info.fields || []).find((f) => f.name === name);
  }

  function isNumeric(field) {
    return field && (field.dtype === "INT64" || field.dtype === "DOUBLE");
  }

  function setupControls(info) {
    const groupBy = $("#group-by");
    for (const name of info.group_by) groupBy.append(new Option(name, name));
    const lists = $("#datalists");
    info.fields.forEach((f, i) => {
      let values = f.values;
      if (f.dtype === "BOOL") values = ["true", "false"];
      if (!values || !values.length) return;
      const list = el("datalist");
      list.id = `values-${i}`;
      for (const v of values) list.append(new Option(String(v)));
      lists.append(list);
      f.list = list.id;
    });
    $("#top-k").max = String(info.max_top_k);
    $("#dz-sub").textContent = `or click to choose a file, or paste one (up to ${formatBytes(info.max_upload_bytes)})`;
    if (!info.fields.length) $("#add-filter").disabled = true;
  }

  function addFilterRow() {
    const fields = state.info.fields;
    const row = el("div", "filter");
    const field = el("select", "f-field");
    for (const f of fields) field.append(new Option(f.name, f.name));
    const preferred = fields.find((f) => f.name === "label") || fields[0];
    field.value = preferred.name;
    const op = el("select", "f-op");
    const value = el("input", "f-value");
    value.placeholder = "value";
    const remove = el("button", "link f-remove", "×");
    remove.type = "button";
    remove.title = "remove this filter";

    const syncOps = () => {
      const f = fieldInfo(field.value);
      const ops = isNumeric(f) ? state.info.operators : ["==", "!="];
      const current = op.value;
      op.replaceChildren(...ops.map((o) => new Option(o, o)));
      op.value = ops.includes(current) ? current : "==";
      value.type = isNumeric(f) ? "number" : "text";
      if (f && f.list) value.setAttribute("list", f.list);
      else value.removeAttribute("list");
    };
    syncOps();
    field.addEventListener("change", () => { syncOps(); scheduleSearch(); });
    op.addEventListener("change", scheduleSearch);
    value.addEventListener("input", () => scheduleSearch(450));
    remove.addEventListener("click", () => { row.remove(); scheduleSearch(); });
    row.append(field, op, value, remove);
    $("#filters").append(row);
    value.focus();
  }

  function searchParams() {
    const filters = [];
    for (const row of document.querySelectorAll("#filters .filter")) {
      const name = row.querySelector(".f-field").value;
      const raw = row.querySelector(".f-value").value;
      if (raw === "") continue;
      const f = fieldInfo(name);
      const value = isNumeric(f) && raw.trim() !== "" && !Number.isNaN(Number(raw)) ? Number(raw) : raw;
      filters.push({ field: name, op: row.querySelector(".f-op").value, value });
    }
    const params = { top_k: Number($("#top-k").value) || 12, filters };
    const groupBy = $("#group-by").value;
    if (groupBy) params.group_by = groupBy;
    return params;
  }

  function scheduleSearch(delay) {
    if (!state.query) return;
    clearTimeout(state.timer);
    state.timer = setTimeout(runSearch, delay || 150);
  }

  // ----------------------------------------------------------------------------------------------
  // queries: upload, drop, paste, examples

  function queryFile(file) {
    if (!file) return;
    const limit = state.info ? state.info.max_upload_bytes : Infinity;
    if (file.size > limit) {
      showError(`'${file.name}' is ${formatBytes(file.size)}; the limit is ${formatBytes(limit)}. Upload a smaller image.`);
      return;
    }
    state.query = { kind: "upload", file };
    markExample(null);
    runSearch();
  }

  function queryRecord(example) {
    state.query = { kind: "id", id: example.id, label: example.label, image: example.image };
    markExample(example.id);
    runSearch();
  }

  function markExample(id) {
    for (const b of document.querySelectorAll("#examples .example")) {
      b.classList.toggle("selected", b.dataset.recordId === id);
    }
  }

  function thumb(url, alt, placeholder) {
    const box = el("div", "thumb");
    if (url) {
      const img = el("img");
      img.alt = alt;
      img.decoding = "async";
      img.addEventListener("load", () => {
        if (img.naturalWidth < 100) img.classList.add("pixelated");
      });
      img.addEventListener("error", () => img.replaceWith(el("div", "noimg", "image unavailable")));
      img.src = url;
      box.append(img);
    } else {
      box.append(el("div", "noimg", placeholder || "no image file"));
    }
    return box;
  }

  async function loadExamples() {
    const box = $("#examples");
    try {
      state.examples = await api("/api/examples?n=8");
    } catch (err) {
      box.replaceChildren(el("div", "muted", `no examples: ${err.message}`));
      return;
    }
    box.replaceChildren(
      ...state.examples.map((ex) => {
        const b = el("button", "example");
        b.type = "button";
        b.dataset.recordId = ex.id;
        b.title = `${ex.id}${ex.label ? ` (${ex.label})` : ""}`;
        b.append(thumb(ex.image, ex.id, ex.label || "no image"));
        b.addEventListener("click", () => queryRecord(ex));
        return b;
      }),
    );
    if (state.query && state.query.kind === "id") markExample(state.query.id);
  }

  function setupQueryInputs() {
    const zone = $("#dropzone");
    const input = $("#file");
    input.addEventListener("change", () => {
      queryFile(input.files[0]);
      input.value = "";  // choosing the same file again still triggers a search
    });
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
    }
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      queryFile(e.dataTransfer.files[0]);
    });
    // a file dropped next to the zone should not navigate away from the page
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    document.addEventListener("paste", (e) => {
      const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
      if (file) queryFile(file);
    });
    $("#shuffle").addEventListener("click", loadExamples);
    $("#include-self").addEventListener("change", () => {
      if (state.query && state.query.kind === "id") scheduleSearch();
    });
    $("#top-k").addEventListener("change", () => scheduleSearch());
    $("#group-by").addEventListener("change", () => scheduleSearch());
    $("#add-filter").addEventListener("click", addFilterRow);
    $("#error-close").addEventListener("click", clearError);
  }

  // ----------------------------------------------------------------------------------------------
  // searching and drawing the results

  async function runSearch() {
    const query = state.query;
    if (!query) return;
    const mine = ++state.seq;
    const params = searchParams();
    clearError();
    setStatus("searching…", true);
    let options;
    if (query.kind === "upload") {
      const form = new FormData();
      form.append("image", query.file, query.file.name);
      form.append("params", JSON.stringify(params));
      options = { method: "POST", body: form };
    } else {
      params.id = query.id;
      params.include_self = $("#include-self").checked;
      options = { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(params) };
    }
    try {
      const result = await api("/api/search", options);
      if (mine !== state.seq) return;  // a newer search is under way
      drawQuery(result.query);
      drawPanels(result);
      const counts = result.panels.map((p) => `${p.label}: ${p.error ? "error" : `${p.hits.length} hits`}`);
      const ms = result.panels.map((p) => p.ms).reduce((a, b) => a + b, 0);
      setStatus(`${result.query.name} · ${counts.join(", ")} · ${ms.toFixed(0)} ms`, false);
    } catch (err) {
      if (mine !== state.seq) return;
      showError(err.message);
      setStatus("search failed; see the message above", false);
      $("#query").hidden = true;  // the card would show the previous query beside this error
      $("#panels").replaceChildren();
    }
  }

  function drawQuery(q) {
    $("#query").hidden = false;
    const img = $("#query-img");
    img.hidden = !q.image;
    $("#query-noimg").hidden = Boolean(q.image);
    if (q.image) img.src = q.image;
    img.onload = () => img.classList.toggle("pixelated", img.naturalWidth < 100);
    $("#query-kind").textContent = q.kind === "upload" ? `uploaded${q.size ? ` · ${q.size[0]}×${q.size[1]} px` : ""}` : "picked from the collection";
    $("#query-name").textContent = q.name;
    $("#query-name").title = q.name;
    $("#query-label").textContent = q.label ? `label: ${q.label}` : "";
  }

  function formatValue(v) {
    if (v === null || v === undefined || v === "") return "–";
    if (typeof v === "number" && !Number.isInteger(v)) return String(Number(v.toPrecision(4)));
    return String(v);
  }

  function hitCard(hit, panelInfo, queryLabel) {
    const card = el("figure", "hit");
    card.dataset.rank = hit.rank;
    card.dataset.recordId = hit.record_id;
    card.dataset.score = hit.score;
    if (queryLabel !== null && queryLabel !== undefined && hit.label !== undefined) {
      card.classList.add(hit.label === queryLabel ? "match" : "miss");
    }
    const box = thumb(hit.image, hit.record_id, "no image file");
    box.append(el("span", "rank", `#${hit.rank}`));
    const cap = el("figcaption");
    const scoreRow = el("div", "score-row");
    scoreRow.append(el("span", "score", hit.score.toFixed(4)));
    scoreRow.append(el("span", "muted", panelInfo.higher_is_closer ? panelInfo.metric.toLowerCase() : "L2 dist."));
    cap.append(scoreRow);
    if (panelInfo.higher_is_closer) {
      const bar = el("div", "bar");
      const fill = el("span");
      fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
      bar.append(fill);
      cap.append(bar);
    }
    if (hit.label !== undefined) cap.append(el("div", "hit-label", formatValue(hit.label)));
    const dl = el("dl", "fields");
    const tooltip = [`${hit.record_id}`, `score ${hit.score}`];
    for (const [k, v] of Object.entries(hit)) {
      if (CARD_SKIP.has(k)) {
        if (k === "label" || k === "path") tooltip.push(`${k}: ${formatValue(v)}`);
        continue;
      }
      tooltip.push(`${k}: ${formatValue(v)}`);
      if (TOOLTIP_ONLY.has(k)) continue;
      if (k === "group" && v === hit.record_id) continue;  // the default group is the record itself
      dl.append(el("dt", null, k), el("dd", null, formatValue(v)));
    }
    cap.append(dl);
    cap.append(el("div", "rid", hit.record_id));
    card.title = tooltip.join("\n");
    card.append(box, cap);
    return card;
  }

  function drawPanels(result) {
    const panels = $("#panels");
    panels.classList.toggle("compare", result.panels.length > 1);
    const queryLabel = result.query.label;
    panels.replaceChildren(
      ...result.panels.map((p) => {
        const info = state.info.panels[p.index];
        const section = el("section", "panel");
        section.dataset.panel = p.index;
        const head = el("header", "panel-head");
        head.append(el("h2", null, p.label));
        head.append(el("div", "muted", `${info.collection} · ${info.rows} rows · ${info.bundle_id}`));
        const stats = el("div", "panel-stats muted", `${p.hits.length} hits · ${p.ms.toFixed(0)} ms`);
        if (queryLabel !== null && queryLabel !== undefined && p.hits.length) {
          const same = p.hits.filter((h) => h.label === queryLabel).length;
          stats.textContent += ` · ${same}/${p.hits.length} share the query's label`;
        }
        head.append(stats);
        if (p.filter) head.append(el("code", "expr", p.filter));
        section.append(head);
        if (p.error) {
          section.append(el("div", "panel-error", p.error));
        } else if (!p.hits.length) {
          section.append(el("div", "muted empty", "no hits (a filter may exclude everything)"));
        }
        const grid = el("div", "grid");
        grid.append(...p.hits.map((h) => hitCard(h, info, queryLabel)));
        section.append(grid);
        return section;
      }),
    );
  }

  // ----------------------------------------------------------------------------------------------

  async function start() {
    setupQueryInputs();
    try {
      state.info = await api("/api/info");
    } catch (err) {
      showError(`cannot read the collection info: ${err.message}`);
      return;
    }
    const summary = $("#summary");
    for (const p of state.info.panels) {
      summary.append(el("span", null, `${p.label}: ${p.collection} (${p.rows} rows, ${p.bundle_id})`));
    }
    document.title = `deepfeat search · ${state.info.panels.map((p) => p.label).join(" vs ")}`;
    setupControls(state.info);
    document.body.dataset.ready = "true";
    await loadExamples();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
