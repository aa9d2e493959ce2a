"""Summarise bench.sh's raw.jsonl: one row per (family, quant) with decode/prefill tok/s of
mlx-lm (median of its trials), zmlx unpatched and patched (medians of the ABBA runs), the ratios
zmlx/mlx-lm and patched/unpatched, fidelity, the generated-token counts of both sides (which
must be equal: a row where they differ is flagged), load times, peak memory, and decode as a
fraction of the roofline (triad bandwidth / bytes per token). The header gives the thread
settings and the warm-up; notes under the table say where the speedups come from. Prints a
Markdown table and writes summary.json next to raw.jsonl.

With llama.cpp sides in raw.jsonl (`LLAMACPP=1 bash bench.sh`: llamacpp_q4_0, llamacpp_q4_1) or a
zmlx fast-preset run (FAST=1: zmlx_fast_run), a second table puts every engine side by side per
checkpoint: prefill and decode tok/s and the ratio zmlx preset / that engine.

usage: python bench_table.py RAW.jsonl TRIAD.json [THREADS.json]
  THREADS.json defaults to threads.json next to RAW.jsonl; capsules from before it (and rows
  without the new fields) are summarised with those fields shown as not recorded.
"""
import json
import os
import statistics as st
import sys

QUANT_NOTE = ("MLX's CPU kernels are single-threaded scalar; zmlx's fused kernels are multi-threaded "
              "SIMD (AVX2/AVX-512), bit-exact to MLX's per-row order")
FLOAT_NOTE = ("float (bf16) checkpoints: the experts run on MLX's own gather_mm (no fused kernel), so no "
              "kernel speedup is expected there")


def med(xs):
    return st.median(xs) if xs else float("nan")


def spread(xs):
    return (max(xs) - min(xs)) / med(xs) if len(xs) > 1 and med(xs) else 0.0


def uniq(xs):
    out = []
    for x in xs:
        if x is not None and x not in out:
            out.append(x)
    return out


def run_report(run):
    """The validate report inside a zmlx_run line (`zmlx run --json` wraps it in {report, ...})."""
    rep = run.get("report") or {}
    return rep.get("report", rep), (rep.get("ledger_line") or {}) if isinstance(rep.get("ledger_line"), dict) else {}


def zmlx_field(rep, ledger, key):
    for src in (rep, ledger, ledger.get("extra") or {}):
        if src.get(key) is not None:
            return src[key]
    return None


