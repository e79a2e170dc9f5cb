"""`jaxpaged-bench summary FILE.json...`: issue 5's targets against what the JSON results show.

Targets (for the report, never asserted by tests): output throughput >= 30x transformers'
static `generate` and >= 20x its `generate_batch`; steady decode within 1.3x of the memory
roofline; no compile after warm-up; warm-up under 2 minutes; paged >= 2x the no-paging
batcher at the largest cap with KV waste under 4%.
"""

import collections
from typing import Any

from jaxpaged.bench_common import format_table, read_json_results

TARGETS = {"vs_hf_generate": 30.0, "vs_hf_generate_batch": 20.0, "step_over_roofline": 1.3,
           "warmup_s": 120.0, "paged_over_reserve": 2.0, "paged_kv_waste": 0.04}


def _check(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def throughput_rows(r: dict[str, Any]) -> list[tuple]:
    name = f"{r['model']} ({r['num_requests']} prompts)"
    rows = [(name, "output tok/s", f"{r['output_tokens_per_s']:,.0f}", "", "")]
    for key in ("vs_hf_generate", "vs_hf_generate_batch"):
        ratio = r.get("ratios", {}).get(key)
        if ratio is not None:
            rows.append((name, f"speed-up {key[3:]}", f"{ratio:.1f}x", f">= {TARGETS[key]:.0f}x",
                         _check(ratio >= TARGETS[key])))
    roof = (r.get("steady_decode") or {}).get("roofline")
    if roof:
        rows.append((name, f"decode step / roofline at batch {roof['num_seqs']}",
                     f"{roof['step_over_roofline']:.2f}", "<= 1.3",
                     _check(roof["step_over_roofline"] <= TARGETS["step_over_roofline"])))
        if "host_over_roofline" in roof:  # the host's own work per step (scheduling, inputs)
            rows.append((name, "  host busy / roofline",
                         f"{roof['host_over_roofline']:.2f}", "", ""))
    rows.append((name, "compiles after warm-up", str(r["compiles_after_warmup"]), "0",
                 _check(r["compiles_after_warmup"] == 0)))
    warmup = r["engine"]["warmup_s"]
    rows.append((name, "warm-up", f"{warmup:.0f} s", "< 120 s",
                 _check(warmup < TARGETS["warmup_s"])))
    return rows


def batching_rows(r: dict[str, Any]) -> list[tuple]:
    name = f"batching {r['model']}"
    if r.get("kv_capacity_tokens"):  # several KV sizes may be summarized side by side
        name += f" ({r['kv_capacity_tokens']:,} KV tokens)"
    if not r["rows"]:
        return [(name, "no runs finished", "", "", "")]
    cap = max(row["cap"] for row in r["rows"])
    ratio = r.get("paged_over_reserve", {}).get(str(cap))
    paged = next((row for row in r["rows"] if row["cap"] == cap
                  and row["scheduler"] == "paged"), None)
    rows = [(name, f"paged / reserve at cap {cap}",
             "-" if ratio is None else f"{ratio:.2f}x", ">= 2x",
             None if ratio is None else _check(ratio >= TARGETS["paged_over_reserve"]))]
    if paged is not None:
        rows.append((name, f"paged KV waste at cap {cap}", f"{paged['kv_waste']:.1%}", "< 4%",
                     _check(paged["kv_waste"] < TARGETS["paged_kv_waste"])))
    rows.append((name, "compiles after warm-up", str(r.get("compiles_after_warmup")), "0",
                 _check(r.get("compiles_after_warmup") == 0)))
    return rows


def summarize(paths: list[str]) -> str:
    """The targets' table over result JSONs. Where two files give a run the same name (the
    same model and workload, say, measured twice), each of their rows names its revision."""
    results = read_json_results(paths)
    cards = {f"{r.get('card')} (jax {r.get('jax_version')}, git {r.get('git_revision')})"
             for r in results}
    row_makers = {"throughput": throughput_rows, "batching": batching_rows}
    per_result = [(r, row_makers[r.get("benchmark")](r)) for r in results
                  if r.get("benchmark") in row_makers]
    names = collections.Counter(rows[0][0] for _, rows in per_result)  # one name a result
    rows = [(f"{row[0]}, git {r.get('git_revision')}" if names[row[0]] > 1 else row[0], *row[1:])
            for r, result_rows in per_result for row in result_rows]
    return "\n".join([f"# jaxpaged-bench summary: {', '.join(sorted(cards))}", "",
                      format_table(["run", "metric", "measured", "target", "met"], rows), ""])
