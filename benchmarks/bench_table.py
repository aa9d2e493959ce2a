"""Summarise bench.sh's raw.jsonl: one row per (family, quant) with decode/prefill tok/s of
mlx-lm (median of its trials), zmlx unpatched and patched (medians of the ABBA runs), the ratios
zmlx/mlx-lm and patched/unpatched, fidelity, load times, peak memory, and decode as a fraction
of the roofline (triad bandwidth / bytes per token). Prints a Markdown table and writes
summary.json next to raw.jsonl.

usage: python bench_table.py RAW.jsonl TRIAD.json
"""
import json
import os
import statistics as st
import sys


def med(xs):
    return st.median(xs) if xs else float("nan")


def spread(xs):
    return (max(xs) - min(xs)) / med(xs) if len(xs) > 1 and med(xs) else 0.0


def main():
    raw = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    triad = json.load(open(sys.argv[2]))["triad_gbs"]
    keys = []
    for r in raw:
        k = (r["family"], r["quant"])
        if k not in keys:
            keys.append(k)
    rows = []
    for fam, q in keys:
        rs = [r for r in raw if (r["family"], r["quant"]) == (fam, q)]
        m = [r for r in rs if r["side"] == "mlx_lm"]
        run = next((r for r in rs if r["side"] == "zmlx_run"), {})
        rep = run.get("report") or {}
        rep = rep.get("report", rep)
        b, p = rep.get("baseline", {}), rep.get("patched", {})
        by = next((r for r in rs if r["side"] == "bytes"), {})
        zl = next((r for r in rs if r["side"] == "zmlx_load"), {})
        pf = next((r for r in rs if r["side"] == "profile"), None)
        m_dec = med([x["generation_tps"] for x in m])
        m_pre = med([x["prompt_tps"] for x in m])
        u_dec, p_dec = b.get("median_decode_tps", float("nan")), p.get("median_decode_tps", float("nan"))
        roof = triad * 1e9 / by["bytes_per_token"] if by else float("nan")
        rows.append({
            "family": fam, "quant": "bf16" if q == "none" else f"{q}-bit",
            "mlx_lm_decode": m_dec, "mlx_lm_decode_spread": spread([x["generation_tps"] for x in m]),
            "zmlx_decode": u_dec, "patched_decode": p_dec,
            "mlx_lm_prefill": m_pre, "zmlx_prefill": b.get("median_prompt_tps"), "patched_prefill": p.get("median_prompt_tps"),
            "zmlx_vs_mlx_lm": u_dec / m_dec if m_dec else None, "patched_vs_unpatched": p_dec / u_dec if u_dec else None,
            "fidelity": (rep.get("fidelity") or {}).get("verdict", f"exit {run.get('exit')}"),
            "patterns": p.get("patterns"),
            "load_mlx_lm_s": med([x["load_seconds"] for x in m]), "load_zmlx_s": zl.get("load_seconds"),
            "peak_gb_mlx_lm": med([x["peak_memory_gb"] for x in m]), "peak_gb_zmlx": b.get("peak_mem_gb"),
            "peak_gb_patched": p.get("peak_mem_gb"),
            "bytes_per_token": by.get("bytes_per_token"), "roofline_tps": roof,
            "patched_roofline_fraction": p_dec / roof if roof else None,
            "profile": pf and {
                "ops_stock": pf["stock"]["ops_total"], "ops_patched": pf["patched"]["ops_total"],
                "ms_stock": pf["stock"]["ms_by_slot"], "ms_patched": pf["patched"]["ms_by_slot"]},
            "tokens_equal_mlx_lm": bool(m) and bool(b.get("runs")) and (lambda x, y: x[: len(y)] == y[: len(x)])(m[0]["token_ids"], b["runs"][0]["token_ids"]),  # over the common length: zmlx run stops at EOS, mlx-lm here does not
        })
    f = lambda x, n=2: "-" if x is None or x != x else f"{x:.{n}f}"
    print(f"Roofline bandwidth (triad): {triad} GB/s\n")
    print("| family | ckpt | mlx-lm dec | zmlx dec | patched dec | zmlx/mlx-lm | patched/unpatched | prefill mlx-lm / zmlx / patched | fidelity | = mlx-lm tokens | load s mlx-lm / zmlx | peak GB mlx-lm / zmlx | roofline tok/s | patched % roof |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['quant']} | {f(r['mlx_lm_decode'])} | {f(r['zmlx_decode'])} | {f(r['patched_decode'])} | "
              f"{f(r['zmlx_vs_mlx_lm'], 3)} | {f(r['patched_vs_unpatched'], 3)} | {f(r['mlx_lm_prefill'], 1)} / {f(r['zmlx_prefill'], 1)} / {f(r['patched_prefill'], 1)} | "
              f"{r['fidelity']} | {r['tokens_equal_mlx_lm']} | {f(r['load_mlx_lm_s'])} / {f(r['load_zmlx_s'])} | {f(r['peak_gb_mlx_lm'])} / {f(r['peak_gb_zmlx'])} | "
              f"{f(r['roofline_tps'], 0)} | {f(100 * r['patched_roofline_fraction'] if r['patched_roofline_fraction'] else None, 1)} |")
    print("\nDecode-step profile (MLX ops per step; ms per token by slot, barriered), stock -> patched:")
    for r in rows:
        p = r.get("profile")
        if p:
            slots = ", ".join(f"{k} {p['ms_stock'][k]:.1f}->{p['ms_patched'].get(k, float('nan')):.1f}" for k in p["ms_stock"])
            print(f"- {r['family']} {r['quant']}: ops {p['ops_stock']} -> {p['ops_patched']}; {slots}")
    json.dump({"triad_gbs": triad, "rows": rows}, open(os.path.join(os.path.dirname(sys.argv[1]), "summary.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
