"""`make bench`: every benchmark in one run on one local stack; figures to stdout and BENCHMARKS.md.

    python -m bench.run [--contacts 20000] [--window 10] [--baseline-seconds 40] [--live 300]
                        [--intake 3000] [--burst 5000] [--instances N | http=N,queue=N,<function>=N] [--no-write]

(a) backfill of N contacts against the Dataverse simulator's scaled service-protection limits, with a
    naive and a $batch-of-10 baseline in the same run, and the same backfill with one instance of each
    queue function vs the layout's (three by default); (b) webhook intake; (c) live latency
    webhook -> Dataverse; (d) a burst of webhooks on the backfilled account, and meanwhile another
    account's lone contact (bench/burst.py). A benchmark against a simulator measures this code, not
    Dynamics: compare the figures with each other, not with production.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.backfill import Ceiling, LimitSettings, Run, ceiling, run_batch10, run_naive, run_pipeline
from bench.burst import BurstResult, connect_other, run_burst
from bench.intake import IntakeResult, run_intake
from devstack.demo import Burst, instances_arg, percentile, watch_latencies, wave_change
from devstack.devhost import THREAD_COUNT_SETTING
from devstack.stack import ROOT, Instances, Stack, StackOptions
from devstack.wave_sim import WebhookSender

ACCOUNT = "acct_bench"
# Findings from profiling the dev host during backfills (py-spy record -p <dev host pid>) and from timing
# Table queries against Azurite alone, for the reader of BENCHMARKS.md.
ANALYSIS = [
    "How the backfill got here (profiles: `py-spy record -p <dev host pid>` during a backfill, each process's CPU "
    "time from /proc, and the Dataverse simulator's request log):",
    "",
    "- First measurement: pages one after another, each enqueuing the next cursor when done, 147 contacts/s "
    "on 5,000 (0 x 429: Dataverse was never the limit). host.json `maxPollingInterval` 2 s -> 0.5 s removed most "
    "of the idle time between pages (214/s). Then ~94% of a page was `_write_page`, most of it Table Storage: "
    "36 queries of 14 OR-ed RowKeys per page to look up states (Table Storage and Azurite scan the partition "
    "for those) and 5 state transactions one after another.",
    "- Next: the next cursor queued right after the Wave read (up to 8 pages in flight), states read with one "
    "RowKey range query, state transactions built as plain multipart text and sent concurrently: 290/s on "
    "20,000 (73% of the sustained ceiling, 15.4x naive). The request log then showed bursts of 8 pages, a 429, "
    "and the throttled pages going back to the queue; a page that saw the penalty was sent back before reading "
    "Wave, so the chain of cursors stopped, and after each penalty the pages were read, looked up and prepared "
    "again before writing; the last pages took 4-9 s each.",
    "- Then: (1) a prepared page waits out a penalty of up to 15 s in-process and 16 pages may be in flight, so "
    "the next burst is ready when the window moves on (330-350/s); (2) every request sent during a penalty extends "
    "it, and 3-5 pages let go at the same instant cost 2-4 s per window: the Dataverse client now sends nothing "
    "while a Retry-After it has seen runs, and waiting pages go 0.2 s apart; (3) Azurite scans a partition on "
    "every insert: with one partition per account, a page's 500 state rows took 130 ms in a fresh partition "
    "and 1,106 ms at 20,000 rows, so the last burst's states came ~10 s after its Dataverse writes. An "
    "account's states now lie in 8 partitions (110 -> 201 ms per page over the same 20,000 rows; Azurite's "
    "CPU time over a run, with the benchmark client's: ~33 s -> ~10 s); (4) the benchmark had scaled the "
    "window 30x but not the simulator's 1 s penalty extension; it is now scaled alike.",
    "- Several instances (as Flex Consumption runs each queue function): a penalty one instance met was unknown "
    "to the others, which kept sending into it. The penalty and the requests in flight are now one budget per "
    "Dataverse user in a Table row every instance reads (dataverse/budget.py); after a penalty the waiting pages "
    "go 0.2 s apart (at first each instance's, the instances offset by rank; now one schedule over all "
    "instances, below), each reading the row before sending. A page "
    "waits at most 3 s in-process (it was 15 s: a waiting page holds a thread of the worker's one pool); "
    "otherwise it goes back to its queue and returns 3 s before the penalty ends, to be read and prepared "
    "meanwhile. In the runs made while designing this, three instances reached 93-98% of the ceiling against "
    "99-100% for one, with the steady rate 75-80% against 81-82%: on this 2-core machine the extra instances' "
    "polling and the pages re-read after going back cost more than the budget's coordination, which a 10 s "
    "window makes 30 times more visible than the real 300 s one.",
    "- Three instances, measured from the Dataverse simulator's request log (each 429 with its Retry-After and "
    "whether it came during a penalty, kept as `dataverse-requests-<account>.json` beside the instances' logs) "
    "and, for the diagnosis, the time of each page's steps, budget row read and penalty write in the instances' "
    "logs: (1) the pages that took 10-20 s while logging 2-3 s of waiting spent the rest claiming their rows "
    "(sync/holds.py) between the Dataverse lookup and the write, 0.1-5 s of Table writes under load, so after a "
    "penalty a window's writes went out over 5-6 s instead of about 1; the claims are now made before the first "
    "Dataverse request. (2) A page that went back to its queue after claiming claimed again on its return, and "
    "rows that exist already are claimed row by row (a create and a read each): 2-7 s, so pages returning 3 s "
    "before the penalty's end were ready seconds after it. A page now goes back before it claims, one that went "
    "back after claiming carries a digest of its claims and skips claiming the same rows, and pages return 5 s "
    "before the end and wait up to 5 s in-process. (3) 429s and requests during a penalty: pages read the "
    "budget row through its 1 s cache, two pages of one instance went out side by side when the window's budget "
    "ran out (the second into the first's 429), and a penalty one instance met reached the row 5-370 ms later. "
    "Prepared work now reads the row before each call (2-4 reads a page; per-contact requests keep the cache) "
    "and its requests go one at a time in each instance. (4) The contact worker and the drain kept a second, "
    "in-process record of penalties per account beside the budget; the budget is now the one record. Steady "
    "rate with three instances: 76-82% of the ceiling before, 89-91% after (one instance 80-82% before, "
    "90-93% after); requests sent during a penalty 7-15 before, 0-2 after.",
    "- Three instances met more 429s than one (0.35-0.60 against 0.20-0.35 per 1,000 contacts). The first "
    "window's writes go out as pages are prepared, over 1.5 s; the next window's budget comes back as those "
    "leave it, piece by piece, and the three instances' waiters, a third of a stagger apart, went three times "
    "as fast as one instance's: most windows met a 429 with Retry-After 1 and a second one a second later, "
    "where one instance's pace meets one. Tried and dropped: a stagger of 0.1 s instead of 0.2 s (three "
    "instances 88%, 13 429s, 5 during a penalty) and the instances taking turns, every third waiter each "
    "(77%, 9 429s: a burst's pages were spread over 2 s and the last page waited a whole window). What "
    "worked: one schedule of turns per Dataverse user over all instances, the next free turn kept in the "
    "user's budget row (`next_turn`) and taken with an ETag-conditional write by a caller that must wait, "
    "so three instances' waiters go 0.2 s apart as one instance's do (one or two Table requests per waiting "
    "page, after a penalty only). Three runs: three instances 91% steady, 4 429s (0.20 per 1,000) and 0 sent "
    "during a penalty in each; one instance 89-91%, 4-5 429s (0.20-0.25), 0 (before: three instances 89%, 12 "
    "429s, 2 during a penalty).",
    "- Still, in some runs three instances met one or two 429s more than one instance (`make bench`: 5 against "
    "4), and in others one instance more than three. The simulator's request log showed two causes. (1) Pages "
    "of two instances went out side by side when the window's budget ran out (0.03 s apart; each instance sent "
    "one at a time, but not the instances together), and a lookup was sent 0.22 s after another instance's "
    "429, before its penalty reached the row. Now every request of prepared work takes the user's lease in the "
    "budget row and gives it back after the answer, in one write that notes its 429: the next one, of any "
    "instance, reads it before sending (three Table requests per bulk request). With that alone: 4 against 4, "
    "6 against 5, 8 against 7 429s, none sent during a penalty. (2) Split windows, in both layouts: when a "
    "window's pages went out with a gap (pages late, one lagging behind the others and holding back the pages "
    "16 ahead of it), the next window's budget came back in two parts, its pages met a 429 with Retry-After 1 "
    "between them, and every later window repeated the split: the service gives the budget back as requests "
    "age out, at the pace they were sent. Now the lease's give-back also logs each answered bulk request (its "
    "time and rows) for the last window, a 429 of the execution-time limit makes the rows the window then "
    "holds the user's cap (a request-count 429 measures nothing of them), and a "
    "prepared request that finds the cap in the window waits until enough has aged out (dataverse/lease.py "
    "`paced_until`; the window is the service's 300 s, the simulator's scaled one in the bench). Quick runs, in "
    "order (`python -m bench.run --intake 0 --live 0 --burst 0 --baseline-seconds 10 --no-write`; steady "
    "rate three instances / one, 429s three / one): with the lease alone 88% / 90%, 4 / 4 and 87% / 89%, "
    "6 / 5. With the log: 95% / 65%, 1 / 1 (requests that had gone without the lease were not logged, so "
    "the cap was learned low: they are logged now); 81% / 93%, 1 / 1 (one page spent 20 s of a 25 s run "
    "outside its waits while the pages 16 ahead of it waited); 92% / 93%, 2 / 1 (two first-window requests "
    "went without the lease after waiting 0.5 s behind others: a request now waits while others hold it one "
    "after another, up to 5 s); 92% / 93%, 1 / 1. None sent during a penalty in any of them.",
    "- What is left: the first window is not paced (nothing is learned before its 429), and its penalty's "
    "Retry-After is whole seconds (up to a second of a 10 s window, 0.3% of the real 300 s one). Then the "
    "sign-in before the first write and the last page's states after it.",
]


def live_latency(stack: Stack, events: int, rate: float) -> tuple[float | None, list[float]]:
    """(c) One event alone right after a dev host (re)start (cold: tokens, clients, caches), then `events`
    updates/creates of the bench account's contacts posted at `rate` per second. Latencies in seconds."""
    from devstack.demo import event_key, wave_state

    rng = random.Random(5)
    live, _ = wave_state(stack, ACCOUNT)
    ids = sorted(live)
    rng.shuffle(ids)
    sender = WebhookSender(f"{stack.devhost_url}/api/webhooks/wave", [stack.options.webhook_secret])

    def post(burst: Burst, event: dict) -> None:
        burst.sent_at[event_key(event)] = time.time()
        burst.statuses[sender.deliver(event).status_code] += 1

    cold = Burst([wave_change(stack, ACCOUNT, {"id": ids.pop(), "job_title": "Cold start"})])
    post(cold, cold.events[0])
    cold_latency = next(iter(watch_latencies(stack, ACCOUNT, cold, timeout=120).values()), None)

    changes = []
    for i in range(events):
        if i % 3 == 0:
            changes.append(wave_change(stack, ACCOUNT, {"first_name": "Latency", "last_name": f"New {i}",
                                                        "email": f"latency.{i}@example.com"}))
        else:
            changes.append(wave_change(stack, ACCOUNT, {"id": ids.pop(), "job_title": f"Latency {i}"}))
    burst = Burst(changes)
    start = time.monotonic()
    for i, event in enumerate(changes):
        pause = start + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        post(burst, event)
    latencies = watch_latencies(stack, ACCOUNT, burst, timeout=120)
    if len(latencies) < len(changes):
        print(f"  warning: {len(changes) - len(latencies)} live events were not seen in Dataverse", file=sys.stderr)
    return cold_latency, list(latencies.values())


