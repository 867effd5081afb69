"""The report page's style sheet and script (:mod:`captioner.evaluation.report` inlines both, so
``report.html`` stays one self-contained file)."""

CSS = """
:root{--fg:#1d2430;--muted:#5b6575;--line:#dde2ea;--bg:#f4f6f9}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 14px}h2{font-size:16px;margin:22px 0 10px}
.scores{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:12px}
.score{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 14px;
min-width:92px;text-align:center}
.score b{display:block;font-size:19px;font-variant-numeric:tabular-nums}
.score span{color:var(--muted);font-size:12px}
.facts{border-collapse:collapse;font-size:13px}
.facts th{text-align:left;color:var(--muted);font-weight:500;padding:2px 14px 2px 0;vertical-align:top}
.facts td{word-break:break-all}
.curves{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px;max-width:760px}
.curves svg{display:block;width:100%;height:auto}
.controls{margin:20px 0 12px;display:flex;gap:8px;align-items:center;color:var(--muted)}
select{font:inherit;padding:3px 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.entry{margin:0;background:#fff;border:1px solid var(--line);border-radius:10px;overflow:hidden;
display:flex;flex-direction:column;content-visibility:auto;contain-intrinsic-size:auto 330px}
.thumb{display:flex;align-items:center;justify-content:center;background:#e9edf2}
.thumb img{width:100%;height:100%;object-fit:contain;display:block}
.missing{color:var(--muted);font-size:12px;border:2px dashed #b9c1cc;border-radius:6px;
padding:24px 14px}
figcaption{padding:10px 12px 12px}
.meta{display:flex;justify-content:space-between;align-items:center;gap:8px;font-size:12px}
.bleu{color:#fff;border-radius:999px;padding:1px 9px;font-weight:600;white-space:nowrap;
font-variant-numeric:tabular-nums}
.id{color:var(--muted);overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.caption{font-weight:600;margin:8px 0 6px;font-size:14.5px}
.refs{margin:0;padding-left:18px;color:var(--muted);font-size:12.5px}
.attention{margin-top:8px;font-size:12.5px;color:var(--muted)}
.attention summary{cursor:pointer}
.attention .strip{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}
.attention figure{margin:0;text-align:center}
.attention canvas{display:block;width:72px;height:72px}
.attention figcaption{padding:0;font-size:11px}
"""

# Sorts the cards in place (entries carry data-bleu4 and data-image-id); the URL's #worst, #best or
# #id picks the initial order. Draws an entry's attention maps when they are first opened: each
# word's grid (bytes, 255 = the caption's largest weight) upsampled bilinearly to the panel as
# torch's interpolate (align_corners=False), coloured with matplotlib's jet (JET, from Python)
# and laid at 0.55 opacity over the model's view (data-box) of the thumbnail, as heat_overlay.
JS = """
const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const JET = bytes(document.getElementById("grid").dataset.jet || "");
const PANEL = 80;
function heatLayer(grid, h, w) {
  const layer = document.createElement("canvas");
  layer.width = layer.height = PANEL;
  const ctx = layer.getContext("2d"), out = ctx.createImageData(PANEL, PANEL);
  const at = (o, n) => { const s = Math.max(0, (o + 0.5) * n / PANEL - 0.5), i = Math.floor(s);
    return [i, Math.min(i + 1, n - 1), s - i]; };
  for (let y = 0; y < PANEL; y++) {
    const [y0, y1, fy] = at(y, h);
    for (let x = 0; x < PANEL; x++) {
      const [x0, x1, fx] = at(x, w);
      const top = grid[y0 * w + x0] * (1 - fx) + grid[y0 * w + x1] * fx;
      const bottom = grid[y1 * w + x0] * (1 - fx) + grid[y1 * w + x1] * fx;
      const c = 3 * Math.min(255, Math.floor((top * (1 - fy) + bottom * fy) / 255 * 256));
      out.data.set([JET[c], JET[c + 1], JET[c + 2], 255], 4 * (y * PANEL + x));
    }
  }
  ctx.putImageData(out, 0, 0);
  return layer;
}
function drawMaps(details) {
  const img = details.closest(".entry").querySelector(".thumb img");
  if (img && !img.complete) return img.addEventListener("load", () => drawMaps(details), {once: true});
  const words = JSON.parse(details.dataset.words), maps = bytes(details.dataset.maps);
  const [h, w] = details.dataset.grid.split(" ").map(Number);
  const [l, t, r, b] = details.dataset.box.split(" ").map(Number);
  const strip = details.querySelector(".strip");
  words.forEach((word, i) => {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = PANEL;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", "attention for " + word);
    const ctx = canvas.getContext("2d");
    if (img && img.naturalWidth) {
      const [iw, ih] = [img.naturalWidth, img.naturalHeight];
      ctx.drawImage(img, l * iw, t * ih, (r - l) * iw, (b - t) * ih, 0, 0, PANEL, PANEL);
    } else {
      ctx.fillStyle = "#808080";
      ctx.fillRect(0, 0, PANEL, PANEL);
    }
    ctx.globalAlpha = 0.55;
    ctx.drawImage(heatLayer(maps.subarray(i * h * w, (i + 1) * h * w), h, w), 0, 0);
    const figure = document.createElement("figure"), caption = document.createElement("figcaption");
    caption.textContent = word;
    figure.append(canvas, caption);
    strip.appendChild(figure);
  });
  details.dataset.drawn = words.length;
}
document.getElementById("grid").addEventListener("toggle", (e) => {
  const d = e.target;
  if (d.matches("details.attention") && d.open && !d.dataset.drawn) drawMaps(d);
}, true);  // toggle does not bubble: caught on its way down

const grid = document.getElementById("grid");
const cards = Array.from(grid.querySelectorAll(".entry"));
const idOf = (e) => e.dataset.imageId;
const numeric = cards.every((e) => idOf(e) !== "" && !isNaN(Number(idOf(e))));
const byId = (a, b) => numeric ? Number(idOf(a)) - Number(idOf(b)) : idOf(a).localeCompare(idOf(b));
const orders = {
  worst: (a, b) => a.dataset.bleu4 - b.dataset.bleu4 || byId(a, b),
  best: (a, b) => b.dataset.bleu4 - a.dataset.bleu4 || byId(a, b),
  id: byId,
};
function sortCards(how) {
  cards.slice().sort(orders[how]).forEach((e) => grid.appendChild(e));
  grid.dataset.sorted = how;
}
const select = document.getElementById("order");
const asked = location.hash.slice(1);  // report.html#best opens best first
if (Object.hasOwn(orders, asked)) select.value = asked;
select.addEventListener("change", () => {
  sortCards(select.value);
  try { history.replaceState(null, "", "#" + select.value); } catch (e) {}  // a shareable URL
});
sortCards(select.value);
"""
