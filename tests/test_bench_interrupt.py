"""An accuracy run stopped mid-way (SIGTERM, as Ctrl-C) keeps what finished: a report over the finished items,
a one-line error with exit code 130 that says how to go on, and jobs that stop at their next forward."""

import json
import signal
import subprocess
import sys
import time

from kvmas.tasks import load_tasks
from kvmas.testing import save_tiny_model

RUN = ("import sys; from kvmas.cli.app import main; sys.argv = ['kvmas'] + sys.argv[1:]; main()")


def test_sigterm_mid_run_writes_the_finished_items_report(tmp_path):
    model = save_tiny_model(tmp_path / "model", "qwen", seed=1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", RUN, "bench", "accuracy", "--model", str(model), "--data", "synthetic",
           "--n", "400", "--methods", "single,text:review", "--max-new-tokens", "24", "--batch-size", "2",
           "-o", str(out)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    items = out / "items.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if items.exists() and len(items.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)  # stops after a tick, not after 400 questions
    assert child.returncode == 130, err
    summary = json.loads((out / "results.json").read_text())
    done = summary["config"]["interrupted"]["done"]
    assert 3 <= done < 400 and summary["config"]["interrupted"]["not_run"] == ["text:review"]
    assert summary["config"]["methods"] == ["single"] and summary["methods"]["single"]["n"] == done
    lines = [json.loads(x) for x in items.read_text().splitlines()]
    first = [t.id for t in load_tasks("synthetic", n=400, seed=summary["config"]["seed"])][:done]
    assert [x["task_id"] for x in lines] == first  # the first tasks, in order: a range --start continues
    assert f"--start {done} --n {400 - done} --methods single,text:review" in " ".join(err.split())