def longest_log_silence(logs: list[Path], since: datetime) -> tuple[float, str]:
    """The longest gap between consecutive log lines of the app's instances (merged) after `since` (seconds,
    and when it began): with webhooks arriving ten times a second, a long one means the app, or the storage
    it waits on, stood still."""
    stamps = []
    for line in itertools.chain.from_iterable(log.read_text(errors="replace").splitlines() for log in logs):
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # local time, as logging writes it
        except ValueError:
            continue
        if stamp >= since:
            stamps.append(stamp)
    stamps.sort()
    gaps = [((b - a).total_seconds(), f"{a:%H:%M:%S}") for a, b in itertools.pairwise(stamps)]
    return max(gaps, default=(0.0, "-"))


# -- (a) one instance vs several per queue function ---------------------------------------------------

ONE_INSTANCE_ACCOUNT = "acct_bench_one"
# The layout the targets are set for: three of each queue function, and two HTTP instances. In Azure the HTTP
# group scales out with the requests in flight; locally one instance takes a burst's webhooks on one Python
# process, whose handler threads share one GIL (~2.5 ms of CPU per webhook there, beside the drain on the same
# cores), while two spread them over both cores (a 5,000-webhook burst as it arrives: 272-289 -> 308
# contacts/s in the runs made while tuning it, total CPU per webhook 5.1 -> 4.8 ms).
BENCH_INSTANCES = Instances(http=2, queue=3)


