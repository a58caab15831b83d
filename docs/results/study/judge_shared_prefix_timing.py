"""The judge timing in docs/RESULTS.md (issue 15): verdicts for a log's top 3 steps, each prompt scored alone
(before) against one prefill of their common tokens (LogJudge.verdicts). Run from the repository root:
python docs/results/study/judge_shared_prefix_timing.py 6"""
import time, sys
from kvmas.attribution.attributor import LogAttributor
from kvmas.attribution.judge import LogJudge
from kvmas.attribution.log import iter_logs
from kvmas.agents.model import Model

model = Model.load("qwen2.5-coder-0.5b")
logs = [lg for _, lg in zip(range(int(sys.argv[1])), iter_logs("../shared/data/whowhen/algorithm_generated.jsonl"))]
att = LogAttributor()
alone_s = shared_s = 0.0
worst = 0.0
for n, log in enumerate(logs):
    rep = att.attribute(log)
    top = [r.step for r in rep.ranking if r.agent != "human"][:3]
    judge = LogJudge(model)
    def alone():
        return [float(a - b) for a, b in (model.score_continuations(judge._prompt(log, s, judge._ask(log, s)),
                                                                     ["Yes", "No"]) for s in top)]
    def shared():
        return LogJudge(model).verdicts(log, top)
    runs = [("alone", alone), ("shared", shared)] if n % 2 == 0 else [("shared", shared), ("alone", alone)]
    got = {}
    for name, fn in runs:
        t0 = time.perf_counter(); got[name] = fn(); dt = time.perf_counter() - t0
        if name == "alone": alone_s += dt
        else: shared_s += dt
    worst = max(worst, max(abs(a - b) for a, b in zip(got["alone"], got["shared"])))
    print(f"{log.log_id}: steps {top} alone {got['alone']} shared {got['shared']}", flush=True)
print(f"{len(logs)} logs: alone {alone_s:.1f} s, shared {shared_s:.1f} s, ratio {shared_s / alone_s:.2f}, "
      f"max |diff| {worst:.2e}")
