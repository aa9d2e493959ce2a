"""transformers' apply_chat_template as the oracle for zmlx's chat templates.

stdin: a JSON list of cases {"model": DIR, "messages": [{role, content}], "add_generation_prompt": bool}.
stdout: a JSON list, one per case: {"text": ..., "ids": [...]} or {"error": "..."} when the template
raises (raise_exception) or fails; a broken checkpoint fails the whole run.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

cases = json.load(sys.stdin)
tokenizers = {}
out = []
for case in cases:
    model = case["model"]
    if model not in tokenizers:
        tokenizers[model] = AutoTokenizer.from_pretrained(model)
    tok = tokenizers[model]
    kw = dict(add_generation_prompt=case["add_generation_prompt"])
    try:
        text = tok.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kw)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out.append({"text": text, "ids": [int(i) for i in ids]})
    except Exception as e:  # the template's own error (TemplateError) or a Jinja failure
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps({"transformers_version": transformers.__version__, "results": out}))
