"""Helpers shared by tests/ and bench/: real `jina flow`s on free ports (processes), the service they serve and
the clients that talk to it (service), the image the Dockerfile builds (dockerfile). Neither tests/ nor bench/
imports the other; both import this. Not part of the product: not installed, not copied into the image."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
