#!/usr/bin/env python3
"""Throughput and latency of an OpenAI-compatible server against concurrency: total tok/s,
per-request decode tok/s, time to first token p50/p99. Point it at `zmlx serve` and at
`mlx_lm.server` on the same checkpoint (same machine, same script) to compare them.

Standard library only. Every request streams (so the client sees the first token), asks for
greedy decoding of exactly --max-tokens tokens (`ignore_eos`, honoured by zmlx serve; other
servers may stop at EOS — the token counts come from the server's usage, so rates stay honest),
and counts tokens from the final usage chunk.

Usage:
  python3 benchmarks/serve_bench.py --base-url http://127.0.0.1:8080 \
      [--concurrency 1,2,4,8,16,32] [--requests-per-client 4] [--max-tokens 64] [--json out.json]
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "Explain the key differences between TCP and UDP.",
    "Once upon a time, in a kitchen full of bread,",
    "Write a short poem about the sea.",
    "List five prime numbers and explain why each is prime.",
]


def completion_request(base, body, api_key):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(), headers)


def one_request(base, model, prompt, max_tokens, api_key):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        # Every token's text goes out as it is made, special tokens included, as mlx_lm.server
        # writes them; zmlx skips them by default and would stream a special-token run late.
        "skip_special_tokens": False,
    }
    req = completion_request(base, body, api_key)
    start = time.perf_counter()
    first = None
    tokens = None
    chunks = 0
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            v = json.loads(data)
            if v.get("usage"):
                tokens = v["usage"]["completion_tokens"]
            for c in v.get("choices", []):
                # The first token is out when the first choice chunk is, text or not: a token
                # may decode to nothing yet (a partial UTF-8 sequence, a skipped special token).
                if first is None:
                    first = time.perf_counter()
                if c.get("text"):
                    text.append(c["text"])
                    chunks += 1
    end = time.perf_counter()
    if tokens is None:
        tokens = chunks
    ttft = (first or end) - start
    # Tokens after the first, over the time after the first.
    decode = (tokens - 1) / (end - first) if first and end > first and tokens > 1 else 0.0
    return {
        "prompt": prompt,
        "text": "".join(text),
        "tokens": tokens,
        "ttft": ttft,
        "decode_tps": decode,
        "seconds": end - start,
    }


def token_ids(base, model, prompt, max_tokens, via_logprobs, api_key=None):
    """The greedy completion's token ids, non-streamed: from `token_ids` (zmlx serve, vLLM's
    `return_token_ids`) or, with `via_logprobs`, from mlx_lm.server's `logprobs.content[].id`
    (its `logprobs` is a boolean; OpenAI's legacy completions field, as zmlx reads it, a count)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    body["logprobs" if via_logprobs else "return_token_ids"] = True
    req = completion_request(base, body, api_key)
    with urllib.request.urlopen(req, timeout=600) as r:
        c = json.load(r)["choices"][0]
    if "token_ids" in c:
        return c["token_ids"]
    return [e["id"] for e in c["logprobs"]["content"]]


def prompt_for(concurrency, client, k, unique):
    """The k-th prompt of a client. With `unique`, a tag makes every request's prompt distinct
    from its first tokens on, so no server answers from a prompt (prefix) cache."""
    base = PROMPTS[(client + k) % len(PROMPTS)]
    return f"[{concurrency}.{client}.{k}] {base}" if unique else base


def level(base, model, concurrency, per_client, max_tokens, api_key, unique=False):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for k in range(per_client):
            try:
                prompt = prompt_for(concurrency, i, k, unique)
                r = one_request(base, model, prompt, max_tokens, api_key)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(str(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)

    def pct(p):
        return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else 0.0

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "total_tps": sum(r["tokens"] for r in results) / wall if wall > 0 else 0.0,
        "decode_tps_per_request": statistics.mean(r["decode_tps"] for r in results) if results else 0.0,
        "ttft_p50": pct(0.50),
        "ttft_p99": pct(0.99),
        "wall_seconds": wall,
        "texts": {r["prompt"]: r["text"] for r in results},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--unique-prompts", action="store_true", help="tag every prompt so no prefix cache can answer it")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    base = a.base_url.rstrip("/")
    model = a.model
    if model is None:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
    # Warm-up: one short request (JIT, allocator) outside the measurement.
    one_request(base, model, PROMPTS[0], 4, a.api_key)
    rows = []
    print(f"{'conc':>4} {'reqs':>5} {'err':>4} {'total tok/s':>12} {'req decode tok/s':>17} {'TTFT p50 s':>11} {'TTFT p99 s':>11}")
    for c in [int(x) for x in a.concurrency.split(",")]:
        r = level(base, model, c, a.requests_per_client, a.max_tokens, a.api_key, a.unique_prompts)
        rows.append(r)
        print(
            f"{c:>4} {r['requests']:>5} {r['errors']:>4} {r['total_tps']:>12.2f} {r['decode_tps_per_request']:>17.2f}"
            f" {r['ttft_p50']:>11.3f} {r['ttft_p99']:>11.3f}",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"base_url": base, "model": model, "max_tokens": a.max_tokens, "levels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
