"""The one prompt renderer: how a context and a question become the model's input.

Attribution, tuning, evaluation, the export manifest and both LangChain wrappers build prompts
through :class:`PromptTemplate`, so the token ids that attribution scores are the ids the served
model sees (a live-server test checks it):

* **text mode** (``/v1/completions``, :class:`~ircan_serve.langchain.IrcanLLM`): the prompt is
  ``template.render(question, context)``, tokenized as vLLM does (special tokens added);
* **chat mode** (``/v1/chat/completions``, :class:`~ircan_serve.langchain.ChatIrcan`): the same
  text is the content of the last user message (after an optional system message), and the
  prompt is the model's chat template applied with the generation prompt, tokenized without
  adding special tokens again, as vLLM's chat endpoint does.

A recipe may give its own RAG template (``[prompt]`` with ``{context}`` and ``{question}``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import IrcanError


class PromptTemplate(BaseModel):
    """How a context and a question become a prompt; stored in the export manifest."""

    model_config = ConfigDict(frozen=True)
    with_context: str = Field(description="Format string with {context} and {question}.")
    without_context: str = Field(description="Format string with {question} (no {context}).")
    chat: bool = Field(
        False, description="Chat mode: the text is the last user message, rendered with the "
        "model's chat template (as ChatIrcan sends it); otherwise a plain completion prompt.")
    system: str | None = Field(None, description="System message placed first in chat mode.")
    reply_start: str | None = Field(
        None, description="Chat mode: how the model's reply starts, with {question} (e.g. '{question}' when it "
        "repeats the sentence it completes). Attribution, tuning and evaluation score the answer token "
        "after it, where the model decides; served replies write it themselves.")

    @model_validator(mode="after")
    def _check_slots(self) -> PromptTemplate:
        for slot in ("{context}", "{question}"):
            if slot not in self.with_context:
                raise ValueError(f"the template with context has no {slot} slot: {self.with_context!r}")
        if "{question}" not in self.without_context or "{context}" in self.without_context:
            raise ValueError("the template without context needs {question} and no {context}: "
                             f"{self.without_context!r}")
        if self.reply_start is not None and not self.chat:
            raise ValueError("reply_start is for chat mode (chat = true): a completion prompt already ends where "
                             "the answer starts")
        for text in (self.with_context, self.without_context, self.reply_start or ""):
            try:
                text.format(context="", question="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"template {text!r} has a slot other than {{context}} and "
                                 f"{{question}} (write literal braces as {{{{ }}}}): {e}") from e
        return self

    def render(self, question: str, context: str | None = None) -> str:
        """The user text for ``question``, with ``context`` when one is given (the wrappers' slot)."""
        if context is None:
            return self.without_context.format(question=question)
        return self.with_context.format(context=context, question=question)

    def messages(self, question: str, context: str | None = None) -> list[dict[str, str]]:
        """The chat messages ChatIrcan sends for ``question`` (and ``context``)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": self.render(question, context)}]

    def model_input(self, tokenizer: Any, question: str, context: str | None = None) -> str:
        """The exact text the served model continues: the user text, or the chat template applied."""
        if not self.chat:
            return self.render(question, context)
        if getattr(tokenizer, "chat_template", None) is None:
            raise IrcanError("chat mode needs a tokenizer with a chat template; this one has none")
        text = str(tokenizer.apply_chat_template(self.messages(question, context), tokenize=False,
                                                 add_generation_prompt=True))
        return text + self.reply_start.format(question=question) if self.reply_start else text

    def continuation(self, answer: str) -> str:
        """``answer`` as the model would write it after the prompt (' Lyon', or 'Lyon' in chat)."""
        text = str(answer).strip()
        if not text:
            return ""
        ends_open = self.with_context.endswith((" ", "\n")) if not self.chat else not self.reply_start
        return text if ends_open else " " + text


QA_TEMPLATE = PromptTemplate(
    with_context="Context: {context}\nQuestion: {question}\nAnswer:",
    without_context="Question: {question}\nAnswer:",
)
"""The generic QA format (the shipped set and generic JSONL by default)."""

COMPLETION_TEMPLATE = PromptTemplate(with_context="{context}\n{question}", without_context="{question}")
"""Evidence passage, then a sentence to complete (CounterFact's default: its prompts are
sentence starts such as "Danielle Darrieux's mother tongue is")."""

MC_INSTRUCTION = "Choose the correct option to answer the following question:"
MC_TEMPLATE = PromptTemplate(
    with_context=MC_INSTRUCTION + "\n{context}\n{question}\nAnswer:",
    without_context=MC_INSTRUCTION + "\n{question}\nAnswer:",
)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt, as vLLM tokenizes it.

    Completion prompts get the tokenizer's special tokens (a BOS where the model uses one), as
    vLLM's ``/v1/completions`` adds them. A prompt that already starts with the BOS text -- a
    chat template that writes it -- is tokenized without adding another, as vLLM's chat endpoint
    does.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


INSTRUCTION = "Answer using only the information given in the context, even if it contradicts what you know."
"""The prompt baseline users already have: an instruction to rely on the context (``ircan eval``'s
``instruction`` method, and a recipe's template when it serves the instruction)."""


def instructed(template: PromptTemplate) -> PromptTemplate:
    """``template`` with :data:`INSTRUCTION` before the context (inside the user message in chat
    mode); prompts without a context are unchanged."""
    return template.model_copy(update={"with_context": f"{INSTRUCTION}\n{template.with_context}"})
