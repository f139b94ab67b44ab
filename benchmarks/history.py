"""Headline numbers of every benchmark run, in one CSV: benchmarks/results/history.csv.

    python benchmarks/history.py append OUT/bench_paper.json [more.json ...] --run run57
    python benchmarks/history.py plot --out history.png [--preset paper --T 64k --dims 128x128]

``append`` reads what ``nsa bench --json`` wrote (format ``nsa-bench/1``) and adds one row per
measurement of the whole NSA (impl ``nsa``; passes fwd, bwd, decode) that passed its check:
when the run started (the JSON header's ``date_utc``), the run's name (``--run``, default the
name of the JSON's folder), the commit measured (the header's ``git``; ``--commit`` where the
header lacks it or is wrong), the case (preset, T, B, HQ, H, Dk, Dv, ``variant``: ``qsN`` for
``--smooth-queries N``, ``trained-LN`` for the inputs of layer N of ``--from-checkpoint``), the NSA
time, the fastest baseline of the same shape and pass (an SDPA backend, timed on the random case
of a trained one; the full-attention model for ``--preset generate``) with its time and the speedup
(empty when the run had no baselines), and the machine and
versions. Rows already there (same run, case and pass) are left as they are. ``plot`` draws the
speedup of one case over the runs, forward and backward.

Standard library only (matplotlib for ``plot``): no nsa, no torch, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HISTORY = Path(__file__).resolve().parent / "results" / "history.csv"
FIELDS = ["date", "run", "commit", "preset", "T", "B", "HQ", "H", "Dk", "Dv", "variant", "pass",
          "nsa_ms", "baseline", "baseline_ms", "speedup", "hardware", "torch", "triton"]
KEY = ("run", "preset", "T", "B", "HQ", "H", "Dk", "Dv", "variant", "pass")


def _ms(x: float) -> str:
    return f"{x:.4g}" if x < 1 else f"{x:.2f}"


def _shape(r: dict) -> tuple:
    """The case of a record with its inputs left out: a trained case's baselines are its random
    twin's (the same first two parts of the case name, length, batch, heads, dims and dtype)."""
    return (*r["case"].split("/")[:2], r["T"], r["B"], r["HQ"], r["H"], r["D"], r["Dv"], r.get("dtype"))


def rows_from_json(path: Path, run: str | None = None, commit: str | None = None) -> list[dict]:
    """The history rows of one ``nsa bench --json`` file."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != "nsa-bench/1":
        raise ValueError(f"{path}: not an nsa bench JSON (format {data.get('format')!r})")
    head = data["header"]
    records = data["records"]
    gpu = head.get("gpu") or head.get("cpu") or head.get("device") or ""
    hardware = f"{gpu} (driver {head['driver']})" if head.get("driver") else gpu
    rows = []
    for r in records:
        if r["impl"] != "nsa" or r["ms"] is None or r["ok"] is not True:
            continue
        same = [b for b in records if _shape(b) == _shape(r) and b["pass"] == r["pass"]
                and (b["impl"].startswith("sdpa.") or b["impl"] == "full") and b["ms"] is not None
                and b["ok"] is not False]
        best = min(same, key=lambda b: b["ms"]) if same else None
        last = r["case"].rsplit("/", 1)[1]
        variant = last if last.startswith(("qs", "trained-")) else ""
        rows.append({
            "date": head.get("date_utc", ""), "run": run or Path(path).resolve().parent.name,
            "commit": commit or head.get("git") or "", "preset": head.get("preset", r["case"].split("/")[0]),
            "T": r["T"], "B": r["B"], "HQ": r["HQ"], "H": r["H"], "Dk": r["D"], "Dv": r["Dv"],
            "variant": variant, "pass": r["pass"], "nsa_ms": _ms(r["ms"]),
            "baseline": best["impl"] if best else "", "baseline_ms": _ms(best["ms"]) if best else "",
            "speedup": f"{best['ms'] / r['ms']:.2f}" if best else "",
            "hardware": hardware, "torch": head.get("torch", ""), "triton": head.get("triton", ""),
        })
    return rows


def read(path: Path = HISTORY) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append(rows: list[dict], path: Path = HISTORY) -> int:
    """Adds the rows not yet in the CSV (by run, case and pass), keeping it sorted by date and
    run; returns how many were added."""
    old = read(path)
    seen = {tuple(str(r[k]) for k in KEY) for r in old}
    new = [r for r in rows if tuple(str(r[k]) for k in KEY) not in seen]
    merged = sorted(old + [{k: str(v) for k, v in r.items()} for r in new],
                    key=lambda r: (r["date"][:16], r["run"]))  # stable: a run's rows keep their order
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(merged)
    return len(new)


def _size(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def plot(out: str, preset: str, T: int, dims: tuple[int, int], variant: str = "", path: Path = HISTORY) -> int:
    try:
        import matplotlib
    except ImportError:
        print("history.py plot: needs matplotlib (pip install matplotlib, or nsa[plot])", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read(path) if r["preset"] == preset and int(r["T"]) == T and r["speedup"]
            and (int(r["Dk"]), int(r["Dv"])) == dims and r["variant"] == variant and r["HQ"] == "64"]
    if not rows:
        print(f"history.py plot: no rows for {preset} T={T} {dims[0]}x{dims[1]} {variant}", file=sys.stderr)
        return 1
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(runs)), 4))
    for pass_, style in (("fwd", "o-"), ("bwd", "s--")):
        pts = [(runs.index(r["run"]), float(r["speedup"])) for r in rows if r["pass"] == pass_]
        if pts:
            ax.plot(*zip(*pts), style, label=pass_)
    ax.set_xticks(range(len(runs)), runs, rotation=90, fontsize=7)
    ax.set_ylabel("speedup vs best SDPA (same run)")
    hw = rows[-1]["hardware"]
    ax.set_title(f"{preset}, T={T}, D {dims[0]}x{dims[1]}{' ' + variant if variant else ''}: {hw}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({len(rows)} points)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="history.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("append", help="add a run's nsa bench JSON file(s) to history.csv")
    a.add_argument("json", nargs="+", type=Path, help="files written by nsa bench --json")
    a.add_argument("--run", help="the run's name (default: the folder of each JSON)")
    a.add_argument("--commit", help="the commit measured, where the JSON header lacks it or is wrong")
    a.add_argument("--csv", type=Path, default=HISTORY, help=f"the history file (default {HISTORY})")
    g = sub.add_parser("plot", help="speedup of one case over the runs")
    g.add_argument("--out", default="history.png", help="PNG to write (default history.png)")
    g.add_argument("--preset", default="paper", help="preset (default paper)")
    g.add_argument("--T", default="64k", help="sequence length, e.g. 64k (default 64k)")
    g.add_argument("--dims", default="128x128", help="Dk x Dv (default 128x128)")
    g.add_argument("--variant", default="", help="e.g. qs256 (default: independent queries)")
    g.add_argument("--csv", type=Path, default=HISTORY, help=f"the history file (default {HISTORY})")
    args = p.parse_args(argv)
    if args.command == "append":
        rows = [row for f in args.json for row in rows_from_json(f, args.run, args.commit)]
        added = append(rows, args.csv)
        print(f"{args.csv}: {added} row(s) added, {len(rows) - added} already there")
        return 0
    dk, dv = (int(x) for x in args.dims.lower().split("x"))
    return plot(args.out, args.preset, _size(args.T), (dk, dv), args.variant, args.csv)


if __name__ == "__main__":
    sys.exit(main())
