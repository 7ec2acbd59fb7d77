"""The benchmark's report, rendered as Markdown from the rows a run measured (one per target, route,
connection count and round): the results table, the targets' verdicts, the upstream client comparison,
the memory run and the details; and PROFILE.md from py-spy's folded stacks."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from processes import CLIENTS, Lab
from sampling import Row, Sampler
from source import describe_source

BASELINE = "bare-aiohttp"


def fmt(v: float | None, spec: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def summarize(raw: list[Row]) -> list[Row]:
    """One row per target, route and connection count: the round with the median req/s. Its ratio to
    the baseline (and its added p50 over direct) is the median of the per-round figures, each taken
    against the baseline's run of the same round."""
    groups: dict[tuple[str, str, int], list[Row]] = collections.defaultdict(list)
    for r in raw:
        groups[(r.target, r.route, r.conns)].append(r)
    by_round = {(r.target, r.route, r.conns, r.round): r for r in raw}
    out = []
    for (target, route, conns), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.rps)
        row = dataclasses.replace(
            runs[(len(runs) - 1) // 2], rps_per_round=tuple(r.rps for r in sorted(runs, key=lambda r: r.round))
        )
        ratios, added = [], []
        for r in runs:
            base = by_round.get((BASELINE, route, conns, r.round))
            if base and base.rps:
                ratios.append(r.rps / base.rps)
            direct = by_round.get(("direct", route, 1, r.round))
            if conns == 1 and direct and target != "direct":
                added.append(r.p50_ms - direct.p50_ms)
        row.ratio = statistics.median(ratios) if ratios else None
        row.added_p50_ms = statistics.median(added) if added else None
        out.append(row)
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets_section(rows: list[Row], memory: dict[str, Any], gw: str, title: str) -> list[str]:
    by = {(r.target, r.route, r.conns): r for r in rows}
    if not any(r.target == gw for r in rows):
        return []
    lines = [title, "", "| target | measured | verdict |", "|---|---|---|"]
    for route, need in (("create", 0.6), ("poll", 0.8)):
        for conns in (1, 32):
            r, b = by.get((gw, route, conns)), by.get((BASELINE, route, conns))
            if r and b:
                lines.append(
                    f"| {route}s ≥ {need}× {BASELINE} req/s, {conns} conn | {r.rps:.0f} vs {b.rps:.0f} "
                    f"req/s: **{r.ratio:.2f}×** | {verdict(r.ratio >= need)} |"
                )
    for route in ("create", "poll"):
        r, d = by.get((gw, route, 1)), by.get(("direct", route, 1))
        if r and d:
            lines.append(
                f"| {route}s, 1 conn: added p50 over direct ≤ 0.5 ms | {r.p50_ms:.3f} vs {d.p50_ms:.3f} ms: "
                f"**{r.added_p50_ms:.3f} ms** | {verdict(r.added_p50_ms <= 0.5)} |"
            )
    for route in ("create", "poll"):
        r, b = by.get((gw, route, 32)), by.get((BASELINE, route, 32))
        if r:
            x = r.p99_ms / r.p50_ms if r.p50_ms else float("inf")
            raw = r.raw_p99_ms / r.raw_p50_ms if r.raw_p50_ms else float("inf")
            bare = f"; {BASELINE}: {b.p99_ms / b.p50_ms:.1f}×" if b and b.p50_ms else ""
            lines.append(
                f"| {route}s, 32 conns: p99 ≤ 3× p50 | {r.p99_ms:.2f} / {r.p50_ms:.2f} ms = **{x:.1f}×** "
                f"(uncorrected {r.raw_p99_ms:.2f} / {r.raw_p50_ms:.2f} = {raw:.1f}×{bare}) "
                f"| {verdict(x <= 3)} |"
            )
    if memory:
        lines.append(
            f"| RSS after {memory['tasks']:,} tasks < 150 MB | **{memory['end_mb']:.1f} MB** "
            f"(peak {memory['peak_mb']:.1f} MB) | "
            f"{verdict(memory['end_mb'] < 150 and memory['tasks'] >= memory['target'])} |"
        )
    return lines


def redis_section(raw: list[Row]) -> list[str]:
    """The Redis rows against gateway-sqlite, each the median of its per-round ratios (the targets, at 32
    connections: creates ≥ 0.6×, polls ≥ 0.8×)."""
    by_round = {(r.target, r.route, r.conns, r.round): r for r in raw}
    lines = []
    for target in ("gateway-redis", "gateway-redis-sentinel"):
        for route, need in (("create", 0.6), ("poll", 0.8)):
            for conns in (1, 32):
                ratios = [
                    r.rps / s.rps
                    for r in raw
                    if (r.target, r.route, r.conns) == (target, route, conns)
                    and (s := by_round.get(("gateway-sqlite", route, conns, r.round)))
                    and s.rps
                ]
                if ratios:
                    x = statistics.median(ratios)
                    judged = f"{verdict(x >= need)} (≥ {need}×)" if conns == 32 else "–"
                    lines.append(f"| {target} | {route} | {conns} | **{x:.2f}×** | {judged} |")
    if not lines:
        return []
    return [
        "## Redis against SQLite",
        "",
        "| target | route | conns | req/s vs gateway-sqlite | target |",
        "|---|---|---|---|---|",
        *lines,
        "",
    ]


def sdk_section(rows: list[Row], gw: str = "gateway-sqlite") -> list[str]:
    """The openai SDK's multipart create (POST /videos) against the TokenHub-shaped JSON create, same gateway."""
    by = {(r.target, r.route, r.conns): r for r in rows}
    pairs = [(c, by.get((gw, "create", c)), by.get((gw, "create-sdk", c))) for c in (1, 32)]
    if not any(sdk for _, _, sdk in pairs):
        return []
    lines = [
        f"## The openai SDK's create ({gw})",
        "",
        "`client.videos.create(...)` as the SDK sends it (multipart, every field a string, mapped to the same "
        "Seedance body) next to the TokenHub-shaped JSON create.",
        "",
        "| conns | JSON create req/s | SDK create req/s | SDK / JSON | JSON p50 ms | SDK p50 ms "
        "| JSON CPU µs/req | SDK CPU µs/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conns, json_row, sdk in pairs:
        if json_row and sdk:
            lines.append(
                f"| {conns} | {json_row.rps:.0f} | {sdk.rps:.0f} | **{sdk.rps / json_row.rps:.2f}×** | "
                f"{json_row.p50_ms:.3f} | {sdk.p50_ms:.3f} | {fmt(json_row.cpu_us, '.0f')} | "
                f"{fmt(sdk.cpu_us, '.0f')} |"
            )
    return lines


def client_section(rows: list[Row], unavailable: dict[str, str]) -> list[str]:
    lines = [
        "## Upstream client, chosen by measurement",
        "",
        "Each client as the bare pass-through, and inside the gateway (creates and polls, 32 connections).",
        "",
        "| client | bare create req/s | bare poll req/s | bare create CPU µs/req | gateway create req/s "
        "| gateway poll req/s | gateway create CPU µs/req |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r.target, r.route, r.conns): r for r in rows}
    best = None
    for client in CLIENTS:
        bare = f"bare-{client}"
        gw = "gateway-sqlite" if client == "aiohttp" else f"gateway-sqlite-{client}"
        bc, bp, gc, gp = (
            by.get((bare, "create", 32)),
            by.get((bare, "poll", 32)),
            by.get((gw, "create", 32)),
            by.get((gw, "poll", 32)),
        )
        if bc is None and gc is None:
            lines.append(f"| {client} | n/a: {unavailable.get(bare, 'not run')} | | | | | |")
            continue
        lines.append(
            f"| {client} | {fmt(bc and bc.rps, '.0f')} | {fmt(bp and bp.rps, '.0f')} | "
            f"{fmt(bc and bc.cpu_us, '.0f')} | {fmt(gc and gc.rps, '.0f')} | {fmt(gp and gp.rps, '.0f')} | "
            f"{fmt(gc and gc.cpu_us, '.0f')} |"
        )
        if bc and (best is None or bc.rps > best[1]):
            best = (client, bc.rps)
    if best:
        lines += ["", f"Fastest bare pass-through on creates: **{best[0]}**."]
    return lines


def memory_section(memory: dict[str, Any]) -> list[str]:
    if not memory:
        return []
    lines = [
        "## Memory",
        "",
        f"{memory['tasks']:,} tasks created through a fresh gateway-sqlite (32 connections, "
        f"{memory['seconds']:.0f} s, {memory['errors']} errors): RSS {memory['start_mb']:.1f} MB at start, "
        f"**{memory['end_mb']:.1f} MB** after, peak (VmHWM) {memory['peak_mb']:.1f} MB.",
        "",
        "| tasks created | RSS MB |",
        "|---|---|",
    ]
    samples = memory["samples"]
    step = max(1, memory["target"] // 10)
    marks, shown = list(range(0, memory["target"] + 1, step)), set()
    for mark in marks:
        s = min(samples, key=lambda x: abs(x[0] - mark))
        if s[0] not in shown:
            shown.add(s[0])
            lines.append(f"| {s[0]:,} | {s[1]:.1f} |")
    return lines


def machine_lines(args: argparse.Namespace, lab: Lab, source_at_start: str) -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    versions = []
    for pkg in (
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "aiohttp",
        "httpx",
        "httpx-aiohttp",
        "structlog",
        "prometheus-client",
        "orjson",
    ):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            versions.append(f"{pkg} –")
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- gateway code: {source_at_start}",
    ]
    if len(set(lab.fingerprints.values())) > 1 or source_at_start != describe_source(lab.src):
        lines.append(
            f"- **warning: the gateway's code changed during this run** (now {describe_source(lab.src)}; "
            f"per target: {', '.join(f'{k} {v}' for k, v in lab.fingerprints.items())}): rows mix versions"
        )
    return [
        *lines,
        f"- machine: nproc {os.cpu_count()}, {cpu}, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}; {'; '.join(versions)}",
        f"- load: {wrk_v[0] if wrk_v else 'wrk'}; {args.duration:g} s per run after a {args.warmup:g} s "
        f"warm-up; 1 connection = wrk -t1 -c1, 32 connections = wrk -t2 -c32",
        f"- rounds: {args.rounds}; every target stays up and is measured once per round, in turn; a row is the "
        f"round with the median req/s, its ratio the median of the per-round ratios to {BASELINE}",
        f"- pinning: proxy under test on core {lab.proxy_core}; wrk, the fake upstream (and Redis) on core "
        f"{lab.load_core}",
    ]


def report(args: argparse.Namespace, lab: Lab, sampler: Sampler, source_at_start: str) -> str:
    rows = summarize(sampler.rows)
    order = {name: i for i, name in enumerate(dict.fromkeys(r.target for r in rows))}
    rows = sorted(rows, key=lambda r: (r.route, r.conns, order[r.target]))
    lines = [
        "# tokenhub-gateway benchmark",
        "",
        "Written by `python bench/run.py"
        + (" --quick" if args.quick else "")
        + "`; see bench/README.md for what each row is.",
        "",
        *machine_lines(args, lab, source_at_start),
        "",
    ]
    lines += [
        "## Results",
        "",
        "| target | route | conns | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MB | vs bare-aiohttp "
        "| added p50 vs direct ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.route} | {r.conns} | {r.rps:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | "
            f"{fmt(r.cpu_us, '.0f')} | {r.rss_mb:.1f} | {fmt(r.ratio, '.2f')}× | "
            f"{fmt(r.added_p50_ms, '.3f')} | {r.errors} |"
        )
    for name, why in lab.unavailable.items():
        lines.append(f"| {name} | – | – | n/a: {why} | | | | | | | |")
    lines += [
        "",
        *targets_section(rows, sampler.memory, "gateway-sqlite", "## Targets (gateway-sqlite, every feature on)"),
        "",
        *targets_section(rows, {}, "gateway-sqlite-norpm", "### For reference: the same without `requests_per_minute`"),
        "",
        *redis_section(sampler.rows),
        *sdk_section(rows),
        "",
        *client_section(rows, lab.unavailable),
        "",
        *memory_section(sampler.memory),
        "",
    ]
    lines += [
        "## Details",
        "",
        "p50/p99 are wrk's, which corrects for coordinated omission (a request slower than twice the mean "
        "interval per connection adds synthetic samples); the uncorrected ones are rebuilt exactly from "
        "wrk's histogram. Upstream calls per request counts what reached the fake upstream (polls through "
        "the gateway are coalesced to one upstream call per task per second). Core busy % is from "
        "/proc/stat over the measured window: if the load core is not saturated, neither wrk nor the fake "
        "upstream limited the proxy.",
        "",
        "| target | route | conns | req/s per round | requests | uncorrected p50 ms | uncorrected p99 ms "
        "| upstream calls/req "
        "| CPU µs/req: loop thread | CPU µs/req: other threads | context switches/req "
        "| proxy core busy % | load core busy % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_round = ", ".join(f"{x:.0f}" for x in r.rps_per_round)
        lines.append(
            f"| {r.target} | {r.route} | {r.conns} | {per_round} | {r.requests} | {r.raw_p50_ms:.3f} | "
            f"{r.raw_p99_ms:.3f} | {fmt(r.upstream_per_req, '.3f')} | {fmt(r.loop_cpu_us, '.0f')} | "
            f"{fmt(r.other_cpu_us, '.0f')} | {fmt(r.switches_per_req, '.1f')} | "
            f"{fmt(r.proxy_core_pct, '.0f')} | {fmt(r.load_core_pct, '.0f')} |"
        )
    if sampler.profiles:
        lines += [
            "",
            "## Profile",
            "",
            "`--profile` ran py-spy on gateway-sqlite under 32 connections; see PROFILE.md beside this file.",
        ]
    return "\n".join(lines) + "\n"


def profile_summary(path: Path, top: int = 25) -> list[str]:
    """Self and total share per frame, from py-spy's folded stacks ("f1;f2;f3 count")."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += n
        threads[thread_of(frames)] += n
        self_n[frames[-1]] += n
        for f in set(frames):
            total_n[f] += n
    share = ", ".join(f"{name} {100 * k / samples:.0f} %" for name, k in threads.most_common())
    lines = [
        f"{samples} samples (not idle): {share}.",
        "",
        "| by self time | self % | | by total time | total % |",
        "|---|---|---|---|---|",
    ]
    by_self, by_total = self_n.most_common(top), total_n.most_common(top)
    for i in range(top):
        s = by_self[i] if i < len(by_self) else ("", 0)
        t = by_total[i] if i < len(by_total) else ("", 0)
        lines.append(f"| `{s[0]}` | {100 * s[1] / samples:.1f} | | `{t[0]}` | {100 * t[1] / samples:.1f} |")
    return lines


def thread_of(frames: list[str]) -> str:
    if any(f.startswith("_Writer._run ") for f in frames):
        return "SQLite writer thread"
    return "event loop and other threads"


def short_frame(frame: str) -> str:
    """'handle (/x/site-packages/starlette/routing.py:123)' → 'handle (starlette/routing.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where)
    where = re.sub(r"^/.*/(?=gateway/)", "", where)  # this checkout, or the one --src named
    return f"{name} ({where})" if where else name


def write_profile(profiles: dict[str, Path], source_at_start: str, out: Path) -> None:
    if not profiles:
        return
    lines = [
        "# Profile of gateway-sqlite under load",
        "",
        "py-spy (250 Hz, every thread, idle time excluded) while wrk ran 32 connections; written by "
        "`python bench/run.py --profile`. Frames are aggregated by function, lines dropped.",
        "",
        f"Gateway code: {source_at_start}.",
        "",
    ]
    raw = out.parent / "results" / "raw"  # git-ignored
    raw.mkdir(parents=True, exist_ok=True)
    for label, path in profiles.items():
        kept = raw / path.name
        shutil.copyfile(path, kept)
        lines += [
            f"## {label}s",
            "",
            f"Folded stacks: `{kept.relative_to(out.parent)}` (speedscope opens them).",
            "",
            *profile_summary(path),
            "",
        ]
    (out.parent / "PROFILE.md").write_text("\n".join(lines))
