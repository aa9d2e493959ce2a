"""The official `openai` client against `zmlx serve`: a completion, a streamed completion, a chat
and a streamed chat (greedy). Prints one JSON object with the token ids and texts; token ids come
from the server's `return_token_ids` extension (vLLM's name), passed with `extra_body`.

Usage: openai_client.py --base-url http://127.0.0.1:PORT/v1 --prompt TEXT --max-tokens N
"""
import argparse
import json

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    extra = {"return_token_ids": True}

    c = client.completions.create(model=model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=0, extra_body=extra)
    choice = c.choices[0]
    assert c.usage.completion_tokens == len(choice.token_ids), c

    stream_ids, stream_text = [], ""
    for chunk in client.completions.create(
        model=model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=0, stream=True, extra_body=extra
    ):
        for ch in chunk.choices:
            stream_text += ch.text or ""
            stream_ids += getattr(ch, "token_ids", None) or []

    messages = [{"role": "user", "content": a.prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=a.max_tokens, temperature=0, extra_body=extra)
    chat_ids = chat.choices[0].token_ids
    chat_stream_ids, chat_stream_text, usage = [], "", None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=a.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            chat_stream_text += ch.delta.content or ""
            chat_stream_ids += getattr(ch, "token_ids", None) or []
    assert usage is not None and usage.completion_tokens == len(chat_stream_ids), usage

    print(
        json.dumps(
            {
                "completion_token_ids": choice.token_ids,
                "completion_text": choice.text,
                "stream_token_ids": stream_ids,
                "stream_text": stream_text,
                "chat_token_ids": chat_ids,
                "chat_text": chat.choices[0].message.content,
                "chat_stream_token_ids": chat_stream_ids,
                "chat_stream_text": chat_stream_text,
                "chat_usage_completion_tokens": chat.usage.completion_tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
