"""Latency/throughput summary and plot for serve_bench.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
MS = 1000.0


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in PERCENTILES} | {"mean": float("nan")}
    arr = np.asarray(values) * MS
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def summarize(results: list, wall_s: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]
    good = [r for r in ok if r.ttft_s * MS <= slo_ttft_ms and (
        r.num_output_tokens <= 1 or (r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) * MS <= slo_tpot_ms)]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    num_tokens = sum(r.num_output_tokens for r in ok)
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "errors": errors,
        "wall_s": wall_s,
        "output_tokens": num_tokens,
        "output_tokens_per_s": num_tokens / wall_s,
        # > 1 when streamed deltas were coalesced (a lagging consumer gets what piled up as one chunk).
        "tokens_per_chunk": num_tokens / max(sum(len(r.itl_s) + 1 for r in ok), 1),
        "requests_per_s": len(ok) / wall_s,
        "goodput_requests_per_s": len(good) / wall_s,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "attainment": len(good) / max(len(results), 1)},
        "ttft_ms": _pcts([r.ttft_s for r in ok]),
        "itl_ms": _pcts([x for r in ok for x in r.itl_s]),
        "tpot_ms": _pcts(tpots),
        "e2e_ms": _pcts([r.e2e_s for r in ok]),
        "_raw": {"ttft_s": [r.ttft_s for r in ok], "tpot_s": tpots},
    }


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [k for k in ("http", "core", "inprocess") if k in report]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in paths:
        raw = report[name].pop("_raw")
        for ax, key in zip(axes[:2], ("ttft_s", "tpot_s"), strict=True):
            values = np.sort(np.asarray(raw[key]) * MS)
            ax.plot(values, np.linspace(0, 1, len(values)), label=name)
    for ax, title in zip(axes[:2], ("TTFT (ms)", "TPOT (ms)"), strict=True):
        ax.set_xlabel(title)
        ax.set_ylabel("CDF")
        ax.legend()
        ax.grid(alpha=0.3)
    colors = ["tab:blue", "tab:orange", "tab:green"][: len(paths)]
    axes[2].bar(paths, [report[p]["output_tokens_per_s"] for p in paths], color=colors)
    axes[2].set_ylabel("output tokens/s")
    axes[2].set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _proc_label(pid: int, parent_pid: int, own_pid: int) -> str | None:
    if pid == own_pid:
        return "bench_process"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if parent_pid == own_pid and "k2ray.serve.engine.engine_core" in cmd:
        return "bench_engine_core"  # the `core` baseline's, not the engine replica's
    for marker, label in (("EngineServer", "engine_replica"), ("k2ray.serve.engine.engine_core", "engine_core"),
                          (":Router", "router_replica"), ("ProxyActor", "serve_proxy")):
        if marker in cmd:
            return label
    return "ray_other" if ("ray::" in cmd or "/ray/" in cmd) else None


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user+system clock ticks so far), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descends_from(pid: int, ancestor: int, table: dict[int, tuple[int, int]]) -> bool:
    seen = set()
    while pid not in seen and pid in table:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = table[pid][0]
    return False


def cpu_seconds_by_process(own_pid: int) -> dict[str, float]:
    """User+system CPU seconds so far of this process and the processes it started (the local Ray and
    every actor in it, engine cores), by role (Linux /proc). Other users' processes on a shared machine,
    Ray clusters of their own included, are left out."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    table = _process_table()
    totals: dict[str, float] = {}
    for pid, (parent_pid, num_ticks) in table.items():
        if not _descends_from(pid, own_pid, table):
            continue
        if (label := _proc_label(pid, parent_pid, own_pid)) is not None:
            totals[label] = totals.get(label, 0.0) + num_ticks / ticks
    return totals


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], num_tokens: int) -> dict[str, float]:
    return {k: (after.get(k, 0.0) - before.get(k, 0.0)) * MS / max(num_tokens, 1) for k in sorted(after)}


def against_baseline(report: dict, baseline: str) -> dict:
    """Every other path of `report` against `baseline`, measured in the same run: throughput, and the per-step
    cost as the p50 TPOT ratio (serve_bench --tools: tools declared, every step constrained, vs none)."""
    base = report[baseline]
    return {f"{name}_vs_{baseline}": {
        "throughput_ratio": path["output_tokens_per_s"] / base["output_tokens_per_s"],
        "tpot_p50_ratio": path["tpot_ms"]["p50"] / base["tpot_ms"]["p50"],
        "tpot_p50_delta_ms": path["tpot_ms"]["p50"] - base["tpot_ms"]["p50"],
        "ttft_p50_delta_ms": path["ttft_ms"]["p50"] - base["ttft_ms"]["p50"],
    } for name, path in report.items() if name != baseline}
