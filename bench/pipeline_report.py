"""The pipeline benchmark's report: ``pipeline.md``, the latency plot and the console table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Pipeline benchmark: what security costs",
        "",
        f"Run {report['started']} on {report['machine']['cpus']} CPU(s), "
        f"{report['machine']['python']}, Kafka at {report['kafka']}; "
        f"load average before/after: {report['load_before']} / {report['load_after']}. "
        f"Mode: {'quick' if report['quick'] else 'full'}.",
        "",
        "## Saturation (median of the rounds)",
        "",
        f"{report['rounds']} rounds of {report['backlog']} commands per mode, interleaved.",
        "",
        "| mode | partitions | workers | commands/s (median) | min-max | ratio to plaintext "
        "| ratio paired by round (min-max) | CPU ms/command (min-max) | CPU ratio "
        "| machine CPU ms/command (broker) | the same less idle | bytes/command "
        "| p50 ms (backlog) "
        "| saturated rounds | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        sat = row["saturation"]
        spread = sat["spread"]
        paired = row.get("ratio_paired", {})
        lines.append(
            f"| {row['mode']} | {row['partitions']} | {row['workers']} | {sat['throughput']} "
            f"| {spread['throughput_min']}-{spread['throughput_max']} | {row.get('ratio', '')} "
            f"| {paired.get('median')} ({paired.get('min')}-{paired.get('max')}) "
            f"| {sat['cpu_ms_per_command'] or ''} ({spread['cpu_ms_min']}-{spread['cpu_ms_max']}) "
            f"| {row.get('ratio_cpu') or ''} "
            f"| {sat.get('machine_cpu_ms_per_command')} "
            f"({sat.get('shared_cpu_ms_per_command', {}).get('broker')}) "
            f"| {sat.get('machine_net_cpu_ms_per_command')} "
            f"| {row.get('bytes_per_command', {}).get('total', '')} | {sat['p50_ms']} "
            f"| {spread['saturated_rounds']}/{len(row['rounds'])} "
            f"| {', '.join(str(r['load_average'][0]) for r in row['rounds'])} |"
        )
    lines += [
        "",
        "## Rounds",
        "",
        "| round | mode | partitions | commands/s | CPU ms/command (worker / vehicle) "
        "| machine CPU ms/command (broker / load generator) "
        "| saturated | backlog sent s | window s | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        ((r["round"], row) for row in report["rows"] for r in row["rounds"]),
        key=lambda item: (item[1]["partitions"], item[0]),
    )
    for round_no, row in ordered:
        r = row["rounds"][round_no - 1]
        roles = r.get("cpu_ms_per_command_by_role", {})
        shared = r.get("shared_cpu_ms_per_command", {})
        lines.append(
            f"| {round_no} | {row['mode']} | {row['partitions']} | {r['throughput']} "
            f"| {r['cpu_ms_per_command']} ({roles.get('worker')} / {roles.get('vehicle')}) "
            f"| {r.get('machine_cpu_ms_per_command')} ({shared.get('broker')} / "
            f"{shared.get('driver')}) "
            f"| {r.get('saturated')} | {r.get('backlog_sent_s')} | {r.get('window_s')} "
            f"| {r['load_average'][0]} / {(r.get('load_average_after') or [None])[0]} |"
        )
    lines += [
        "",
        "## Latency at offered load (fraction of the plaintext ceiling, same partitions)",
        "",
        "| mode | partitions | offered/s | answered/sent | p50 ms | p95 ms | p99 ms "
        "| CPU ms/command | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for load in row["loads"]:
            lines.append(
                f"| {row['mode']} | {row['partitions']} | {load['offered_rate']} "
                f"({load['fraction']:.0%}) | {load['answered']}/{load['sent']} "
                f"| {load['p50_ms']} | {load['p95_ms']} | {load['p99_ms']} "
                f"| {load['cpu_ms_per_command']} | {load['load_average'][0]} |"
            )
    lines += ["", "## Bytes per command on each topic", ""]
    for row in report["rows"]:
        if "bytes_per_command" in row:
            parts = ", ".join(f"{k}: {v}" for k, v in row["bytes_per_command"].items())
            lines.append(f"- {row['mode']} / {row['partitions']} partition(s): {parts}")
    for row in report["failed"]:
        lines.append(
            f"- FAILED: {row['mode']} / {row['partitions']} partition(s): {row['error']} "
            f"(load average {row['load_average']}, {len(row['rounds'])} round(s) measured)"
        )
    lines += ["", *[f"- {note}" for note in report["notes"]], ""]
    if "floor" in report:
        import bench_floor

        lines += bench_floor.markdown(report["floor"])
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({row["partitions"] for row in report["rows"]})
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.5), squeeze=False)
    for ax, p in zip(axes[0], partitions, strict=True):
        for row in report["rows"]:
            if row["partitions"] != p or not row["loads"]:
                continue
            xs = [load["offered_rate"] for load in row["loads"]]
            for q, style in (("p50_ms", "-o"), ("p99_ms", "--x")):
                ys = [load[q] for load in row["loads"]]
                ax.plot(xs, ys, style, label=f"{row['mode']} {q[:3]}")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (commands/s)")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title(f"{p} partition(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"{'mode':<14}{'P':>3}{'W':>3}{'cmd/s':>10}{'spread':>8}{'ratio':>7}{'paired':>8}"
        f"{'cpu ms':>8}{'cpu r':>7}{'mach ms':>8}{'B/cmd':>8}"
        f"{'p50@25%':>9}{'p99@25%':>9}{'p50@50%':>9}{'p99@50%':>9}{'p50@80%':>9}{'p99@80%':>9}"
    )
    for row in report["rows"]:
        sat = row["saturation"]
        cells = []
        for load in row["loads"]:
            cells += [load["p50_ms"], load["p99_ms"]]
        cells += [None] * (6 - len(cells))
        print(
            f"{row['mode']:<14}{row['partitions']:>3}{row['workers']:>3}"
            f"{sat['throughput'] or 0:>10.1f}{sat['spread']['throughput_rel_spread'] or 0:>8.2f}"
            f"{row.get('ratio') or 0:>7.2f}{row['ratio_paired']['median'] or 0:>8.2f}"
            f"{sat['cpu_ms_per_command'] or 0:>8.2f}{row.get('ratio_cpu') or 0:>7.2f}"
            f"{sat.get('machine_cpu_ms_per_command') or 0:>8.2f}"
            f"{row.get('bytes_per_command', {}).get('total', 0):>8.0f}"
            + "".join(f"{c if c is not None else float('nan'):>9.1f}" for c in cells)
        )
    print("spread: (max - min) / median of the rounds' throughput; paired: median per-round ratio")
    print("cpu ms: worker + vehicle processes; mach ms: the whole machine (broker, driver, all)")
    print()