def queue_functions(stack: Stack) -> list[str]:
    return sorted(n for n, f in stack.functions.items() if f["group"] != "http" and f["trigger"] != "timerTrigger")


def one_instance_backfill(stack: Stack, contacts: int, window: float) -> Run | None:
    """The same backfill with one instance of each queue function: the others are stopped (idle, SIGKILL)
    for it and started again after. None when the layout has only one of each anyway."""
    extra = [name for fn in queue_functions(stack) for name in stack.instance_names(fn)[1:]]
    if not extra:
        return None
    for name in extra:
        stack.kill_instance(name)
    try:
        run = run_pipeline(stack, ONE_INSTANCE_ACCOUNT, contacts, name="one instance per queue function")
    finally:
        for name in extra:
            stack.restart_instance(name)
    time.sleep(window)  # the run's last penalty and its window pass before the next run starts
    return run


def fmt_instances(run: Run, ceil: Ceiling) -> str:
    steady = run.breakdown.steady_per_second if run.breakdown else float("nan")
    return (f"| {run.name} | {run.contacts:,} | {run.seconds:.1f} | **{run.per_second:,.0f}** "
            f"({run.per_second / ceil.per_second:.0%}) | **{steady:,.0f}** ({steady / ceil.per_second:.0%}) | "
            f"{run.throttled:,} | {run.throttled_per_1000:.2f} | {run.during_penalty:,} | "
            f"{run.requests_per_contact:.3f} |")


