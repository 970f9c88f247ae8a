"""A TokenStreamingExecutor whose output processing fails on the 3rd token of any prompt containing FAULT:
an internal failure inside one stream's step, in a real flow."""

import engine.engine
from engine.output import RequestOutputProcessor
from executor import TokenStreamingExecutor

FAULT_MARKER = "FAULT"


class FaultyOutputProcessor(RequestOutputProcessor):
    def on_token(self, token_id: int):
        prompt = self.detokenizer.tokenizer.decode(self.request.prompt_ids)
        if FAULT_MARKER in prompt and len(self.request.output_ids) == 2:
            raise RuntimeError("injected fault")
        return super().on_token(token_id)


engine.engine.RequestOutputProcessor = FaultyOutputProcessor


class FaultyTokenStreamingExecutor(TokenStreamingExecutor):
    pass
