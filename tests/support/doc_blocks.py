"""The fenced code blocks of README.md and docs/*.md, and how each is to be treated.

Every block is either run by ``tests/integration/test_doc_examples.py`` against the real pipeline
or explicitly marked as not runnable, with the reason, by an HTML comment on the line right
before its fence (invisible when rendered)::

    <!-- not-run: the wire layout, not a program -->

A block that runs is in a language the test knows how to run (``python``, ``sh``). It may say
what its output must contain, which is how an example shows that it did what the page says::

    <!-- run; prints: succeeded -->

Blocks of one page run in order, in one working directory and (Python) one namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE = ("python", "sh")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!-- not-run: (?P<reason>\S.*?) -->\s*$")
_RUN = re.compile(r"^\s*<!-- run(?:; prints: (?P<prints>\S.*?))? -->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked
    prints: str | None  # text the output must contain, when declared
    marked_run: bool

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent = len(fence.group(1))
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        before = lines[index - 1] if index > 0 else ""
        not_run, run = _NOT_RUN.match(before), _RUN.match(before)
        found.append(
            Block(
                page=str(page.relative_to(ROOT)),
                line=index + 1,
                lang=fence.group(2),
                code="\n".join(line[indent:] for line in lines[index + 1 : end]) + "\n",
                not_run=not_run.group("reason") if not_run else None,
                prints=run.group("prints") if run else None,
                marked_run=run is not None,
            )
        )
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page)]


def runnable(page: Path) -> list[Block]:
    return [block for block in blocks(page) if block.not_run is None]
