"""The image the Dockerfile builds, read as Docker reads it: its instructions, its COPYs, and the WORKDIR they lay
out, rebuilt in a folder (the deploy test runs that folder; the bundle test checks it)."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def copy_instructions() -> list[tuple[list[str], str, str]]:
    """Each COPY as (sources in the build context, destination, the WORKDIR it is relative to)."""
    copies = []
    workdir = "/"
    for keyword, arguments in dockerfile_instructions():
        if keyword == "WORKDIR":
            workdir = arguments
        elif keyword in ("COPY", "ADD"):
            *sources, destination = arguments.split()
            # Flags (--from, --chown) or ADD's URLs would need more than this model of a build context.
            assert keyword == "COPY" and not any(s.startswith("--") for s in sources), arguments
            copies.append((sources, destination, workdir))
    return copies


def image_layout(target: Path) -> Path:
    """The image's WORKDIR, rebuilt in `target` from the Dockerfile's COPY instructions (Docker's rules: a directory
    source copies its contents, several sources or a trailing slash copy into the destination directory)."""
    for sources, destination, workdir in copy_instructions():
        path = PurePosixPath(workdir, destination)
        # Everything the image needs at run time lies under the WORKDIR, where Jina's commands run.
        relative = path.relative_to(workdir)
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(
                    origin, target / relative, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
                )
            else:
                copied = target / relative / origin.name if into_directory else target / relative
                copied.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, copied)
    return target
