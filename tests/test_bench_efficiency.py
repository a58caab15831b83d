"""The efficiency benchmark on the harness, on tiny models (one test runs the real worker process)."""

from kvmas.bench.efficiency import merge_policy_error, ratios, run_efficiency
from kvmas.bench.harness import BenchConfig, run_bench
from kvmas.bench.report import to_markdown
from kvmas.tasks import load_tasks
from kvmas.testing import tiny_model


def test_methods_ratios_and_report(tmp_path):
    model = tiny_model("qwen")
    tasks = load_tasks("synthetic", n=2, seed=0)
    s = run_bench(tasks, "single,latent:vote,text:vote", model, tmp_path, BenchConfig(max_new_tokens=4, latent_steps=1),
                  extra=lambda summary: {"ratios": ratios(summary)})
    rows = s["methods"]
    for r in rows.values():
        assert r["n"] == 2 and r["tokens_total"]["generated"] <= 2 * 4 * 4
    assert rows["latent:vote"]["tokens_total"]["latent"] == 2 * 3  # 3 solver rows x 1 latent step per question
    assert rows["text:vote"]["tokens_total"]["latent"] == 0
    assert "text/latent vote (wall)" in s["efficiency"]["ratios"]
    gen = s["efficiency"]["ratios"]["text/latent vote (generated)"]
    assert gen == rows["text:vote"]["tokens_total"]["generated"] / rows["latent:vote"]["tokens_total"]["generated"]
    md = to_markdown(s)
    assert "| latent:vote |" in md and "Sample answers" in md and "Ratios measured in this run" in md


def test_isolated_workers_give_the_in_process_items_and_their_peak_memory(tmp_path):
    from kvmas.testing import save_tiny_model

    d = save_tiny_model(tmp_path / "tiny", "qwen")
    tasks = load_tasks("synthetic", n=2, seed=0)
    s = run_efficiency(tasks=tasks, methods=["single", "latent:vote"], model=str(d), seed=0, max_new_tokens=4,
                       latent_steps=1, out_dir=tmp_path / "eff", merge_error=1)
    alone = run_bench(tasks, "single,latent:vote", str(d), tmp_path / "inproc", BenchConfig(max_new_tokens=4,
                                                                                            latent_steps=1))
    for m in ("single", "latent:vote"):
        assert s["methods"][m]["peak_rss_mb"] > 0
        for k in ("correct", "tokens_total", "answer_tokens_mean", "samples"):
            assert s["methods"][m][k] == alone["methods"][m][k], (m, k)
    assert len(s["efficiency"]["merge_error"]) == 1
    assert len(list((tmp_path / "eff" / "traces").glob("*.json"))) == 4


def test_trace_names_stay_inside_their_folder():
    from kvmas.bench.harness import trace_name

    name = trace_name("latent:vote", 3, "../../../etc/passwd")
    assert "/" not in name and ".." not in name and name.endswith(".json") and not name.startswith(".")
    ids = ["gsm8k/1", "gsm8k_1", "gsm8k?1", "../x", "..\\x", "", "." * 300]
    assert len({trace_name("single", 0, i) for i in ids}) == len(ids)  # distinct items never share a file


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


def test_throughput_bench_reports_every_figure_and_matches_generate():
    from kvmas.bench.throughput import run_throughput, to_markdown

    model = tiny_model("llama")
    tasks = load_tasks("synthetic", n=4, seed=0)
    res = run_throughput(model, tasks, ["single", "latent:vote"], [1, 2], max_new_tokens=4, min_questions=2,
                         compare_tokens=5)
    assert [(r["method"], r["batch"]) for r in res["rows"]] == [("single", 1), ("single", 2), ("latent:vote", 1),
                                                                ("latent:vote", 2)]
    for r in res["rows"]:
        assert r["identical_answers_vs_batch1"] == "2/2" and r["questions_per_hour"] > 0 and r["peak_rss_mb"] > 0
    assert res["compute_limit_tokens_per_s"] > 0
    assert [c["same_tokens_rows"] for c in res["decode_vs_generate"]] == [1, 2]
    assert "of limit" in to_markdown(res)
