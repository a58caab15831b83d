from fractions import Fraction

import pytest

from kvmas.tasks import Choice, Task, extract_answer, extract_choice, extract_number, is_correct, parse_number


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
    ("It costs 3.50 dollars and 2 more, 5.5 total", "5.5"),
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
