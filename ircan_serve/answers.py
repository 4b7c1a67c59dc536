"""What an answer is, in tokens and in text: the one place that decides "the model said it".

* :func:`answer_token_id`: the first token of an answer *as it continues the prompt* (``" Paris"``
  after ``"Answer:"``, not ``"Paris"`` tokenized alone), the token attribution scores and the
  first-token metrics compare with;
* :func:`answer_matches` / :func:`replace_answer`: the answer as whole words in generated text
  ("30" is not in "300"), ignoring case; the known-facts filter, the evaluation, the demo and the
  conflict builders use them;
* :func:`until_period`: MemoTrap's prediction, the text up to its first period.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import IrcanError
from .prompts import encode


def answer_token_id(tokenizer: Any, prompt: str, answer: str) -> int:
    """First token of ``answer`` as it continues ``prompt`` (leading-space form included).

    Tokenizing the bare answer word gives ``Paris`` instead of `` Paris`` (and a lone ``▁`` piece
    first with SentencePiece tokenizers); here the answer is tokenized in place after the prompt.
    """
    prompt_ids = encode(tokenizer, prompt)
    full_ids = encode(tokenizer, prompt + answer)
    n = len(prompt_ids)
    if full_ids[:n] == prompt_ids:
        if len(full_ids) == n:
            raise IrcanError(f"answer {answer!r} adds no token after the prompt")
        return int(full_ids[n])
    # The tokenizer merged the prompt's last token with the answer's first ("▁Pa" + "ris" ->
    # "▁Paris"): take the first token where the two encodings part.
    first = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), None)
    if first is None:
        raise IrcanError(f"answer {answer!r} adds no token after the prompt")
    return int(full_ids[first])


def whole_words(answer: str) -> re.Pattern[str]:
    """``answer`` (stripped) as whole words, ignoring case."""
    return re.compile(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", re.IGNORECASE)


def answer_matches(text: str, answer: str) -> bool:
    """The answer occurs in ``text`` as whole words, ignoring case ("30" is not in "300")."""
    return whole_words(answer).search(text) is not None


def replace_answer(text: str, answer: str, replacement: str) -> str | None:
    """``text`` with every whole-word occurrence of ``answer`` replaced, or None where it has none."""
    pattern = whole_words(answer)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _m: replacement.strip(), text)


def until_period(text: str) -> str:
    """MemoTrap's prediction: the generated text up to the first period, normalized."""
    return text.split(".", 1)[0].strip().lower()
