"""The environment adapters behind the skill memory: TextWorld cooking games (one tiny game generated here, a
few seconds) and a ScienceWorld step loop where a Java runtime is present; bad input as one-line errors; the
skills eval run end to end on TextWorld with a tiny random model (mechanics only).

TextWorld and ScienceWorld come with the ``envs`` extra (``make test`` installs it); where a package or Java
cannot be had, its tests are skipped with the reason printed (``-rs``)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time

import pytest
from typer.testing import CliRunner

from kvmas.envs import ENVS, make_env, splits
from kvmas.envs.base import call_with_timeout
from kvmas.errors import BadInputError, EnvError

HAS_TW = importlib.util.find_spec("textworld") is not None
HAS_SW = importlib.util.find_spec("scienceworld") is not None
needs_tw = pytest.mark.skipif(not HAS_TW, reason="textworld is not installed (pip install 'kvmas[envs]')")
needs_sw = pytest.mark.skipif(not HAS_SW, reason="scienceworld is not installed (pip install 'kvmas[envs]')")
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no Java runtime on PATH: ScienceWorld cannot start "
                                       "(apt-get install -y default-jre-headless)")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("kvmas-home")


@pytest.fixture(autouse=True)
def _home(home, monkeypatch):
    monkeypatch.setenv("KVMAS_HOME", str(home))  # games are generated here, never in the user's cache


def test_registry_and_bad_input_need_no_package():
    assert set(ENVS) == {"house", "codebreaker", "textworld", "scienceworld"}
    assert splits("textworld") == ("train", "test", "ood")
    with pytest.raises(BadInputError, match="unknown environment 'zork'"):
        make_env("zork", 0)
    with pytest.raises(BadInputError, match="unknown split 'ood' for scienceworld|unknown split 'bogus'"):
        make_env("textworld", 0, "bogus")
    with pytest.raises(BadInputError, match="takes no options"):
        make_env("house", 0, tasks="x")


def test_a_hanging_step_is_a_one_line_timeout():
    t0 = time.perf_counter()
    with pytest.raises(EnvError, match="did not finish within 0.2 s"):
        call_with_timeout(lambda: time.sleep(5), 0.2, "a step")
    assert time.perf_counter() - t0 < 2
    with pytest.raises(ZeroDivisionError):  # the step's own error is the caller's, as it was
        call_with_timeout(lambda: 1 / 0, 5, "a step")


# -- TextWorld ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tw_game(home):
    """Game 0 of the train split (a one-ingredient recipe), generated into the test's kvmas home."""
    import os

    from kvmas.envs.textworld_env import ensure_game

    old = os.environ.get("KVMAS_HOME")
    os.environ["KVMAS_HOME"] = str(home)
    try:
        t0 = time.perf_counter()
        path = ensure_game(0, "train")
        return path, time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("KVMAS_HOME")
        else:
            os.environ["KVMAS_HOME"] = old


@needs_tw
def test_textworld_game_is_generated_into_the_cache_once(tw_game, home):
    from kvmas.envs.textworld_env import ensure_game

    path, took = tw_game
    assert path.parent == home / "envs" / "textworld" and path.suffix == ".z8"
    assert path.with_suffix(".json").is_file() and took < 60
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".gen-")]  # no leftover temp folder
    mtime = path.stat().st_mtime_ns
    assert ensure_game(0, "train") == path and path.stat().st_mtime_ns == mtime  # cached: not generated again


@needs_tw
def test_textworld_adapter_plays_the_walkthrough_to_a_win(tw_game):
    env = make_env("textworld", 0, "train")
    obs = env.reset()
    assert "cookbook" in env.task and "Kitchen" in obs and env.task_family == "recipe1"
    assert env.slots == {} and env.walkthrough
    events, res = [], None
    for a in env.walkthrough:
        assert a in env.admissible()
        tpl = env.template(a)
        res = env.step(a)
        events.append(res.event)
        if a.startswith("take ") and env.slots and env.slots["ingredient1"] in a:
            assert tpl == "take <ingredient1>"  # no "from <where>": a layout-free skill step
        if a.split()[0] in ("slice", "dice", "chop"):
            assert tpl == "<cut1> <ingredient1> with knife"  # the recipe's cut, by slot
        if a.startswith("cook "):
            assert tpl == "cook <ingredient1> with <cook1>"  # what the recipe cooks it with, by slot
        if res.done:
            break
    assert res.done and res.won and res.score == 1.0 and res.reward == 1.0
    assert "read" in events and "eat" in events and list(env.slots) == ["ingredient1", "cut1", "cook1"]
    env.close()


