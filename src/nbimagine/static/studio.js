// nbimagine studio: the front end of nbimagine._widgets.Studio (anywidget's standard ES module contract,
// so it runs unchanged in JupyterLab, Notebook 7 and VS Code). No build step: plain DOM, no dependencies.
//
// State comes from the kernel as traits (items, selected, result, activity, status, error, detail,
// compare, save_feedback...). Actions go back as custom messages {action: ...}; the kernel answers by
// changing traits. Text from prompts and providers is only ever set with textContent, never as markup.

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function caption(lines) {
  const box = h("div", { class: "nbi-caption" });
  (lines || []).forEach((line, i) => box.append(h("div", { class: i ? "nbi-caption-more" : "nbi-caption-head", text: line })));
  return box;
}

function render({ model, el }) {
  const send = (content) => model.send(content);
  const root = h("div", { class: "nbi-studio-root" });
  el.append(root);

  // --- header, prompt and actions -------------------------------------------------------------
  const summary = h("div", { class: "nbi-summary", title: "" });
  const header = h("div", { class: "nbi-header" }, h("span", { class: "nbi-title", text: "nbimagine studio" }), summary);
  const budget = h("div", { class: "nbi-budget" });
  const prompt = h("textarea", {
    class: "nbi-prompt", rows: "3", "aria-label": "Prompt",
    placeholder: "Describe the image to make, or the edit to apply to the selected images (Ctrl+Enter generates)",
  });
  prompt.value = model.get("prompt");
  prompt.addEventListener("input", () => { model.set("prompt", prompt.value); model.save_changes(); });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send({ action: selectedIds().length && event.shiftKey ? "edit" : "generate" });
    }
  });
  const buttons = {};
  buttons.generate = h("button", { class: "nbi-button nbi-primary nbi-generate", text: "Generate", onclick: () => send({ action: "generate" }) });
  buttons.edit = h("button", { class: "nbi-button nbi-edit", onclick: () => send({ action: "edit" }),
    title: "Send the selected images as edit inputs with the prompt" });
  buttons.mask = h("button", { class: "nbi-button nbi-paint-mask", text: "Paint mask", onclick: () => send({ action: "mask" }),
    title: "Paint the region of the first selected image to change; Edit selected then changes only that region" });
  buttons.cancel = h("button", { class: "nbi-button nbi-cancel", text: "Cancel", onclick: () => send({ action: "cancel" }) });
  const status = h("span", { class: "nbi-status", role: "status", "aria-live": "polite" });
  const actions = h("div", { class: "nbi-actions" }, buttons.generate, buttons.edit, buttons.mask, buttons.cancel, status);
  const error = h("div", { class: "nbi-error", role: "alert" });

  // --- the mask painter (nbimagine._painter.MaskPainter, its own widget) over the image to edit ---
  const maskTitle = h("span", { class: "nbi-mask-title" });
  const closeMask = h("button", { class: "nbi-button nbi-close-mask", text: "Close mask", title: "Edit the whole image again",
    onclick: () => send({ action: "unmask" }) });
  const maskSlot = h("div", { class: "nbi-mask-slot" });
  const maskArea = h("div", { class: "nbi-mask-area", role: "region", "aria-label": "Mask" },
    h("div", { class: "nbi-panel-bar" }, maskTitle, closeMask), maskSlot);
  maskArea.hidden = true;

  // --- the stage: the result, or the progress of the one being made, in the same place ----------
  const stage = h("div", { class: "nbi-stage" });

  // --- gallery --------------------------------------------------------------------------------
  const galleryTitle = h("span", { class: "nbi-gallery-title" });
  const pageLabel = h("span", { class: "nbi-page-label" });
  const refresh = h("button", { class: "nbi-button nbi-icon nbi-refresh", title: "Reload the history", text: "⟳", onclick: () => send({ action: "refresh" }) });
  const prev = h("button", { class: "nbi-button nbi-icon nbi-prev-page", title: "Newer images", text: "‹", onclick: () => send({ action: "page", page: model.get("page") - 1 }) });
  const next = h("button", { class: "nbi-button nbi-icon nbi-next-page", title: "Older images", text: "›", onclick: () => send({ action: "page", page: model.get("page") + 1 }) });
  const compareButton = h("button", { class: "nbi-button nbi-compare", text: "Compare", title: "Show two selected images side by side",
    onclick: () => send({ action: "compare", ids: selectedIds().slice(0, 2) }) });
  const clear = h("button", { class: "nbi-button nbi-clear-selection", text: "Clear", title: "Clear the selection", onclick: () => setSelection([]) });
  const selectionLabel = h("span", { class: "nbi-selection-label" });
  const toolbar = h("div", { class: "nbi-toolbar" }, galleryTitle, refresh, prev, pageLabel, next, compareButton, clear, selectionLabel);
  const grid = h("div", { class: "nbi-grid", role: "listbox", "aria-multiselectable": "true", "aria-label": "History" });

  // --- save -----------------------------------------------------------------------------------
  const savePath = h("input", { class: "nbi-save-path", type: "text", "aria-label": "Save to",
    placeholder: "a folder/ (readable names) or a file such as out/fox.png" });
  savePath.value = model.get("save_path");
  savePath.addEventListener("input", () => { model.set("save_path", savePath.value); model.save_changes(); });
  savePath.addEventListener("keydown", (event) => { if (event.key === "Enter") send({ action: "save" }); });
  const overwrite = h("input", { type: "checkbox", class: "nbi-overwrite" });
  overwrite.checked = model.get("overwrite");
  overwrite.addEventListener("change", () => { model.set("overwrite", overwrite.checked); model.save_changes(); });
  const saveButton = h("button", { class: "nbi-button nbi-save", text: "Save", onclick: () => send({ action: "save" }) });
  const saveFeedback = h("span", { class: "nbi-save-feedback", role: "status", "aria-live": "polite" });
  const saveRow = h("div", { class: "nbi-save-row" }, h("label", { class: "nbi-save-label", text: "Save selected to" }), savePath,
    h("label", { class: "nbi-overwrite-label" }, overwrite, document.createTextNode("overwrite")), saveButton, saveFeedback);

  // --- detail (lightbox) and compare panels, shown in place of the grid -------------------------
  const detail = h("div", { class: "nbi-detail", role: "dialog", "aria-label": "Image details", tabindex: "-1" });
  const compare = h("div", { class: "nbi-compare-view", role: "dialog", "aria-label": "Compare two images", tabindex: "-1" });
  detail.addEventListener("keydown", onPanelKey);
  compare.addEventListener("keydown", onPanelKey);

  root.append(header, budget, prompt, actions, error, maskArea, stage, toolbar, grid, detail, compare, saveRow);

  // --- selection ------------------------------------------------------------------------------
  function selectedIds() { return model.get("selected") || []; }
  function setSelection(ids) { model.set("selected", ids); model.save_changes(); renderSelection(); }
  function toggle(id) {
    const ids = selectedIds();
    setSelection(ids.includes(id) ? ids.filter((x) => x !== id) : [...ids, id]);
  }

  // --- rendering ------------------------------------------------------------------------------
  let focusId = null;
  let pendingFocus = null;  // "first" / "last": the tile to focus once a page turned by keyboard arrives

  function renderSummary() {
    summary.textContent = model.get("summary");
    summary.title = model.get("summary");
    budget.textContent = model.get("budget");
    budget.hidden = !model.get("budget");
  }

  function renderGrid() {
    const items = model.get("items") || [];
    // A re-render (a page turned, an image made elsewhere) must not drop the keyboard focus out of the grid.
    const hadFocus = grid.contains(document.activeElement);
    grid.replaceChildren();
    if (!items.length) grid.append(h("div", { class: "nbi-empty", text: "No images yet: write a prompt and Generate." }));
    items.forEach((item) => {
      const img = item.thumb ? h("img", { src: item.thumb, alt: `#${item.id}`, draggable: "false" })
        : h("div", { class: "nbi-missing", text: "file missing" });
      const open = h("button", { class: "nbi-open", title: `Open #${item.id}`, "aria-label": `Open #${item.id}`, tabindex: "-1", text: "⤢",
        onclick: (event) => { event.stopPropagation(); send({ action: "open", id: item.id }); } });
      const label = h("div", { class: "nbi-tile-label" },
        h("span", { class: "nbi-tile-ref", text: `#${item.id}` }),
        h("span", { class: "nbi-tile-prompt", text: item.prompt, title: item.prompt }));
      const tile = h("div", { class: "nbi-tile", role: "option", tabindex: "-1", "data-id": String(item.id),
        title: `#${item.id} ${item.prompt}`, onclick: () => { focusTile(item.id); toggle(item.id); },
        ondblclick: () => send({ action: "open", id: item.id }) }, img, open, label);
      grid.append(tile);
    });
    const ids = items.map((i) => i.id);
    if (pendingFocus && ids.length) focusId = pendingFocus === "last" ? ids[ids.length - 1] : ids[0];
    if (!ids.includes(focusId)) focusId = ids.length ? ids[0] : null;
    renderSelection();
    if ((pendingFocus || hadFocus) && focusId !== null) grid.querySelector(`.nbi-tile[data-id="${focusId}"]`).focus();
    pendingFocus = null;
    galleryTitle.textContent = `History (${model.get("total").toLocaleString()} image${model.get("total") === 1 ? "" : "s"})`;
    pageLabel.textContent = `page ${model.get("page") + 1} of ${model.get("pages")}`;
    prev.disabled = model.get("page") <= 0;
    next.disabled = model.get("page") >= model.get("pages") - 1;
  }

  function renderSelection() {
    const ids = selectedIds();
    for (const tile of grid.querySelectorAll(".nbi-tile")) {
      const id = Number(tile.dataset.id);
      tile.setAttribute("aria-selected", ids.includes(id) ? "true" : "false");
      tile.tabIndex = id === focusId ? 0 : -1;
    }
    selectionLabel.textContent = ids.length ? `selected: ${ids.map((i) => `#${i}`).join(", ")}` : "nothing selected";
    const open = (model.get("detail") || {}).id;
    const select = detail.querySelector(".nbi-detail-select");
    if (select) select.textContent = ids.includes(open) ? "Selected ✓" : "Select";
    clear.disabled = !ids.length;
    compareButton.disabled = ids.length !== 2;
    renderButtons();
  }

  function renderButtons() {
    const running = model.get("running");
    const count = selectedIds().length;
    buttons.generate.disabled = running;
    const masked = model.get("mask_id");
    buttons.edit.disabled = running || !count;
    buttons.edit.textContent = masked && selectedIds()[0] === masked ? `Edit #${masked} in the mask`
      : count ? `Edit selected (${count})` : "Edit selected";
    buttons.mask.disabled = running || !count;
    buttons.cancel.disabled = !running;
    maskTitle.textContent = masked ? (selectedIds()[0] === masked
      ? `Mask for #${masked}: paint the region to change, then Edit #${masked} in the mask`
      : `Mask for #${masked}: select #${masked} first to edit with it`) : "";
    saveButton.disabled = !count;
  }

  // Elapsed time is counted here, from the kernel's last figure: no clock needs to agree, no message per tick.
  let tick = null;
  let base = { elapsed: 0, at: 0 };
  function renderActivity() {
    const activity = model.get("activity") || {};
    const running = model.get("running");
    base = { elapsed: activity.elapsed || 0, at: performance.now() };
    if (tick) { clearInterval(tick); tick = null; }
    if (running) {
      const update = () => {
        const seconds = base.elapsed + (performance.now() - base.at) / 1000;
        const note = activity.note ? ` · ${activity.note}` : "";
        status.textContent = `${activity.label || "Generating"}… ${seconds.toFixed(1)} s${note}`;
      };
      update();
      tick = setInterval(update, 100);
      status.className = "nbi-status nbi-running";
    } else {
      const done = model.get("status") || {};
      status.textContent = done.text || "";
      status.className = `nbi-status nbi-${done.kind || "idle"}`;
    }
    renderStage();
    renderButtons();
  }

  function renderStage() {
    stage.replaceChildren();
    const activity = model.get("activity") || {};
    if (model.get("running")) {
      // The result being made, in its own place: the latest partial image, else a placeholder.
      const partial = (activity.partials || []).filter(Boolean).slice(-1)[0];
      const frame = h("div", { class: "nbi-progress" });
      if (partial) frame.append(h("img", { class: "nbi-partial", src: partial, alt: "partial image" }));
      else frame.append(h("div", { class: "nbi-placeholder" }, h("span", { class: "nbi-spinner" }), h("span", { text: activity.label || "Generating" })));
      if (activity.partial_label) frame.append(h("div", { class: "nbi-caption-more nbi-partial-note", text: activity.partial_label }));
      stage.append(frame);
      return;
    }
    const result = model.get("result") || {};
    if (result.lines) {
      const recorded = result.id !== null && result.id !== undefined;
      const img = result.src
        ? h("img", { class: "nbi-result", src: result.src, alt: recorded ? `#${result.id}` : "result",
            title: recorded ? "Open the details" : "", onclick: () => { if (recorded) send({ action: "open", id: result.id }); } })
        : h("div", { class: "nbi-missing nbi-no-preview", text: "no preview" });
      stage.append(h("figure", { class: "nbi-result-figure" }, img, h("figcaption", { class: "nbi-result-caption" }, caption(result.lines))));
    }
  }

  // The painter is a widget of its own: its view is made by the widget manager and placed here.
  let painterView = null;
  async function renderPainter() {
    const ref = model.get("painter");
    if (painterView) { painterView.remove(); painterView = null; }
    maskSlot.replaceChildren();
    maskArea.hidden = !ref;
    renderButtons();
    if (!ref) return;
    const child = await model.widget_manager.get_model(ref.slice("IPY_MODEL_".length));
    const view = await model.widget_manager.create_view(child);
    if (model.get("painter") !== ref) { view.remove(); return; }  // replaced while it was being made
    painterView = view;
    maskSlot.append(view.el);
  }

  function renderError() {
    error.textContent = model.get("error") ? `⚠ ${model.get("error")}` : "";
    error.hidden = !model.get("error");
  }

  function renderSaveFeedback() {
    const feedback = model.get("save_feedback") || {};
    saveFeedback.textContent = feedback.text || "";
    saveFeedback.className = `nbi-save-feedback nbi-${feedback.kind || "idle"}`;
    saveFeedback.title = feedback.text || "";
  }

  function metaTable(rows) {
    const table = h("table", { class: "nbi-meta" });
    for (const [key, value] of rows) table.append(h("tr", {}, h("th", { text: key }), h("td", { text: value })));
    return table;
  }

  function renderDetail() {
    const info = model.get("detail") || {};
    detail.replaceChildren();
    detail.hidden = !info.id;
    if (!info.id) { showGrid(); return; }
    const items = model.get("items") || [];
    const index = items.findIndex((i) => i.id === info.id);
    const nav = (step) => { const other = items[index + step]; if (other) send({ action: "open", id: other.id }); };
    const selected = selectedIds().includes(info.id);
    const bar = h("div", { class: "nbi-panel-bar" },
      h("span", { class: "nbi-panel-title", text: `#${info.id}` }),
      h("button", { class: "nbi-button nbi-icon nbi-detail-prev", text: "‹", title: "Previous (←)", disabled: index <= 0, onclick: () => nav(-1) }),
      h("button", { class: "nbi-button nbi-icon nbi-detail-next", text: "›", title: "Next (→)", disabled: index < 0 || index >= items.length - 1, onclick: () => nav(1) }),
      h("button", { class: "nbi-button nbi-detail-select", text: selected ? "Selected ✓" : "Select", onclick: () => toggle(info.id) }),
      info.parents && info.parents.length ? h("button", { class: "nbi-button nbi-compare-source", text: `Compare with #${info.parents[0]}`,
        onclick: () => send({ action: "compare", ids: [info.parents[0], info.id] }) }) : null,
      h("button", { class: "nbi-button nbi-close", text: "Close", title: "Close (Esc)", onclick: closePanels }));
    const lineage = h("div", { class: "nbi-lineage" }, h("span", { class: "nbi-lineage-title", text: "Lineage" }));
    for (const step of info.lineage || []) {
      lineage.append(h("button", { class: `nbi-lineage-step${step.id === info.id ? " nbi-current" : ""}`, title: step.prompt,
        onclick: () => send({ action: "open", id: step.id }) },
        step.thumb ? h("img", { src: step.thumb, alt: `#${step.id}` }) : null, h("span", { text: `#${step.id}` })));
    }
    const body = h("div", { class: "nbi-detail-body" },
      info.src ? h("img", { class: "nbi-detail-image", src: info.src, alt: `#${info.id}` }) : h("div", { class: "nbi-missing", text: "file missing" }),
      h("div", { class: "nbi-detail-side" }, h("p", { class: "nbi-detail-prompt", text: info.prompt }), metaTable(info.meta || [])));
    detail.append(bar, body, lineage);
    grid.hidden = true;
    compare.hidden = true;
    detail.focus();
  }

  function renderCompare() {
    const pair = model.get("compare") || {};
    compare.replaceChildren();
    compare.hidden = !pair.left;
    if (!pair.left) { if (!(model.get("detail") || {}).id) showGrid(); return; }
    const side = (item) => h("figure", { class: "nbi-compare-side" },
      item.src ? h("img", { src: item.src, alt: `#${item.id}` }) : h("div", { class: "nbi-missing", text: "file missing" }),
      h("figcaption", {}, caption(item.lines)));
    compare.append(
      h("div", { class: "nbi-panel-bar" }, h("span", { class: "nbi-panel-title", text: `#${pair.left.id} and #${pair.right.id}` }),
        h("button", { class: "nbi-button nbi-swap", text: "Swap", onclick: () => send({ action: "compare", ids: [pair.right.id, pair.left.id] }) }),
        h("button", { class: "nbi-button nbi-close", text: "Close", title: "Close (Esc)", onclick: closePanels })),
      h("div", { class: "nbi-compare-pair" }, side(pair.left), side(pair.right)));
    grid.hidden = true;
    detail.hidden = true;
    compare.focus();
  }

  function showGrid() {
    detail.hidden = true;
    compare.hidden = true;
    grid.hidden = false;
  }

  function closePanels() {
    send({ action: "close" });
    showGrid();
    focusTile(focusId);
  }

  // Keys handled here do not reach the notebook (whose command mode would move between cells).
  function onPanelKey(event) {
    if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); closePanels(); }
    else if (!detail.hidden && (event.key === "ArrowLeft" || event.key === "ArrowRight")) {
      const button = detail.querySelector(event.key === "ArrowLeft" ? ".nbi-detail-prev" : ".nbi-detail-next");
      if (button && !button.disabled) { event.preventDefault(); event.stopPropagation(); button.click(); }
    }
  }

  // --- keyboard in the grid: arrows move, Space selects, Enter opens, PageDown/PageUp turn pages ----
  function tiles() { return [...grid.querySelectorAll(".nbi-tile")]; }
  function focusTile(id) {
    focusId = id;
    renderSelection();
    const tile = grid.querySelector(`.nbi-tile[data-id="${id}"]`);
    if (tile) tile.focus();
  }
  grid.addEventListener("keydown", (event) => {
    const all = tiles();
    const index = all.findIndex((t) => Number(t.dataset.id) === focusId);
    if (index < 0) return;
    const columns = Math.max(1, all.filter((t) => t.offsetTop === all[0].offsetTop).length);
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns, Home: -index, End: all.length - 1 - index };
    const page = model.get("page");
    // PageDown / PageUp, or an arrow past the first or last tile, turn the page; focus follows.
    const turn = event.key === "PageDown" || (event.key in moves && moves[event.key] > 0 && index + moves[event.key] >= all.length
      && event.key !== "End") ? 1
      : event.key === "PageUp" || (event.key in moves && moves[event.key] < 0 && index + moves[event.key] < 0
      && event.key !== "Home") ? -1 : 0;
    if (turn && page + turn >= 0 && page + turn < model.get("pages")) {
      event.preventDefault();
      event.stopPropagation();
      pendingFocus = turn > 0 ? "first" : "last";
      send({ action: "page", page: page + turn });
    } else if (event.key in moves) {
      event.preventDefault();
      event.stopPropagation();
      const target = all[Math.min(all.length - 1, Math.max(0, index + moves[event.key]))];
      focusTile(Number(target.dataset.id));
    } else if (event.key === " " || event.key === "Spacebar") {
      event.preventDefault();
      event.stopPropagation();
      toggle(focusId);
    } else if (event.key === "Enter") {
      event.preventDefault();
      event.stopPropagation();
      send({ action: "open", id: focusId });
    }
  });

  // --- wiring ---------------------------------------------------------------------------------
  const handlers = {
    "change:summary": renderSummary,
    "change:budget": renderSummary,
    "change:items": renderGrid,
    "change:page": renderGrid,
    "change:selected": renderSelection,
    "change:running": renderActivity,
    "change:activity": renderActivity,
    "change:status": renderActivity,
    "change:result": renderStage,
    "change:error": renderError,
    "change:save_feedback": renderSaveFeedback,
    "change:detail": renderDetail,
    "change:compare": renderCompare,
    "change:painter": renderPainter,
    "change:mask_id": renderButtons,
    "change:prompt": () => { if (prompt.value !== model.get("prompt")) prompt.value = model.get("prompt"); },
    "change:save_path": () => { if (savePath.value !== model.get("save_path")) savePath.value = model.get("save_path"); },
    "change:overwrite": () => { overwrite.checked = model.get("overwrite"); },
  };
  for (const [event, handler] of Object.entries(handlers)) model.on(event, handler);
  renderSummary();
  renderGrid();
  renderActivity();
  renderError();
  renderSaveFeedback();
  renderDetail();
  renderCompare();
  renderPainter();

  return () => {
    if (tick) clearInterval(tick);
    if (painterView) painterView.remove();
    for (const [event, handler] of Object.entries(handlers)) model.off(event, handler);
  };
}

export default { render };
