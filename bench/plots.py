"""Draw what `make bench` measured: PNG plots and the headline table, from bench/results/*.json.

* router_rps.png   -- req/s against connections for every proxy (median, min-max bars), with
                      free scheduling and with the proxy pinned to its own core;
* latency_cdf.png  -- latency CDFs: the proxies at the most connections, the Python API against
                      Ray Serve at 32 callers, and one call against `call_all` to 16 replicas;
* scale.png        -- req/s, p50 and the router's CPU per call against the number of replicas;
* payloads.png     -- round-trip throughput against payload size (log-log), one line per path;
* summary.md       -- the headline table, each figure against its target (pasted into README).

A results file that is missing is left out of the plots and the table, with a printed line.
Usage: `.venv/bin/python bench/plots.py [--results bench/results]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

Results = dict[str, dict[str, Any]]
PROXIES = ("direct", "kf-router", "kf-router/s", "nginx", "nginx/s", "haproxy", "vllm-router")


def load(folder: Path) -> Results:
    names = ["router_overhead", "router_overhead_pinned", "service_calls", "scale"]
    names += ["spmd_calls", "operator_memory", "operator_scale", "payloads", "streams"]
    out: Results = {}
    for name in names:
        path = folder / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
        else:
            print(f"{path}: missing, left out")
    return out


def ticks(ax: Axes, values: list[int]) -> None:
    """A log-2 axis labelled with the measured values themselves (4, 16, 64; not 2^2)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def rps_panel(ax: Axes, run: dict[str, Any], title: str) -> None:
    for target in PROXIES:
        per = run["targets"].get(target)
        if not per:
            continue
        conns = sorted(per, key=int)
        med = [per[c]["rps"] for c in conns]
        low = [per[c]["rps"] - per[c]["rps_min"] for c in conns]
        high = [per[c]["rps_max"] - per[c]["rps"] for c in conns]
        style = "-" if target.startswith("kf-") else "--"
        ax.errorbar([int(c) for c in conns], med, yerr=[low, high], fmt=style + "o", label=target)
    ticks(ax, sorted({int(c) for t in run["targets"].values() for c in t}))
    ax.set_xlabel("connections")
    ax.set_ylabel("req/s (median of rounds, min-max bars)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def cdf_panel(
    ax: Axes, curves: dict[str, list[float]], percentiles: list[float], title: str
) -> None:
    for label, cdf in curves.items():
        if cdf:
            ax.plot(cdf, [p / 100 for p in percentiles], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_router(results: Results, out: Path) -> None:
    runs = [
        (results[k], t)
        for k, t in (
            ("router_overhead", "free scheduling"),
            ("router_overhead_pinned", "proxy pinned to core 0 (taskset)"),
        )
        if k in results
    ]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, (run, title) in zip(axes[0], runs, strict=True):
        rps_panel(ax, run, f"router vs proxies, token on: {title}")
    fig.tight_layout()
    fig.savefig(out / "router_rps.png", dpi=110)
    plt.close(fig)


def plot_latency(results: Results, out: Path) -> None:
    panels: list[tuple[dict[str, list[float]], list[float], str]] = []
    if "router_overhead" in results:
        run = results["router_overhead"]
        conns = str(max(run["connections"]))
        curves = {t: run["targets"][t][conns]["cdf_ms"] for t in PROXIES if t in run["targets"]}
        panels.append((curves, run["cdf_percentiles"], f"proxies at {conns} connections"))
    if "service_calls" in results:
        run = results["service_calls"]
        curves = {t: per["32"]["cdf_ms"] for t, per in run["targets"].items()}
        panels.append((curves, run["cdf_percentiles"], "Python API, 32 callers"))
    if "scale" in results:
        b = results["scale"]["broadcast"]
        curves = {
            "one call, one replica": b["one_cdf_ms"],
            f"call_all, {b['replicas']} replicas": b["call_all_cdf_ms"],
        }
        percentiles = (results.get("router_overhead") or results.get("service_calls") or {}).get(
            "cdf_percentiles"
        )
        if percentiles:
            panels.append((curves, percentiles, "broadcast through the router"))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (curves, percentiles, title) in zip(axes[0], panels, strict=True):
        cdf_panel(ax, curves, percentiles, title)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)


