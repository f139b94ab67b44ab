"""Reporting for `nsa bench`: run header, terminal table, JSON file, PNG plot.

JSON format (``format: "nsa-bench/1"``), one top-level object::

    {"format": "nsa-bench/1",
     "header": {"date_utc", "device", "gpu", "driver", "cuda", "torch", "triton", "python", "nsa",
                "git", "preset", "backend", "argv", "conventions", ["trained"]},
     "records": [{"case", "inputs", "impl", "pass", "T", "B", "HQ", "H", "D", "Dv", "dtype", "ms", "speedup",
                  "tflops", "gbps", "ideal", "mem_mib", "ok", "backend", "note"}, ...]}

One record per measurement (one impl, one pass, one case). ``ms`` is null for a
measurement not run (``note`` starts with ``n/a:`` and says why) or failed (``ok`` false).
``inputs``: ``random``, or ``trained:L`` for a case on the inputs of layer L of a trained model
(``--from-checkpoint``; the case's name ends with ``/trained-L<L>``); the header's ``trained``
then describes the checkpoint, the text, the model's NSA settings and the selection statistics
(:mod:`nsa.bench.trained`). Files written before ``inputs`` existed read as random.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch

FORMAT = "nsa-bench/1"

CONVENTIONS = (
    "ms: median; bwd: backward call alone (graph built outside timing, retain_graph=True); "
    "speedup: best SDPA time of the same case and pass / ms; tflops: work actually done, "
    "2*(Dk+Dv) per attended key (NSA: exact key counts, + 2*Dk per visible compressed token for "
    "selection scores in fwd; SDPA causal: half the matrix incl. diagonal), bwd = 2.5x; "
    "gbps (decode): KV bytes read; copy_share (decode): gbps / the header's copy_gbps, the device's "
    "measured copy bandwidth (bytes read + written by one copy of 1 GiB on CUDA); "
    "ideal: full-attention / NSA work (train) or bytes (decode); "
    "mem_mib (CUDA): peak allocated during one call minus allocated before it; "
    "D: query/key head dim, Dv: value head dim"
)


def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def header(device, preset: str, backend: str, argv) -> dict:
    """Where and when: hardware, driver and library versions, date (UTC)."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from nsa import __version__ as nsa_version
    except ImportError:
        nsa_version = None
    gpu = driver = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "gpu": gpu,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "nsa": nsa_version,
        # NSA_GIT_REV: the commit, where the checkout's own git metadata is absent or stale (the
        # GPU machine receives a copy of the working tree; pass the commit it was made from)
        "git": os.environ.get("NSA_GIT_REV") or _run(["git", "-C", here, "rev-parse", "--short", "HEAD"]),
        "preset": preset,
        "backend": backend,
        "argv": list(argv) if argv is not None else None,
        "conventions": CONVENTIONS,
    }


def _fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _num(v) -> str:
    """Three significant digits, without exponent for the usual range."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _tk(t: int) -> str:
    return f"{t // 1024}k" if t % 1024 == 0 else str(t)


COLUMNS = (  # title, width, record -> text
    ("case", 36, lambda r: r["case"]),
    ("impl", 14, lambda r: r["impl"]),
    ("pass", 6, lambda r: r["pass"]),
    ("T", 5, lambda r: _tk(r["T"])),
    ("B", 3, lambda r: str(r["B"])),
    ("HQ", 3, lambda r: str(r["HQ"])),
    ("H", 3, lambda r: str(r["H"])),
    ("D", 7, lambda r: f"{r['D']}/{r['Dv']}" if r["Dv"] != r["D"] else str(r["D"])),
    ("dtype", 5, lambda r: r["dtype"]),
    ("ms", 9, lambda r: _fmt(r["ms"], ".3f") if r["ms"] is not None else ("FAIL" if r["ok"] is False else "n/a")),
    ("speedup", 7, lambda r: _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")),
    ("TFLOP/s", 7, lambda r: _num(r["tflops"])),
    ("GB/s", 7, lambda r: _num(r["gbps"])),
    ("ideal", 6, lambda r: _fmt(r["ideal"], ".1f") + ("x" if r["ideal"] is not None else "")),
    ("MiB", 7, lambda r: _fmt(r["mem_mib"], ".0f")),
    ("ok", 4, lambda r: {True: "ok", False: "FAIL", None: "-"}[r["ok"]]),
)


def _inputs(r) -> str:
    return r.get("inputs") or "random"


def format_table(records: list[dict], note_width: int = 70) -> str:
    """Plain-text table, one row per record, with the note (truncated) last; an ``inputs`` column
    after the case when some record ran on trained inputs."""
    columns = COLUMNS
    if any(_inputs(r) != "random" for r in records):
        columns = COLUMNS[:1] + (("inputs", 10, _inputs),) + COLUMNS[1:]
    cells = [[f(r) for _, _, f in columns] for r in records]
    widths = [max([w, len(t)] + [len(c[i]) for c in cells]) for i, (t, w, _) in enumerate(columns)]
    left = {"case", "inputs", "impl", "pass", "dtype"}

    def line(vals):
        return "  ".join(v.ljust(w) if t in left else v.rjust(w)
                         for v, w, (t, _, _) in zip(vals, widths, columns))

    out = [line([t for t, _, _ in columns]) + "  note", "-" * (sum(widths) + 2 * len(widths) + 4)]
    prev = None
    for r, c in zip(records, cells):
        if prev is not None and r["case"] != prev:
            out.append("")
        prev = r["case"]
        note = r.get("note") or ""
        if len(note) > note_width:
            note = note[:note_width - 3] + "..."
        out.append(line(c) + ("  " + note if note else ""))
    return "\n".join(out)


def format_header(h: dict) -> str:
    where = h["gpu"] or h["cpu"] or h["device"]
    parts = [f"{h['date_utc']}", f"{where}", f"driver {h['driver']}" if h.get("driver") else None,
             f"torch {h['torch']}", f"triton {h['triton']}", f"cuda {h['cuda']}" if h.get("cuda") else None,
             f"nsa {h['nsa']} ({h['git']})" if h.get("git") else f"nsa {h['nsa']}",
             f"preset {h['preset']}", f"backend {h['backend']}"]
    return " | ".join(p for p in parts if p)


def write_json(path: str, head: dict, records: list[dict]):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
             for r in records]
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "header": head, "records": clean}, f, indent=1, allow_nan=False)
        f.write("\n")


def write_outputs(head: dict, records: list[dict], json_path: str | None, plot_path: str | None):
    """The run's ``--json`` and ``--plot`` files, where asked, each announced on stdout."""
    if json_path:
        write_json(json_path, head, records)
        print(f"wrote {json_path}")
    if plot_path:
        plot(plot_path, records, title=format_header(head))
        print(f"wrote {plot_path}")


