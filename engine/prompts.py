"""Prompts to token ids: a text, or a conversation through the model's chat template, turn by turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")

Prompt = str | Sequence[Mapping[str, Any]]  # a text, or a conversation: [{"role": ..., "content": ...}]


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says why and what the limit is."""


class PromptEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode(self, prompt: Prompt, chat_template: bool | None = None) -> list[int]:
        """The chat template applies unless turned off or absent; a text is then the user's message. A
        conversation needs the template."""
        use_template = chat_template is not False and self.tokenizer.chat_template is not None
        if isinstance(prompt, str):
            if not use_template:
                return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return self._apply_chat_template([{"role": "user", "content": prompt}])
        if not use_template:
            raise InvalidRequest(
                "messages need the model's chat template, which is turned off or absent: send a prompt"
            )
        return self._apply_chat_template(checked_messages(prompt))

    def _apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except TemplateError as error:  # the template's own refusal, e.g. a role this model cannot take
            raise InvalidRequest(f"the model's chat template refused the messages: {error}") from None
        return list(cast(Any, encoded)["input_ids"])  # a BatchEncoding (return_dict=True), typed as a union


def checked_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """A conversation as the chat template takes it, or InvalidRequest naming the message at fault."""
    if not messages:
        raise InvalidRequest("messages is empty: send at least one message")
    checked = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{index}].role is {role!r}; this model takes {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{index}].content must be a text")
        checked.append({"role": role, "content": content})
    return checked
