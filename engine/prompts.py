"""Prompts to token ids: a text, or a conversation through the model's chat template, turn by turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # a tool's result, taken where the template has a tool syntax of its own

Prompt = str | Sequence[Mapping[str, Any]]  # a text, or a conversation: [{"role": ..., "content": ...}]
Tools = Sequence[Mapping[str, Any]]  # OpenAI's tools, [{"type": "function", "function": {...}}], as templates take them

# Tool-call syntaxes a template may have of its own, by the name the service gives them.
HERMES = "hermes"  # Hermes, Qwen2.5, Qwen3: <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>
HERMES_TAGS = ("<tool_call>", "</tool_call>")

# A conversation that shows what a template does with tools: a tool offered, an assistant's call of it and the
# tool's result, each with a text of its own to look for in what the template renders.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_function", "description": "probe_description",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}
_PROBE = [
    {"role": "user", "content": "probe_question"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_probe", "type": "function", "function": {
        "name": "probe_function", "arguments": {"probe_arg": "probe_value"}}}]},
    {"role": TOOL_ROLE, "tool_call_id": "call_probe", "content": "probe_result"},
]
# The probe's call as a Hermes template writes it: exactly what the gateway's grammar holds a call to.
_HERMES_CALL = '<tool_call>\n{"name": "probe_function", "arguments": {"probe_arg": "probe_value"}}\n</tool_call>'


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says why and what the limit is."""


class PromptEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tool_syntax = tool_syntax(tokenizer)
        # The syntax's tags that are tokens of their own. The grammar library reads every added token as a special
        # one, never as its text, so a grammar must name these as tokens (`<tool_call>`), the others as text.
        added = tokenizer.get_added_vocab()
        self.tool_tokens = tuple(tag for tag in HERMES_TAGS if tag in added) if self.tool_syntax else ()

    def encode(self, prompt: Prompt, chat_template: bool | None = None, tools: Tools | None = None) -> list[int]:
        """The chat template applies unless turned off or absent; a text is then the user's message. A
        conversation, and tools, need the template."""
        use_template = chat_template is not False and self.tokenizer.chat_template is not None
        if tools is not None and (not use_template or self.tool_syntax is None):
            raise InvalidRequest("tools need a chat template with a tool syntax of its own, and this model's has "
                                 "none or is turned off: describe the tools in the messages (the OpenAI API does)")
        if isinstance(prompt, str):
            if not use_template:
                return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return self._apply_chat_template([{"role": "user", "content": prompt}], tools)
        if not use_template:
            raise InvalidRequest(
                "messages need the model's chat template, which is turned off or absent: send a prompt"
            )
        return self._apply_chat_template(checked_messages(prompt, self.tool_syntax is not None), tools)

    def _apply_chat_template(self, messages: list[dict[str, Any]], tools: Tools | None) -> list[int]:
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, tools=cast(Any, tools), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except TemplateError as error:  # the template's own refusal, e.g. a role this model cannot take
            raise InvalidRequest(f"the model's chat template refused the messages: {error}") from None
        return list(cast(Any, encoded)["input_ids"])  # a BatchEncoding (return_dict=True), typed as a union


def tool_syntax(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template's own tool-call syntax, read from what it makes of a probe conversation: HERMES when it
    renders the tools, the tool's result and the call, the call as the Hermes syntax writes it; None otherwise (no
    template, no tool syntax, or one the service does not read, as Llama 3.1's or Mistral's), and the OpenAI API
    renders tools in its generic format."""
    if tokenizer.chat_template is None:
        return None
    try:
        text = str(tokenizer.apply_chat_template(cast(Any, _PROBE), tools=[_PROBE_TOOL], tokenize=False))
    except Exception:  # a template refuses what it does not take in ways of its own (raise_exception, a missing key)
        return None
    if not all(part in text for part in ("probe_description", "probe_result", _HERMES_CALL)):
        return None
    # Decoding skips special tokens: tags that are would never reach the text the gateway reads calls from.
    if set(HERMES_TAGS) & set(tokenizer.all_special_tokens):
        return None
    return HERMES


def checked_messages(messages: Sequence[Mapping[str, Any]], tool_syntax: bool = False) -> list[dict[str, Any]]:
    """A conversation as the chat template takes it, or InvalidRequest naming the message at fault. With
    `tool_syntax` (the template has one), tool results and an assistant's calls go to the template as they are."""
    if not messages:
        raise InvalidRequest("messages is empty: send at least one message")
    roles = (*ROLES, TOOL_ROLE) if tool_syntax else ROLES
    checked = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise InvalidRequest(f"messages[{index}].role is {role!r}; this model takes {', '.join(roles)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{index}].content must be a text")
        entry: dict[str, Any] = {"role": role, "content": content}
        if message.get("tool_calls"):
            if not tool_syntax:
                raise InvalidRequest(f"messages[{index}].tool_calls: this model's chat template has no tool syntax; "
                                     "write the calls in the content")
            if role != "assistant":
                raise InvalidRequest(f"messages[{index}].tool_calls: only an assistant's message carries calls, "
                                     f"not a {role!r} one")
            entry["tool_calls"] = message["tool_calls"]
        if message.get("tool_call_id") is not None:
            entry["tool_call_id"] = message["tool_call_id"]
        checked.append(entry)
    return checked
