"""A TokenStreamingExecutor whose warm-up waits for a gate file: the test decides when warm-up ends and checks
what the health check says before that."""

import time
from pathlib import Path

from executor import TokenStreamingExecutor


class GatedWarmupExecutor(TokenStreamingExecutor):
    def __init__(self, gate_dir: str, **kwargs) -> None:
        self.gate_dir = Path(gate_dir)
        super().__init__(**kwargs)

    def _warm_up(self, tokens: int) -> None:
        (self.gate_dir / "warming").touch()  # the model is loaded; warm-up is about to run
        while not (self.gate_dir / "open").exists():
            time.sleep(0.05)
        super()._warm_up(tokens)