def instances_section(one: Run | None, many: Run, ceil: Ceiling, naive: Run | None, threads: str,
                      layout: Instances) -> list[str]:
    lines = [
        "",
        "### One instance vs several per queue function",
        "",
        f"The same backfill twice in this run on the same limits: with one instance of each queue function (the "
        f"others stopped), then with the layout's ({layout}). Every instance runs its functions as Microsoft's "
        f"Python worker does, on one pool of `{THREAD_COUNT_SETTING}` = {threads} threads, and the instances "
        "share one Dataverse budget per user (dataverse/budget.py: a 429 any of them meets holds back all, "
        "requests in flight within the DOP hint split among them).",
        "",
        "| Run | Contacts | Seconds | Contacts/s (of ceiling) | Steady rate, first burst left out (of ceiling) "
        "| 429s | 429s per 1,000 contacts | Requests sent during a penalty | Dataverse requests per contact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    many_row = Run(f"{layout.count('backfill_worker')} instances per queue function", many.contacts, many.seconds,
                   many.requests, many.throttled, many.breakdown, many.during_penalty)
    lines += [fmt_instances(r, ceil) for r in (one, many_row) if r is not None]
    if one is None:
        lines += ["", "(The layout has one instance of each queue function: nothing to compare.)"]
    elif naive is not None and many.breakdown is not None:
        steady = many.breakdown.steady_per_second
        lines += [
            "",
            f"- {many_row.name}: steady rate **{steady / ceil.per_second:.0%} of the ceiling**, "
            f"**{many.per_second / naive.per_second:.1f}x the naive baseline**; "
            f"{many.throttled_per_1000:.2f} 429s per 1,000 contacts against {one.throttled_per_1000:.2f} with one "
            "instance.",
        ]
    return lines


def fmt_run(run: Run, ceil: Ceiling) -> str:
    return (f"| {run.name} | {run.contacts:,} | {run.seconds:.1f} | **{run.per_second:,.0f}** | "
            f"{run.requests_per_contact:.3f} | {run.throttled:,} | {run.per_second / ceil.per_second:.0%} |")


# (b) before the live lane's drain (sync/drain.py) and lean intake: the BENCHMARKS.md of 2026-11-27 11:09 UTC,
# `make bench` on this machine, with the webhook storing a dedupe row and a snapshot and queueing a message
INTAKE_BEFORE = {"per_second": 46.0, "app_cpu_ms": 19.21, "storage_cpu_ms": 9.55}


def burst_section(bursts: list[BurstResult], ceil: Ceiling, naive: Run | None, window: float) -> list[str]:
    """(d): the burst's drain against the ceiling and the per-contact baseline, and the other account's
    lone contact."""
    def row(b: BurstResult) -> str:
        lone = f"{b.lone_latency * 1000:,.0f} ms" if b.lone_latency is not None else "not seen in 120 s"
        versus_naive = f"{b.per_second / naive.per_second:.1f}x" if naive and naive.per_second else "-"
        return (f"| {b.name} | {b.events:,} | {b.post_seconds:.1f} | {b.seconds:.1f} | **{b.per_second:,.0f}** | "
                f"{b.per_second / ceil.per_second:.0%} | {versus_naive} | {b.requests_per_contact:.3f} | "
                f"{b.throttled:,} | **{lone}** ({b.lone_sent_after:.1f} s in) |")

    return [
        "",
        "## (d) A burst on a backfilled account, and another account meanwhile",
        "",
        f"Bursts of `contact.updated` webhooks for existing contacts of the backfilled account (a CSV import or a "
        f"bulk reassignment in Wave), posted by 8 threads to the app's front, each one window ({window:g} s) after "
        "the previous work. First as the webhooks arrive: timed from the first post, so the HTTP instances "
        "taking the webhooks on this machine bound it, and the drain applies them pass after pass meanwhile "
        "(a pass gathers what arrived in the last 0.5 s). Then as a backlog: every change of a second burst stored "
        "before anything drains (the contact worker instances stopped while it was posted, as when webhooks "
        "arrive faster than an account's limits let them out, e.g. over many HTTP instances), timed from "
        "the moment the first of them was up again (cold: sign-in token, clients; it drains while the others "
        "start). Done = Dynamics holds every new "
        "version (checked on the simulator's rows; the time of the last successful write before). Requests "
        "and 429s are the burst account's Dataverse user's. Meanwhile a new contact of ANOTHER connected "
        "account (its own Dataverse user) is posted: its latency runs until a Web API read (a third user, "
        "every 50 ms) finds the row.",
        "",
        "| Burst | Webhooks | Posting (s) | Until Dynamics holds all (s) | Contacts/s | of ceiling | x naive | "
        "Requests per contact | 429s | Other account's lone contact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[row(b) for b in bursts],
        "",
        f"- Ceiling and naive baseline as in (a), same run. A burst starts on a fresh window, so one window's budget "
        f"({ceil.per_window:,.0f} contacts) comes on top of the sustained rate, as for the pipeline. Answers to "
        f"the posts: {'; '.join(', '.join(f'{k}: {v}' for k, v in sorted(b.statuses.items())) for b in bursts)}.",
        "- The webhooks store each change as pending and schedule at most one drain per account; the drain "
        "writes the account's backlog in bulk (UpsertMultiple), one pass of up to 1,000 after another (README, "
        "\"The live lane\"). The other account's change has its own drain: nothing of the burst is in front of it.",
        *cpu_lines(bursts),
    ]


