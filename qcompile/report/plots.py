"""The report's figures as PNG files (matplotlib, Agg backend; imported only when a report is built).

Each function takes the numbers of ``collect`` and a path, draws one figure and returns the path (or
None when there is nothing to draw).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_all", "plot_backends", "plot_outliers", "plot_ranges", "plot_split", "plot_sqnr"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_sqnr(numbers: dict, path: Path) -> Path | None:
    rows = numbers["layers"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    x = range(len(rows))
    ax.plot(x, [r["sqnr_local_db"] for r in rows], ".-", lw=0.8, label="local (this linear only)")
    ax.plot(x, [r["sqnr_e2e_db"] for r in rows], ".-", lw=0.8, label="end to end (accumulated)")
    ax.set_xlabel("quantized linear (graph order)")
    ax.set_ylabel("output SQNR vs FP (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _per_layer(rows, key):
    import re

    sums: dict[int, float] = {}
    for r in rows:
        m = re.search(r"layers\.(\d+)\.", r["module"])
        i = int(m.group(1)) if m else -1
        sums[i] = sums.get(i, 0.0) + r[key] / max(r["signal"], 1e-30)
    return sums


def plot_split(numbers: dict, path: Path) -> Path | None:
    """AQAS Fig. 4(b)/(d): underflow and rounding error per decoder layer, INT4 vs dINT4 (RTN, same W)."""
    rows = numbers["layers"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    layers = sorted(_per_layer(rows, "int4_underflow"))
    width = 0.4
    for j, fmt in enumerate(("int4", "dint4")):
        und, rnd = _per_layer(rows, f"{fmt}_underflow"), _per_layer(rows, f"{fmt}_rounding")
        xs = [i + (j - 0.5) * width for i in range(len(layers))]
        ax.bar(xs, [und[layer] for layer in layers], width, label=f"{fmt} underflow", color=("C3", "C1")[j])
        ax.bar(xs, [rnd[layer] for layer in layers], width, bottom=[und[layer] for layer in layers],
               label=f"{fmt} rounding", color=("C0", "C2")[j], alpha=0.7)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("E[(ΔX)²] / E[(WX)²]")
    ax.set_title("summed over each layer's linears (RTN of the same FP weights)", fontsize=9)
    ax.legend(ncol=4, fontsize=8)
    return _save(fig, path)


def plot_ranges(numbers: dict, path: Path) -> Path | None:
    """AQAS Fig. 1(c): min/max of each linear input for every sequence length."""
    inputs = numbers["ranges"]["inputs"]
    if not inputs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for j, t in enumerate(inputs[0]["max"]):
        ax.plot([r["max"].get(t) for r in inputs], "-", color=f"C{j}", lw=0.9, label=f"{t} tokens")
        ax.plot([r["min"].get(t) for r in inputs], "-", color=f"C{j}", lw=0.9)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("linear input (graph order)")
    ax.set_ylabel("min / max of the input")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_outliers(numbers: dict, path: Path) -> Path | None:
    """AQAS Fig. 1(d): per-channel max of the widest input, shortest vs longest sequence."""
    widest = numbers["ranges"].get("widest")
    if not widest:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for j, (t, values) in enumerate(sorted(widest["channel_max"].items(), key=lambda kv: -int(kv[0]))):
        ax.plot(values, lw=0.7, color=f"C{j}", label=f"{t} tokens")
    ax.set_xlabel(f"channel of {widest['input']}")
    ax.set_ylabel("per-channel abs max")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_backends(numbers: dict, path: Path) -> Path | None:
    comp = numbers.get("backends")
    if not comp or not any(r["rel_err"] is not None for r in comp["rows"]):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    by_backend: dict[str, list] = {}
    for r in comp["rows"]:
        by_backend.setdefault(r["backend"], []).append(r["rel_err"])
    for b, errs in by_backend.items():
        ax.semilogy([e if e else float("nan") for e in errs], ".-", lw=0.8, label=b)
    ax.axhline(comp["tol"], color="r", ls="--", lw=0.8, label=f"tolerance {comp['tol']:g}")
    ax.set_xlabel("quantized linear (graph order)")
    ax.set_ylabel("‖y − y_ref‖ / ‖y_ref‖")
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {"sqnr": plot_sqnr, "error_split": plot_split, "ranges": plot_ranges, "outliers": plot_outliers,
         "backends": plot_backends}


def plot_all(numbers: dict, out_dir: Path) -> dict[str, Path]:
    """Every figure that has data, as ``{name: out_dir/<name>.png}``."""
    out = {}
    for name, fn in PLOTS.items():
        p = fn(numbers, Path(out_dir) / f"{name}.png")
        if p is not None:
            out[name] = p
    return out
