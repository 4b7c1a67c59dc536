"""One knowledge conflict, as every stage reads it, and the errors bad rows raise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import IrcanError
from ..prompts import PromptTemplate

Task = Literal["qa", "completion", "multiple_choice"]


class ConflictExample(BaseModel):
    """One knowledge conflict: a context that contradicts what the model memorized."""

    model_config = ConfigDict(frozen=True)
    id: str = Field(description="Stable identifier (the attribution store is keyed by it).")
    task: Task
    prompt: str = Field(description="The prompt with the context.")
    prompt_without_context: str = Field(description="The same prompt without the context.")
    answer: str = Field(description="The context's answer, as it continues the prompt (' Lyon').")
    memorized: str = Field(description="The memorized answer, as it continues the prompt.")
    options: list[str] | None = Field(None, description="Option letters for multiple choice.")
    context: str | None = None
    question: str | None = None
    agreeing_context: str | None = Field(None, description="A context that states the memorized (true) answer.")
    agreeing_prompt: str | None = Field(
        None, description="The prompt with a context that states the memorized (true) answer: "
        "a side-effect check, where following the context must still give the true answer.")
    irrelevant_prompt: str | None = Field(
        None, description="The question after documents about other subjects only (as a retriever returns them when "
        "the corpus lacks the answer): a side-effect check, where the model must keep its memorized answer.")
    locality_question: str | None = Field(None, description="An unrelated fact's question (unrendered).")
    locality_prompt: str | None = Field(None, description="That question rendered without context.")
    locality_answer: str | None = Field(None, description="Its answer, as it continues the prompt.")
    source: str = Field("", description="file:line the row came from, for error messages.")
    subject: str | None = Field(None, description="What the fact is about (CounterFact's subject), "
                                "where the data says; context builders use it.")
    statements: list[str] = Field(default_factory=list, description="Sentence starts, other than the "
                                  "question, that the answer completes into a statement of the fact "
                                  "(CounterFact's paraphrase); context builders use them.")


@dataclass
class LoadedData:
    """Examples read from a file, and the rows skipped with ``skip_invalid`` and why."""

    examples: list[ConflictExample]
    skipped: list[str] = field(default_factory=list)
    template: PromptTemplate | None = None
    """The prompt template the rows were rendered with (None: the format's fixed prompts)."""

    def skip_summary(self) -> str:
        """'skipped 3 rows: 2 missing field ..., 1 empty answer' (empty when none)."""
        if not self.skipped:
            return ""
        reasons = Counter(s.split(": ", 1)[-1].split(" (")[0] for s in self.skipped)
        parts = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        return f"skipped {len(self.skipped)} invalid rows: {parts}"


class DataError(IrcanError):
    """A bad data row; the message names the file, the line and the problem."""
