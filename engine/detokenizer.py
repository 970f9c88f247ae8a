"""Incremental detokenization, as in text-generation-inference.

Decoding token by token breaks characters that span several byte-level tokens (Chinese, emoji) and loses the
spaces that some tokenizers attach to the next token. So each step decodes a short window twice: the tokens
already sent (prefix_offset..read_offset) and the same window plus the new tokens. The difference is the new
text, held back while it ends in an incomplete character (U+FFFD). The window restarts after every emission,
so a step costs O(window), never O(output).
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the window of already-sent tokens, kept for context
        self.read_offset = 0  # tokens before this have been turned into text and sent

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return cast(str, text)  # one sequence of ids decodes to one text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, except the bytes of a character the output
        stopped in the middle of (max_tokens cut it): a full decode shows them as U+FFFD, a broken last
        character the client would keep. vLLM holds them back too; the token ids still carry them."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)
