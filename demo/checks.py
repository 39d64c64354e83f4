"""The demo's verdict: a step states the outcome it expects, and one differing outcome fails the whole demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console


@dataclass(frozen=True)
class StepOutcome:
    step: str
    expected: str
    got: str

    @property
    def ok(self) -> bool:
        return self.expected == self.got


@dataclass
class Outcomes:
    """What each step expected and what it got, printed as it happens."""

    console: Console
    steps: list[StepOutcome] = field(default_factory=list)

    def expect(self, step: str, expected: object, got: object) -> bool:
        outcome = StepOutcome(step, str(expected), str(got))
        self.steps.append(outcome)
        mark = "[green]ok[/]" if outcome.ok else f"[bold red]FAILED[/] (expected {outcome.expected})"
        self.console.print(f"   {mark:<12} {step}: {outcome.got}", highlight=False)
        return outcome.ok

    @property
    def failed(self) -> list[StepOutcome]:
        return [s for s in self.steps if not s.ok]