def main():
    raw_path = sys.argv[1]
    raw = [json.loads(l) for l in open(raw_path) if l.strip()]
    tri = json.load(open(sys.argv[2]))
    triad = tri["triad_gbs"]
    th_path = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(raw_path), "threads.json")
    threads = json.load(open(th_path)) if os.path.exists(th_path) else None
    keys = []
    for r in raw:
        k = (r["family"], r["quant"])
        if k not in keys:
            keys.append(k)
    rows, zmlx_threads, zmlx_warm, zmlx_ignore, mlx_warm, mlx_env = [], [], [], [], [], []
    for fam, q in keys:
        rs = [r for r in raw if (r["family"], r["quant"]) == (fam, q)]
        m = [r for r in rs if r["side"] == "mlx_lm"]
        run = next((r for r in rs if r["side"] == "zmlx_run"), {})
        rep, ledger = run_report(run)
        b, p = rep.get("baseline", {}), rep.get("patched", {})
        by = next((r for r in rs if r["side"] == "bytes"), {})
        zl = next((r for r in rs if r["side"] == "zmlx_load"), {})
        pf = next((r for r in rs if r["side"] == "profile"), None)
        zmlx_threads.append(zmlx_field(rep, ledger, "threads"))
        zmlx_warm.append(zmlx_field(rep, ledger, "warmup"))
        zmlx_ignore.append(zmlx_field(rep, ledger, "ignore_eos"))
        mlx_warm += [x.get("warmup") for x in m]
        mlx_env += [json.dumps((x.get("threads") or {}).get("env"), sort_keys=True) for x in m if x.get("threads")]
        m_dec = med([x["generation_tps"] for x in m])
        m_pre = med([x["prompt_tps"] for x in m])
        u_dec, p_dec = b.get("median_decode_tps", float("nan")), p.get("median_decode_tps", float("nan"))
        roof = triad * 1e9 / by["bytes_per_token"] if by else float("nan")
        # Generated-token counts: every mlx-lm trial, every zmlx run (unpatched and patched).
        n_mlx = uniq([x.get("generation_tokens", len(x.get("token_ids", []))) for x in m])
        z_runs = (b.get("runs") or []) + (p.get("runs") or [])
        n_zmlx = uniq([len(x["token_ids"]) for x in z_runs if "token_ids" in x])
        counts_equal = bool(n_mlx) and bool(n_zmlx) and len(n_mlx) == 1 and n_mlx == n_zmlx
        ids_m, ids_z = (m[0]["token_ids"] if m else None), (b["runs"][0]["token_ids"] if b.get("runs") else None)
        if ids_m is None or ids_z is None:
            same = None
        elif counts_equal:
            same = ids_m == ids_z
        else:  # only the common prefix can be compared; the row is flagged anyway
            same = ids_m[: len(ids_z)] == ids_z[: len(ids_m)]
        rows.append({
            "family": fam, "quant": "bf16" if q == "none" else f"{q}-bit", "quantized": q != "none",
            "mlx_lm_decode": m_dec, "mlx_lm_decode_spread": spread([x["generation_tps"] for x in m]),
            "zmlx_decode": u_dec, "patched_decode": p_dec,
            "mlx_lm_prefill": m_pre, "zmlx_prefill": b.get("median_prompt_tps"), "patched_prefill": p.get("median_prompt_tps"),
            "zmlx_vs_mlx_lm": u_dec / m_dec if m_dec else None, "patched_vs_unpatched": p_dec / u_dec if u_dec else None,
            "patched_vs_mlx_lm": p_dec / m_dec if m_dec else None,
            "fidelity": (rep.get("fidelity") or {}).get("verdict", f"exit {run.get('exit')}"),
            "patterns": p.get("patterns"),
            "load_mlx_lm_s": med([x["load_seconds"] for x in m]), "load_zmlx_s": zl.get("load_seconds"),
            "peak_gb_mlx_lm": med([x["peak_memory_gb"] for x in m]), "peak_gb_zmlx": b.get("peak_mem_gb"),
            "peak_gb_patched": p.get("peak_mem_gb"),
            # Process peak RSS (weights included, mapped or not): mlx-lm's timing process vs a
            # one-token `zmlx generate` (the load line).
            "rss_gb_mlx_lm": med([x["peak_rss_bytes"] / 1e9 for x in m if x.get("peak_rss_bytes")]),
            "rss_gb_zmlx": zl["peak_rss_bytes"] / 1e9 if zl.get("peak_rss_bytes") else None,
            "bytes_per_token": by.get("bytes_per_token"), "roofline_tps": roof,
            "patched_roofline_fraction": p_dec / roof if roof else None,
            "profile": pf and {
                "ops_stock": pf["stock"]["ops_total"], "ops_patched": pf["patched"]["ops_total"],
                "ms_stock": pf["stock"]["ms_by_slot"], "ms_patched": pf["patched"]["ms_by_slot"]},
            "gen_tokens_mlx_lm": n_mlx, "gen_tokens_zmlx": n_zmlx, "gen_tokens_equal": counts_equal,
            "tokens_equal_mlx_lm": same,
            "zmlx_threads": zmlx_threads[-1], "zmlx_warmup": zmlx_warm[-1], "zmlx_ignore_eos": zmlx_ignore[-1],
            "mlx_lm_warmup": uniq([x.get("warmup") for x in m]),
        })

    f = lambda x, n=2: "-" if x is None or x != x else f"{x:.{n}f}"
    nr = "not recorded"
    # Header: bandwidth, threads, warm-up, EOS.
    if "triad_gbs_1t" in tri:
        print(f"Roofline bandwidth (triad): {triad} GB/s (1 thread: {tri['triad_gbs_1t']} GB/s, "
              f"{tri.get('threads')} threads: {tri.get('triad_gbs_mt')} GB/s; the roofline takes the higher)")
    else:
        print(f"Roofline bandwidth (triad): {triad} GB/s (1 thread, numpy; capsule predates the multi-threaded triad)")
    zt = uniq(zmlx_threads)
    if threads:
        env = threads.get("env", {})
        blas = ", ".join(f"{k}={env.get(k)}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"))
        print(f"Threads: THREADS={threads.get('threads')} of {threads.get('cpus_available')} CPUs ({threads.get('cpu_model')}); "
              f"zmlx kernels ZMLX_CPU_THREADS={env.get('ZMLX_CPU_THREADS')} "
              f"(report: {', '.join(map(str, zt)) if zt else nr}), ISA {threads.get('zmlx_isa')}; "
              f"both sides {blas}; MLX's own CPU ops: 1 thread, scalar"
              + (f"; load average at start {', '.join(f'{x:.2f}' for x in threads['loadavg_at_start'])}"
                 if threads.get("loadavg_at_start") else ""))
    else:
        print(f"Threads: {nr} (capsule predates threads.json){'; zmlx report: ' + ', '.join(map(str, zt)) if zt else ''}")
    mw, zw, zi = uniq(mlx_warm), uniq(zmlx_warm), uniq(zmlx_ignore)
    print(f"Warm-up generations (5 tokens on \"Hello\") per configuration: zmlx {', '.join(map(str, zw)) if zw else nr + ' (2 before --warmup)'}, "
          f"mlx-lm {', '.join(map(str, mw)) if mw else nr + ' (0 before --warmup)'}; "
          f"EOS ignored: zmlx {', '.join(map(str, zi)) if zi else nr}, mlx-lm True\n")

    print("| family | ckpt | mlx-lm dec | zmlx dec | patched dec | zmlx/mlx-lm | patched/unpatched | prefill mlx-lm / zmlx / patched | fidelity | gen tokens mlx-lm / zmlx | = mlx-lm tokens | load s mlx-lm / zmlx | peak GB mlx-lm / zmlx | peak RSS GB mlx-lm / zmlx | roofline tok/s | patched % roof | why |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    flagged = []
    for r in rows:
        nm, nz = r["gen_tokens_mlx_lm"], r["gen_tokens_zmlx"]
        if r["gen_tokens_equal"]:
            counts = f"{nm[0]} / {nz[0]}"
        else:
            counts = f"**{'/'.join(map(str, nm)) or '-'} / {'/'.join(map(str, nz)) or '-'} (differ)**"
            flagged.append(r)
        why = "[q]" if r["quantized"] else "[f]"
        print(f"| {r['family']} | {r['quant']} | {f(r['mlx_lm_decode'])} | {f(r['zmlx_decode'])} | {f(r['patched_decode'])} | "
              f"{f(r['zmlx_vs_mlx_lm'], 3)} | {f(r['patched_vs_unpatched'], 3)} | {f(r['mlx_lm_prefill'], 1)} / {f(r['zmlx_prefill'], 1)} / {f(r['patched_prefill'], 1)} | "
              f"{r['fidelity']} | {counts} | {'-' if r['tokens_equal_mlx_lm'] is None else r['tokens_equal_mlx_lm']} | "
              f"{f(r['load_mlx_lm_s'])} / {f(r['load_zmlx_s'])} | {f(r['peak_gb_mlx_lm'])} / {f(r['peak_gb_zmlx'])} | "
              f"{f(r['rss_gb_mlx_lm'])} / {f(r['rss_gb_zmlx'])} | "
              f"{f(r['roofline_tps'], 0)} | {f(100 * r['patched_roofline_fraction'] if r['patched_roofline_fraction'] else None, 1)} | {why} |")

    print("\nWhere the speedup comes from:")
    q_rows = [r for r in rows if r["quantized"]]
    f_rows = [r for r in rows if not r["quantized"]]
    if q_rows:
        fast = [f"{r['family']} {f(r['patched_vs_unpatched'], 1)}x" for r in q_rows
                if r["patched_vs_unpatched"] and r["patched_vs_unpatched"] > 1.05]
        print(f"- [q] quantized checkpoints: {QUANT_NOTE}."
              + (f" Patched/unpatched decode: {', '.join(fast)}." if fast else " (No patched speedup above 5% in these rows.)"))
    rng = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}x" if xs else "-"
    if f_rows:
        print(f"- [f] {FLOAT_NOTE}. Patched/unpatched decode: {rng([r['patched_vs_unpatched'] for r in f_rows if r['patched_vs_unpatched']])}.")
    zr = [r["zmlx_vs_mlx_lm"] for r in rows if r["zmlx_vs_mlx_lm"] and r["zmlx_vs_mlx_lm"] == r["zmlx_vs_mlx_lm"]]
    print(f"- zmlx unpatched and mlx-lm run the same MLX CPU ops: zmlx/mlx-lm decode {rng(zr)} is the check.")
    if flagged:
        print("\nFLAGGED: generated-token counts differ between mlx-lm and zmlx (not like with like; decode tok/s"
              " not comparable): " + ", ".join(f"{r['family']} {r['quant']}" for r in flagged)
              + ". Old capsules: zmlx stopped at EOS (before --ignore-eos).")

    print("\nDecode-step profile (MLX ops per step; ms per token by slot, barriered), stock -> patched:")
    for r in rows:
        p = r.get("profile")
        if p:
            slots = ", ".join(f"{k} {p['ms_stock'][k]:.1f}->{p['ms_patched'].get(k, float('nan')):.1f}" for k in p["ms_stock"])
            print(f"- {r['family']} {r['quant']}: ops {p['ops_stock']} -> {p['ops_patched']}; {slots}")
    engines = engine_table(raw, rows, f)
    paired = paired_table(raw, f)
    json.dump({"triad_gbs": triad, "triad": tri, "threads": threads, "rows": rows, "engines": engines,
               "paired": paired},
              open(os.path.join(os.path.dirname(raw_path), "summary.json"), "w"), indent=1)


