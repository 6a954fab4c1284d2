"""Renders the benchmark suite's JSON files into REPORT.md and PNG plots; no number in it is typed by hand.

    python -m benchmarks.report                          # re-render benchmarks/results/REPORT.md from its JSON
    python -m benchmarks.report --results DIR            # another results directory (e.g. a suite --smoke run)

Reads, from the results directory, `<name>.json` for each benchmark of the suite (SUITE) and
`suite.json` when `benchmarks.suite` wrote one (which benchmarks ran, how they ended, their commands).
A benchmark the suite saw fail is shown as failed, with the end of its log, and any older JSON of it is
ignored; one with no JSON is listed as without results. Each benchmark's JSON follows one convention:
"benchmark", "machine", "baseline", "rows" (a list of flat records), "headlines" ({name, value, unit});
"model" / "upstream", "date", "command" and further lists of records are optional. Whatever is present is
rendered: headlines first, then per benchmark its context line, plots, and a table of its rows (known
benchmarks with chosen columns, the ratio to the baseline among them; others with every scalar column).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUITE = ("proxy_cost", "overhead", "step_cost", "peer_nemo")

# Known benchmarks: their tables' columns, in order (those no row has are dropped).
COLUMNS = {
    "overhead": [
        "concurrency", "mode", "arm", "requests_per_second", "throughput_ratio_to_direct", "throughput_ratio_lowest_round",
        "throughput_ratio_highest_round", "tokens_per_second",
        "p50_ms", "added_p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "added_ttft_p50_ms", "guard_cpu_ms_per_request", "errors",
    ],
    "proxy_cost": [
        "concurrency", "proxy", "door", "cpu_ms_per_request", "cpu_ratio_to_minimal_proxy", "requests_per_second",
        "p50_ms", "p99_ms", "loadgen_cpu_ms_per_request",
    ],
}
# Words that mark a column as a comparison with the baseline: such columns come right after the labels.
RATIO_WORDS = ("ratio", "added", "overhead", "speedup", "vs_", "÷")
# What the bar plot shows for a benchmark without a plot of its own: one panel per metric present.
GENERIC_METRICS = {
    "step_cost": ["added_cpu_ms", "added_p50_ms"],
    "peer_nemo": ["requests_per_second", "p50_ms", "cpu_ms_per_request"],
}
# Lists of records besides "rows" worth a table of their own, with what they are.
EXTRA_TABLES = {
    "overhead": {"loadgen_ceiling": "The load generator alone, against the instant upstream (and guard in front of it): "
                                    "the rates it reaches when the upstream costs nothing."},
}
# Rows that carry no comparison of their own get these metrics divided by their baseline row's.
DERIVED_RATIOS = ("requests_per_second", "p50_ms", "p99_ms", "cpu_ms_per_request")
ARM_COLOURS = {"direct": "tab:gray", "guard-http": "tab:blue", "guard-grpc": "tab:orange"}


# -- reading ------------------------------------------------------------------------------------


def load(results: Path) -> tuple[dict | None, dict[str, dict]]:
    """(suite.json or None, {benchmark: its JSON}) for the suite's benchmarks that have a readable file."""
    suite_file = results / "suite.json"
    suite = json.loads(suite_file.read_text()) if suite_file.exists() else None
    data = {}
    for name in SUITE:
        path = results / f"{name}.json"
        if path.exists():
            try:
                data[name] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue  # a half-written file: shown as without results
    return suite, data


def statuses(suite: dict | None, data: dict[str, dict]) -> dict[str, dict]:
    """Per benchmark of the suite: {"status": "ok" | "failed" | "no results", ...what suite.json says}."""
    ran = {entry["name"]: entry for entry in (suite or {}).get("benchmarks", [])}
    found = {}
    for name in SUITE:
        entry = dict(ran.get(name, {}))
        if entry.get("status", "ok") == "ok":
            entry["status"] = "ok" if name in data else "no results"
        found[name] = entry
    return found


# -- formatting ---------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value).replace("|", "\\|")  # a bar would split the table cell
    magnitude = abs(value)
    if magnitude < 1e-9:
        return "0"  # float noise from a subtraction, not a measurement
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def machine_text(machine) -> str:
    if isinstance(machine, dict):
        parts = []
        if machine.get("cpus"):
            parts.append(f"{machine['cpus']} CPUs")
        for key in ("gpu", "processor", "platform"):
            if machine.get(key):
                parts.append(str(machine[key]))
        if machine.get("python"):
            parts.append(f"Python {machine['python']}")
        return ", ".join(parts) or "unknown machine"
    return str(machine) if machine else "unknown machine"


