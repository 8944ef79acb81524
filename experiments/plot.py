"""Charts (PNG, matplotlib Agg) and a markdown table from the JSON lines of sweep.py, simulate.py or quality.py.

    .venv/bin/python experiments/plot.py results/sweep.jsonl [--out-dir DIR] [--prefix NAME]

Writes DIR/NAME_*.png and DIR/NAME.md (default DIR: the input's folder, NAME: the input's stem)
and prints the markdown.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meshlab.common import markdown_table, read_jsonl, run_header  # noqa: E402

DPI = 80
SIZE = (6.4, 4.0)

SPEED_COLUMNS = [
    ("k", "K", ""), ("policy", "policy", ""), ("extra", "extra", ""), ("rtt_ms", "added RTT ms", ".0f"),
    ("probe_rtt_ms", "probed RTT ms", ".1f"), ("jitter_ms", "jitter ms", ".0f"), ("loss", "loss", ".3f"),
    ("top_k", "top-k", ""), ("tokens", "tokens", ".0f"), ("tokens_per_s_spread", "tokens/s median (min–max)", ""),
    ("ttft_ms", "TTFT ms", ".0f"), ("latency_p50_ms_spread", "p50 ms/token (min–max)", ""),
    ("latency_p99_ms_spread", "p99 ms/token (min–max)", ""),
    ("straggler_share", "dropped as late", ".2f"), ("failed_share", "failed calls", ".2f"),
    ("router_ms_p50_spread", "router ms (min–max)", ""), ("beyond_compute_p50_ms", "beyond model time ms", ".1f"),
    ("load_average_1m_spread", "load avg (min–max)", ""), ("repeats", "runs", ""),
]
SPREAD_KEYS = {"tokens_per_s": ".2f", "latency_p50_ms": ".1f", "latency_p99_ms": ".1f", "router_ms_p50": ".2f",
               "load_average_1m": ".1f"}
FACTORS = ("policy", "extra", "top_k", "k")  # a comparison table is made for each of these that varies
SHOWN_FIXED = ("k", "extra", "policy", "top_k", "rtt_ms")
BYTES_COLUMNS = [
    ("k", "K", ""), ("top_k", "top-k", ""), ("reply_bytes_per_expert_token", "reply B/expert/token", ".0f"),
    ("request_bytes_per_expert_token", "request B/expert/token", ".0f"),
    ("wire_down_bytes_per_call", "wire B expert→router/call", ".0f"),
    ("wire_up_bytes_per_call", "wire B router→expert/call", ".0f"), ("union_size_mean", "union size", ".0f"),
    ("round_trips_per_token", "round trips/token", ".2f"), ("calls_per_token", "calls/token", ".2f"),
]


def _save(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _line_by(rows, x: str, y: str, group: str, ax, style: str = "-o", label_fmt: str = "{g}") -> None:
    groups = defaultdict(list)
    for r in rows:
        if r.get(y) is not None and not (isinstance(r[y], float) and math.isnan(r[y])):
            groups[r[group]].append((r[x], r[y]))
    for g in sorted(groups):
        pts = sorted(groups[g])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label_fmt.format(g=g))


POINT_KEY = ("k", "rtt_ms", "jitter_ms", "loss", "top_k", "extra", "policy", "mix")


def aggregate(points: list[dict]) -> list[dict]:
    """One row per sweep point: the median over its repeats of every numeric field (and how many there were)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[tuple(p.get(k) for k in POINT_KEY) + (tuple(p.get("rtt_per_expert_ms") or ()),)].append(p)
    out = []
    for members in groups.values():
        row = dict(members[0])
        for key, value in members[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in POINT_KEY:
                vals = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
                row[key] = float(np.median(vals)) if vals else math.nan
                if key in SPREAD_KEYS and vals:
                    row[f"{key}_min"], row[f"{key}_max"] = min(vals), max(vals)
                    row[f"{key}_spread"] = spread_text(row[key], min(vals), max(vals), SPREAD_KEYS[key])
        row["repeats"] = len(members)
        out.append(row)
    return out


def spread_text(median: float, low: float, high: float, fmt: str) -> str:
    """'median (min–max)' with one format."""
    return f"{median:{fmt}} ({low:{fmt}}–{high:{fmt}})"


def noise_verdict(a: dict, b: dict, key: str = "tokens_per_s") -> str:
    """'within noise' when the min–max ranges of two aggregated points overlap, else which one is faster."""
    if a.get("repeats", 1) < 2 or b.get("repeats", 1) < 2:
        return "one run each: no spread to judge"
    if a[f"{key}_min"] <= b[f"{key}_max"] and b[f"{key}_min"] <= a[f"{key}_max"]:
        return "within noise"
    return "second faster" if b[key] > a[key] else "first faster"


def comparisons(points: list[dict], factor: str) -> list[dict]:
    """Each pair of points that differ only in factor: both medians with spreads, their ratio and the verdict."""
    others = [k for k in POINT_KEY if k != factor]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[tuple(p.get(k) for k in others) + (tuple(p.get("rtt_per_expert_ms") or ()),)].append(p)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r[factor])
        for first, second in zip(members, members[1:]):
            out.append({"factor": factor, "fixed": ", ".join(f"{k}={first[k]}" for k in others if k in SHOWN_FIXED
                                                             and first.get(k) is not None),
                        "first": f"{factor}={first[factor]}", "first_tps": first["tokens_per_s_spread"],
                        "second": f"{factor}={second[factor]}", "second_tps": second["tokens_per_s_spread"],
                        "ratio": second["tokens_per_s"] / first["tokens_per_s"],
                        "verdict": noise_verdict(first, second)})
    return out