def bad_argument(msg: str) -> int:
    """A preset's answer to bad input: the message on stderr, exit status 2."""
    print(f"nsa bench: {msg}", file=sys.stderr)
    return 2


def device_for(args):
    """``(device, None)`` for a preset's ``--device``, with matplotlib importable when ``--plot``
    is given (refused before the run, not after it); ``(None, 2)`` after the message otherwise."""
    from .._cli_utils import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        return None, bad_argument(e)
    if getattr(args, "plot", None):
        try:
            import_matplotlib()
        except RuntimeError as e:
            return None, bad_argument(f"--plot: {e}")
    return device, None


def _line_key(records, r, x_fields):
    """Label of the line a record belongs to: impl, pass, and any other shape field that varies."""
    same = [x for x in records if x["impl"] == r["impl"] and x["pass"] == r["pass"]]
    extra = [f"{k}={r[k]}" for k in ("B", "HQ", "H", "D", "Dv", "dtype")
             if k not in x_fields and len({x[k] for x in same}) > 1]
    if len({_inputs(x) for x in same}) > 1:
        extra.append(_inputs(r))
    return " ".join([r["impl"], r["pass"]] + extra)


def import_matplotlib():
    """matplotlib, or a RuntimeError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'nsa[plot]'") from None
    return matplotlib


def plot(path: str, records: list[dict], title: str = ""):
    """PNG with two panels: time vs T (log-log) and speedup vs T, one line per impl and pass
    (and per batch/heads/dims where those vary); colour = impl, line style = pass. NSA's
    per-branch lines (thin) appear in the time panel only. When every record has the same T
    (the gqa preset), the x axis is the group size HQ/H instead."""
    matplotlib = import_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    done = [r for r in records if r["ms"] is not None and r["ok"]]
    by_t = len({r["T"] for r in records}) > 1 or not records
    xname = "T (tokens; decode: context length)" if by_t else "group size HQ/H"

    def xval(r):
        return r["T"] if by_t else r["HQ"] // r["H"]

    lines = {}
    for r in done:
        lines.setdefault(_line_key(done, r, ("T",) if by_t else ("HQ", "H")), []).append(r)
    impls = sorted({r["impl"] for r in done}, key=lambda i: (not i.startswith("nsa"), i))
    cmap = plt.get_cmap("tab20")
    color = {impl: cmap(i % 20) for i, impl in enumerate(impls)}
    style = {"fwd": "-", "bwd": "--", "decode": "-."}
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(14, 5.5))
    order = sorted(lines, key=lambda k: (impls.index(lines[k][0]["impl"]), k))
    for label in order:
        rs = lines[label]
        impl, pass_ = rs[0]["impl"], rs[0]["pass"]
        branch = impl.startswith("nsa.")
        kw = dict(color=color[impl], ls=style.get(pass_, ":"), marker="o", ms=3 if branch else 4,
                  lw=0.8 if branch else 1.8, alpha=0.75 if branch else 1.0, label=label)
        pts = sorted((xval(r), r["ms"], r["speedup"]) for r in rs)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        sp = [(p[0], p[2]) for p in pts if p[2] is not None]
        if sp and not branch:
            ax_s.plot([p[0] for p in sp], [p[1] for p in sp], **kw)
    ticks = FuncFormatter(lambda v, _: (f"{v / 1024:g}k" if v >= 1024 else f"{v:g}"))
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticks)
        ax.set_xlabel(xname)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("time (ms, median)")
    ax_t.set_title("time (thin: NSA branches)")
    ax_s.axhline(1.0, color="grey", lw=0.8)
    ax_s.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_s.set_ylabel("speedup vs best SDPA of the same pass")
    ax_s.set_title("speedup")
    handles, labels = ax_t.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def markdown_summary(head: dict, records: list[dict]) -> str:
    """The README table: per head-dim pair and T, NSA against the fastest SDPA backend of the same
    shape and pass (forward, backward, decode), with the ideal ratio and peak memory; a case on
    trained inputs says so after its T (``64k trained L3``)."""
    from .harness import shape_key

    lines = [f"{head.get('gpu', head.get('device'))}, driver {head.get('driver')}, torch {head.get('torch')}, "
             f"triton {head.get('triton')}, {head.get('date_utc')}; preset {head.get('preset')}, "
             f"backend {head.get('backend')}.", ""]
    nsa = {(r["case"], r["pass"]): r for r in records if r["impl"] == "nsa"}
    best = {}
    for r in records:
        if r["impl"].startswith("sdpa") and r["ms"] is not None:
            key = shape_key(r)
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r

    def cell(r):
        if r is None:
            return "-"
        if r["ms"] is None:
            return "FAIL" if r["ok"] is False else "n/a"
        return f"{r['ms']:.3g}" if r["ms"] < 1 else f"{r['ms']:.1f}"

    def ratio(a, b):
        if a is None or b is None or a["ms"] is None or b["ms"] is None:
            return "-"
        return f"**{b['ms'] / a['ms']:.2f}x**"

    train = sorted({(r["D"], r["Dv"], r["B"], r["HQ"], r["H"], r["T"], r["case"]) for r in records
                    if r["pass"] in ("fwd", "bwd") and r["impl"] == "nsa"})
    label = {r["case"]: "" if _inputs(r) == "random" else " " + _inputs(r).replace("trained:", "trained L")
             for r in records}
    if train:
        lines += ["| D (k/v) | T | NSA fwd ms | best SDPA fwd ms | fwd speedup | NSA bwd ms | best SDPA bwd ms "
                  "| bwd speedup | ideal (keys) | peak MiB NSA / SDPA (bwd) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for D, Dv, B, HQ, H, T, case in train:
            f, b = nsa.get((case, "fwd")), nsa.get((case, "bwd"))
            sf, sb = (best.get(shape_key(x)) if x else None for x in (f, b))
            ideal = f["ideal"] if f and f["ideal"] else None
            mem = f"{_fmt(b['mem_mib'] if b else None, '.0f')} / {_fmt(sb['mem_mib'] if sb else None, '.0f')}"
            lines.append(f"| {D}/{Dv} | {_tk(T)}{label[case]} | {cell(f)} | "
                         f"{cell(sf)} ({sf['impl'][5:] if sf else '-'}) | "
                         f"{ratio(f, sf)} | {cell(b)} | {cell(sb)} ({sb['impl'][5:] if sb else '-'}) | {ratio(b, sb)} "
                         f"| {_fmt(ideal, '.1f')}x | {mem} |")
        lines.append("")
    dec = sorted({(r["T"], r["B"], r["case"]) for r in records if r["pass"] == "decode" and r["impl"] == "nsa"})
    if dec:
        lines += ["| context | batch | NSA decode ms | best SDPA ms | speedup | NSA GB/s | of copy bandwidth "
                  "| ideal (bytes) |",
                  "|---|---|---|---|---|---|---|---|"]
        for T, B, case in dec:
            n = nsa.get((case, "decode"))
            s = best.get(shape_key(n)) if n else None
            share = n.get("copy_share") if n else None
            lines.append(f"| {_tk(T)} | {B} | {cell(n)} | {cell(s)} | {ratio(n, s)} | {_num(n['gbps']) if n else '-'} "
                         f"| {'-' if share is None else f'{100 * share:.0f}%'} "
                         f"| {_fmt(n['ideal'] if n else None, '.1f')}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m nsa.bench.report RESULT.json ...``: print the markdown summary of saved runs."""
    import sys

    for path in (sys.argv[1:] if argv is None else argv):
        with open(path) as f:
            d = json.load(f)
        print(markdown_summary(d["header"], d["records"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
