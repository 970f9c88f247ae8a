"""`python -m lifecycle.supervisor COMMAND...`: run COMMAND (`jina flow --uses flow.yml`, as `make serve` does)
and start it again whenever it fails, with backoff.

Jina 3.34 cannot restart an executor: when one dies, the gateway ends the whole flow with a failure status
(gateway/health.py), and something outside must start it again. Under systemd, Docker or Kubernetes that is the
supervisor's job; `make serve` has none, so this is the small one of its own. It starts COMMAND, and when COMMAND
exits with a failure (a status other than 0, or a signal), starts it again after a delay that doubles from
`--backoff-s` up to `--max-backoff-s` while the restarts come quickly, and falls back to `--backoff-s` once a run
has lasted `--stable-s`. Each run gets the number of restarts so far in LLM_FLOW_RESTARTS, which the gateway
publishes as the metric `llm_flow_restarts`. SIGTERM or SIGINT goes on to COMMAND, and the supervisor exits with
COMMAND's status once it has stopped; COMMAND exiting with 0 (a clean stop) ends the supervisor too.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

RESTARTS_ENV = "LLM_FLOW_RESTARTS"

log = logging.getLogger("llm.supervisor")


def restarts() -> int:
    """How many times the supervisor has restarted this process's flow (0 without a supervisor)."""
    value = os.environ.get(RESTARTS_ENV, "0")
    return int(value) if value.isdigit() else 0


class Supervisor:
    def __init__(self, command: Sequence[str], backoff_s: float, max_backoff_s: float, stable_s: float) -> None:
        self.command = list(command)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.restarts = 0
        self.stopping = False
        self.child: subprocess.Popen | None = None

    def stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        delay = self.backoff_s
        while True:
            started = time.monotonic()
            self.child = subprocess.Popen(self.command, env={**os.environ, RESTARTS_ENV: str(self.restarts)})
            status = self.child.wait()
            if self.stopping or status == 0:
                return status
            if time.monotonic() - started >= self.stable_s:
                delay = self.backoff_s  # it had been serving: the failure is not part of a crash loop
            self.restarts += 1
            log.error(f"{self.command[0]} exited with status {status}: restart {self.restarts} in {delay:g} s")
            deadline = time.monotonic() + delay
            while not self.stopping and (remaining := deadline - time.monotonic()) > 0:
                time.sleep(min(remaining, 0.1))
            if self.stopping:
                return status
            delay = min(delay * 2, self.max_backoff_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lifecycle.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backoff-s", type=float, default=1.0, help="the first delay before a restart")
    parser.add_argument("--max-backoff-s", type=float, default=30.0, help="the longest delay before a restart")
    parser.add_argument("--stable-s", type=float, default=60.0,
                        help="a run this long resets the delay to --backoff-s")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="what to run, e.g. jina flow --uses flow.yml")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to supervise")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return Supervisor(command, args.backoff_s, args.max_backoff_s, args.stable_s).run()


if __name__ == "__main__":
    sys.exit(main())