def upstream_text(data: dict) -> str:
    parts = [str(data[key]) for key in ("model", "upstream") if data.get(key)]
    return " / ".join(dict.fromkeys(parts)) or "not stated"


def context_line(data: dict) -> str:
    return (f"Machine: {machine_text(data.get('machine'))}. Model / upstream: {upstream_text(data)}. "
            f"Baseline: {str(data.get('baseline') or 'not stated').rstrip('.')}."
            + (f" Cores: {data['cores']}." if data.get("cores") else ""))


def scalar_columns(rows: list[dict]) -> list[str]:
    """Every key some row holds a scalar under: labels (text) first, then ratios to the baseline, then the rest."""
    keys = list(dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, (list, dict))))
    labels = [k for k in keys if any(isinstance(row.get(k), str) for row in rows)]
    ratios = [k for k in keys if k not in labels and any(word in k for word in RATIO_WORDS)]
    return labels + ratios + [k for k in keys if k not in labels and k not in ratios]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def baseline_label(rows: list[dict], baseline: str | None) -> tuple[str, str] | None:
    """(column, value) of the baseline rows: the one value of a text column the "baseline" text names, as a word."""
    for key in scalar_columns(rows):
        values = {row[key] for row in rows if isinstance(row.get(key), str)}
        named = [v for v in values if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", baseline or "", re.IGNORECASE)]
        if len(named) == 1 and len(values) > 1:
            return key, named[0]
    return None


def with_ratios(rows: list[dict], baseline: str | None) -> list[dict]:
    """`rows`, or where none compares itself with the baseline, each with `<metric> ÷ baseline`,
    against the baseline row (baseline_label) with the same other labels and concurrency."""
    columns = scalar_columns(rows)
    found = baseline_label(rows, baseline)
    if found is None or any(word in c for c in columns for word in RATIO_WORDS):
        return rows
    key, value = found
    group = [c for c in columns if c != key and any(isinstance(row.get(c), str) for row in rows)] + ["concurrency"]
    bases = {tuple(row.get(c) for c in group): row for row in rows if row.get(key) == value}
    derived = []
    for row in rows:
        base = bases.get(tuple(row.get(c) for c in group))
        ratios = {}
        if base is not None and base is not row:
            ratios = {f"{m} ÷ baseline": row[m] / base[m] for m in DERIVED_RATIOS
                      if is_number(row.get(m)) and is_number(base.get(m)) and base[m]}
        derived.append(row | ratios)
    return derived


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    rows = [row for row in rows if isinstance(row, dict)]
    if not rows:
        return "_no rows_\n"
    present = {k for row in rows for k in row}
    columns = [c for c in columns if c in present] if columns else []
    columns = columns or scalar_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def exit_text(entry: dict) -> str:
    code = entry.get("returncode", "?")
    return f"exit {code}" if isinstance(code, int) else str(code)


def headline_text(headline: dict) -> str:
    unit = str(headline.get("unit") or "")
    gap = "" if unit in ("", "×", "%") else " "
    return f"{headline.get('name', '?')}: **{fmt(headline.get('value'))}{gap}{unit}**"


# -- plots --------------------------------------------------------------------------------------


def _figure(panels: int, data: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False, layout="constrained")
    caption = textwrap.fill(context_line(data), 75 * panels)
    fig.suptitle(f"{title}\n{caption}", fontsize=8.5)
    return fig, axes[0]


def _concurrency_axis(ax, levels) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
    ax.xaxis.set_minor_locator(NullLocator())


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_overhead(data: dict, out: Path) -> list[tuple[Path, str]]:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = [r for r in data.get("rows", []) if {"arm", "mode", "concurrency"} <= r.keys()]
    modes = [m for m in ("unary", "stream") if any(r["mode"] == m for r in rows)]
    if not modes:
        return []
    made = []
    fig, axes = _figure(len(modes), data, "overhead: latency by concurrency (solid p50, dashed p99, dotted TTFT p50)")
    for ax, mode in zip(axes, modes):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            series = sorted((r for r in rows if r["arm"] == arm and r["mode"] == mode), key=lambda r: r["concurrency"])
            colour = ARM_COLOURS.get(arm)
            for key, style, label in (("p50_ms", "-", arm), ("p99_ms", "--", None), ("ttft_p50_ms", ":", None)):
                points = [(r["concurrency"], r[key]) for r in series if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=colour, label=label)
        ax.set(title=mode, yscale="log", xlabel="concurrency", ylabel="ms")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        _concurrency_axis(ax, {r["concurrency"] for r in rows})
        ax.legend(fontsize=7)
    made.append((_save(fig, out / "overhead_latency.png"), "Latency by concurrency"))
    fig, axes = _figure(len(modes), data, "overhead: throughput by concurrency")
    for ax, mode in zip(axes, modes):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            points = sorted((r["concurrency"], r["requests_per_second"]) for r in rows
                            if r["arm"] == arm and r["mode"] == mode and r.get("requests_per_second") is not None)
            if points:
                ax.plot(*zip(*points), "-", marker="o", color=ARM_COLOURS.get(arm), label=arm)
        ax.set(title=mode, xlabel="concurrency", ylabel="requests / s")
        _concurrency_axis(ax, {r["concurrency"] for r in rows})
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    made.append((_save(fig, out / "overhead_throughput.png"), "Throughput by concurrency"))
    return made


def plot_proxy_cost(data: dict, out: Path) -> list[tuple[Path, str]]:
    rows = [r for r in data.get("rows", []) if r.get("cpu_ms_per_request") is not None]
    if not rows:
        return []
    fig, (ax,) = _figure(1, data, "proxy_cost: proxy CPU per request (all threads, user + system)")
    levels = sorted({r.get("concurrency", 0) for r in rows})
    def subject(row: dict) -> str:
        return f"{row.get('proxy', '?')} {row.get('door', '')}".strip()

    subjects = list(dict.fromkeys(subject(r) for r in rows))
    width = 0.8 / len(subjects)
    for i, name in enumerate(subjects):
        values = [next((r["cpu_ms_per_request"] for r in rows if subject(r) == name and r.get("concurrency", 0) == level), 0)
                  for level in levels]
        ax.bar([j + i * width for j in range(len(levels))], values, width, label=name)
    ax.set_xticks([j + width * (len(subjects) - 1) / 2 for j in range(len(levels))], [f"concurrency {c}" for c in levels])
    ax.set(ylabel="CPU ms / request")
    ax.legend(fontsize=7)
    return [(_save(fig, out / "proxy_cost_cpu.png"), "CPU per request, guard against the minimal proxy")]


def row_label(row: dict) -> str:
    """The row's first text field (its name; later ones tend to be descriptions) and its concurrency."""
    parts = [next((v for v in row.values() if isinstance(v, str)), "?")]
    if "concurrency" in row:
        parts.append(f"c={row['concurrency']}")
    return " ".join(parts)


def plot_generic(name: str, data: dict, out: Path) -> list[tuple[Path, str]]:
    """Horizontal bars per row for the benchmark's first metrics present (GENERIC_METRICS, else its ratios)."""
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    numeric = [k for k in scalar_columns(rows) if any(is_number(r.get(k)) for r in rows)]
    wanted = [k for k in GENERIC_METRICS.get(name, []) if k in numeric]
    metrics = (wanted or [k for k in numeric if any(word in k for word in RATIO_WORDS)] or numeric)[:3]
    if not metrics:
        return []
    found = baseline_label(rows, data.get("baseline"))
    fig, axes = _figure(len(metrics), data, name + (f" (grey: {found[1]}, the baseline)" if found else ""))
    labels = [row_label(r) for r in rows]
    colours = ["tab:gray" if found and r.get(found[0]) == found[1] else "tab:blue" for r in rows]
    for ax, metric in zip(axes, metrics):
        values = [r[metric] if is_number(r.get(metric)) else 0 for r in rows]
        ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        if min(values) > 0 and max(values) > 100 * min(values):  # else the small bars vanish
            ax.set_xscale("log")
        ax.set(title=metric, xlabel=metric)
    return [(_save(fig, out / f"{name}.png"), ", ".join(metrics))]


def plots(name: str, data: dict, out: Path) -> list[tuple[Path, str]]:
    plotter = {"overhead": plot_overhead, "proxy_cost": plot_proxy_cost}.get(name)
    return plotter(data, out) if plotter else plot_generic(name, data, out)


# -- the report ---------------------------------------------------------------------------------


def render(results: Path = RESULTS, out: Path | None = None) -> Path:
    """Writes `out` (default results/REPORT.md) and its PNGs next to it; returns the report's path."""
    out = out or results / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    suite, data = load(results)
    status = statuses(suite, data)
    command = (suite or {}).get("command") or "python -m benchmarks.report"
    lines = [
        "# guard benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} by `{command}`"
        + (f" (suite run started {suite['date']})" if suite and suite.get("date") else "")
        + ". Every number below is read from the JSON files next to this report; regenerate with `python -m benchmarks.report`.",
        "",
        "## Headlines",
        "",
    ]
    for name in SUITE:
        if status[name]["status"] == "ok":
            for headline in data[name].get("headlines") or []:
                lines.append(f"- {name}: {headline_text(headline)}")
    if not any(status[n]["status"] == "ok" and data[n].get("headlines") for n in SUITE):
        lines.append("_no headlines_")
    lines += ["", "## Runs", "", "| benchmark | status | seconds | results |", "| --- | --- | --- | --- |"]
    for name in SUITE:
        entry = status[name]
        label = entry["status"] + (f" ({exit_text(entry)})" if entry["status"] == "failed" else "")
        lines.append(f"| {name} | {label} | {fmt(entry.get('seconds'))} | {f'{name}.json' if entry['status'] == 'ok' else ''} |")
    for name in SUITE:
        entry = status[name]
        lines += ["", f"## {name}", ""]
        if entry["status"] == "failed":
            lines += [f"**Failed** ({exit_text(entry)}): `{entry.get('command', '')}`. End of its log:", "", "```"]
            lines += (entry.get("log_tail") or "(no log)").rstrip().splitlines() + ["```"]
            continue
        if entry["status"] != "ok":
            lines.append("No results in this directory.")
            continue
        result = data[name]
        lines.append(context_line(result))
        run_command = result.get("command") or entry.get("command")
        if result.get("date") or run_command:
            lines += ["", " ".join(filter(None, [f"Run {result['date']}." if result.get("date") else "",
                                                 f"Command: `{run_command}`." if run_command else ""]))]
        for path, caption in plots(name, result, out.parent):
            lines += ["", f"![{name}: {caption}]({path.name})", "", f"_{caption}. {context_line(result)}_"]
        lines += ["", table(with_ratios(result.get("rows") or [], result.get("baseline")), COLUMNS.get(name))]
        for key, caption in EXTRA_TABLES.get(name, {}).items():
            if isinstance(result.get(key), list):
                lines += [f"`{key}`: {caption}", "", table(result[key])]
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


README = ROOT / "README.md"
README_START = "<!-- benchmark headlines: generated by `python -m benchmarks.report --readme`; do not edit -->"
README_END = "<!-- end of generated benchmark headlines -->"


def readme_block(results: Path = RESULTS) -> str:
    """The suite's headlines as README shows them, from the committed JSON (deterministic: no dates)."""
    suite, data = load(results)
    status = statuses(suite, data)
    lines = [README_START]
    for name in SUITE:
        if status[name]["status"] != "ok" or not data[name].get("headlines"):
            continue
        lines += ["", f"**{name}** ({context_line(data[name]).rstrip('.')}; `benchmarks/results/{name}.json`):", ""]
        lines += [f"- {headline_text(headline)}" for headline in data[name]["headlines"]]
    lines += ["", README_END]
    return "\n".join(lines)


def update_readme(results: Path = RESULTS, readme: Path = README) -> bool:
    """Replaces README's generated block; False when README has no block to replace."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start] + readme_block(results) + text[end + len(README_END) :])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory holding the benchmarks' JSON")
    parser.add_argument("--out", type=Path, help="report path (default: RESULTS/REPORT.md)")
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's generated headlines block")
    args = parser.parse_args()
    print(f"written: {render(args.results, args.out)}")
    if args.readme:
        if not update_readme(args.results):
            raise SystemExit(f"{README} has no generated block ({README_START!r} ... {README_END!r})")
        print(f"written: {README} (benchmark headlines)")


if __name__ == "__main__":
    main()
