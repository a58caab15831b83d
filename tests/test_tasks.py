

def test_prompt_styles():
    import pytest

    from kvmas.errors import BadInputError
    from kvmas.tasks import load_tasks
    from kvmas.tasks.prompts import format_question

    t = load_tasks("arc-easy-sample", n=1)[0]
    cot, direct = format_question(t), format_question(t, style="direct")
    assert "step by step" in cot and "step by step" not in direct and "letter" in direct
    assert cot.split("\n")[:-1] == direct.split("\n")[:-1]  # same stem and options
    with pytest.raises(BadInputError, match="prompt style"):
        format_question(t, style="verbose")
