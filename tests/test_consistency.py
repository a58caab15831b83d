"""Self-consistency: n samples of the single agent's prompt on one prefilled question, plurality of answers."""

import pytest

from kvmas.bench.harness import parse_methods
from kvmas.primitives import SelfConsistency, Single, parse_method
from kvmas.primitives.run import TEAM_SYSTEM
from kvmas.testing import tiny_model

Q = "Tom has 5 apples and eats 2. How many are left?"


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen", seed=1)


def rigged(keys):
    it = iter(keys)
    return lambda text: next(it)


@pytest.mark.parametrize("keys,pick", [(["3", "7", "7", "3", "7"], 1),  # plurality: 7 (three of five)
                                       (["3", "7", "7", "3", None], 0),  # a tie goes to the earliest sample
                                       ([None, None, "9", None, None], 2),  # the only readable answer
                                       ([None] * 5, 0)])  # nothing readable: the first sample
def test_the_most_common_answer_wins(model, keys, pick):
    res = SelfConsistency(n=5, max_new_tokens=6, answer_key=rigged(keys))(Q, model=model)
    samples = next(s for s in res.trace.steps if s.action == "speak").text_out.split("\n---\n")
    assert res.meta["vote_candidates"] == keys and res.meta["consistency_pick"] == pick
    assert res.answer == samples[pick]


def test_samples_share_one_prefill_and_differ(model):
    res = SelfConsistency(n=4, max_new_tokens=8, temperature=1.0)(Q, model=model)
    read, speak = res.trace.steps
    assert read.usage.prefilled == len(model.encode(model.chat_text([{"role": "system", "content": TEAM_SYSTEM},
                                                                     {"role": "user", "content": Q}])))
    assert speak.rows == 4 and len(set(speak.text_out.split("\n---\n"))) > 1  # sampled, not copies
    # the same seed gives the same samples; greedy samples are all Single's answer
    again = SelfConsistency(n=4, max_new_tokens=8, temperature=1.0)(Q, model=model)
    assert again.trace.steps[1].text_out == speak.text_out
    greedy = SelfConsistency(n=2, max_new_tokens=8, temperature=0.0)(Q, model=model)
    assert greedy.answer == Single(max_new_tokens=8)(Q, model=model).answer


def test_it_is_a_bench_method(model):
    assert [m.name for m in parse_methods("single,consistency")] == ["single", "consistency"]
    assert parse_method("consistency", max_new_tokens=4, latent_steps=2).method == "consistency"


def test_the_default_key_reads_a_choice_question_as_the_scorer_does(model):
    """On a multiple-choice question the samples' keys are option labels (a worded reply included): before,
    every such sample keyed None and the first sample won whatever the others said."""
    from kvmas.tasks import format_question
    from kvmas.tasks.answers import extract_answer
    from kvmas.tasks.task import Choice, Task

    task = Task(id="c", question="Which is a gas?", answer="B", kind="choice",
                choices=[Choice(label="A", text="iron"), Choice(label="B", text="steam")])
    question = format_question(task, style="direct")
    res = SelfConsistency(n=5, max_new_tokens=6, temperature=1.0)(question, model=model)
    samples = next(s for s in res.trace.steps if s.action == "speak").text_out.split("\n---\n")
    assert res.meta["vote_candidates"] == [extract_answer(s, task) for s in samples]
    from kvmas.primitives.vote import answer_key
    assert [answer_key(t, question) for t in ("B. steam", "steam", r"\boxed{A}", "either")] == ["B", "B", "A", None]