COMPARISON_COLUMNS = [("fixed", "fixed", ""), ("first", "first", ""), ("first_tps", "tokens/s median (min–max)", ""),
                      ("second", "second", ""), ("second_tps", "tokens/s median (min–max)", ""),
                      ("ratio", "second ÷ first (medians)", ".2f"), ("verdict", "verdict", "")]


def verdict_tables(points: list[dict]) -> str:
    """A comparison table for each factor that varies among the aggregated points (empty when none does)."""
    out = ""
    for factor in FACTORS:
        if len({str(r.get(factor)) for r in points}) > 1:
            out += (f"\n\nBy {factor}, everything else fixed (within noise: the min–max ranges of tokens/s overlap):"
                    f"\n\n" + markdown_table(comparisons(points, factor), COMPARISON_COLUMNS))
    return out


def plot_sweep(rows: list[dict], out_dir: Path, prefix: str) -> tuple[list[Path], str]:
    """Speed against RTT per K, latency percentiles, TTFT and bytes per expert per token against top-k."""
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    points = aggregate([r for r in rows if r["kind"] == "point"])
    paths = []
    top_ks = sorted({r["top_k"] for r in points})
    main_tk = max(top_ks, key=lambda tk: sum(r["top_k"] == tk for r in points))
    by_rtt = [r for r in points if r["top_k"] == main_tk]
    backend = meta.get("backend", "?")
    if len({r["rtt_ms"] for r in by_rtt}) > 1:
        fig, ax = plt.subplots(figsize=SIZE)
        _line_by(by_rtt, "rtt_ms", "tokens_per_s", "k", ax, label_fmt="K={g}")
        ax.set(xlabel="added RTT per expert (ms)", ylabel="decode tokens/s", title=f"Speed vs RTT ({backend}, top-{main_tk})")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, f"{prefix}_tokens_per_s"))
        fig, ax = plt.subplots(figsize=SIZE)
        _line_by(by_rtt, "rtt_ms", "latency_p50_ms", "k", ax, "-o", "p50 K={g}")
        ax.set_prop_cycle(None)
        _line_by(by_rtt, "rtt_ms", "latency_p99_ms", "k", ax, "--x", "p99 K={g}")
        ax.set_prop_cycle(None)
        rtts = sorted({r["rtt_ms"] for r in by_rtt})
        for k in sorted({r["k"] for r in by_rtt}):  # one round trip per token: p50 at RTT 0, plus the RTT
            base = [r["latency_p50_ms"] for r in by_rtt if r["k"] == k and r["rtt_ms"] == rtts[0]]
            if base:
                ax.plot(rtts, [base[0] + x - rtts[0] for x in rtts], ":", lw=1,
                        label="p50(0) + RTT" if k == min(r["k"] for r in by_rtt) else None)
        ax.set(xlabel="added RTT per expert (ms)", ylabel="ms per token", title="Per-token latency vs RTT")
        ax.legend(ncol=2, fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, f"{prefix}_latency"))
        fig, ax = plt.subplots(figsize=SIZE)
        _line_by(by_rtt, "rtt_ms", "ttft_ms", "k", ax, label_fmt="K={g}")
        ax.set(xlabel="added RTT per expert (ms)", ylabel="time to first token (ms)", title="Time to first token vs RTT")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, f"{prefix}_ttft"))
    if len(top_ks) > 1:
        fig, ax = plt.subplots(figsize=SIZE)
        _line_by(points, "top_k", "reply_bytes_per_expert_token", "k", ax, "-o", "reply message, K={g}")
        if any(not math.isnan(r.get("wire_down_bytes_per_call", math.nan)) for r in points):
            ax.set_prop_cycle(None)
            _line_by(points, "top_k", "wire_down_bytes_per_call", "k", ax, "--x", "on the wire, K={g}")
        ax.set(xscale="log", xlabel="top-k entries per reply", ylabel="bytes per expert per token",
               title="Reply size vs top-k")
        ax.set_xticks(top_ks, [str(t) for t in top_ks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, f"{prefix}_bytes"))
    ordered = sorted(points, key=lambda r: (r["top_k"], r["policy"], r["extra"], r["rtt_ms"], r["jitter_ms"], r["loss"],
                                            r["k"]))
    table = markdown_table(ordered, SPEED_COLUMNS) + "\n\nBytes per expert per token:\n\n"
    seen, byte_rows = set(), []
    for r in sorted(ordered, key=lambda r: (r["top_k"], r["k"])):
        if (r["top_k"], r["k"]) not in seen:
            seen.add((r["top_k"], r["k"]))
            byte_rows.append(r)
    table += markdown_table(byte_rows, BYTES_COLUMNS)
    table += verdict_tables(points)
    head = (run_header(meta) + f"Backend: {backend} — {meta.get('backend_reason', '')}\n\n"
            "Each row: the median over its runs of each figure, min–max in brackets where shown.\n\n")
    return paths, head + table


