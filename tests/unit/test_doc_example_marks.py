"""Every code block of README.md and docs/ is either run by the doc-example test or marked as
not runnable with a reason (``tests/support/doc_blocks.py`` describes the marks)."""

from __future__ import annotations

from tests.support import doc_blocks


def test_every_block_is_run_or_marked_with_a_reason() -> None:
    unclear = [
        f"{b.where} ({b.lang or 'no language'})"
        for b in doc_blocks.all_blocks()
        if b.not_run is None and b.lang not in doc_blocks.RUNNABLE
    ]
    assert not unclear, (
        "blocks that are neither runnable (python, sh) nor marked "
        "'<!-- not-run: reason -->' on the line before the fence: " + ", ".join(unclear)
    )


def test_a_block_is_not_marked_both_ways() -> None:
    both = [b.where for b in doc_blocks.all_blocks() if b.not_run and b.marked_run]
    assert not both


def test_the_pages_have_examples_that_run() -> None:
    # The parser must see fences at all: a regression to zero runnable blocks would pass the
    # other tests vacuously.
    pages = {b.page for b in doc_blocks.all_blocks() if b.not_run is None}
    assert {"docs/sdk.md", "docs/key-management.md"} <= pages
