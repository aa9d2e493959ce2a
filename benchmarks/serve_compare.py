#!/usr/bin/env python3
"""zmlx serve against mlx_lm.server on one checkpoint, one machine, one client script
(benchmarks/serve_bench.py): total tok/s, per-request decode tok/s and time to first token at
each concurrency, and whether greedy token ids are the same on every server (an identity pass
of 8 requests sent at once, so batched on each: ids from zmlx's `return_token_ids`, from
mlx_lm.server's `logprobs`). The measured requests stream with `skip_special_tokens: false`,
so both servers write every token's text as it is made (mlx_lm.server always writes special
tokens; zmlx skips them by default, as OpenAI's and vLLM's servers do).

Servers (started and stopped one after another, never two at once):
  zmlx-<p>          `zmlx serve --patterns <p>` for each p of --presets (default: safe fast;
                    safe is what `zmlx serve` runs by default), --max-concurrency 32
  zmlx-none         `zmlx serve --patterns none` (the stock model; --baseline-levels only):
                    the baseline of the ledger lines
  mlx_lm.server     mlx-lm 0.32.0's server through benchmarks/mlx_lm_server.py, its defaults
                    (decode concurrency 32, prompt concurrency 8), in float32 as zmlx on the
                    CPU (`--peer-dtype native` keeps the checkpoint's dtype)
  mlx_lm.server-native  the same in the checkpoint's dtype (bf16 here), as a user starts it
                    (--peer-native-levels only; its tokens may differ: other arithmetic)

Like with like: the same prompts (each tagged so that no prefix cache answers it), greedy,
exactly --max-tokens tokens per request (EOS ignored on both sides), the same kernel threads
(ZMLX_CPU_THREADS; MLX's own CPU ops are single-threaded on both). Writes a capsule
(repro_capsules/serve-cpu-<UTC>/: results.json with the run's metadata and every text and id,
table.md, one log per server)
and ledger lines (benchmarks/matrix-cpu.jsonl) for each zmlx preset at the baseline levels.

Usage: python3 benchmarks/serve_compare.py [--model DIR] [--concurrency 1,2,4,8,16,32]
         [--requests-per-client 2] [--max-tokens 32] [--presets safe,fast] [--no-ledger]
"""
import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Z = os.path.join(ROOT, "target/release/zmlx")
VENV_PY = os.path.join(ROOT, ".mlx/oracle-venv/bin/python")
PEER = "mlx_lm.server"
# Requests of the token-identity pass, all sent at once (so batched on every server).
IDENTITY_REQUESTS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Server:
    def __init__(self, name, cmd, env, log_path):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.log = open(log_path, "w")
        self.log.write(" ".join(self.cmd) + "\n")
        self.log.flush()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.ready_s = None

    def wait_ready(self, timeout=600):
        """Poll /health until the model is loaded; the model name to send comes from /v1/models
        (mlx_lm.server's listing scans the Hugging Face cache and fails without one: then its
        name for the --model checkpoint, "default_model")."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    r.read()
                break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.5)
        else:
            raise RuntimeError(f"{self.name} not ready after {timeout} s; log: {self.log_path}")
        self.ready_s = time.perf_counter() - self.t0
        try:
            with urllib.request.urlopen(f"{self.base}/v1/models", timeout=30) as r:
                return json.load(r)["data"][0]["id"]
        except Exception:  # noqa: BLE001
            return "default_model"

    def stop(self):
        rss = vm_hwm(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return rss


def identity_pass(base, model, a, via_logprobs):
    """The token ids of IDENTITY_REQUESTS tagged prompts sent at once, non-streamed."""
    prompts = [f"[id.{i}] {serve_bench.PROMPTS[i % len(serve_bench.PROMPTS)]}" for i in range(IDENTITY_REQUESTS)]
    out = {}
    lock = threading.Lock()

    def one(p):
        ids = serve_bench.token_ids(base, model, p, a.max_tokens, via_logprobs)
        with lock:
            out[p] = ids

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_server(name, cmd, env, levels, a, capsule):
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    srv = Server(name, cmd, env, os.path.join(capsule, f"{name}.log"))
    try:
        model = srv.wait_ready()
        # Warm-up outside the measurement (JIT, allocator, the first prefill).
        serve_bench.one_request(srv.base, model, serve_bench.PROMPTS[0], 4, None)
        rows = []
        for c in levels:
            r = serve_bench.level(srv.base, model, c, a.requests_per_client, a.max_tokens, None, unique=True)
            rows.append(r)
            print(
                f"{name:>18} conc {c:>3}: {r['requests']:>3} req, {r['errors']} err, total {r['total_tps']:8.2f} tok/s,"
                f" per-request {r['decode_tps_per_request']:7.2f}, TTFT p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s",
                flush=True,
            )
            if r["errors"]:
                print(f"   first error: {r['first_error']}", flush=True)
        ids = identity_pass(srv.base, model, a, via_logprobs=name.startswith(PEER))
    finally:
        rss = srv.stop()
    return {"name": name, "cmd": srv.cmd, "ready_seconds": srv.ready_s, "peak_rss_bytes": rss, "levels": rows,
            "identity_ids": ids}


def sh(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def same_ids(results, ref_name):
    """Per server: identity-pass requests whose token ids equal the reference server's."""
    ref = results[ref_name]["identity_ids"]
    return {name: (sum(1 for p, ids in res["identity_ids"].items() if ref.get(p) == ids), len(ref))
            for name, res in results.items()}