def engine_table(raw, rows, f):
    """mlx-lm, zmlx (unpatched, preset, fast) and llama.cpp (q4_0, q4_1) per checkpoint."""
    if not any(r["side"].startswith("llamacpp_") or r["side"] == "zmlx_fast_run" for r in raw):
        return []
    out = []
    print("\nEngines side by side (prefill = PROMPT_TOKENS-token prompt; decode = GEN_TOKENS tokens after it; "
          "llama.cpp: llama-bench pp at depth 0, tg at depth PROMPT_TOKENS, random token ids, its own warm-up):\n")
    print("| family | ckpt | engine | weights | prefill tok/s | decode tok/s | zmlx preset / this: prefill | decode | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fam, q = r["family"], ("none" if r["quant"] == "bf16" else r["quant"].split("-")[0])
        rs = [x for x in raw if x["family"] == fam and str(x["quant"]) == q]
        pp, pd = r["patched_prefill"], r["patched_decode"]
        ratio = lambda a, b: f(a / b, 2) + "x" if a and b and a == a and b == b else "-"
        eng = [("mlx-lm", "MLX affine (f32 compute)", r["mlx_lm_prefill"], r["mlx_lm_decode"], "reference"),
               ("zmlx unpatched", "same", r["zmlx_prefill"], r["zmlx_decode"], f"= mlx-lm tokens: {r['tokens_equal_mlx_lm']}"),
               ("zmlx preset", "same", pp, pd, r["fidelity"])]
        fast = next((x for x in rs if x["side"] == "zmlx_fast_run"), None)
        if fast:
            rep, _ = run_report(fast)
            fp = rep.get("patched") or {}
            eng.append(("zmlx fast", "same", fp.get("median_prompt_tps"), fp.get("median_decode_tps"),
                        (rep.get("fidelity") or {}).get("verdict", f"exit {fast.get('exit')}")))
        for x in rs:
            if not x["side"].startswith("llamacpp_"):
                continue
            t = x["type"]
            conv = x.get("conversion") or {}
            ver = conv.get("verify") or {}
            w = ("Q4_1 = the same weights" if t == "q4_1" else "Q4_0 re-quantized" if t == "q4_0" else t)
            if ver:
                w += (f" (bit-exact {ver.get('exact_ok')}/{ver.get('must_be_exact')})" if t == "q4_1"
                      else f" (max abs err {ver.get('max_abs_err_all', float('nan')):.3g})")
            g = x.get("greedy_check")
            chk = (f"greedy: {g['matching_tokens']}/{g['compared_tokens']} = mlx-lm, prompt ids "
                   f"{'equal' if g.get('prompt_ids_equal') else 'differ'}") if g else "-"
            eng.append((f"llama.cpp {t}", w, x["prefill_tps"], x["decode_tps"], chk))
        for name, w, p_, d_, chk in eng:
            print(f"| {fam} | {r['quant']} | {name} | {w} | {f(p_, 1)} | {f(d_, 2)} | {ratio(pp, p_)} | {ratio(pd, d_)} | {chk} |")
            out.append({"family": fam, "quant": r["quant"], "engine": name, "weights": w, "prefill_tps": p_,
                        "decode_tps": d_, "preset_over_prefill": pp / p_ if pp and p_ else None,
                        "preset_over_decode": pd / d_ if pd and d_ else None, "check": chk})
    builds = uniq([x.get("build") for x in raw if x["side"].startswith("llamacpp_")])
    if builds:
        print(f"\nllama.cpp: {', '.join(builds)}; Q4_x x Q8 dot products (activations quantized to 8 bits per "
              "block of 32, int8 SIMD); zmlx/MLX keep activations in f32, bit-exact to MLX.")
    return out


def paired_table(raw, f):
    """paired.py's rounds: zmlx safe/fast and llama.cpp back to back, order rotated per round."""
    ps = [x for x in raw if x["side"] == "paired"]
    if not ps:
        return []
    print("\nPaired (paired.py: the engines back to back, order rotated each round, so this VM's drift hits all "
          "alike): median tok/s over the rounds, and the median of the same-round ratios (min-max):\n")
    print("| family | ckpt | rounds | engine | prefill tok/s | decode tok/s | zmlx safe / this: prefill | decode | "
          "zmlx fast / this: prefill | decode |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = lambda r: "-" if not r else f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
    for x in ps:
        q = "bf16" if str(x["quant"]) == "none" else f"{x['quant']}-bit"
        for e in x["engines"]:
            m = x["medians"][e]
            cells = [rng(x["ratios"].get(f"zmlx_{z}/{e}/{k}")) for z in ("safe", "fast") for k in ("prefill", "decode")]
            print(f"| {x['family']} | {q} | {len(x['rounds'])} | {e.replace('_', ' ', 1)} | {f(m['prefill_tps'], 1)} | "
                  f"{f(m['decode_tps'], 2)} | " + " | ".join(cells) + " |")
    return ps


if __name__ == "__main__":
    main()
