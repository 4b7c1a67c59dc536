"""The data-format table: one row per input format, in the shape of ``ARCHITECTURES``.

Each format says how a row becomes an example (its parser), what kind of task it is, and its
prompt template: the default one (recorded in the export manifest for the RAG wrappers), and
whether a recipe may give its own. Adding a format is one row here plus its parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import table_entry
from ..prompts import COMPLETION_TEMPLATE, MC_TEMPLATE, QA_TEMPLATE, PromptTemplate
from .example import Task
from .parsers import Parser, counterfact_example, generic_example, kre_example, memotrap_example


@dataclass(frozen=True)
class DataFormat:
    """How one input format becomes conflict examples."""

    parser: Parser
    task: Task
    template: PromptTemplate | None
    """The prompt template of the format (None: MemoTrap's rows are whole prompts)."""
    custom_template: bool
    """A recipe's ``[prompt]`` may replace the template (RAG formats: context + question)."""
    description: str


FORMATS: dict[str, DataFormat] = {
    "generic": DataFormat(generic_example, "qa", QA_TEMPLATE, True,
                          "JSONL: context, question, answer, memorized (the project's own format)"),
    "counterfact": DataFormat(counterfact_example, "qa", COMPLETION_TEMPLATE, True,
                              "JSON list in the EasyEdit layout: prompt, target_new, ground_truth, "
                              "rephrase_prompt, locality_*"),
    "memotrap": DataFormat(memotrap_example, "completion", None, False,
                           "JSONL: prompt (instruction: quote start), classes, answer_index"),
    "kre": DataFormat(kre_example, "multiple_choice", MC_TEMPLATE, False,
                      "JSON list (COSE_KRE, ECARE_KRE): question, choices, negative_context, candidate, answer"),
}

FORMAT_CHOICES = ("auto", *FORMATS)
"""What ``--format`` and a recipe's ``data_format`` take."""


def data_format(name: str) -> DataFormat:
    """The format called ``name``, or an error naming the table's formats."""
    return table_entry(FORMATS, name, "data format", "ircan_serve/data/formats.py:FORMATS", FORMAT_CHOICES)


def detect_format(path: Path) -> str:
    """Guess the format from the file: a JSON list is KRE or CounterFact (rows with
    'target_new'); JSONL rows with 'classes' are MemoTrap, other JSONL generic."""
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            head = f.read(4096)
        return "counterfact" if '"target_new"' in head else "kre"
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    break
                return "memotrap" if isinstance(first, dict) and "classes" in first else "generic"
    return "generic"
