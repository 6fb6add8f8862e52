"""The benchmark's summary (overheads, paired intervals, speedups kept) and its Markdown report (bench.md)."""
from __future__ import annotations

from .workload import CALL, IMAGE_SIZE, METHODS, PREFIX, REFERENCE, SITE_CALLS, SUFFIX

CALL_KINDS = (*SITE_CALLS, "index")


def paired_overhead(off: list, full: list, seed: int = 0) -> dict:
    """Median of the paired differences full_i − off_i (adjacent runs, so slow drift cancels), as % of the
    median off time, with a bootstrap 95 % interval over the pairs."""
    import numpy as np

    d = np.asarray(full) - np.asarray(off)
    base = float(np.median(off))
    rng = np.random.default_rng(seed)
    boot = np.median(d[rng.integers(0, len(d), (4000, len(d)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median_pct": 100 * float(np.median(d)) / base, "ci95_pct": [100 * lo / base, 100 * hi / base]}


# ---------------------------------------------------------------------------------------------- summary

def summarise(results: dict) -> dict:
    """Overhead ratio (full − off)/off and speedup retention per method, against unpruned LLaVA."""
    ref = results.get(REFERENCE, {}).get("modes", {}).get("off", {})
    call = {(r["n"], r["dtype"]): r for r in results.get(CALL, {}).get("call", [])}
    per_call_us = call.get((576, "float16"), {}).get("overhead_us")
    summary = {}
    for m, r in results.items():
        if m in (REFERENCE, CALL) or "modes" not in r or "full" not in r["modes"]:
            continue
        row = {key: _timing_row(r["modes"], key, ref) for key in r["modes"]["off"] if key.endswith("_ms")}
        if per_call_us is not None and "prefill_ms" in row:
            n_calls = _ranking_calls_per_prefill(r)
            row["debias_calls_per_prefill"] = n_calls
            row["isolated_overhead_pct"] = 100 * n_calls * per_call_us / 1e3 / row["prefill_ms"]["off"]
        summary[m] = row
    return summary


def _timing_row(modes: dict, key: str, ref: dict) -> dict:
    """One timing (prefill or prefill + decode) of a method: medians, overhead, spread, paired estimates and,
    beside the reference, the speedups."""
    off_t, full_t = modes["off"][key], modes["full"][key]
    off, full = off_t["median"], full_t["median"]
    row = {"off": off, "full": full, "overhead_pct": 100 * (full - off) / off,
           "spread_pct": 100 * (off_t["p90"] - off_t["p10"]) / off}
    if "runs" in off_t:
        row["paired"] = paired_overhead(off_t["runs"], full_t["runs"])
        control = modes.get("off_control", {}).get(key)
        if control:
            row["control"] = paired_overhead(off_t["runs"], control["runs"])
    if key in ref:
        base = ref[key]["median"]
        row["speedup_off"], row["speedup_full"] = base / off, base / full
        row["speedup_kept_pct"] = 100 * (base / full) / (base / off)
        if "paired" in row:  # the same from the paired estimate of full/off, which is less noisy
            q = row["paired"]
            row["speedup_kept_paired_pct"] = {
                "median": 100 / (1 + q["median_pct"] / 100),
                "ci95": [100 / (1 + q["ci95_pct"][1] / 100), 100 / (1 + q["ci95_pct"][0] / 100)]}
    return row


def _ranking_calls_per_prefill(result: dict) -> int:
    """debias + mask_padding calls of the warm prefill (keep_cap is host-only)."""
    syncs = result.get("host_syncs_in_debias_core")
    calls = syncs.get("warm", {}).get("calls", {}) if isinstance(syncs, dict) else {}
    return calls.get("debias", 0) + calls.get("mask_padding", 0)


# ---------------------------------------------------------------------------------------------- bench.md

def markdown(results: dict, summary: dict, meta: dict) -> str:
    insitu = {m: r["in_situ"] for m, r in results.items() if isinstance(r, dict) and "overhead_pct_median" in
              r.get("in_situ", {})}
    lines = [*_end_to_end_section(results, summary, meta), *_inputs_section(results), *_in_situ_section(insitu),
             *_by_call_section(insitu), *_isolated_section(summary), *_call_section(results.get(CALL, {}).get("call"))]
    return "\n".join(lines) + "\n"


def _end_to_end_section(results: dict, summary: dict, meta: dict) -> list[str]:
    lines = [f"# Debias overhead — {meta['gpu']}, {meta['date']}", "",
             f"torch {meta['torch']}; random-weight LLaVA-1.5-7B (fp16), {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} image "
             f"(pad), prompt {PREFIX} + 576 + {SUFFIX} tokens; median of {meta['reps']} after {meta['warmup']} "
             f"warm-up runs, off/full interleaved. Overhead = (full − off)/off; spread = (p90 − p10)/median of off "
             f"(the run-to-run noise the overhead has to be read against).", "",
             "Paired = median of (full_i − off_i) over adjacent runs (order alternated every rep) ÷ median off, with a "
             "bootstrap 95 % interval; A/A = the same for off vs off, i.e. what the harness reads when nothing "
             "differs. Prefill: twice the reps.", "",
             "| method | prefill off (ms) | prefill full (ms) | overhead (medians) | paired [95 % CI] | A/A [95 % CI] | spread | "
             "speedup off → full (kept) | prefill+decode off (ms) | full (ms) | paired [95 % CI] | peak GiB off/full | "
             "debias syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        if "error" in r:
            lines.append(_error_row(m, r))
        elif m == REFERENCE:
            lines.append(_reference_row(m, r["modes"]))
        else:
            lines.append(_method_row(m, r, summary.get(m, {})))
    return lines


def _decode_key(modes: dict) -> str:
    return next(k for k in modes["off"] if k.startswith("prefill_decode"))


def _error_row(m: str, r: dict) -> str:
    last = r.get("log_tail", "").splitlines()[-1] if r.get("log_tail") else ""
    return f"| {m} | not run: {r['error']} — {last} |" + " |" * 11


def _reference_row(m: str, modes: dict) -> str:
    prefill, dk = modes["off"]["prefill_ms"], _decode_key(modes)
    spread = 100 * (prefill["p90"] - prefill["p10"]) / prefill["median"]
    return (f"| {m} (unpruned reference) | {prefill['median']:.2f} | — | — | — | — | {spread:.1f} % | — | "
            f"{modes['off'][dk]['median']:.1f} | — | — | {modes['off']['peak_memory_gib']:.1f} | — |")


def _method_row(m: str, r: dict, s: dict) -> str:
    modes = r["modes"]
    p, d = s.get("prefill_ms", {}), s.get(_decode_key(modes), {})
    return (f"| {m} | {p['off']:.2f} | {p['full']:.2f} | {p['overhead_pct']:+.2f} % | {_paired(p)} | "
            f"{_paired(p, 'control')} | "
            f"{p['spread_pct']:.1f} % | {_speedup(p)} | {d['off']:.1f} | {d['full']:.1f} | {_paired(d)} | "
            f"{modes['off']['peak_memory_gib']:.1f} / {modes['full']['peak_memory_gib']:.1f} | "
            f"{_sync_text(r.get('host_syncs_in_debias_core', {}))} |")


def _paired(cell: dict, which: str = "paired") -> str:
    q = cell.get(which)
    return f"{q['median_pct']:+.2f} % [{q['ci95_pct'][0]:+.2f}, {q['ci95_pct'][1]:+.2f}]" if q else "—"


def _speedup(p: dict) -> str:
    speed = (f"{p['speedup_off']:.2f}× → {p['speedup_full']:.2f}× ({p['speedup_kept_pct']:.1f} %)"
             if "speedup_off" in p else "—")
    if "speedup_kept_paired_pct" in p:
        k = p["speedup_kept_paired_pct"]
        speed += f"; paired {k['median']:.1f} % [{k['ci95'][0]:.1f}, {k['ci95'][1]:.1f}]"
    return speed


def _sync_text(sync: dict) -> str:
    if not all(v.get("checked", True) for v in sync.values()):
        return "not checked (CPU)"
    if all(v.get("ok") for v in sync.values()):
        return "none"
    return "SYNC: " + "; ".join(v.get("error", "") for v in sync.values() if not v.get("ok"))


def _inputs_section(results: dict) -> list[str]:
    """Methods measured on another input than LLaVA-1.5's image prompt (a workload's "input" line)."""
    other = [(m, r["input"]) for m, r in results.items() if isinstance(r, dict) and r.get("input")]
    return ["", *(f"Input of {m}: {text}." for m, text in other)] if other else []


def _in_situ_section(insitu: dict) -> list[str]:
    if not insitu:
        return []
    lines = ["", "## In situ: every debias_core call inside real prefills", "",
             "Every debias / mask_padding / keep_cap / positions call (calls per prefill counts the first two), "
             "and every re-indexing of tracked positions (control: the same indexing of upstream's long ones). "
             "CUDA events recorded before and after each call (GPU-timeline time: its kernels plus any gap "
             "while the GPU waits for the host to launch them) and the call's host time, summed per prefill. "
             "Control = the same wrapper in mode `off`, where each call returns what upstream computes (its "
             "input; positions: upstream's `torch.arange`; PyramidDrop's debias, called with `mean_dim=0`: "
             "upstream's own `torch.mean` over the text queries): what the measurement itself costs, plus any "
             "upstream work that full mode folds into the call. Net = median over prefills of (full share − "
             "control share of the prefill's wall time); modes alternate every rep. Speedup kept = 1 / (1 + net share): the method's own speedup "
             "that debiasing leaves.", "",
             "| method | calls per prefill | full: GPU-timeline µs | full: host µs | control: GPU-timeline µs "
             "| full share, median (max) | control share | **net share** | speedup kept | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [_in_situ_row(m, q) for m, q in insitu.items()]


def _in_situ_row(m: str, q: dict) -> str:
    if "net_pct_median" not in q:  # an older run without the control
        return (f"| {m} | {q['calls_per_prefill']:g} | {q['debias_us_per_prefill_median']:.1f} | — | — | "
                f"{q['overhead_pct_median']:.3f} % ({q['overhead_pct_max']:.3f} %) | — | — | — | {q['n']} |")
    return (f"| {m} | {q['calls_per_prefill']:g} | {q['debias_us_per_prefill_median']:.1f} | "
            f"{q['host_us_per_prefill_median']:.1f} | {q['control_us_per_prefill_median']:.1f} | "
            f"{q['overhead_pct_median']:.3f} % ({q['overhead_pct_max']:.3f} %) | "
            f"{q['control_pct_median']:.3f} % | **{q['net_pct_median']:.3f} %** | "
            f"{100 / (1 + q['net_pct_median'] / 100):.2f} % | {q['n']} |")


def _by_call_section(insitu: dict) -> list[str]:
    by_call = {m: q["by_call_us_median"] for m, q in insitu.items() if "by_call_us_median" in q}
    if not by_call:
        return []
    lines = ["", "Where the net goes: GPU-timeline µs per prefill by call, full / control (off), medians "
             "(`index`: re-indexing positions between stages, tracked in full, upstream's long ones in off).", "",
             "| method | " + " | ".join(CALL_KINDS) + " |", "|---|" + "---|" * len(CALL_KINDS)]
    return lines + [f"| {m} | " + " | ".join(_by_call_cell(per, kind) for kind in CALL_KINDS) + " |"
                    for m, per in by_call.items()]


def _by_call_cell(per: dict, kind: str) -> str:
    full_us = per["full"].get("__getitem__" if kind == "index" else kind)
    off_us = per["off"].get(kind)
    if full_us is None and off_us is None:
        return "—"
    return f"{full_us or 0:.1f} / {off_us or 0:.1f} ({(full_us or 0) - (off_us or 0):+.1f})"


def _isolated_section(summary: dict) -> list[str]:
    iso = {m: s["isolated_overhead_pct"] for m, s in summary.items() if "isolated_overhead_pct" in s}
    if not iso:
        return []
    return ["", "Isolated estimate (debias calls per prefill × the call's measured cost ÷ prefill): " +
            ", ".join(f"{m} {v:.3f} %" for m, v in iso.items())]


def _call_section(call: list | None) -> list[str]:
    if not call:
        return []
    lines = ["", "## The call alone (wall µs per call, launch-bound; debias + keep_cap + topk vs plain topk)", "",
             "| N | dtype | topk | debias + topk | overhead | host syncs |", "|---|---|---|---|---|---|"]
    return lines + [f"| {c['n']} | {c['dtype']} | {c['topk_us']:.1f} | {c['debias_topk_us']:.1f} | "
                    f"{c['overhead_us']:+.1f} | {c['host_syncs']} |" for c in call]