# (d) as the webhooks arrive, before issue 15's intake work (BENCHMARKS.md of 2026-12-01 08:10 UTC and the same
# burst alone, `--burst-only arrive`, on the code of then): 204 contacts/s, posting 24.4 s; CPU per webhook
# by process, first post to done
ARRIVE_BEFORE_CPU_MS = {"HTTP instance": 2.93, "Azurite": 2.25, "drain": 1.57, "benchmark poster": 0.77,
                        "front": 0.36, "Dataverse simulator": 0.07, "backfill instances (idle)": 0.06}


def _cpu_group(process: str) -> str:
    for prefix, group in (("http-", "HTTP instances"), ("contact_worker", "drain"), ("azurite", "Azurite"),
                          ("backfill_worker", "backfill instances (idle)"), ("bench", "benchmark poster"),
                          ("dataverse", "Dataverse simulator"), ("keyvault", "Key Vault simulator"),
                          ("wave", "Wave simulator"), ("entra", "Entra stand-in")):
        if process.startswith(prefix):
            return group
    return process


def cpu_lines(bursts: list[BurstResult]) -> list[str]:
    """Where the machine's CPU went while the burst arrived: each process's CPU per webhook."""
    arrive = next((b for b in bursts if b.cpu_ms), None)
    if arrive is None:
        return []
    groups: dict[str, float] = {}
    for process, ms in arrive.cpu_ms.items():
        groups[_cpu_group(process)] = groups.get(_cpu_group(process), 0.0) + ms
    now = ", ".join(f"{name} {ms:.2f} ms" for name, ms in sorted(groups.items(), key=lambda kv: -kv[1])
                    if ms >= 0.01)
    before = ", ".join(f"{name} {ms:.2f} ms" for name, ms in ARRIVE_BEFORE_CPU_MS.items())
    return [
        f"- CPU per webhook while the burst arrived ({arrive.name}; each process's from /proc, first post to "
        f"done): {now}; {sum(arrive.cpu_ms.values()):.2f} ms in all. Before issue 15's intake work (one HTTP "
        f"instance, 204 contacts/s): {before}; {sum(ARRIVE_BEFORE_CPU_MS.values()):.2f} ms. Since then: the "
        "front keeps its connections to the instances (as Azure's does) instead of one per request; the "
        "benchmark posts on kept connections without requests' per-call work; the webhook's two storage calls "
        "go as plain requests through the table client's pipeline, the marker read instead of an insert "
        "refused with 409; the drain's passes gather what arrived in the last 0.5 s (174 passes -> 37); two HTTP "
        "instances instead of one.",
    ]