def plot_simulate(rows: list[dict], out_dir: Path, prefix: str) -> tuple[list[Path], str]:
    """Degradation timeline and per-policy speed of a simulate.py run."""
    paths = []
    toks = [r for r in rows if r["kind"] == "degrade_token"]
    waves = [r for r in rows if r["kind"] == "wave"]
    reg = [r for r in rows if r["kind"] == "registry"]
    if toks:
        fig, ax = plt.subplots(figsize=SIZE)
        ax.plot([r["t_s"] for r in toks], [r["used"] for r in toks], ".-", label="experts mixed per token")
        ax.plot([r["t_s"] for r in toks], [r["failed"] for r in toks], "x", label="failed calls per token")
        for w in waves:
            ax.axvline(w["t_s"], color="grey", ls=":")
            ax.text(w["t_s"], ax.get_ylim()[1] * 0.95, f" {w['alive_after']} left", fontsize=7, va="top")
        ax.set(xlabel="seconds", ylabel="count per token", title="Degradation as experts are killed (K=4)")
        ax2 = ax.twinx()
        ax2.plot([r["t_s"] for r in reg], [max(r["online"], 0.5) for r in reg], "g-", alpha=0.5, label="online in registry")
        ax2.set(yscale="log", ylabel="experts online")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center left")
        paths.append(_save(fig, out_dir, f"{prefix}_degradation"))
    gen = sorted(aggregate([r for r in rows if r["kind"] == "gen"]), key=lambda r: (r["policy"], r["k"], r["extra"]))
    if gen:
        fig, ax = plt.subplots(figsize=SIZE)
        for extra in sorted({r["extra"] for r in gen}):
            for policy in sorted({r["policy"] for r in gen}):
                pts = sorted((r["k"], r["tokens_per_s"]) for r in gen if r["policy"] == policy and r["extra"] == extra)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if extra == 0 else "--x",
                        label=f"{policy}, s={extra}")
        ax.set(xlabel="K", ylabel="decode tokens/s", title="Simulated mesh: speed by policy and K")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir, f"{prefix}_speed"))
    cols = [("policy", "policy", ""), ("k", "K", ""), ("extra", "s", ""),
            ("tokens_per_s_spread", "tokens/s median (min–max)", ""),
            ("latency_p50_ms_spread", "p50 ms/token (min–max)", ""),
            ("modelled_p50_ms", "slowest used expert's step ms", ".0f"),
            ("overhead_p50_ms", "difference p50 ms", ".1f"), ("router_ms_p50_spread", "router ms p50 (min–max)", ""),
            ("union_size_mean", "union", ".0f"), ("straggler_share", "dropped as late", ".2f"),
            ("calls_per_token", "calls/token", ".2f"), ("load_average_1m_spread", "load avg (min–max)", ""),
            ("repeats", "runs", "")]
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    md = run_header(meta) + markdown_table(gen, cols) + verdict_tables(gen)
    scale = [r for r in rows if r["kind"] == "scale"]
    if scale:
        md += "\n\n" + markdown_table(scale, [("what", "operation", ""), ("p50_ms", "p50 ms", ".3f"),
                                              ("p99_ms", "p99 ms", ".3f")])
    if waves:
        md += "\n\n" + markdown_table(waves, [("after_token", "after token", ""), ("killed", "killed", ""),
                                              ("alive_after", "left alive", ""),
                                              ("not_online_after_s", "no longer selected after s", ".2f"),
                                              ("gone_after_s", "marked gone after s", ".2f")])
    return paths, md