@needs_tw
def test_textworld_bad_input_is_one_line(tw_game, tmp_path):
    env = make_env("textworld", 0, "train")
    env.reset()
    with pytest.raises(BadInputError, match="not an admissible action"):
        env.step("fly to the moon")
    env.close()
    bad = tmp_path / "broken.z8"
    bad.write_bytes(b"not a story file at all" * 10)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(EnvError, match="fails to load: not a Z-machine"):  # refused, the process lives on
        make_env("textworld", 0, "train", game_file=str(bad)).reset()
    with pytest.raises(EnvError, match="does not exist"):
        make_env("textworld", 0, "train", game_file=str(tmp_path / "nope.z8")).reset()
    only = tmp_path / "only.z8"
    shutil.copy(tw_game[0], only)
    with pytest.raises(EnvError, match="only.json is missing"):
        make_env("textworld", 0, "train", game_file=str(only)).reset()


@needs_tw
def test_textworld_step_timeout(tw_game):
    env = make_env("textworld", 0, "train", step_timeout_s=0.2)
    env.reset()
    env._env.step = lambda cmd: time.sleep(3)  # a world that hangs
    with pytest.raises(EnvError, match="TextWorld step 'look' did not finish within 0.2 s"):
        env.step("look")
    env._env = None


@needs_tw
def test_textworld_seed_skills_hint_layout_free_steps(tw_game):
    from kvmas.memory.lifecycle import seed_skills
    from kvmas.memory.runtime import step_hint

    take = next(s for s in seed_skills("textworld", "tw") if s.name == "TakeIngredients")
    env = make_env("textworld", 0, "train")
    env.reset()
    assert step_hint(take, [], env.admissible(), env.slots) is None  # nothing to take before the recipe is read
    env.step("examine cookbook")
    ing = env.slots["ingredient1"]
    hint = step_hint(take, [], env.admissible(), env.slots)
    assert hint.startswith(f"take {ing} from ") and hint in env.admissible()  # resolved to the one command
    env.step(hint)
    assert step_hint(take, [hint], env.admissible(), env.slots) is None  # <ingredient2> unbound: skipped
    env.close()


def _gold(seed: int, split: str):
    """Game ``seed`` of ``split`` played by its walkthrough (no model), as a trace."""
    from kvmas.memory.episode import play_script

    env = make_env("textworld", seed, split)
    env.reset()
    return play_script(env, list(env.walkthrough))


@needs_tw
def test_extraction_finds_procedures_past_the_shared_prefix_and_they_ground_on_unseen_games(tw_game):
    """Walkthroughs of a one- and a two-ingredient game: the only prefix they share is reading the recipe and
    taking an ingredient (what the seeds do; all the old prefix rule proposed). Extraction must find what comes
    after it, across the two recipe sizes, and it must ground on a game of unseen foods."""
    from kvmas.memory.lifecycle import seed_skills
    from kvmas.memory.procedures import carried_out, extract

    seeds = seed_skills("textworld", "tw")
    train = [_gold(0, "train"), _gold(1, "train")]
    assert [t.outcome["task_family"] for t in train] == ["recipe1", "recipe2"]
    assert all(t.outcome["success"] for t in train)
    ex = extract(train, "tw", min_support=2, live=seeds)
    seed_steps = {s for sk in seeds for s in sk.steps}
    new = [s for sk in ex.skills for s in sk.steps if s not in seed_steps]
    assert {"<cut1> <ingredient1> with knife", "cook <ingredient1> with <cook1>", "eat meal"} <= set(new), \
        [sk.steps for sk in ex.skills]
    assert all(sk.provenance["families"] == ["recipe1", "recipe2"] for sk in ex.skills)  # across recipe sizes
    assert any(sk.steps[0] not in ("inventory", "examine cookbook") for sk in ex.skills)  # not a prefix
    assert ex.rejected and all(p.reason for p in ex.rejected)  # every candidate not proposed says why
    test = _gold(100_001, "test")  # foods never built on
    assert test.outcome["success"]
    for sk in ex.skills:
        done = carried_out(sk.steps, test)
        assert done is not None, sk.steps  # the gold walkthrough does each proposed procedure, grounded
        assert all(test.steps[i].text_out in test.steps[i].meta["inputs"]["admissible"] for i in done)


