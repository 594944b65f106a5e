"""Render the benchmark tables of docs/performance.md from bench/results/*.json (never typed
by hand).

Every ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block of the page is rewritten
from ``bench/results/NAME.json`` by the renderer of its ``"benchmark"`` kind; blocks whose
file is missing or whose kind has no renderer here are left as they are.

    python bench/report.py            # rewrite the tables between the page's markers
    python bench/report.py --check    # exit 1 if the page is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: the page that holds the generated tables (the README links to it)
PAGE = ROOT / "docs" / "performance.md"
MARKER = re.compile(r"(<!-- bench:([\w.-]+) -->\n)(?:.*?\n)?(<!-- /bench:\2 -->)", re.S)


def _f(x, nd=2):
    return f"{x:.{nd}f}"


def _where(d: dict) -> str:
    env = d["env"]
    return env.get("gpu", f"CPU, {env['cpu_threads']} threads")


def _heading(d: dict, what: str) -> str:
    env = d["env"]
    command = d["command"].removeprefix("python ")
    date = f", {d['date']}" if d.get("date") else ""
    return (f"`{command}` — {_where(d)}{date}, torch {env['torch']}, transformers "
            f"{env['transformers']}, {what}")


def _spread(r: dict) -> str:
    return f"{_f(r['median'], 3)} ({_f(r['min'], 3)}-{_f(r['max'], 3)})"


def _met(ok) -> str:
    return "-" if ok is None else "yes" if ok else "**no**"


def checkpoint_table(d: dict) -> str:
    lines = [
        _heading(d, f"{d['model']} {d['dtype']}, median of {d['reps']}"),
        "",
        "| context | KV MiB | dispatch ms (median / cold) | copy ms | pinned D2H ms | copy / pinned | "
        "restore ms | pinned H2D ms | restore / pinned | prefill ms | restore+continue ms | "
        "recompute ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['context']} | {_f(r['kv_bytes'] / 2**20, 1)} | {_f(r['dispatch_ms_median'], 3)} / "
            f"{_f(r['dispatch_ms_cold'], 1)} | {_f(r['copy_ms_median'], 3)} | "
            f"{_f(r['baseline_pinned_d2h_ms'], 3)} | {_f(r['copy_vs_pinned_d2h'])} | "
            f"{_f(r['restore_ms_median'], 3)} | {_f(r['baseline_pinned_h2d_ms'], 3)} | "
            f"{_f(r['restore_vs_pinned_h2d'])} | {_f(r['prefill_ms'], 1)} | "
            f"{_f(r['restore_continue_ms'], 1)} | {_f(r['recompute_prefix_ms'], 1)} | "
            f"{_f(r['restore_continue_speedup'], 1)}x |")
    for run in d.get("dispatch", {}).get("runs", []):        # --dispatch (checkpoint_bench.py)
        if run["profiled"]:
            continue
        cases = "; ".join(
            f"{case.replace('_', ' ')}: first {_f(run[case]['first']['dispatch_ms'], 3)} ms, later "
            f"{_f(run[case]['later_median_dispatch_ms'], 3)} (max {_f(run[case]['later_max_dispatch_ms'], 3)})"
            for case in ("finished_run", "paused_in_slot"))
        lines += ["", f"Dispatch at {run['context']} positions, fresh process, {run['variant']}: {cases}."]
    return "\n".join(lines)


def decode_table(d: dict) -> str:
    tok = d["tokens"]
    rtt = d["pause_baseline_rtt_ms"]      # (bench/decode_bench.py: the faster RTT sampling)
    per = {k: sorted(d[f"{k}_total_ms"])[len(d[f"{k}_total_ms"]) // 2] / tok
           for k in ("plain", "hooked", "steered")}
    rows = [
        ("decode through the server, hooks installed, no breakpoint hit (client-observed, "
         f"{tok} tokens, prefill included) vs plain HF loop",
         f"{_f(per['hooked'], 2)} vs {_f(per['plain'], 2)} ms/token",
         _spread(d["hooks_vs_plain_e2e"]), ">= 0.99", d["hooks_vs_plain_e2e"]["median"] >= 0.99),
        ("the same, per decode step (server forward time vs plain loop step)",
         f"{_f(d['server_hooks_ms_per_token'], 2)} vs {_f(d['plain_hf_ms_per_token'], 2)} ms",
         _spread(d["hooks_vs_plain_step"]), ">= 0.99", d["hooks_vs_plain_step"]["median"] >= 0.99),
        ("decode with one standing steering rule vs none (client-observed)",
         f"{_f(per['steered'], 2)} vs {_f(per['hooked'], 2)} ms/token",
         _spread(d["steered_vs_unsteered_e2e"]), ">= 0.98",
         d["steered_vs_unsteered_e2e"]["median"] >= 0.98),
        ("pause -> resume -> next pause beyond compute (control channel) vs raw socket round trip "
         "(the faster of the run's two samplings of it)",
         f"{_f(d['pause_resume_overhead_ms'], 3)} vs {_f(rtt, 3)} ms (raw round trip sampled "
         f"between the cycles: {_f(d['raw_socket_rtt_ms'], 3)}, in the ping phase: "
         f"{_f(d['raw_socket_rtt_ping_phase_ms'], 3)}; over rpyc: "
         f"{_f(d['rpyc_pause_resume_overhead_ms'], 3)}; floor without djinn_nb, a raw "
         f"socket round trip around one decode step: {_f(d['raw_step_overhead_ms'], 3)}, "
         f"{_f(d['pause_overhead_vs_raw_step'], 1)}x)",
         f"{_f(d['pause_overhead_vs_raw_rtt'], 1)}x", "<= 2x", d["pause_overhead_vs_raw_rtt"] <= 2),
        ("an empty call (ping), control channel vs raw socket round trip",
         f"{_f(d['control_ping_ms'], 3)} vs {_f(d['raw_socket_rtt_ping_phase_ms'], 3)} ms "
         f"(over rpyc: {_f(d['rpyc_ping_ms'], 3)})",
         f"{_f(d['control_ping_vs_raw_rtt'], 1)}x", "-", None),
        ("activation transfer (control channel) vs raw loopback socket",
         f"{_f(d['activation_gb_s'], 3)} vs {_f(d['raw_socket_gb_s'], 3)} GB/s "
         f"({d['activation_bytes'] / 2**20:.1f} MiB; rpyc + bulk path {_f(d['rpyc_activation_gb_s'], 3)})",
         _f(d["activation_vs_raw_bandwidth"]), ">= 0.50", d["activation_vs_raw_bandwidth"] >= 0.5),
        ("logits transfer: a finished result with full-vocabulary logits, the time they add to "
         "`stop()` (control channel) vs raw loopback socket",
         f"{_f(d['logits_gb_s'], 3)} vs {_f(d['raw_socket_logits_gb_s'], 3)} GB/s "
         f"({d['logits_bytes'] / 2**20:.1f} MiB; over the whole `stop()`, "
         f"{_f(d['logits_stop_ms'], 1)} ms, {_f(d['logits_e2e_gb_s'], 3)} GB/s)",
         _f(d["logits_vs_raw_bandwidth"]), ">= 0.50", d["logits_vs_raw_bandwidth"] >= 0.5),
    ]
    mode = f", server decode mode: {d['fast_decode']}" if d.get("fast_decode") else ""
    lines = [_heading(d, f"{d['model']} {d.get('dtype', '')}{mode}, {d['reps']} interleaved "
                         "repetitions; ratios: median (min-max) of per-repetition ratios"), "",
             "| what | measured | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {t} | {_met(ok)} |" for a, b, c, t, ok in rows]
    return "\n".join(lines)


def sweep_table(d: dict) -> str:
    lines = [_heading(d, f"{d['model']} {d['dtype']}, median of {d['reps']} (alternating order)"), "",
             "| scales | prompt tokens | tokens per scale | N fresh generations ms | "
             "sweep from one checkpoint ms (prefix) | speed-up | prefills | same tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {len(d['scales'])} ({d['scales'][0]:g}..{d['scales'][-1]:g}) | {d['context']} | "
             f"{d['tokens']} | {_f(d['fresh_ms_median'], 0)} | {_f(d['sweep_ms_median'], 0)} "
             f"({_f(d['prefix_ms_median'], 0)}) | {_f(d['sweep_speedup'], 1)}x | "
             f"{d['prefills_fresh']} vs {d['prefills_sweep']}"
             f"{'' if d['prefix_not_recomputed'] else ' (**recomputed**)'} | "
             f"{'yes' if d['tokens_match'] else '**no**'} ({d['distinct_continuations']} distinct) |"]
    return "\n".join(lines)


def nnsight_table(d: dict) -> str:
    lines = [_heading(d, f"{d['model']} {d['dtype']}, nnsight {d['nnsight_version']}, "
                         f"{d['reps']} interleaved repetitions"), "",
             f"| steered greedy generation, {d['tokens']} tokens (block {d['layer']} output "
             f"x {d['scale']:g}) | ms per token | djinn_nb tokens/s relative to it | same tokens |",
             "| --- | --- | --- | --- |",
             f"| plain HF forward hook, in-process (no framework) | {_f(d['hook_ms_per_token'], 2)} | "
             f"{_spread(d['djinn_vs_hook'])} | {'yes' if d['tokens_hook'] == d['tokens_djinn'] else '**no**'} |",
             f"| djinn_nb, client -> kernel server (loopback) | {_f(d['djinn_ms_per_token'], 2)} | 1 | - |",
             f"| nnsight, local (`TransformersModel`, `tracer.iter`) | "
             f"{_f(d['nnsight_ms_per_token'], 2)} | {_spread(d['djinn_vs_nnsight'])} | "
             f"{'yes' if d['tokens_nnsight'] == d['tokens_djinn'] else '**no**'} |"]
    return "\n".join(lines)


def analysis_table(d: dict) -> str:
    """bench/analysis_bench.py: one-shot analysis passes against in-process peers."""
    load = d.get("load_average_before", [None])[0]
    lines = [_heading(d, f"{d['model']} {d['dtype']}, median of {d['reps']}"
                         + (f", machine load average {load:.1f} at the start" if load is not None else "")),
             "", "| task | djinn_nb ms | djinn_nb one pass per prompt / cell ms | HF hooks in-process, "
             "batched ms | HF hooks, batched, `logits_to_keep=1` ms | HF hooks, one forward per cell ms | "
             "nnsight batched trace ms | nnsight trace + `tracer.stop()` ms | "
             "fastest peer / djinn_nb (> 1: djinn_nb faster) | max abs diff vs djinn_nb |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        peers = [r[k] for k in ("hf_ms", "hf_last_logits_ms", "hf_unbatched_ms", "nnsight_ms",
                                "nnsight_stop_ms") if k in r]
        cell = lambda k: _f(r[k], 0) if k in r else "-"  # noqa: E731
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items())
        extra = f" (r = {r['corr_with_exact']:.3f} with the exact grid)" if "corr_with_exact" in r else ""
        lines.append(f"| {r['task']}{extra} | {cell('djinn_ms')} | {cell('djinn_unbatched_ms')} | "
                     f"{cell('hf_ms')} | {cell('hf_last_logits_ms')} | {cell('hf_unbatched_ms')} | {cell('nnsight_ms')} | "
                     f"{cell('nnsight_stop_ms')} | "
                     f"{min(peers) / r['djinn_ms']:.2f}x | {diffs} |")
    return "\n".join(lines)


#: what each traced segment of a pause cycle holds (bench/cycle_trace.py)
CYCLE_SEGMENTS = {
    "c_call -> c_send": "client: `resume()` to the request on the socket (encode)",
    "c_send -> s_recv": "request in transit; the server's control thread wakes and reads it",
    "s_recv -> s_parsed": "server: JSON parse, frame checks (and the wait until the generation "
                          "thread's send of the last reply has returned)",
    "s_parsed -> s_cmd": "server: argument checks, session state, command to the generation thread",
    "s_cmd -> w_wake": "the generation thread wakes",
    "w_fwd_end -> w_step": "server: bookkeeping between two steps",
    "w_pause -> s_reply": "server: pause event, session state (generation thread)",
    "s_reply -> c_ready": "reply encoded and sent by the generation thread; the client wakes",
    "c_ready -> c_reply": "client: reply read and JSON-decoded",
    "c_reply -> c_event": "client: the `Paused` object",
}


def cycle_trace_table(d: dict) -> str:
    seg = d["segments"]
    overhead = sum(seg[k]["median_us"] for k in CYCLE_SEGMENTS if k in seg)
    lines = [_heading(d, f"{d['model']} {d.get('dtype') or ''}, {seg['cycle (c_call -> c_event)']['n']} "
                         "cycles; microseconds"), "",
             "| segment | median | p10-p90 |", "| --- | --- | --- |"]
    for key, what in CYCLE_SEGMENTS.items():
        if key in seg:
            s = seg[key]
            lines.append(f"| {what} (`{key}`) | {_f(s['median_us'], 0)} | "
                         f"{_f(s['p10_us'], 0)}-{_f(s['p90_us'], 0)} |")
    comp = seg["compute (w_wake -> w_fwd_end, w_step -> w_pause)"]
    lines.append(f"| **sum of the medians above** (the cycle beyond compute, with the trace's own cost) | "
                 f"**{_f(overhead, 0)}** | |")
    lines.append(f"| compute of the traced cycle (not overhead) | {_f(comp['median_us'], 0)} | "
                 f"{_f(comp['p10_us'], 0)}-{_f(comp['p90_us'], 0)} |")
    return "\n".join(lines)


def tenants_table(d: dict) -> str:
    hf = d["hf_batched"]
    off = {r["clients"]: r for r in d.get("engine_off", {}).get("runs", [])}
    lines = [_heading(d, f"{d['model']} {d['dtype']}, {d['tokens_per_client']} new tokens per "
                         f"client, standing rule {d['rule']}, one client process per session"), "",
             "| clients | engine on: aggregate tokens/s | median client latency s | each client's "
             "tokens and logits = its solo run | engine off: tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in d["engine_on"]["runs"]:
        same = all(r["tokens_equal_solo"]) and all(r["logits_bit_equal_solo"])
        o = off.get(r["clients"])
        lines.append(f"| {r['clients']} | {_f(r['tokens_per_s'], 1)} | "
                     f"{_f(r['client_latency_s']['median'], 2)} | "
                     f"{'yes, bit for bit' if same else '**no**'} | "
                     f"{_f(o['tokens_per_s'], 1) if o else '-'} |")
    lines.append(f"| HF batched `generate`, {hf['clients']} prompts | {_f(hf['tokens_per_s'], 1)} | "
                 f"{_f(hf['wall_s'], 2)} | - | - |")
    lines.append("")
    lines.append(f"{hf['clients']} clients / HF batched generate: {_f(d['max_clients_over_hf'], 2)}x"
                 + (f"; one client, engine on / off: {_f(d['solo_on_over_off'], 2)}x"
                    if "solo_on_over_off" in d else ""))
    sw = d["engine_on"].get("sweep")
    if sw:
        lines += ["", f"Sweep of {len(sw['scales'])} scales from one checkpoint ({sw['new_tokens']} "
                  f"new tokens each): {len(sw['scales'])} sequential forks {_f(sw['sequential_forks_s'], 2)} s; "
                  f"{len(sw['scales'])} clients resuming together {_f(sw['together_resume_s'], 2)} s "
                  f"(+ {_f(sw['together_load_s'], 2)} s loading the checkpoint file): "
                  f"**{_f(sw['speedup'], 1)}x** ({_f(sw['speedup_with_loads'], 1)}x with the loads); "
                  f"tokens equal to each fork alone: "
                  f"{'yes' if all(sw['tokens_equal_fork']) else '**no**'}."]
    st = d["engine_on"].get("join_stall")
    if st:
        lines += ["", f"Join stall: a session joining with a {st['joiner_prompt_tokens']}-token prompt "
                  f"(prefill {_f(st['joiner_prefill_alone_ms'], 1)} ms alone) stalled a running session's "
                  f"step by {_f(st['stall_ms'], 1)} ms (slowest step {_f(st['running_step_max_ms'], 1)} ms, "
                  f"median {_f(st['running_step_median_ms'], 1)} ms)."]
    return "\n".join(lines)


def fast_decode_peers_table(d: dict) -> str:
    """bench/fast_decode_bench.py --peers: ms per decode token by context, the server's modes
    and the peers, with and without a standing rule; the bit-for-bit relations; targets."""
    def ms(r, k):
        return _f(r[k], 2) if r.get(k) is not None else "-"

    def replay(r):
        x = r.get("replay_only")
        return (f"{_f(x['segments_replay_ms'], 2)} / {_f(x['graph_replay_ms'], 2)} "
                f"({x['segments']} graphs)") if x else "-"
    lines = [_heading(d, f"{d['model']} {d['dtype']}, {d['new_tokens']} new tokens, ms per decode "
                         f"token (median; HF and nnsight: (time of n tokens - time of 1) / (n-1)); "
                         f"rule: {d['rule']} at layer {d['rule_layer']}; breakpoint at layer "
                         f"{d['breakpoint_layer']} on every step"), "",
             "| context (bucket) | graph | graph + rule | graph + expression | breakpoint step "
             "(client time out) | breakpoint / graph (target <= 1.5) | pause to pause, in-process client | "
             "segments alone / whole graph (replay only) | eager server | HF `generate` "
             "SDPA | HF + rule (hook) | nnsight | nnsight + rule |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        ratio = r["breakpoint_vs_graph"]
        lines.append(f"| {r['context']} ({r['bucket']}) | {ms(r, 'graph_ms')} | {ms(r, 'graph_rule_ms')} | "
                     f"{ms(r, 'graph_expression_ms')} | {ms(r, 'breakpoint_step_ms')} | "
                     f"{_f(ratio, 2)}{'' if ratio <= 1.5 else ' **no**'} | {ms(r, 'pause_to_pause_ms')} | "
                     f"{replay(r)} | {ms(r, 'eager_ms')} | "
                     f"{ms(r, 'hf_generate_sdpa_ms')} | {ms(r, 'hf_generate_sdpa_rule_ms')} | "
                     f"{ms(r, 'nnsight_ms')} | {ms(r, 'nnsight_rule_ms')} |")

    def same(key):
        rows = [r[key] for r in d["rows"]]
        if all(x["bit_identical"] for x in rows):
            return "yes"
        return ", ".join("yes" if x["bit_identical"] else
                         f"no (step {x['first_differing_step']}, {x['max_abs_logit_diff']:.3g})" for x in rows)
    lines += ["", "Bit for bit over all steps, per context: breakpoint on every step = no breakpoint: "
              f"{same('breakpoint_vs_no_breakpoint')}; expression in the graph = the same expression "
              f"by the run's hooks: {same('expression_graph_vs_hooks')}; graph = eager server: "
              f"{same('graph_vs_eager')}; graph = HF `generate` with the server's decode attention: "
              f"{same('graph_vs_hf_generate_exact_attention')}; graph = HF `generate` with fused SDPA: "
              f"{same('graph_vs_hf_generate_sdpa')}."]
    ck = d.get("first_checkpoint")
    if ck:
        a, b = ck["pool_512mib"], ck["pool_sized_at_load"]
        lines += ["", f"First checkpoint at {ck['context']} positions ({_f(b['kv_mib'], 0)} MiB): "
                  f"{_f(a['first_dispatch_ms'], 1)} ms with a 512 MiB pool (later ones "
                  f"{_f(a['later_dispatch_ms'], 2)} ms); {_f(b['first_dispatch_ms'], 2)} ms with the "
                  f"pool sized at load ({_f(b['pool_mib'], 0)} MiB, allocated in "
                  f"{_f(b['prepare_s'], 2)} s; later ones {_f(b['later_dispatch_ms'], 2)} ms)"
                  f"{'' if b['first_dispatch_ms'] < 1.0 else ' **no** (target < 1 ms)'}"]
    if d.get("nnsight_error"):
        lines += ["", f"nnsight: {d['nnsight_error']}"]
    return "\n".join(lines)


RENDERERS = {"checkpoint": checkpoint_table, "fast_decode_peers": fast_decode_peers_table, "decode": decode_table, "sweep": sweep_table,
             "nnsight": nnsight_table, "analysis": analysis_table, "cycle_trace": cycle_trace_table, "tenants": tenants_table}


def render(text: str, results: Path = RESULTS) -> str:
    def table(m: re.Match) -> str:
        path = results / f"{m.group(2)}.json"
        if not path.exists():
            return m.group(0)
        d = json.loads(path.read_text())
        fn = RENDERERS.get(d.get("benchmark"))
        if fn is None:
            return m.group(0)
        return m.group(1) + fn(d) + "\n" + m.group(3)
    return MARKER.sub(table, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    old = PAGE.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"the benchmark tables of {PAGE.relative_to(ROOT)} are out of date: "
                  "run python bench/report.py")
            return 1
        if "<!-- bench:" not in old:
            print(f"{PAGE.relative_to(ROOT)} holds no benchmark tables")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
