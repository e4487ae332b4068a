#!/usr/bin/env python3
"""The suite's picture: the best of each system, throughput and p99 latency
per concurrency, storage per account and per operation, and Kopilka at
scale.

    .venv/bin/python benchmarks/chart.py benchmarks/results/<date>-<host>.json

(suite.py draws it after every run; this redraws one from its JSON.)
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

COLORS = {"kopilka-kernel": "#c0392b", "kopilka-twin": "#e67e22",
          "kopilka-server": "#8e44ad", "postgresql": "#2471a3", "sqlite": "#17a589",
          "lmdb-raw-puts": "#7f8c8d", "grpc-echo": "#b3b6b7"}
MARKERS = {"unary": "o", "batch": "s"}


def _label(n):
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _series(rows):
    """(system, mode, batch, variant) -> rows sorted by concurrency."""
    out = {}
    for r in rows:
        out.setdefault((r["system"], r["mode"], r["batch"], r["variant"]), []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["concurrency"])
    return out


def _name(system, mode, batch, variant):
    what = f"{system} {mode}" + (f" b={_label(batch)}" if batch > 1 else "")
    return what + (f" ({variant})" if variant == "hot" else "")


IN_PROCESS = ("kopilka-kernel", "kopilka-twin", "lmdb-raw-puts")


def _per_system(ax, rows, field, ylabel, title):
    """Systems with clients (in-process ones have one writer: see _best)."""
    rows = [r for r in rows if r["system"] not in IN_PROCESS]
    for (system, mode, batch, variant), rs in sorted(_series(rows).items()):
        xs = [r["concurrency"] for r in rs]
        ys = [r[field] for r in rs]
        if any(y is None for y in ys):
            continue
        ax.plot(xs, ys, marker=MARKERS.get(mode, "o"), color=COLORS.get(system, "black"),
                linestyle="--" if variant == "hot" else "-",
                markersize=7 if batch > 1_000 else 5,
                alpha=0.55 if variant == "hot" else 1.0,
                label=_name(system, mode, batch, variant))
    ax.set_xscale("log", base=2)
    ticks = sorted({r["concurrency"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (tills, connections, Post senders)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _best(ax, rows):
    """The best configuration of each system and path, spread and hot."""
    best = {}
    for r in rows:
        key = (r["system"], r["mode"])
        slot = best.setdefault(key, {})
        if r["ops_per_s"] > slot.get(r["variant"], {"ops_per_s": -1})["ops_per_s"]:
            slot[r["variant"]] = r
    keys = sorted(best, key=lambda k: max(r["ops_per_s"] for r in best[k].values()))
    for y, key in enumerate(keys):
        for variant, shift in (("spread", 0.2), ("-", 0.2), ("hot", -0.2)):
            r = best[key].get(variant)
            if r is None:
                continue
            ax.barh(y + shift, r["ops_per_s"], 0.38, color=COLORS.get(key[0], "black"),
                    alpha=0.5 if variant == "hot" else 1.0)
            how = (f"c={r['concurrency']}" + (f", b={_label(r['batch'])}"
                                              if r["batch"] > 1 else ""))
            ax.annotate(f" {r['ops_per_s']:,.0f}  ({how}" + (", hot)" if variant == "hot"
                                                            else ")"),
                        (r["ops_per_s"], y + shift), va="center", fontsize=7)
    ax.set_yticks(range(len(keys)), [f"{s} {m}" for s, m in keys], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("durable operations / s (best configuration; pale: hot variant)")
    ax.set_title("Best of each system")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_xlim(right=ax.get_xlim()[1] * 8)


def _storage(ax, storage):
    names = [s for s in storage if storage[s].get("per_op")]
    xs = range(len(names))
    per_account = [storage[s].get("per_account") or 0 for s in names]
    per_op = [storage[s]["per_op"] for s in names]
    ax.bar([x - 0.2 for x in xs], per_account, 0.4, label="bytes per account",
           color="#5d6d7e")
    ax.bar([x + 0.2 for x in xs], per_op, 0.4, label="bytes per operation", color="#c0392b")
    for x, a, o in zip(xs, per_account, per_op):
        if a:
            ax.annotate(f"{a:,.0f}", (x - 0.2, a), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{o:,.0f}", (x + 0.2, o), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("bytes on disk")
    ax.set_title("Storage after the run")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _scale(ax, scale):
    if not scale:
        ax.set_axis_off()
        return
    ns = [e["accounts"] for e in scale]
    ax.plot(ns, [e["kernel"]["ops_per_s"] for e in scale], marker="s",
            color=COLORS["kopilka-kernel"], label="kernel ops/s (batches of 1k)")
    ax.plot(ns, [e["server_unary"]["ops_per_s"] for e in scale], marker="o",
            color=COLORS["kopilka-server"], label="server unary ops/s (16 tills)")
    if all("server_post" in e for e in scale):
        ax.plot(ns, [e["server_post"]["ops_per_s"] for e in scale], marker="s",
                color=COLORS["kopilka-server"], linestyle="--",
                label="server Post ops/s (b=1k)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("accounts")
    ax.set_ylabel("durable ops/s")
    ax.set_xticks(ns, [_label(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    mem = ax.twinx()
    mem.plot(ns, [e["server_memory"]["RssAnon"] / 2**20 for e in scale], marker="^",
             color="black", linestyle=":", label="server anonymous RSS (MiB)")
    mem.set_ylabel("server anonymous RSS, MiB")
    top = max(e["server_memory"]["RssAnon"] for e in scale) / 2**20
    mem.set_ylim(0, top * 1.4)
    lines = ax.get_legend_handles_labels()
    more = mem.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    ax.set_title("Kopilka at scale (spread)")


def draw(result, path):
    meta, rows = result["meta"], result["rows"]
    fig, axes = plt.subplots(2, 3, figsize=(22, 12))
    _best(axes[0][0], rows)
    _per_system(axes[0][1], rows, "ops_per_s", "durable operations / s",
                "Throughput by concurrency (dashed: hot)")
    _per_system(axes[0][2], rows, "p99_ms", "p99 acknowledgement latency, ms "
                "(Post and batches: the request's)", "p99 latency by concurrency")
    handles, labels = axes[0][1].get_legend_handles_labels()
    _storage(axes[1][0], result["storage"])
    _scale(axes[1][1], result["scale"])
    axes[1][2].set_axis_off()
    axes[1][2].legend(handles, labels, loc="upper center", fontsize=9, frameon=False,
                      title="by concurrency (hot: 10% of operations on 100 accounts)")
    goals = [("MET      " if g["met"] else "NOT MET  ") + g["want"]
             for g in result["goals"].values()]
    axes[1][2].text(0.0, 0.0, "goals\n" + "\n".join(goals), fontsize=8.5,
                    family="monospace", va="bottom", transform=axes[1][2].transAxes)
    load = meta["load_start"][0], meta["load_end"][0]
    fig.suptitle(f"Kopilka side by side: {_label(meta['config']['accounts'])} accounts, "
                 f"every acknowledged operation on disk; {meta['host']}, {meta['cpus']} "
                 f"CPUs, {meta['date']}, load average {load[0]:.1f} at start, "
                 f"{load[1]:.1f} at end (other work shares the machine)"
                 + (" (quick)" if meta["quick"] else ""))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: chart.py RESULTS.json")
    with open(argv[0]) as f:
        result = json.load(f)
    out = os.path.splitext(argv[0])[0] + ".png"
    draw(result, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