@needs_tw
def test_skills_eval_on_textworld_end_to_end_with_a_tiny_model(tw_game, tmp_path):
    """Build → gate → evaluate through the CLI; the trace names the skill active at every step."""
    import torch

    from kvmas.cli.app import app
    from kvmas.testing import save_tiny_model
    from kvmas.trace import Trace

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = save_tiny_model(tmp_path / "tiny")
        out, traces = tmp_path / "eval.json", tmp_path / "traces"
        r = CliRunner().invoke(app, ["skills", "eval", "textworld", "--model", str(model), "--iterations", "1",
                                     "--build-episodes", "2", "--eval-episodes", "2", "--max-steps", "4",
                                     "--split", "train,test",
                                     "--no-judge", "--conditions", "none,ours,seeds", "--json", str(out),
                                     "--trace-dir", str(traces), "--store", str(tmp_path / "s.sqlite")])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "skills eval: textworld/train" in flat and "one decision under a skill" in flat, r.output
    doc = json.loads(out.read_text())
    assert [(x["split"], x["condition"]) for x in doc["results"]] == [
        (sp, c) for sp in ("train", "test") for c in ("none", "ours", "seeds")]  # one build, two splits
    res = {x["condition"]: x for x in doc["results"] if x["split"] == "test"}
    assert all(x["episodes"] == 2 for x in res.values()) and "skills eval: textworld/test" in flat
    assert res["seeds"]["pool_skills"] == 3 and res["none"]["pool_skills"] == 0
    assert res["ours"]["paired_diff_vs_seeds"] is not None and 0 <= res["ours"]["score"] <= 1
    assert res["ours"]["gate_log"] == doc["results"][1]["gate_log"]  # the same build behind both splits
    tr = Trace.load(traces / "seeds-train-100000.json")
    assert all("skill_id" in s.meta and "template" in s.meta for s in tr.steps)
    assert any(s.meta["skill_name"] == "ExamineRecipe" for s in tr.steps)
    shown = CliRunner().invoke(app, ["trace", "show", str(traces / "seeds-train-100000.json")])
    unwrapped = re.sub(r"[\s│├└─]+", " ", shown.output)  # the tree's wrapping and guides, whatever the width
    assert shown.exit_code == 0 and "[skill ExamineRecipe (seed)]" in unwrapped, shown.output


@needs_tw
def test_prepare_generates_what_an_eval_plays(tw_game, home):
    from kvmas.cli.app import app

    r = CliRunner().invoke(app, ["skills", "prepare", "textworld", "--split", "train,ood", "--iterations", "1",
                                 "--build-episodes", "1", "--eval-episodes", "1", "--workers", "2"])
    assert r.exit_code == 0 and "3 games ready" in " ".join(r.output.split()), r.output
    names = {p.name for p in (home / "envs" / "textworld").glob("*.z8")}
    assert {"cooking-v1-train-r1-g1-s0.z8", "cooking-v1-train-r1-g1-s100000.z8",
            "cooking-v1-test-r3-g1-s100000.z8"} <= names


def test_skills_cli_refuses_bad_env_options(tmp_path):
    from kvmas.cli.app import app

    db = str(tmp_path / "s.sqlite")
    r = CliRunner()
    for args, msg in ((["eval", "textworld", "--split", "bogus"], "unknown split 'bogus' for textworld"),
                      (["eval", "textworld", "--tasks", "boil"], "ScienceWorld options"),
                      (["eval", "house", "--max-steps", "3"], "TextWorld / ScienceWorld option"),
                      (["learn", "zork"], "unknown environment 'zork'"),
                      (["prepare", "house"], "nothing to prepare")):
        out = r.invoke(app, ["skills", *args] + (["--store", db] if args[0] != "prepare" else []))
        assert out.exit_code != 0 and msg in out.output, (args, out.output)


# -- ScienceWorld ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw():
    from kvmas.envs import scienceworld_env

    yield scienceworld_env
    scienceworld_env.shutdown()  # no JVM left behind


@needs_sw
def test_scienceworld_bad_input_without_starting_java(sw, monkeypatch):
    with pytest.raises(BadInputError, match="unknown ScienceWorld task 'bake-a-cake'"):
        make_env("scienceworld", 0, "train", tasks="find-plant,bake-a-cake")
    with pytest.raises(BadInputError, match="also a built task type"):
        make_env("scienceworld", 0, "train", tasks="find-plant", unseen="find-plant")
    monkeypatch.setattr(sw.shutil, "which", lambda name: None)
    monkeypatch.setattr(sw._Simulator, "_env", None)
    with pytest.raises(EnvError, match="needs a Java runtime"):
        make_env("scienceworld", 0, "train")


@needs_sw
@needs_java
def test_scienceworld_step_loop(sw):
    env = make_env("scienceworld", 0, "train")
    assert env.task_name in sw.DEFAULT_TASKS
    assert env.variation in sw._Simulator.variations(env.task_name, "train")
    obs = env.reset()
    assert "This room is called" in obs and env.task.startswith("Your task is to")
    assert {"box", "room"} <= set(env.slots)
    res = None
    for i in range(4):
        adm = env.admissible()
        assert 2 <= len(adm) <= 64 and "look around" in adm and not any(a.startswith("focus on air") for a in adm)
        action = "teleport to outside" if "teleport to outside" in adm else "look around"
        res = env.step(action if i == 0 else "look around")
        assert 0.0 <= res.score <= 1.0 and isinstance(res.obs, str) and res.obs
    assert env.t == 4 and not res.won
    env.close()
    test = make_env("scienceworld", 100_000, "test")
    ood = make_env("scienceworld", 100_000, "ood")
    assert test.variation in sw._Simulator.variations(test.task_name, "test")
    assert ood.task_name == sw.DEFAULT_UNSEEN
    with pytest.raises(BadInputError, match="is not in its train split"):
        make_env("scienceworld", 0, "train", task="find-plant",
                 variation=sw._Simulator.variations("find-plant", "test")[0])
