"""Bad-row accounting: a skipped row is always counted by reason and named in a warning."""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger("vlcal_jax.data")

# Every reason a row can be skipped for, with what it means.
SKIP_REASONS = {
    "bad_record": "the line or row is not a record (invalid JSON, not an object)",
    "undecodable_text": "a text field is not valid UTF-8",
    "missing_prompt": "the question field is missing or empty",
    "missing_answer": "the answer field is missing or empty",
    "missing_image": "an image is missing (no file at the path, null, empty)",
    "corrupt_image": "an image does not decode",
    "image_placeholder_mismatch": "the number of '<image>' placeholders differs from the images",
    "prompt_too_long": "the tokenized prompt is longer than max_prompt_length (EasyR1 filter)",
}


class BadRowError(Exception):
    """A row that cannot become an example; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped rows by reason and logs one warning per row that names it.

    Warnings are capped at `max_warnings_per_reason` per reason until the next `reset()`
    (None: no cap); the per-reason counts are exact either way and appear in `summary()`.
    """

    def __init__(self, max_warnings_per_reason: int | None = 100):
        self.max_warnings_per_reason = max_warnings_per_reason
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, where: str, error: BadRowError) -> None:
        """Records that the row at `where` (e.g. "train.jsonl row 17") was skipped."""
        self.counts[error.reason] += 1
        count = self.counts[error.reason]
        cap = self.max_warnings_per_reason
        if cap is None or count <= cap:
            logger.warning("skipping %s: %s", where, error)
        if cap is not None and count == cap:
            logger.warning("further rows skipped for %r are counted but not named", error.reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load(self, counts: dict[str, int]) -> None:
        """Replaces the counts, e.g. with those saved in a reader state."""
        self.counts = collections.Counter({str(k): int(v) for k, v in counts.items()})

    def reset(self) -> None:
        self.counts.clear()

    def summary(self) -> str:
        if not self.counts:
            return "no row skipped"
        parts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.counts.items()))
        return f"{self.total} rows skipped ({parts})"
