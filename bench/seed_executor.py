"""The baseline: the seed tutorial's design, served by its own real Jina flow.

Its async `/stream` endpoint calls `model.generate(**inputs, max_new_tokens=1)` once per token over the whole
sequence so far (no KV cache kept between tokens) and yields a document per token. `generate` blocks the event
loop, so concurrent streams are served one after another: that is the design being measured, not an accident.
Same model, dtype and chat template as the service; greedy, as generate's defaults are for this model.
"""

# No `from __future__ import annotations`: Jina reads the endpoint's document types from real annotations.
import torch
from jina import Executor, requests

from engine.loading import EMBEDDED, load_model
from schemas import ModelOutputDocument, PromptDocument


class SeedStreamingExecutor(Executor):
    def __init__(
        self, model: str = EMBEDDED, device: str = "auto", dtype: str = "auto", chat_template: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        loaded = load_model(model, device=device, dtype=dtype)
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.chat_template = chat_template and self.tokenizer.chat_template is not None
        self.eos_token_id = self.tokenizer.eos_token_id
        self.model.generate(**self._inputs("Hello"), max_new_tokens=4)  # warm-up, as the service does
        self.logger.info(f"seed baseline serving {loaded.name} on {loaded.device} ({loaded.dtype})")

    def _inputs(self, prompt: str) -> dict:
        if self.chat_template:
            inputs = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt")
        return {
            "input_ids": inputs["input_ids"].to(self.device),
            "attention_mask": inputs["attention_mask"].to(self.device),
        }

    @requests(on="/stream")
    async def stream(self, doc: PromptDocument, **kwargs) -> ModelOutputDocument:
        inputs = self._inputs(doc.prompt)
        input_len = inputs["input_ids"].shape[1]
        for _ in range(doc.max_tokens):
            output = self.model.generate(**inputs, max_new_tokens=1)
            token_id = int(output[0][-1])
            if token_id == self.eos_token_id:
                break
            yield ModelOutputDocument(
                token_id=token_id,
                generated_text=self.tokenizer.decode(output[0][input_len:], skip_special_tokens=True),
            )
            inputs = {"input_ids": output, "attention_mask": torch.ones_like(output)}
