// nbimagine mask painter: the front end of nbimagine._painter.MaskPainter (anywidget's ES module contract,
// so it runs unchanged in JupyterLab, Notebook 7 and VS Code). No build step: plain DOM and canvas.
//
// The image is shown at a reduced size; strokes are drawn on a canvas of the image's full pixel size,
// so the mask always matches the image exactly. Painted = the region to change. After each change the
// mask goes back to the kernel as the `mask` trait: a PNG data URL, opaque black where the image stays
// and fully transparent where it should change (OpenAI's mask form), or "" when nothing is painted.

const UNDO_LIMIT = 30;
const PAINT = "#ff2d78";

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

// A new canvas of the image's size filled with `fill`, with `source` cut out of it (its opaque pixels
// become transparent): the mask from the paint layer, the inverse of the paint layer, paint from a mask.
function cutout(width, height, fill, source) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const c = canvas.getContext("2d");
  c.fillStyle = fill;
  c.fillRect(0, 0, width, height);
  c.globalCompositeOperation = "destination-out";
  c.drawImage(source, 0, 0, width, height);
  return canvas;
}

function render({ model, el }) {
  const width = model.get("natural_width");
  const height = model.get("natural_height");
  const root = h("div", { class: "nbi-mask-painter" });
  el.append(root);

  // --- toolbar ----------------------------------------------------------------------------------
  const brush = h("button", { class: "nbi-mp-brush nbi-mp-on", type: "button", title: "Paint the region to change (B)", text: "Brush" });
  const eraser = h("button", { class: "nbi-mp-eraser", type: "button", title: "Erase paint (E)", text: "Eraser" });
  const size = h("input", { class: "nbi-mp-size", type: "range", min: "2", max: String(Math.max(8, Math.round(Math.max(width, height) / 4))), "aria-label": "Brush size" });
  const sizeLabel = h("span", { class: "nbi-mp-size-label" });
  const undo = h("button", { class: "nbi-mp-undo", type: "button", title: "Undo (Ctrl+Z)", text: "Undo" });
  const invert = h("button", { class: "nbi-mp-invert", type: "button", title: "Paint everything that is not painted, and the reverse", text: "Invert" });
  const clear = h("button", { class: "nbi-mp-clear", type: "button", title: "Remove all paint", text: "Clear" });
  const status = h("span", { class: "nbi-mp-status", "aria-live": "polite" });
  root.append(h("div", { class: "nbi-mp-bar" }, brush, eraser, h("label", { class: "nbi-mp-size-box" }, "Size ", size, sizeLabel),
    undo, invert, clear, status));

  // --- image and paint layer ----------------------------------------------------------------------
  const image = h("img", { class: "nbi-mp-image", alt: model.get("label") || "image to mask", draggable: "false" });
  image.src = model.get("image");
  const paint = h("canvas", { class: "nbi-mp-paint", width: String(width), height: String(height) });
  const cursor = h("div", { class: "nbi-mp-cursor" });
  const stage = h("div", { class: "nbi-mp-stage" }, image, paint, cursor);
  stage.style.aspectRatio = `${width} / ${height}`;
  stage.style.maxWidth = `${Math.min(768, width)}px`;  // never shown larger than the image itself
  root.append(stage);
  const ctx = paint.getContext("2d", { willReadFrequently: true });

  let tool = model.get("tool") === "eraser" ? "eraser" : "brush";
  const history = [];

  function setTool(name) {
    tool = name;
    brush.classList.toggle("nbi-mp-on", name === "brush");
    eraser.classList.toggle("nbi-mp-on", name === "eraser");
    brush.setAttribute("aria-pressed", String(name === "brush"));
    eraser.setAttribute("aria-pressed", String(name === "eraser"));
    if (model.get("tool") !== name) { model.set("tool", name); model.save_changes(); }
  }

  function showSize() {
    size.value = String(model.get("brush"));
    sizeLabel.textContent = `${model.get("brush")} px`;
  }

  function painted() {
    const data = ctx.getImageData(0, 0, width, height).data;
    let count = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) count += 1;
    return count;
  }

  // The mask OpenAI takes: opaque where the image stays, fully transparent where it changes.
  function publish() {
    const count = painted();
    status.textContent = count ? `${(100 * count / (width * height)).toFixed(1)}% of the image will change` : "Nothing painted yet";
    undo.disabled = history.length === 0;
    const url = count ? cutout(width, height, "#000", paint).toDataURL("image/png") : "";
    model.set("mask_url", url);
    model.set("painted", count);
    model.save_changes();
  }

  function remember() {
    history.push(ctx.getImageData(0, 0, width, height));
    if (history.length > UNDO_LIMIT) history.shift();
  }

  // Strokes are opaque on the layer (the layer itself is shown half transparent), so overlapping
  // segments do not build up darker spots, and the mask is exactly what was painted.
  function point(event) {
    const box = paint.getBoundingClientRect();
    return [(event.clientX - box.left) * width / box.width, (event.clientY - box.top) * height / box.height];
  }

  let last = null;
  function stroke(from, to) {
    ctx.save();
    ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = PAINT;
    ctx.fillStyle = PAINT;
    ctx.lineWidth = model.get("brush");
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    if (from[0] === to[0] && from[1] === to[1]) {
      ctx.arc(to[0], to[1], model.get("brush") / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0], to[1]);
      ctx.stroke();
    }
    ctx.restore();
  }

  function moveCursor(event) {
    const box = paint.getBoundingClientRect();
    const diameter = model.get("brush") * box.width / width;
    cursor.style.width = cursor.style.height = `${diameter}px`;
    cursor.style.left = `${event.clientX - box.left - diameter / 2}px`;
    cursor.style.top = `${event.clientY - box.top - diameter / 2}px`;
    cursor.style.display = "block";
  }

  paint.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    paint.setPointerCapture(event.pointerId);
    remember();
    last = point(event);
    stroke(last, last);
  });
  paint.addEventListener("pointermove", (event) => {
    moveCursor(event);
    if (last === null) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = (event) => {
    if (last === null) return;
    last = null;
    if (paint.hasPointerCapture(event.pointerId)) paint.releasePointerCapture(event.pointerId);
    publish();
  };
  paint.addEventListener("pointerup", end);
  paint.addEventListener("pointercancel", end);
  paint.addEventListener("pointerleave", () => { cursor.style.display = "none"; });

  brush.addEventListener("click", () => setTool("brush"));
  eraser.addEventListener("click", () => setTool("eraser"));
  size.addEventListener("input", () => { model.set("brush", Number(size.value)); model.save_changes(); showSize(); });
  undo.addEventListener("click", () => {
    const previous = history.pop();
    if (previous) ctx.putImageData(previous, 0, 0);
    publish();
  });
  invert.addEventListener("click", () => {
    remember();
    const inverse = cutout(width, height, PAINT, paint);
    ctx.clearRect(0, 0, width, height);
    ctx.drawImage(inverse, 0, 0);
    publish();
  });
  clear.addEventListener("click", () => {
    remember();
    ctx.clearRect(0, 0, width, height);
    publish();
  });
  root.tabIndex = 0;
  root.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); undo.click(); }
    else if (event.key === "b") setTool("brush");
    else if (event.key === "e") setTool("eraser");
  });

  // A mask given by the kernel (e.g. reopening one from the history) is loaded onto the paint layer.
  function load(url) {
    if (!url) return;
    const source = new Image();
    source.onload = () => {
      // The mask's opaque pixels remove paint; its transparent ones (the region to change) stay painted.
      const layer = cutout(width, height, PAINT, source);
      ctx.clearRect(0, 0, width, height);
      ctx.drawImage(layer, 0, 0);
      publish();
    };
    source.src = url;
  }

  model.on("change:brush", showSize);
  model.on("change:tool", () => setTool(model.get("tool") === "eraser" ? "eraser" : "brush"));
  showSize();
  setTool(tool);
  load(model.get("initial_mask"));
  status.textContent = "Paint over the region to change";
  undo.disabled = true;
}

export default { render };
