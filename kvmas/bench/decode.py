"""`kvmas bench decode`: decode speed of kvmas `speak` against a bare transformers `generate`, same prompt.

Both decode greedily from the same chat prompt for the same number of new tokens (EOS suppressed so the
lengths match); runs alternate (kvmas, generate, kvmas, ...) so machine noise hits both alike. Reports
tokens/s of each and their ratio, and checks the two produced the same tokens.
"""

from __future__ import annotations

import time

import torch
from kvmas.agents.state import LatentState


def measure(model, prompt: str = "Write a short story about a robot who learns to paint.", new_tokens: int = 128,
            repeats: int = 2) -> dict:
    text = model.chat_text([{"role": "user", "content": prompt}])
    ids = model.encode(text)
    eos = model.eos_ids
    kv_times, hf_times = [], []
    kv_tokens = hf_tokens = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = LatentState.empty(model).extend(ids)
        sp = state.speak(new_tokens, min_new_tokens=new_tokens)
        kv_times.append(time.perf_counter() - t0)
        kv_tokens = sp.token_ids[0]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.hf.generate(torch.tensor([ids], device=model.device),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=model.tokenizer.pad_token_id or eos[0])
        hf_times.append(time.perf_counter() - t0)
        hf_tokens = out[0, len(ids):].tolist()
    kv, hf = min(kv_times), min(hf_times)
    return {
        "prompt_tokens": len(ids), "new_tokens": new_tokens,
        "kvmas_s": kv, "generate_s": hf,
        "kvmas_tok_s": len(kv_tokens) / kv, "generate_tok_s": len(hf_tokens) / hf,
        "ratio_kvmas_over_generate": (len(kv_tokens) / kv) / (len(hf_tokens) / hf),
        "same_tokens": kv_tokens == hf_tokens[: len(kv_tokens)],
    }
