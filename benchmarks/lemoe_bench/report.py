"""The bench's markdown report."""

from __future__ import annotations

from .inputs import METHODS


# ----------------------------------------------------------------------- reporting


def _f(v, fmt="{:.3g}") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v != v:
        return "n/a"
    return fmt.format(v)


def _mb(v) -> str:
    return "n/a" if v is None else f"{v / 2 ** 20:.1f}"


def markdown(res: dict) -> str:
    """The benchmark's results as markdown tables."""
    s = res["settings"]
    lines = [f"# LEMoE performance benchmark", "",
             f"Model: `{s['model']}` ({s['model_source']}); edits: {s['data']}; "
             f"torch threads: {s['threads']}; {s['machine']['cpu_count']} CPUs, "
             f"torch {s['machine']['torch']}, transformers {s['machine']['transformers']}.",
             f"Command: `{' '.join(s['command']) if s.get('command') else 'n/a'}`", "",
             "## Editing cost", "",
             f"Each method's time is its fastest of {s.get('rounds', 1)} round(s); a later "
             "round times every method's editing again (same edits, fresh model) after all "
             "methods of the round before. Memory and accuracy are from the first round.", "",
             "| method | mode | edits timed | s / edit | edits / s | time / LEMoE's | "
             "seconds per round | peak RSS (MB) | RSS above model (MB) | rewrite acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = res["methods"].get(m, {})
        if r.get("status") != "ok":
            lines.append(f"| {m} | {r.get('status', 'n/a')}: {r.get('error', '')} "
                         "| | | | | | | | |")
            continue
        mode = f"{r['mode']} ({r['call_size']}/call)"
        rounds = ", ".join(_f(v) for v in r.get("rounds", [r["seconds"]]))
        lines.append(f"| {m} | {mode} | {r['edits']} | {_f(r['seconds_per_edit'])} | "
                     f"{_f(r['edits_per_second'])} | {_f(r.get('time_ratio_to_lemoe'))} | "
                     f"{rounds} | {_mb(r['peak_rss_bytes'])} | "
                     f"{_mb(r['rss_above_base_bytes'])} | {_f(r['rewrite_acc'], '{:.3f}')} |")
    le = res["methods"].get("LEMoE", {})
    if le.get("status") == "ok":
        inst = le["installments"]
        lines += ["", "## LEMoE cost along the stream", "",
                  f"Protocol mode: the T edits from a freshly loaded model, in calls of "
                  f"{le['call_size']}, "
                  f"{'planned' if le['order_planning'] else 'cut in order'} "
                  f"into experts of {le['edits_per_expert']} edits "
                  f"(a shorter T: mean over the T-edit blocks of the longest stream, each from "
                  f"a fresh model; the fastest round of all its blocks together). "
                  f"Installments: calls of {inst['call_size']} edits (one expert each) one "
                  f"after the other; marginal time per edit over the {s['window']} edits "
                  "before T (each window's fastest round).", "",
                  "| T | protocol: experts | protocol: s / edit | protocol: training steps "
                  "/ edit | protocol: ms / step | installments: experts | "
                  "installments: marginal s / edit |", "|---|---|---|---|---|---|---|"]
        proto = {str(p["T"]): p for p in le["protocol"]}
        for t in sorted(proto, key=int):
            p = proto[t]
            per_step = p.get("seconds_per_step")
            lines.append(f"| {t} | {p['experts']} | {_f(p['seconds_per_edit'])} "
                         f"| {_f(p.get('steps_per_edit'))} "
                         f"| {_f(None if per_step is None else 1000 * per_step)} "
                         f"| {-(-int(t) // inst['call_size'])} | "
                         f"{_f(inst['seconds_per_edit_at'].get(t))} |")
        ends = [proto[min(proto, key=int)], proto[max(proto, key=int)]]
        if len(proto) > 1 and all(p.get("seconds_per_step") for p in ends):
            ratio = [ends[1][k] / ends[0][k]
                     for k in ("seconds_per_edit", "steps_per_edit", "seconds_per_step")]
            lines += ["", f"Protocol growth T={ends[1]['T']} / T={ends[0]['T']}: time per "
                      f"edit {_f(ratio[0])} = training steps per edit {_f(ratio[1])} x time "
                      f"per step {_f(ratio[2])} (the steps are the method's: how soon the "
                      "batches converge; the time per step is the implementation's)."]
        lines += ["", "## Serving cost (edited / unedited, interleaved in one process, best of "
                  f"{s['repeats']})", "",
                  f"Forward: {s['latency_prompts']} prompts one at a time (half edited, half "
                  f"not), and as one padded batch; generation: greedy, {s['gen_tokens']} new "
                  "tokens, batch 1.", "",
                  "| experts | forward ms (base) | forward ms | ratio | batch fwd ratio | "
                  "gen tok/s (base) | gen tok/s | gen throughput ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in inst["serving"]:
            lines.append(f"| {v['experts']} | {_f(v['forward_ms_base'])} | "
                         f"{_f(v['forward_ms'])} | {_f(v['forward_ratio'])} | "
                         f"{_f(v['batch_forward_ratio'])} | {_f(v['gen_tokens_per_s_base'])} | "
                         f"{_f(v['gen_tokens_per_s'])} | {_f(v['gen_ratio'])} |")
        lines += ["", "## Memory after the installments", "",
                  f"{inst['experts']} experts; the stacked routing table adds "
                  f"{_mb(inst['routing_table_bytes'])} MB (included in the live tensors). "
                  "Baseline: the loaded model after the runtime has run this stream once "
                  "(edits made and taken out: the runtime's buffer pools are warm); the cold "
                  "baseline is the loaded model after one warm-up call.", "",
                  "| interval | experts' bytes (MB) | RSS growth (MB) | ratio | "
                  "anonymous RSS growth (MB) | ratio | live tensor growth (MB) | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, eb, rss, anon, ten in (
                ("loaded model (warm runtime) -> end of stream", inst["expert_bytes"],
                 inst["rss_above_base_bytes"], inst.get("anon_above_base_bytes"),
                 inst["tensor_bytes_above_base"]),
                ("loaded model (cold baseline) -> end of stream", inst["expert_bytes"],
                 inst.get("rss_above_cold_base_bytes"), inst.get("anon_above_cold_base_bytes"),
                 inst.get("tensor_bytes_above_cold_base")),
                ("end of first call -> end of stream", inst["expert_bytes_after_first"],
                 inst["rss_growth_after_first_bytes"], inst.get("anon_growth_after_first_bytes"),
                 inst["tensor_growth_after_first_bytes"])):
            ratio = (lambda v: _f(v / eb if eb and v is not None else None))
            lines.append(f"| {label} | {_mb(eb)} | {_mb(rss)} | {ratio(rss)} | {_mb(anon)} | "
                         f"{ratio(anon)} | {_mb(ten)} | {ratio(ten)} |")
        if inst.get("rehearsal_retained_rss_bytes") is not None:
            lines += ["", f"The rehearsal of the stream, its adaptor taken out, left "
                      f"{_mb(inst['rehearsal_retained_rss_bytes'])} MB of RSS "
                      f"({_mb(inst.get('rehearsal_retained_anon_bytes'))} MB anonymous) and "
                      f"{_mb(inst['rehearsal_retained_tensor_bytes'])} MB of live tensors "
                      "behind."]
    tr = res.get("training", {})
    lines += ["", "## Cached-activation vs full-forward training", ""]
    if tr.get("status") == "ok":
        lines += ["| edits | experts | steps | full (s) | cached (s) | speed-up | "
                  "max rel. loss diff | max weight diff (max weight) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {tr['edits']} | {tr['experts']} | {tr['steps']} | "
                  f"{_f(tr['full_seconds'])} | {_f(tr['cached_seconds'])} | "
                  f"{_f(tr['speedup'])} | {_f(tr['max_rel_loss_diff'])} | "
                  f"{_f(tr['max_abs_weight_diff'])} ({_f(tr['max_abs_weight'])}) |"]
    else:
        lines.append(f"{tr.get('status', 'n/a')}: {tr.get('error', '')}")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['description']} | {_f(t['value'])} | {met} |")
    lines.append("")
    return "\n".join(lines)


