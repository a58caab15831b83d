"""The efficiency benchmark's pieces on a tiny model (the worker-process driver is exercised by the CLI)."""

from kvmas.bench.efficiency import merge_policy_error, run_method, summarize, to_markdown
from kvmas.tasks import load_tasks
from kvmas.testing import tiny_model


def test_run_method_and_summary():
    model = tiny_model("qwen")
    tasks = load_tasks("synthetic", n=2, seed=0)
    res = [run_method(m, tasks, model, seed=0, max_new_tokens=4, latent_steps=1)
           for m in ("single", "latent:vote", "text:vote")]
    for r in res:
        assert len(r.items) == 2 and all(i.generated <= 4 * 4 for i in r.items)
    lat, txt = res[1], res[2]
    assert lat.total("latent") == 2 * 3  # 3 solver rows x 1 latent step per question
    assert txt.total("latent") == 0
    s = summarize(res, data=None, n=2, model="tiny", seed=0, max_new_tokens=4, latent_steps=1)
    assert set(s["methods"]) == {"single", "latent:vote", "text:vote"}
    assert "text/latent vote (wall)" in s["ratios"]
    md = to_markdown(s)
    assert "| latent:vote |" in md and "Sample answers" in md


def test_merge_policy_error_is_measured():
    err = merge_policy_error(tiny_model("llama"), "Pick a number.", n=3, latent_steps=1)
    for policy in ("shared", "rerotate"):
        assert err[policy]["max_abs_dlogprob"] > 0  # approximate policies really differ from exact re-prefill
        assert err[policy]["kl_exact_to_policy"] >= -1e-6


def test_latent_steps_scores_gold_solution_under_each_setting():
    from kvmas.bench.latent_steps import gold_solution, run

    tasks = load_tasks("gsm8k-sample", n=1)
    assert "<<" not in gold_solution(tasks[0]) and "\\boxed{" in gold_solution(tasks[0])
    res = run(tiny_model("llama"), tasks, methods=("latent:review",), steps=(0, 2))
    assert set(res) == {"single", "latent:review@0", "latent:review@2"}
    assert res["latent:review@0"]["mean"] != res["latent:review@2"]["mean"]  # latent steps change the context


def test_latent_steps_compares_handoffs():
    from kvmas.bench.latent_steps import run

    tasks = load_tasks("gsm8k-sample", n=1)
    res = run(tiny_model("llama"), tasks, methods=("latent:plan",), steps=(2,), handoffs=("thoughts", "full"))
    assert set(res) == {"single", "latent:plan@2/thoughts", "latent:plan@2/full"}
    # dropping the role prompts changes what the integrator reads
    assert res["latent:plan@2/thoughts"]["mean"] != res["latent:plan@2/full"]["mean"]
