"""`kvmas bench throughput`: what batching buys, measured in one run (a benchmark, never a timed test).

For each method (single and the latent primitives) and each batch size: aggregate generated tokens/s,
questions/hour at a fixed answer budget, peak memory, and the ratio to batch 1. Beside them, the machine's
compute-bound limit (the fp32 matmul FLOP/s a large torch matmul achieves, divided by 2 × parameters per
token) with every figure as a fraction of it, and the own decode loop against a bare transformers
``generate`` at batch 1 and at the largest batch (same prompts, EOS suppressed: same tokens, speed ratio).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import torch

from kvmas.agents.engine import run_batched
from kvmas.agents.state import LatentState
from kvmas.primitives import parse_method
from kvmas.tasks import Task, format_question


def matmul_flops(size: int = 2048, repeats: int = 3, dtype=torch.float32, device="cpu") -> float:
    """Achieved FLOP/s of a large square matmul (the best of ``repeats``)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _reset_peak() -> None:
    try:  # Linux: "5" resets the peak resident set size of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_method(model, method: str, tasks: list[Task], batch: int, max_new_tokens: int) -> dict:
    """One method at one batch size over ``tasks`` (whole runs, as rows of shared forwards)."""
    prim = parse_method(method, max_new_tokens=max_new_tokens)
    questions = [format_question(t) for t in tasks]
    _reset_peak()
    t0 = time.perf_counter()
    results = prim.batch(questions, model=model, batch_size=batch)
    wall = time.perf_counter() - t0
    gen = sum(r.usage.generated for r in results)
    return {"method": method, "batch": batch, "questions": len(tasks), "wall_s": round(wall, 2),
            "generated": gen, "tokens_per_s": round(gen / wall, 2), "questions_per_hour": round(len(tasks) / wall * 3600),
            "peak_rss_mb": round(_peak_mb()), "answers": [r.answer for r in results]}


def decode_vs_generate(model, prompts: list[str], new_tokens: int, repeats: int = 2) -> dict:
    """kvmas decoding (each prompt its own run, batched by the engine) against one ``generate`` call on the
    left-padded batch; EOS suppressed so both produce ``new_tokens`` per prompt.

    The two alternate ``repeats`` times and each keeps its fastest run: on a shared machine a burst of other
    work lands on one of them, not on a whole variant, and the ratio is of like with like.
    """
    texts = [model.chat_text([{"role": "user", "content": p}]) for p in prompts]
    ids = [model.encode(t) for t in texts]

    def ours(i):
        return LatentState.empty(model).extend(ids[i]).speak(new_tokens, min_new_tokens=new_tokens).token_ids[0]

    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.eos_ids[0]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    kv_times, hf_times = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        kv = run_batched(model, [lambda i=i: ours(i) for i in range(len(ids))])
        kv_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.hf.generate(batch.to(model.device), attention_mask=mask.to(model.device),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=model.eos_ids, pad_token_id=pad)
        hf_times.append(time.perf_counter() - t0)
    kv_s, hf_s = min(kv_times), min(hf_times)
    hf = [row[width:].tolist() for row in out]
    total = len(ids) * new_tokens
    return {"batch": len(ids), "new_tokens": new_tokens, "repeats": len(kv_times),
            "kvmas_s": [round(t, 2) for t in kv_times], "generate_s": [round(t, 2) for t in hf_times],
            "kvmas_tok_s": round(total / kv_s, 2), "generate_tok_s": round(total / hf_s, 2),
            "ratio_kvmas_over_generate": round(hf_s / kv_s, 3),
            "same_tokens_rows": sum(a == b[: len(a)] for a, b in zip(kv, hf))}


def run_throughput(model, tasks: list[Task], methods: list[str], batches: list[int], max_new_tokens: int,
                   min_questions: int = 8, compare_tokens: int = 32,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Every method at every batch size (each on ``max(batch, min_questions)`` questions), the machine's
    compute-bound limit, and the decode-loop comparison; one dict, ready for JSON."""
    params = sum(p.numel() for p in model.hf.parameters())
    flops = matmul_flops(device=model.device, dtype=model.dtype)
    limit = flops / (2 * params)
    rows = []
    for method in methods:
        base = None
        for b in batches:
            if progress:
                progress(f"{method} at batch {b}")
            r = measure_method(model, method, tasks[: max(b, min_questions)], b, max_new_tokens)
            base = base or r
            r["ratio_tokens_per_s_vs_batch1"] = round(r["tokens_per_s"] / max(1e-9, base["tokens_per_s"]), 2)
            r["ratio_questions_per_hour_vs_batch1"] = round(r["questions_per_hour"] / max(1, base["questions_per_hour"]), 2)
            r["fraction_of_compute_limit"] = round(r["tokens_per_s"] / limit, 3)
            n = min(len(base["answers"]), len(r["answers"]))
            r["identical_answers_vs_batch1"] = f"{sum(a == c for a, c in zip(base['answers'][:n], r['answers'][:n]))}/{n}"
            rows.append(r)
    compare = []
    prompts = [format_question(t) for t in tasks]
    for b in sorted({1, max(batches)}):
        if progress:
            progress(f"decode loop vs generate at batch {b}")
        compare.append(decode_vs_generate(model, prompts[:b], compare_tokens))
    return {"model": model.name, "params": params, "matmul_flops": round(flops), "compute_limit_tokens_per_s":
            round(limit, 1), "max_new_tokens": max_new_tokens, "rows": [{k: v for k, v in r.items() if k != "answers"}
                                                                          for r in rows],
            "decode_vs_generate": compare}


def to_markdown(res: dict) -> str:
    lines = [f"# Throughput: {res['model']} ({res['params'] / 1e6:.0f}M parameters), answer budget "
             f"{res['max_new_tokens']} tokens", "",
             f"Compute-bound limit here: {res['matmul_flops'] / 1e9:.1f} GFLOP/s fp32 matmul / (2 × parameters) = "
             f"{res['compute_limit_tokens_per_s']:.1f} tokens/s.", "",
             "| method | batch | questions | wall s | generated | tokens/s | × batch 1 | questions/h | × batch 1 | "
             "of limit | peak RSS MB | answers as batch 1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['batch']} | {r['questions']} | {r['wall_s']} | {r['generated']} | "
                     f"{r['tokens_per_s']} | {r['ratio_tokens_per_s_vs_batch1']}× | {r['questions_per_hour']} | "
                     f"{r['ratio_questions_per_hour_vs_batch1']}× | {100 * r['fraction_of_compute_limit']:.0f}% | "
                     f"{r['peak_rss_mb']} | {r['identical_answers_vs_batch1']} |")
    lines += ["", "| decode loop vs generate | kvmas tok/s | generate tok/s | ratio | same tokens |", "|---|---|---|---|---|"]
    for c in res["decode_vs_generate"]:
        lines.append(f"| batch {c['batch']}, {c['new_tokens']} tokens | {c['kvmas_tok_s']} | {c['generate_tok_s']} | "
                     f"{c['ratio_kvmas_over_generate']}× | {c['same_tokens_rows']}/{c['batch']} rows |")
    return "\n".join(lines) + "\n"
