from fractions import Fraction

import pytest

from kvmas.tasks import Choice, Task, extract_answer, extract_choice, extract_number, is_correct, parse_number
from kvmas.tasks.answers import RULES, Reading, read_answer, read_choice, read_number
from kvmas.tasks.prompts import prompt_echo_floor


@pytest.mark.parametrize("text,want", [
    (r"9 * 2 = 18, so \boxed{18}.", "18"),
    (r"\boxed{\$1,250}", "1250"),
    (r"Final: \boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{\dfrac{1}{3}}", "1/3"),
    (r"first \boxed{3} then corrected \boxed{5}", "5"),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("The answer is $70,000.", "70000"),
    ("The final answer is: -12 degrees", "-12"),
    ("The answer is \u22127.", "-7"),
    ("Answer: 5.0", "5"),
    ("It costs 3.50 dollars and 2 more, 5.5 total.", "5.5"),
    ("He runs 3 sprints 3 times: 3*3=9, 9*60=540 meters.", "540"),
    ("16-3-4=9 eggs", "9"),
    ("an increase of 150%", "150"),
    ("we need 1/2 of it", "0.5"),
    ("no digits here", None),
    ("", None),
    ("1,000,000 people", "1000000"),
    ("list 1, 2, 3", "3"),
    ("value .5", "0.5"),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_boxed_beats_later_numbers_and_answer_is_beats_last_number():
    assert extract_number(r"\boxed{42} (checked in 3 steps)") == "42"
    assert extract_number("The answer is 42. I used 3 steps.") == "42"


def test_parse_number_exact():
    assert parse_number("5.0") == parse_number("5") == Fraction(5)
    assert parse_number("0.1") == Fraction(1, 10)
    assert parse_number("-3/4") == Fraction(-3, 4)
    assert parse_number("abc") is None


def _num(ans):
    return Task(id="t", question="q?", answer=ans)


@pytest.mark.parametrize("pred,gold,ok", [
    ("The answer is 18.", "18", True),
    (r"\boxed{18.00}", "18", True),
    ("so 70,000 dollars", "70000", True),
    ("0.5", "1/2", True),
    (r"\boxed{-2}", "2", False),
    ("17", "18", False),
    (None, "18", False),
    ("nothing", "18", False),
])
def test_is_correct_numbers(pred, gold, ok):
    assert is_correct(pred, _num(gold)) is ok


def _mc(answer="B", labels=("A", "B", "C", "D"), texts=("safety goggles", "breathing mask", "rubber gloves",
                                                            "lead apron")):
    return Task(id="m", question="Which?", answer=answer,
                choices=tuple(Choice(label=lab, text=t) for lab, t in zip(labels, texts)))


@pytest.mark.parametrize("pred,want", [
    (r"So \boxed{B}", "B"),
    (r"\boxed{(B)}", "B"),
    (r"\boxed{B. breathing mask}", "B"),
    (r"\boxed{breathing mask}", "B"),
    ("The answer is (B).", "B"),
    ("Answer: B", "B"),
    ("the correct answer is option C because", "C"),
    ("B) breathing mask", "B"),
    ("B", "B"),
    ("(D)", "D"),
    ("You should wear a breathing mask.", "B"),
    ("A mask is not enough; goggles help.", None),
    ("I think it is 2", "B"),
    ("Blue is not a label", None),
    ("A. safety goggles\nB. breathing mask\nC. rubber gloves\n\nStep 1: think about it", None),
    ("A. safety goggles\nB. breathing mask\nSo the answer is (B).", "B"),
    ("A. safety goggles\nB. breathing mask\nI pick (D)", "D"),
    ("", None),
])
def test_extract_choice(pred, want):
    assert extract_answer(pred, _mc()) == want


def test_numeric_labels_map_by_position():
    t = _mc(answer="2", labels=("1", "2", "3", "4"))
    assert is_correct("The answer is (B).", t)
    assert is_correct(r"\boxed{2}", t)
    assert not is_correct(r"\boxed{3}", t)


def test_numeric_option_texts_are_not_labels():
    t = _mc(answer="B", texts=("1", "3", "6", "7"))
    assert extract_answer("3", t) == "B"
    assert extract_answer(r"\boxed{3}", t) == "B"
    t2 = _mc(answer="B", texts=("+2", "+1", "-1", "-2"))
    assert extract_answer("+1", t2) == "B"
    assert extract_answer("-1", t2) == "C"


def test_extract_choice_without_texts():
    assert extract_choice("The answer is C", ["A", "B", "C", "D"]) == "C"
    assert extract_choice("nothing useful", ["A", "B", "C", "D"]) is None


def test_task_validation():
    with pytest.raises(ValueError):
        Task(id="x", question="q", answer="E", choices=(Choice(label="A", text="a"), Choice(label="B", text="b")))
    with pytest.raises(ValueError):
        Task(id="x", question="q", answer="many")
    assert Task(id="x", question="q", answer="3", kind="number").kind == "number"


# ------------------------------------------------------------------ the audit's cases: only answers are credited
@pytest.mark.parametrize("text,want,rule", [
    # "answer" without "is" is no answer statement: the concluding number counts, not the next one
    ("To find the answer we use 2 steps: 9*2=18.", "18", "last-number"),
    # the last statement wins: a correction is not swallowed
    ("The answer is 18. Correction: the answer is 20.", "20", "answer-is"),
    ("The answer is 18.\nCorrection: the answer is 20", "20", "answer-is"),
    # a format example after the real box is not the answer
    (r"\boxed{42}. (Format example: \boxed{7})", "42", "boxed"),
    (r"\boxed{42}, written e.g. as \boxed{7}", "42", "boxed"),
    # the number right after "answer is"; an equation there is read to its result
    ("The answer is 9 * 2 = 18.", "18", "answer-is"),
    ("**Answer:** 18", "18", "answer-is"),
    ("answer = 18", "18", "answer-is"),
    ("The answer is $\\frac{3}{4}$.", "0.75", "answer-is"),
    ("The answer is not 18, it is 20.", "20", "last-number"),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18", "####"),
    (r"so \boxed{18}", "18", "boxed"),
    # concluding numbers: a finished sentence, an equation closing the reply, a bare answer
    ("So she makes $18 every day.", "18", "last-number"),
    ("Step 1: 16-3-4 = 9\nStep 2: 9*2 = 18", "18", "last-number"),
    ("18 dollars", "18", "last-number"),
])
def test_number_rules(text, want, rule):
    assert read_number(text) == Reading(want, rule)


@pytest.mark.parametrize("text", [
    "…now we need to check whether 72",  # an unfinished ramble
    "Step 1: she has 16 eggs. Step 2: she eats 3, so now we need to check whether 72",
    "It costs 3.50 dollars and 2 more, 5.5 total",
    "So she makes $18 every day. Now let us double-check the",
    "Is it 18?",  # a question is no answer
    "The answer is 18? Let me think again about whether",
    "She makes $18 every day.\nReason step by step, then give the final answer as \\boxed{N}.",
    r"\boxed{N}",
    "The answer is not 18.",
])
def test_non_answers_name_no_number(text):
    assert read_number(text) == Reading(None, None)


def test_echoing_the_prompt_is_not_credited():
    from kvmas.tasks.prompts import format_question

    t = Task(id="e", question="Tom has 5 apples. He gives away 3. Then he buys 2 more than he gave away, so 5 in "
                              "all were bought? How many apples does he have?", answer="5")
    for style in ("cot", "direct"):
        assert not is_correct(format_question(t, style=style), t)
    assert prompt_echo_floor([t]) == 0
    # the question echoed before a real answer does not hide the answer
    assert read_answer(t.question + "\nHe has 2 + 5 = 7 apples, so the answer is 7.", t) == Reading("7", "answer-is")


ARC = ("an element", "a mixture", "a compound", "a new form of matter")


@pytest.mark.parametrize("text,want,rule", [
    # the article "a" is not option A; an option's text after "answer is (a/an)" wins
    ("The answer is a compound.", "C", "answer-is"),
    ("The answer is compound.", "C", "answer-is"),
    ("The answer is a new form of matter.", "D", "answer-is"),
    ("The answer is an element.", "A", "answer-is"),
    # the forms models write
    ("(C)", "C", "label"), ("C.", "C", "label"), ("C)", "C", "label"), ("C", "C", "label"),
    (r"\boxed{C}", "C", "boxed"), ("The answer is C.", "C", "answer-is"), ("Answer: (C)", "C", "answer-is"),
    ("The answer is (C), not (B).", "C", "answer-is"),
    ("a compound", "C", "option-text"),
    ("Mixing two elements chemically gives a compound.", "C", "option-text"),
])
def test_choice_rules(text, want, rule):
    assert read_answer(text, _mc(answer="C", texts=ARC)) == Reading(want, rule)


@pytest.mark.parametrize("text", [
    "The answer is a substance.",  # "a" alone is no label, and no option's text follows
    "It is either A or B.",  # hedges
    "The answer is A or B.",
    "It could be (A) or (C).",
    "The answer is not (B).",  # negation
    "(A) an element (B) a mixture (C) a compound (D) a new form of matter",  # echoed list on one line
    "A\nB\nC\nD",  # echoed labels
    "A. an element\nB. a mixture\nC. a compound\nD",
])
def test_choice_non_answers(text):
    assert read_answer(text, _mc(answer="C", texts=ARC)) == Reading(None, None)


def test_option_text_beats_a_numeric_reading_of_it():
    t = _mc(answer="D", texts=("100%", "90%", "70%", "3%"))
    assert read_answer("The answer is 3%.", t) == Reading("D", "answer-is")
    t2 = _mc(answer="B", texts=("A prokaryotic cell is larger.", "A prokaryotic cell has no nucleus."))
    assert read_answer("The answer is A prokaryotic cell has no nucleus.", t2).answer == "B"


def test_strict_credits_only_boxed_or_hashes():
    t = _num("18")
    assert is_correct(r"so \boxed{18}", t, strict=True) and is_correct("#### 18", t, strict=True)
    assert is_correct("The answer is 18.", t) and not is_correct("The answer is 18.", t, strict=True)
    assert Reading("18", "boxed").strict and not Reading("18", "answer-is").strict
    assert set(RULES) >= {"boxed", "####", "answer-is", "option-text", "label", "last-number"}


def test_every_gold_option_text_reads_as_its_option_on_arc_easy():
    """The scorer against the whole ARC-Easy test file: each gold option, in every form, is that option; hedges,
    negations and echoed lists name none (a check of the scorer, not of any model)."""
    from pathlib import Path

    from kvmas.tasks import load_tasks

    where = [Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")]  # beside the checkout, or here
    found = [p / "data" / "arc" / "arc_easy_test.jsonl" for p in where if (p / "data" / "arc").is_dir()]
    if not found:
        pytest.skip(f"the ARC-Easy data is not on this machine (looked in {', '.join(map(str, where))})")
    path = found[0]
    forms = ["The answer is {t}.", "The answer is a {t}.", "The answer is {L}.", "({L})", "{L}.", r"\boxed{{{L}}}",
             "Answer: {L}", "{t}", "So the correct answer is option {L}."]
    wrong = []
    for task in load_tasks(str(path), n=None):
        gold = next(c for c in task.choices if c.label == task.answer)
        labels = [c.label for c in task.choices]
        for form in forms:
            if read_answer(form.format(t=gold.text, L=gold.label), task).answer != task.answer:
                wrong.append((task.id, form))
        for hedge in (f"It is either {labels[0]} or {labels[1]}.", f"The answer is not ({task.answer}).",
                      " ".join(f"({c.label}) {c.text}" for c in task.choices), "\n".join(labels)):
            if read_answer(hedge, task).answer is not None:
                wrong.append((task.id, hedge))
    assert not wrong, wrong[:10]