def report(args: argparse.Namespace, ceil: Ceiling, runs: list[Run],
           intake: IntakeResult | None, cold: float | None, latencies: list[float], command: str,
           one: Run | None = None, bursts: list[BurstResult] | None = None) -> str:
    cfg, pipeline = ceil.cfg, runs[0]
    steady = pipeline.breakdown.steady_per_second if pipeline.breakdown else float("nan")
    naive = next((r for r in runs if r.name.startswith("naive")), None)
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}), everything on one "
        "machine: Azurite, the simulators, the dev host and the benchmark client share the cores "
        f"(1-minute load average {args.load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        "other work on the machine depresses the figures). "
        f"App instances (devstack/stack.py, grouped as Flex Consumption scales the app): {args.instances}.",
        "These figures measure this code against the local simulators; they are not Dynamics 365's.",
        "",
        "## (a) Backfill against service-protection limits",
        "",
        f"Dataverse simulator limits per user: {cfg['requests']:,} requests and {cfg['execution_ms']:,} ms of "
        f"execution per {cfg['window_seconds']:g} s window (research/dataverse.md §6: 6,000 and 1,200,000 ms per "
        f"300 s, scaled by {cfg['window_seconds'] / 300:.4g} so the sustained rates are the real ones; each request "
        f"sent during a penalty extends it by {cfg['penalty_extension_seconds']:.3g} s, the simulator's 1 s scaled "
        f"alike), {cfg['concurrency']} concurrent requests. Simulated execution time: {cfg['base_ms']:g} ms per "
        f"request (and per request inside a $batch) + {cfg['per_record_ms']:g} ms per row written.",
        "",
        f"**Ceiling the limits allow: {ceil.per_second:,.0f} contacts/s** sustained (execution budget "
        f"{cfg['execution_ms'] / cfg['window_seconds']:,.0f} ms/s divided by {cfg['per_record_ms']:g} ms per row "
        f"+ {cfg['base_ms']:g} ms per 1,000-row bulk request; the request budget would allow "
        f"{cfg['requests'] / cfg['window_seconds'] * 1000:,.0f}/s). A run can pass it: it starts on an empty "
        f"window, so one window's budget ({ceil.per_window:,.0f} contacts) comes on top, and the limits are "
        "checked against finished requests, so those in flight when the budget runs out overshoot it (as the "
        "service's do). The pipeline's steady rate below leaves its first burst out.",
        "",
        "| Run | Contacts | Seconds | Contacts/s | Dataverse requests per contact | 429s | of ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[fmt_run(r, ceil) for r in runs],
        "",
        f"- Pipeline: **{pipeline.per_second / ceil.per_second:.0%} of the ceiling**"
        + (f", **{pipeline.per_second / naive.per_second:.1f}x the naive baseline**" if naive else "")
        + " (same run, same limits). Pipeline time runs from the connect call to the backfill's `done` state "
        "(sign-in, queues, Wave pages, owner lookups and writes included)."
        + (f" Steady rate, without the first burst (the empty window's): {steady:,.0f} contacts/s, "
           f"**{steady / ceil.per_second:.0%} of the ceiling**." if steady == steady else ""),
        f"- Baselines use the app's `DataverseClient` directly as a separate Dataverse user (own limit windows) "
        f"for {args.baseline_seconds:g} s each, waiting out every 429 as told by Retry-After. The naive one is "
        f"held to the request budget ({cfg['requests'] / cfg['window_seconds']:g} requests/s) whatever a row costs.",
        *instances_section(one, pipeline, ceil, naive, args.threads, args.instances),
    ]
    b = pipeline.breakdown
    if b is not None and b.pages:
        lines += [
            "",
            "### Where the pipeline's time goes",
            "",
            f"From this run's logs: the bulk writes reached Dataverse in {len(b.bursts)} bursts, starting "
            + ", ".join(f"{at:.1f} s ({rows:,})" for at, rows in b.bursts)
            + f" after the connect call (contacts in brackets); the last write at {b.last_write_s:.1f} s, the run "
            "done at "
            f"{b.elapsed_ms / 1000:.1f} s. Each burst is what one window's execution budget takes; the next "
            f"starts when the window has moved on. The {b.pages} page runs took {b.pages_ms / 1000:,.1f} s in all "
            f"(penalties waited out in-process included), of which the Dataverse simulator itself spent "
            f"{b.dataverse_ms / 1000:,.1f} s.",
            "",
            *ANALYSIS,
        ]
    if intake is not None:
        lines += [
            "",
            "## (b) Webhook intake",
            "",
            "The real handler (`functions.webhook.wave_webhook`: size, HMAC signature, JSON schema, the "
            "connection, the pending change, the drain marker) called in-process against Azurite for "
            "`contact.updated` webhooks of one account, with the dev host stopped so nothing drains it.",
            "",
            "| | Requests | Threads | Requests/s | CPU per request (app) | CPU per request (Azurite) | Answers |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| before (per-contact intake, BENCHMARKS.md of 2026-11-27) | 3,000 | 8 | "
            f"{INTAKE_BEFORE['per_second']:,.0f} | {INTAKE_BEFORE['app_cpu_ms']:.2f} ms | "
            f"{INTAKE_BEFORE['storage_cpu_ms']:.2f} ms | 202: 3000 |",
            f"| now | {intake.requests:,} | {intake.threads} | **{intake.per_second:,.0f}** | "
            f"**{intake.app_cpu_ms:.2f} ms** | {intake.storage_cpu_ms:.2f} ms | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(intake.statuses.items()))} |",
            "",
            "Before: five storage calls per webhook (connection read, event-id insert, snapshot read and write, "
            "enqueue), each through an SDK transport that re-read the proxy environment. Now: the connection from "
            "a 5 s cache, one insert of the pending change, one point read of the account's drain marker "
            "(an insert and a message only when it is absent), both as plain requests through the table "
            "client's pipeline (core/tables.py: the SDK's own calls spent more CPU serializing and raising on "
            "a 409 than on the call), on a transport without environment lookups and with a pool as large as "
            "the concurrency (README, \"Webhook contract\").",
        ]
    if latencies:
        lines += [
            "",
            "## (c) Live latency webhook -> Dataverse",
            "",
            f"{len(latencies)} create/update webhooks posted at {args.live_rate:g}/s to the dev host after the "
            "backfill and one window later (the backfill had used the connection's limits to the full); latency "
            "is from the POST to the first successful Dataverse write of that contact (the "
            "simulator's request log; both clocks are this machine's). Before them, one webhook alone right after "
            "the dev host restarted (cold: token from Key Vault and Entra, clients, owner cache) took "
            + (f"{cold * 1000:,.0f} ms." if cold is not None else "too long to be seen (120 s)."),
            "",
            "| p50 | p95 | p99 | max |",
            "|---:|---:|---:|---:|",
            f"| {percentile(latencies, 50) * 1000:,.0f} ms | {percentile(latencies, 95) * 1000:,.0f} ms | "
            f"{percentile(latencies, 99) * 1000:,.0f} ms | {max(latencies) * 1000:,.0f} ms |",
            "",
            f"Longest silence in the app instances' logs meanwhile: {args.silence[0]:.1f} s (from {args.silence[1]}). "
            "With a webhook arriving every 100 ms, a silence of seconds means the host, or the Azurite it "
            "waits on, stood still, and the events in flight then make the max.",
        ]
    if bursts:
        lines += burst_section(bursts, ceil, naive, args.window)
    return "\n".join(lines) + "\n"