def ledger_line(a, meta, res, level, base_level, same, capsule):
    """One matrix-ledger line (the schema's key order; src/ledger.rs): patched = the zmlx preset's
    server, baseline = the stock zmlx server, at one concurrency; the peer's numbers in `serve`."""
    peer = meta["peer_levels"].get(level["concurrency"])
    now = datetime.datetime.now(datetime.timezone.utc)
    d = {
        "model_id": a.model,
        "model_family": meta["family"],
        "architecture": "moe",
        "patterns_applied": meta["patterns"][res["name"]],
        "hardware": meta["hardware"],
        "notes": (
            f"serve_compare.py: zmlx serve, {level['concurrency']} concurrent streaming clients x "
            f"{a.requests_per_client} requests, {a.max_tokens} greedy tokens each (EOS ignored), threads {a.threads}; "
            f"baseline = zmlx serve --patterns none; decode tps = total completion tok/s of the level; "
            f"peer {PEER} ({meta['peer_dtype']}) in `serve`"
        ),
        "macos_version": "",
        "mlx_version": meta["mlx_version"],
        "zmlx_version": meta["zmlx_version"],
        "zmlx_commit": meta["commit"][:7],
        "python_version": "",
        "custom_mlx": False,
        "timestamp": now.isoformat(),
        "fidelity": "PASS" if same[0] == same[1] else "FAIL",
        "fidelity_detail": f"{same[0]}/{same[1]} batched requests' token ids identical to the stock zmlx server's",
        "modules_patched": meta["modules_patched"][res["name"]],
        "decode_tps_baseline": round(base_level["total_tps"], 2),
        "decode_tps_patched": round(level["total_tps"], 2),
        "decode_speedup": round(level["total_tps"] / base_level["total_tps"], 4) if base_level["total_tps"] else 0.0,
        "decode_runs_baseline": [round(base_level["total_tps"], 2)],
        "decode_runs_patched": [round(level["total_tps"], 2)],
        "prefill_tps_baseline": 0.0,
        "prefill_tps_patched": 0.0,
        "prefill_change": 0.0,
        "peak_mem_baseline_gb": 0.0,
        "peak_mem_patched_gb": 0.0,
        "max_tokens": a.max_tokens,
        "gen_tokens": a.max_tokens,
        "runs": 1,
        "backend": "cpu",
        "device": meta["device"],
        "libmlx_version": meta["mlx_version"],
        "git_commit": meta["commit"],
        "prompt_source": "benchmarks/serve_bench.py PROMPTS (tagged per request)",
        "capsule": capsule,
        "threads": a.threads,
        "peak_rss_bytes": res["peak_rss_bytes"],
        "batch_size": level["concurrency"],
        "serve": {
            "concurrency": level["concurrency"],
            "requests": level["requests"],
            "errors": level["errors"],
            "decode_tps_per_request": round(level["decode_tps_per_request"], 2),
            "ttft_p50_s": round(level["ttft_p50"], 4),
            "ttft_p99_s": round(level["ttft_p99"], 4),
            "baseline_ttft_p50_s": round(base_level["ttft_p50"], 4),
            "peer": f"{PEER} {meta['mlx_lm_version']} ({meta['peer_dtype']})",
            "peer_total_tps": round(peer["total_tps"], 2) if peer else None,
            "peer_ttft_p50_s": round(peer["ttft_p50"], 4) if peer else None,
            "vs_peer": round(level["total_tps"] / peer["total_tps"], 3) if peer and peer["total_tps"] else None,
        },
    }
    return json.dumps(d, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="target/zmlx-bench/qwen3_moe-4")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--baseline-levels", default="1,8", help="levels the stock zmlx server runs (slow)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--presets", default="safe,fast")
    ap.add_argument("--peer-dtype", default="f32", choices=["f32", "native"])
    ap.add_argument("--peer-native-levels", default="1,8",
                    help="levels mlx_lm.server also runs in the checkpoint's own dtype, as a user starts it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ledger", default="benchmarks/matrix-cpu.jsonl")
    ap.add_argument("--no-ledger", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    base_levels = [int(x) for x in a.baseline_levels.split(",") if x]
    presets = [p for p in a.presets.split(",") if p]
    for f in (Z, VENV_PY):
        if not os.path.exists(f):
            sys.exit(f"{f} missing: cargo build --release; bash scripts/setup.sh --oracle")
    if not os.path.isfile(os.path.join(ROOT, a.model, "config.json")):
        print(f"synthesizing the bench checkpoint at {a.model}", flush=True)
        fam = os.path.basename(a.model.rstrip("/")).rsplit("-", 1)[0]
        subprocess.run([Z, "synth", "--family", fam, "--preset", "bench", "--quantize", "4", "--out", a.model],
                       cwd=ROOT, check=True)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    capsule = f"repro_capsules/serve-cpu-{stamp}"
    os.makedirs(os.path.join(ROOT, capsule))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    env["ZMLX_CPU_THREADS"] = str(a.threads)

    # What each zmlx preset patches (the same selection `serve` makes): from `generate --json`.
    meta = {"patterns": {}, "modules_patched": {}}
    for p in presets + ["none"]:
        out = subprocess.run([Z, "generate", "--model", a.model, "--prompt", "hi", "--max-tokens", "1", "--json",
                              "--patterns", p], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        g = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
        rep = g.get("patch_report", {}).get("patterns", {})
        meta["patterns"][f"zmlx-{p}"] = sorted(rep)
        meta["modules_patched"][f"zmlx-{p}"] = len(g.get("patch_report", {}).get("slots", {}))
        meta["family"] = g["family"]
    cpu = sh(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    mem_gb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    flags = sh(["sh", "-c", "grep -m1 flags /proc/cpuinfo"])
    meta.update({
        "commit": sh(["git", "rev-parse", "HEAD"]),
        "dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        "hardware": f"{cpu} {mem_gb}GB",
        "device": cpu,
        "isa": "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other"),
        "zmlx_version": sh([Z, "--version"]).split()[-1],
        "mlx_version": sh([VENV_PY, "-c", "import mlx.core as mx; print(mx.__version__)"]),
        "mlx_lm_version": sh([VENV_PY, "-c", "import mlx_lm; print(mlx_lm.__version__)"]),
        "peer_dtype": a.peer_dtype,
        "platform": platform.platform(),
        "args": vars(a),
        "started": stamp,
    })

    zserve = [Z, "serve", "--model", a.model, "--port", "{port}", "--max-concurrency", "32", "--max-queue", "256"]
    plan = [(f"zmlx-{p}", zserve + ["--patterns", p], levels) for p in presets]
    plan.append(("zmlx-none", zserve + ["--patterns", "none"], base_levels))
    peer_cmd = [VENV_PY, "benchmarks/mlx_lm_server.py", "--ignore-eos", "--model", a.model, "--port", "{port}",
                "--log-level", "WARNING"]
    if a.peer_dtype == "f32":
        peer_cmd.insert(2, "--f32")
    plan.append((PEER, peer_cmd, levels))
    if a.peer_dtype == "f32":
        native = [int(x) for x in a.peer_native_levels.split(",") if x]
        plan.append((f"{PEER}-native", [c for c in peer_cmd if c != "--f32"], native))

    results = {}
    for name, cmd, lv in plan:
        if lv:
            results[name] = run_server(name, cmd, env, lv, a, os.path.join(ROOT, capsule))
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta["peer_levels"] = {lv["concurrency"]: lv for lv in results[PEER]["levels"]}

    same_peer = same_ids(results, PEER)
    same_base = same_ids(results, "zmlx-none") if "zmlx-none" in results else {}
    lines = ["| server | concurrency | requests | total tok/s | × mlx_lm.server | per-request decode tok/s |"
             " TTFT p50 s | TTFT p99 s | ids = mlx_lm.server's (identity pass) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for lv in res["levels"]:
            peer = meta["peer_levels"].get(lv["concurrency"])
            ratio = f"{lv['total_tps'] / peer['total_tps']:.2f}×" if peer and peer["total_tps"] else "–"
            s = same_peer[name]
            same = f"{s[0]}/{s[1]}"
            lines.append(
                f"| {name} | {lv['concurrency']} | {lv['requests']} ({lv['errors']} err) | {lv['total_tps']:.2f} | {ratio} |"
                f" {lv['decode_tps_per_request']:.2f} | {lv['ttft_p50']:.3f} | {lv['ttft_p99']:.3f} | {same} |"
            )
    table = "\n".join(lines)
    head = (f"# zmlx serve vs {PEER}, {meta['hardware']} ({meta['isa']}), {stamp}\n\n"
            f"Checkpoint {a.model}; {a.requests_per_client} requests per client, {a.max_tokens} greedy tokens each"
            f" (EOS ignored), threads {a.threads}; {PEER} {meta['mlx_lm_version']} in {a.peer_dtype}; commit"
            f" {meta['commit'][:7]}{' (dirty)' if meta['dirty'] else ''}.\n\n")
    rss = "\n".join(f"- {n}: ready after {r['ready_seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
                    for n, r in results.items() if r["peak_rss_bytes"])
    with open(os.path.join(ROOT, capsule, "table.md"), "w") as f:
        f.write(head + table + "\n\n" + rss + "\n")
    with open(os.path.join(ROOT, capsule, "results.json"), "w") as f:
        json.dump({"meta": {k: v for k, v in meta.items() if k != "peer_levels"}, "servers": results}, f, indent=1)
    print("\n" + table + "\n\n" + rss)

    if not a.no_ledger and "zmlx-none" in results:
        base = {lv["concurrency"]: lv for lv in results["zmlx-none"]["levels"]}
        out = []
        for p in presets:
            res = results[f"zmlx-{p}"]
            for lv in res["levels"]:
                if lv["concurrency"] in base:
                    same = same_base[res["name"]]
                    out.append(ledger_line(a, meta, res, lv, base[lv["concurrency"]], same, capsule))
        with open(os.path.join(ROOT, a.ledger), "a") as f:
            f.write("".join(line + "\n" for line in out))
        print(f"{len(out)} ledger lines -> {a.ledger}")
    print(f"capsule: {capsule}")


if __name__ == "__main__":
    main()
