"""The report page: one self-contained HTML file (inline CSS, PNGs as data URIs, a few lines of JS).

Every string from the model, recipe or backends goes through ``html.escape``. The script only sorts
tables on a header click and marks ``<body data-images-ok="N/M">`` once the figures have decoded
(the browser test reads it); it logs nothing unless an image fails to decode.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

__all__ = ["render"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.diverged td{background:#fff3cd}tr.first td{background:#f8b4b4;font-weight:bold}
td.bad{color:#b00020;font-weight:bold}
.note{color:#555;font-size:13px}.scroll{max-height:520px;overflow:auto;display:inline-block}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.ok{color:#0a7d2c}.warn{color:#b00020;font-weight:bold}
"""

_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th, i){
  th.addEventListener("click", function(){
    var tb = th.closest("table").tBodies[0], rows = Array.from(tb.rows), dir = th.dataset.dir === "1" ? -1 : 1;
    th.dataset.dir = dir === 1 ? "1" : "0";
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.v || a.cells[i].textContent, y = b.cells[i].dataset.v || b.cells[i].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      return dir * (isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny);
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
window.addEventListener("load", function(){
  var imgs = Array.from(document.images), ok = imgs.filter(function(i){ return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesOk = ok.length + "/" + imgs.length;
  if (ok.length !== imgs.length)
    console.error("qcompile report: " + (imgs.length - ok.length) + " figure(s) did not decode");
});
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v) or abs(v) >= 1e299:
            return "inf"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return _e(v)


def _table(cols: list[tuple[str, str]], rows: list[dict], table_id: str, row_class=None, cell_class=None) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{_e(title)}</th>' for i, (title, _) in enumerate(cols))
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = []
        for i, (_, key) in enumerate(cols):
            v = key(r) if callable(key) else r.get(key)
            extra = cell_class(key, r) if cell_class else ""
            data = f' data-v="{v}"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            text = v if isinstance(v, str) and v.startswith("<a ") else _num(v)
            cells.append(f'<td class="{"l " if i == 0 or isinstance(v, str) else ""}{extra}"{data}>{text}</td>')
        body.append(f'<tr class="{cls}">{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img id="plot-{_e(Path(path).stem)}" alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _pass_log(numbers: dict) -> str:
    def link(kind):
        return lambda r: f'<a href="{_e(r[kind])}">{kind}</a>' if r.get(kind) else "–"

    cols = [("pass", "name"), ("matches", "matches"), ("nodes +", "nodes_added"), ("nodes −", "nodes_removed"),
            ("ms", lambda r: r["seconds"] * 1000), ("notes", lambda r: "; ".join(r["notes"]) or "–"),
            ("graph after", link("txt")), ("diff", link("diff"))]
    note = "" if numbers.get("pass_dumps") else \
        '<p class="note">No per-pass graph dumps: this model was loaded from an artifact (its passes ran at load).</p>'
    return _table(cols, numbers["pass_log"], "pass-log") + note


_LAYER_COLS = [
    ("module", "module"), ("weight", "weight"), ("w gran", "w_gran"), ("act", "act"), ("a gran", "a_gran"),
    ("N×K", lambda r: f'{r["out_features"]}×{r["in_features"]}'),
    ("w scale min", "w_scale_min"), ("w scale med", "w_scale_median"), ("w scale max", "w_scale_max"),
    ("a scale min", "a_scale_min"), ("a scale med", "a_scale_median"), ("a scale max", "a_scale_max"),
    ("SQNR local dB", "sqnr_local_db"), ("SQNR e2e dB", "sqnr_e2e_db"),
    ("underflow", "underflow_err"), ("rounding", "rounding_err"), ("zero frac", "zero_frac"),
    ("INT4 underflow", "int4_underflow"), ("INT4 rounding", "int4_rounding"), ("INT4 SQNR dB", "int4_sqnr_db"),
    ("dINT4 underflow", "dint4_underflow"), ("dINT4 rounding", "dint4_rounding"), ("dINT4 SQNR dB", "dint4_sqnr_db"),
]


def _split_sentence(s: dict) -> str:
    if not s:
        return ""
    i, d = s["int4"], s["dint4"]
    verdict = ('<span class="ok">dINT4 lowers the underflow error</span>' if s["dint4_lowers_underflow"]
               else '<span class="warn">dINT4 does NOT lower the underflow error on this model</span>')
    return (f"<p>AQAS eq. 4 on this model (RTN of the same FP weights, summed over {s['linears']} linears): "
            f"{verdict} — INT4 underflow {i['underflow']:.3e} vs dINT4 {d['underflow']:.3e}; rounding "
            f"{i['rounding']:.3e} vs {d['rounding']:.3e}; total {i['total']:.3e} vs {d['total']:.3e}. dINT4 has the "
            f"lower underflow error in {s['dint4_lower_underflow']} of {s['linears']} linears.</p>")


def _ranges(numbers: dict) -> str:
    r = numbers["ranges"]
    lens = [str(t) for t in r["inputs"][0]["max"]] if r["inputs"] else []
    cols = [("input", "input"), ("channels", "channels")]
    for t in lens:
        cols += [(f"min @{t}", lambda row, t=t: row["min"][t]), (f"max @{t}", lambda row, t=t: row["max"][t])]
    cols.append(("outlier channels (abs max @" + "/".join(lens) + ")", lambda row: "; ".join(
        f"{c}: " + "/".join(f"{row['outlier_max'][t][k]:.3g}" for t in lens)
        for k, c in enumerate(row["outlier_channels"][:4]))))
    cols.append(("median channel max", lambda row: "/".join(f"{row['median_channel_max'][t]:.3g}" for t in lens)))
    return (f'<p class="note">The model is causal, so the activations of a t-token input are the first t positions '
            f'of one {numbers["tokens"]["ranges"]}-token run: each range below is of that prefix.</p>'
            + _table(cols, r["inputs"], "ranges"))


def _backends(numbers: dict) -> str:
    comp = numbers.get("backends")
    if not comp:
        return '<p class="note">No backend asked for (use --backends reference,onnx,triton).</p>'
    parts = ['<p class="note">rel err = ‖y − y_ref‖ / ‖y_ref‖ of each quantized linear\'s output; a linear diverges '
             'when its rel err exceeds the rel err of its own input by more than the tolerance (onnxruntime runs '
             'end to end, so error that only propagates is not blamed on it; Triton kernels run on the reference '
             'input).</p>']
    for backend, status in comp["status"].items():
        rows = [r for r in comp["rows"] if r["backend"] == backend]
        first = comp["first_divergence"].get(backend)
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r["lowering"]] = kinds.get(r["lowering"], 0) + 1
        verdict = (f'<span class="warn">first divergence beyond tolerance {comp["tol"]:g}: {_e(first)}</span>'
                   if first else (f'<span class="ok">no linear beyond tolerance {comp["tol"]:g}</span>'
                                  if status.startswith("ok") else ""))
        parts.append(f'<h3 id="backend-{_e(backend)}">{_e(backend)}</h3><p>status: {_e(status)}. {verdict}<br>'
                     f'lowering: {_e(", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))}</p>')
        cols = [("module", "module"), ("lowering", "lowering"), ("rel err", "rel_err"), ("input rel err", "in_rel_err"),
                ("excess", "excess_err"), ("max abs err", "max_abs_err"),
                ("SQNR vs ref dB", "sqnr_db"), ("diverged", "diverged"), ("why / how", "reason")]
        parts.append(_table(cols, rows, f"backend-table-{backend}",
                            row_class=lambda r: "first" if r["first"] else ("diverged" if r["diverged"] else "")))
    return "".join(parts)


def render(numbers: dict, plots: dict[str, Path], title: str, json_name: str | None = None) -> str:
    """The full page as a string."""
    s = numbers["seconds"]
    figs = {name: _img(p, name) for name, p in plots.items()}
    recipe = numbers["recipe"]
    def low(key, r):
        return "bad" if isinstance(r.get(key), float) and key.startswith("sqnr") and r[key] < 10 else ""

    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p>recipe <b>{_e(recipe["name"])}</b>: weights {_e(recipe["weight_format"])} '
        f'{_e(recipe["weight_granularity"])}, '
        f'activations {_e(recipe["act_format"])} {_e(recipe["act_granularity"])}, V {_e(recipe["v_format"])}, '
        f'scaling {_e(recipe["scaling"])}, rounding {_e(recipe["rounding"])}. Errors on {numbers["tokens"]["errors"]} '
        f'tokens, ranges on {numbers["tokens"]["ranges"]}. Built in {sum(s.values()):.1f} s '
        f'({_e(", ".join(f"{k} {v:.1f}" for k, v in s.items()))}).'
        + (f' All numbers: <a href="{_e(json_name)}">{_e(json_name)}</a>.' if json_name else "") + "</p>",
        '<h2 id="passes">Pass log</h2>', _pass_log(numbers),
        '<h2 id="layers-section">Per linear: formats, scales, SQNR, underflow vs rounding</h2>',
        _split_sentence(numbers["split_summary"]),
        '<p class="note">SQNR local: qdq(x)·Ŵᵀ vs x·Wᵀ on the FP input; e2e: the quantized graph\'s output vs the FP '
        'twin\'s. underflow / rounding: E[(Δ_u X)²], E[(Δ_r X)²] of the recipe\'s weights (AQAS eq. 4); the INT4 / '
        'dINT4 columns quantize the same FP weight round-to-nearest in each format. Click a header to sort.</p>',
        _table(_LAYER_COLS, numbers["layers"], "layers", cell_class=low),
        figs.get("sqnr", ""), figs.get("error_split", ""),
        '<h2 id="ranges-section">Activation ranges and sequence length</h2>',
        figs.get("ranges", ""), figs.get("outliers", ""), _ranges(numbers),
        '<h2 id="backends-section">Backends vs reference</h2>', figs.get("backends", ""), _backends(numbers),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>{"".join(sections)}'
            f"<script>{_JS}</script></body></html>\n")