def print_cpu(burst: BurstResult) -> None:
    """Each process's CPU per webhook during a burst, most first."""
    total = sum(burst.cpu_ms.values())
    print(f"  CPU per webhook, first post to done: {total:.2f} ms in all")
    for name, ms in sorted(burst.cpu_ms.items(), key=lambda kv: -kv[1]):
        if ms >= 0.005:
            print(f"    {name:<24} {ms:6.2f} ms")


def burst_only(stack: Stack, args: argparse.Namespace, ceil: Ceiling) -> None:
    """`--burst-only`: the backfill the burst needs, then (d), printed with each process's CPU."""
    print(f"(a) pipeline backfill of {args.contacts:,} contacts (for the burst)")
    pipeline = run_pipeline(stack, ACCOUNT, args.contacts)
    print(f"  pipeline: {pipeline.per_second:,.1f} contacts/s")
    print(f"(d) bursts of {args.burst:,} webhooks, and another account's lone contact")
    connect_other(stack)
    time.sleep(args.window)
    for b in run_burst(stack, ACCOUNT, args.burst, args.window, backlog=args.burst_only == "both"):
        lone = f"{b.lone_latency * 1000:.0f} ms" if b.lone_latency is not None else "not seen"
        print(f"  {b.name}: posting {b.post_seconds:.1f} s, Dynamics holds all after {b.seconds:.1f} s: "
              f"{b.per_second:,.0f} contacts/s ({b.per_second / ceil.per_second:.0%} of the ceiling), "
              f"{b.requests_per_contact:.3f} requests per contact, {b.throttled} x 429, answers "
              f"{dict(sorted(b.statuses.items()))}; other account's lone contact {lone}")
        if b.cpu_ms:
            print_cpu(b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks: backfill vs limits, webhook intake, live latency")
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--window", type=float, default=10.0, help="scaled service-protection window (s)")
    parser.add_argument("--baseline-seconds", type=float, default=40.0)
    parser.add_argument("--intake", type=int, default=3000, help="webhooks for the intake benchmark; 0 skips it")
    parser.add_argument("--live", type=int, default=300, help="webhooks for the latency benchmark; 0 skips it")
    parser.add_argument("--live-rate", type=float, default=10.0, help="webhooks per second (latency)")
    parser.add_argument("--burst", type=int, default=5000, help="webhooks of the burst (d); 0 skips it")
    parser.add_argument("--instances", type=instances_arg, default=BENCH_INSTANCES, metavar="SPEC",
                        help="app instances: N per queue function (one HTTP instance), or http=N,queue=N,<function>=N "
                             "(default http=2,queue=3); the backfill also runs once with one of each")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--burst-only", choices=("arrive", "both"),
                        help="only the backfill (--contacts, at least 2x --burst) and (d): the burst as it arrives, "
                             "or both bursts; prints the figures and each process's CPU per webhook, writes nothing")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = "make bench" if not argv else "python -m bench.run " + " ".join(argv)
    args.load_before = os.getloadavg()[0]

    limits = LimitSettings(args.window)
    print(f"starting the local stack (limits scaled to a {args.window:g} s window; instances {args.instances})")
    # The app's budget knows the simulator's scaled window, as it knows Dataverse's 300 s (dataverse/budget.py).
    options = StackOptions(name="bench", dataverse_args=limits.simulator_args(), instances=args.instances,
                           devhost_env={"DEV_DATAVERSE_WINDOW_SECONDS": f"{limits.window_seconds:g}"})
    with Stack(options) as stack:
        print(f"logs in {stack.dir.relative_to(ROOT)}/; app instances {', '.join(stack.instance_names())}")
        ceil = ceiling(stack)
        print(f"ceiling the limits allow: {ceil.per_second:,.0f} contacts/s sustained")
        if args.burst_only:
            burst_only(stack, args, ceil)
            return 0
        print(f"(a) baselines, {args.baseline_seconds:g} s each")
        naive = run_naive(stack, args.baseline_seconds)
        print(f"  naive:    {naive.per_second:,.1f} contacts/s, {naive.throttled} x 429")
        batch10 = run_batch10(stack, args.baseline_seconds)
        print(f"  batch10:  {batch10.per_second:,.1f} contacts/s, {batch10.throttled} x 429")
        args.threads = stack.devhost_env.get(THREAD_COUNT_SETTING, "the worker's default")
        print(f"(a) backfill of {args.contacts:,} contacts with one instance per queue function "
              f"({THREAD_COUNT_SETTING}={args.threads})")
        one = one_instance_backfill(stack, args.contacts, args.window)
        if one is not None:
            print(f"  one instance: {one.per_second:,.1f} contacts/s ({one.per_second / ceil.per_second:.0%} of the "
                  f"ceiling), {one.throttled} x 429, {one.during_penalty} sent during a penalty")
        print(f"(a) pipeline backfill of {args.contacts:,} contacts")
        pipeline = run_pipeline(stack, ACCOUNT, args.contacts, seed_users=one is None)
        print(f"  pipeline: {pipeline.per_second:,.1f} contacts/s ({pipeline.per_second / ceil.per_second:.0%} of "
              f"the ceiling, {pipeline.per_second / naive.per_second:.1f}x naive), "
              f"{pipeline.requests_per_contact:.3f} requests per contact, {pipeline.throttled} x 429, "
              f"{pipeline.during_penalty} sent during a penalty")
        cold, latencies = None, []
        if args.live:
            print(f"(c) live latency, {args.live} webhooks at {args.live_rate:g}/s")
            stack.restart_devhost(kill=False)  # the first event then meets a cold host
            # The backfill used the connection's execution budget to the full: let one window pass, so that
            # live events are measured, not the end of the backfill's penalty.
            time.sleep(args.window)
            live_start = datetime.now()
            cold, latencies = live_latency(stack, args.live, args.live_rate)
            args.silence = longest_log_silence(stack.instance_logs(), live_start)
            print(f"  first event after the host restart: {cold * 1000 if cold else float('nan'):.0f} ms")
            print(f"  p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms, "
                  f"p99 {percentile(latencies, 99) * 1000:.0f} ms")
        bursts: list[BurstResult] = []
        if args.burst:
            print(f"(d) bursts of {args.burst:,} webhooks, and another account's lone contact")
            connect_other(stack)
            time.sleep(args.window)  # a fresh window, as for (c)
            bursts = run_burst(stack, ACCOUNT, args.burst, args.window)
            for b in bursts:
                print(f"  {b.name}: {b.per_second:,.0f} contacts/s ({b.per_second / ceil.per_second:.0%} of the "
                      f"ceiling, {b.per_second / naive.per_second:.1f}x naive), {b.requests_per_contact:.3f} "
                      f"requests per contact, {b.throttled} x 429; other account's lone contact "
                      f"{b.lone_latency * 1000 if b.lone_latency is not None else float('nan'):.0f} ms")
        intake = None
        if args.intake:
            print(f"(b) webhook intake, {args.intake:,} requests")
            intake = run_intake(stack, ACCOUNT, requests=args.intake)
            print(f"  {intake.per_second:,.0f} requests/s, CPU {intake.app_cpu_ms:.2f} ms (app) + "
                  f"{intake.storage_cpu_ms:.2f} ms (Azurite) per request")
    text = report(args, ceil, [pipeline, naive, batch10], intake, cold, latencies, command, one, bursts)
    print()
    print(text)
    if not args.no_write:
        args.out.write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