def plot_quality(rows: list[dict], out_dir: Path, prefix: str) -> tuple[list[Path], str]:
    """Text NLL against top-k for each expert and mixture (the full-vocabulary value at the right)."""
    meta = next((r for r in rows if r["kind"] == "meta"), None)
    first = next(iter(meta.get("text_sources") or {"text": None})) if meta else "text"
    text = [r for r in rows if r["kind"] == "text" and r.get("text", "text") == first]
    top_ks = sorted({r["top_k"] for r in text if r["top_k"] != "full"})
    xs = top_ks + [max(top_ks) * 4]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    groups = defaultdict(dict)
    for r in text:
        if r["fill"] in ("spread", "-"):
            groups[(r["experts"], r["rule"])][r["top_k"]] = r["nll"]
    for (experts, rule), vals in groups.items():
        k = experts.count("+") + 1
        if k == 1 or experts.count("+") == len({e for g in groups for e in g[0].split("+")}) - 1 or k == 2 and rule == "linear":
            ys = [vals.get(tk, math.nan) for tk in top_ks] + [vals.get("full", math.nan)]
            style = "-o" if k == 1 else ("--s" if rule == "linear" else ":^")
            ax.plot(xs, ys, style, label=f"{experts} {rule if k > 1 else ''}".strip(), alpha=0.85)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(t) for t in top_ks] + ["full"])
    ax.minorticks_off()
    ax.set(xlabel="top-k per expert reply", ylabel="NLL nats/token", title=f"NLL vs top-k on {first}")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    paths = [_save(fig, out_dir, f"{prefix}_nll")]
    from quality import markdown_report

    return paths, markdown_report([r for r in rows if r["kind"] in ("text", "mc", "weighted")],
                                  [r for r in rows if r["kind"] == "expert"], meta)


def main(argv: list[str] | None = None) -> int:
    """Read JSON lines, draw the charts for its experiment, write and print the markdown."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--prefix", default=None)
    args = p.parse_args(argv)
    rows = read_jsonl(args.input)
    out_dir = args.out_dir or args.input.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or args.input.stem
    kinds = {r["kind"] for r in rows}
    if "point" in kinds:
        paths, md = plot_sweep(rows, out_dir, prefix)
    elif "gen" in kinds or "degrade_token" in kinds:
        paths, md = plot_simulate(rows, out_dir, prefix)
    elif "text" in kinds:
        paths, md = plot_quality(rows, out_dir, prefix)
    else:
        raise SystemExit(f"{args.input}: no sweep, simulate or quality rows")
    (out_dir / f"{prefix}.md").write_text(md + "\n")
    print(md)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote {out_dir / f'{prefix}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
