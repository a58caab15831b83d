"""Live output of a run: each step as it finishes, and the speaking agent's tokens as they are decoded.

A :class:`LiveRun` is a run listener (``prim(question, listener=LiveRun(console))``): called with every text
delta of a speech, and (``on_step``) with every step the trace records. The speech that is the run's answer
opens with ``answer · AGENT ▸``; :meth:`LiveRun.heard` says whether it was streamed whole, so that the answer is
not printed a second time.

>>> import io
>>> from kvmas.cli.render import console
>>> from kvmas.primitives import Single
>>> from kvmas.testing import tiny_model
>>> out = console(file=io.StringIO(), width=100)
>>> _ = Single(max_new_tokens=3)("2+2?", model=tiny_model(), listener=LiveRun(out))
>>> [line.split()[:3] for line in out.file.getvalue().splitlines() if line[:2].strip().isdigit()]
[['0', 'solver', 'read'], ['1', 'solver', 'speak']]
>>> [line.split(" ▸ ")[0] for line in out.file.getvalue().splitlines() if " ▸ " in line]
['answer · solver']
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from kvmas.cli.render import clean, step_line


class LiveRun:
    """Prints steps and streamed speech on ``out`` (data shown literally; the console strips controls)."""

    def __init__(self, out: Console, title: Text | None = None):
        self.out, self.title = out, title  # the title opens the first line shown (a run refused shows nothing)
        self.speaking: str | None = None
        self.answer = ""  # the text of the last speech streamed as the run's answer

    def _open(self) -> None:
        if self.title is not None:
            self.out.print(self.title, soft_wrap=True)
            self.title = None

    def __call__(self, agent: str, delta: str, final: bool) -> None:
        if not delta:  # several rows decode at once: no single text to show
            return
        self._open()
        if self.speaking != agent:
            self._end_speech()
            head = Text.assemble(("answer · ", "bold green"), (clean(agent), "bold green")) if final else \
                Text(clean(agent), style="bold")
            self.out.print(head, Text(" ▸ ", style="dim"), sep="", end="")
            self.speaking = agent
            if final:
                self.answer = ""
        if final:
            self.answer += delta
        self.out.print(Text(clean(delta)), end="", soft_wrap=True)

    def heard(self, answer: str) -> bool:
        """Whether ``answer`` was streamed whole as the run's answer (a vote's pick, decoded as one of several
        rows at once, was not)."""
        return bool(answer.strip()) and self.answer.strip() == answer.strip()

    def on_step(self, step) -> None:
        self._open()
        self._end_speech()
        self.out.print(step_line(step), soft_wrap=True)

    def _end_speech(self) -> None:
        if self.speaking is not None:
            self.out.print()
            self.speaking = None