def plot_scale(results: Results, out: Path) -> None:
    if "scale" not in results:
        return
    rows = results["scale"]["replicas"]
    counts = sorted(rows, key=int)
    x = [int(n) for n in counts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(
        axes,
        ("rps", "p50_ms", "router_cpu_us"),
        ("req/s", "p50 (ms)", "router CPU per call (µs)"),
        strict=True,
    ):
        ax.plot(x, [rows[n][key] for n in counts], "o-")
        ticks(ax, x)
        ax.set_xlabel("replicas (no-op actor, 16 connections)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title("1 router + N replicas + wrk sharing 2 cores")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


PAYLOAD_PATHS = ("raw-socket", "service", "router", "ray-actor", "ray-serve")


def plot_payloads(results: Results, out: Path) -> None:
    if "payloads" not in results:
        return
    run = results["payloads"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in PAYLOAD_PATHS:
        per = run["targets"].get(name)
        if not per:
            continue
        sizes = sorted(per, key=int)
        x = [int(n) for n in sizes]
        med = [per[n]["mbps"] for n in sizes]
        err = [
            [per[n]["mbps"] - per[n]["min"] for n in sizes],
            [per[n]["max"] - per[n]["mbps"] for n in sizes],
        ]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (float32 array), bytes each way")
    ax.set_ylabel("round trip, MB/s of payload each way")
    ax.set_title("Payload round trips on 2 cores (median, min-max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "payloads.png", dpi=110)
    plt.close(fig)


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _one_core(row: dict[str, Any]) -> str:
    """A broadcast row's ratio with every process on one core (runs that measured it)."""
    one = row.get("one_core")
    return f"; on one core: {one['ratio']:.2f}x" if one else ""


def _size(n: str | int) -> str:
    n = int(n)
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def summary(results: Results) -> str:
    """The headline table: each target of issue 15 beside what this run measured."""
    rows: list[tuple[str, str, str]] = []

    def add(figure: str, target: str, value: Callable[[], str]) -> None:
        try:
            rows.append((figure, target, value()))
        except (KeyError, TypeError, ValueError):
            rows.append((figure, target, "not measured"))

    for key, how in (("router_overhead", ""), ("router_overhead_pinned", ", proxy pinned")):
        if key not in results:
            continue
        run = results[key]
        for c in map(str, run["connections"]):
            r = run["ratios"][c]

            def spread(t: str, c: str = c, run: dict[str, Any] = run) -> str:
                p = run["targets"][t][c]
                return f"{p['rps']:.0f} req/s [{p['rps_min']:.0f}-{p['rps_max']:.0f}]"

            add(
                f"router / nginx, {c} conns{how}",
                "≥ 1.0x",
                lambda r=r, c=c: (
                    f"{_ratio(r['router_over_nginx_rps'])} "
                    f"({spread('kf-router', c)} vs {spread('nginx', c)})"
                ),
            )
            add(
                f"router / HAProxy, {c} conns{how}",
                "≥ 1.0x",
                lambda r=r: _ratio(r["router_over_haproxy_rps"]),
            )
            add(
                f"sessions: router / nginx hash, {c} conns{how}",
                "≥ 0.9x",
                lambda r=r: _ratio(r["router_in_sessions_over_nginx_hash_rps"]),
            )

            def tail(c: str = c, run: dict[str, Any] = run) -> str:
                kf, nginx = (run["targets"][t][c]["p99_ms"] for t in ("kf-router", "nginx"))
                return f"{_ratio(kf / nginx)} ({kf:.2f} vs {nginx:.2f} ms)"

            add(f"p99: router / nginx, {c} conns{how}", "≤ 1.2x", tail)
    if "scale" in results:
        s = results["scale"]
        rows_r = s["replicas"]
        last = max(rows_r, key=int)
        add(
            f"router CPU per call, 1 → {last} replicas",
            "flat",
            lambda: (
                f"{rows_r['1']['router_cpu_us']:.1f} → {rows_r[last]['router_cpu_us']:.1f} "
                f"µs ({rows_r[last]['cpu_vs_first']:.2f}x); net of health polling at rest "
                f"{rows_r['1']['router_cpu_net_us']:.1f} → {rows_r[last]['router_cpu_net_us']:.1f}"
                f" µs ({rows_r[last]['net_vs_first']:.2f}x)"
            ),
        )
        b = s["broadcast"]
        add(
            f"call_all to {b['replicas']} replicas / one call",
            "≤ 2.5x",
            lambda: (
                f"{b['ratio']:.2f}x ({b['call_all_p50_ms']:.2f} vs {b['one_p50_ms']:.2f} ms; "
                f"the CPU it needs, on every core: {b['cpu_bound_ratio']:.2f}x{_one_core(b)})"
            ),
        )
        if "floor" in b:  # the same through replicas that run no code: the machine's share
            f = b["floor"]
            add(
                f"call_all to {b['replicas']} floor replicas / one call",
                "—",
                lambda: (
                    f"{f['ratio']:.2f}x ({f['call_all_p50_ms']:.2f} vs {f['one_p50_ms']:.2f} "
                    f"ms; CPU per call_all: router {f['cpu']['all']['router_cpu_us']:.0f} µs, "
                    f"each replica {f['cpu']['all']['replicas_cpu_us'] / b['replicas']:.0f} µs "
                    f"against {b['cpu']['all']['replicas_cpu_us'] / b['replicas']:.0f} µs; "
                    f"the CPU it needs, on every core: {f['cpu_bound_ratio']:.2f}x{_one_core(f)})"
                ),
            )
        ss = s["sessions"]
        add(
            f"routing p50 with {ss['sessions']} sessions / none",
            "≤ 1.10x",
            lambda: (
                f"{ss['p50_ratio']:.2f}x (router RSS +"
                f"{ss['router_rss_mib'][1] - ss['router_rss_mib'][0]:.1f} MiB, "
                f"{ss['create_per_s']:.0f} sessions/s)"
            ),
        )
        for rate, d in s["detection"].items():
            add(
                f"failure detection, healthPollRate {rate} s",
                f"≤ {d['target']:.1f} s",
                lambda d=d: f"idle {d['idle']:.2f} s, under load {d['loaded']:.2f} s",
            )
    if "service_calls" in results:
        sc = results["service_calls"]
        for callers, r in sc["ratios"].items():
            add(
                f"local Service / Ray Serve, {callers} caller(s)",
                "≥ 5x",
                lambda r=r: _ratio(r.get("service_over_ray")),
            )
    if "payloads" in results:
        pl = results["payloads"]
        ratios = pl["ratios"]
        for n, v in ratios.get("service_over_ray_actor", {}).items():
            if int(n) >= 1_000_000:
                add(f"local Service / Ray actor, {_size(n)}", "≥ 1.0x", lambda v=v: _ratio(v))
        for n, v in ratios.get("router_over_raw_socket", {}).items():
            if int(n) >= 16_000_000:
                add(f"router / raw socket, {_size(n)}", "≥ 0.5x", lambda v=v: _ratio(v))
        b = pl["broadcast"]
        add(
            f"broadcast {_size(b['bytes'])} to {b['replicas']} / parallel raw sends",
            "≥ 0.7x",
            lambda: _ratio(b["ratio"]),
        )
        m = pl["memory"]
        add(
            f"router RSS growth, {_size(m['router_call_bytes'])} call",
            "≤ 64 MiB",
            lambda: f"{m['router_rss_growth_mib']:.1f} MiB",
        )
        add(
            "replica memory per payload byte",
            "≤ 1.2",
            lambda: f"{m['replica_bytes_per_payload_byte']:.2f}",
        )
    if "streams" in results:
        st = results["streams"]
        kf = st["streaming"]["kf-router"]
        add(
            "stream: first item through the router - a call",
            "≤ 1 ms",
            lambda: (
                f"{st['ratios']['kf_first_item_minus_call_ms']:+.2f} ms "
                f"({kf['first_item_ms']:.2f} vs {kf['plain_call_ms']:.2f} ms)"
            ),
        )
        for peer, key in (
            ("nginx", "kf_items_per_s_over_nginx"),
            ("Ray Serve", "kf_items_per_s_over_ray"),
        ):
            if st["ratios"].get(key) is not None:
                add(
                    f"stream of 1000 items: router / {peer}, items/s",
                    "—",
                    lambda key=key: _ratio(st["ratios"][key]),
                )
        add(
            "batched / unbatched, 64 callers (2 ms + 0.05 ms/item)",
            "> 1.0x",
            lambda: _ratio(st["ratios"]["kf_batched_over_unbatched"]),
        )
        if st["ratios"].get("kf_batched_over_ray_batched") is not None:
            add(
                "batched: kubeforge / Ray Serve @serve.batch, calls/s",
                "≥ 1.0x",
                lambda: _ratio(st["ratios"]["kf_batched_over_ray_batched"]),
            )
    lines = ["| figure | target | measured (median of rounds) |", "|---|---|---|"]
    lines += [f"| {f} | {t} | {v} |" for f, t, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ns = p.parse_args(argv)
    results = load(ns.results)
    if not results:
        print(f"no results under {ns.results}: run `make bench` first", file=sys.stderr)
        return 1
    plot_router(results, ns.results)
    plot_latency(results, ns.results)
    plot_scale(results, ns.results)
    plot_payloads(results, ns.results)
    table = summary(results)
    (ns.results / "summary.md").write_text(table)
    print(table)
    print(f"plots and summary.md written to {ns.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
