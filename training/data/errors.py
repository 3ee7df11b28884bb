"""Data errors a user can act on, and the bad-image budget of a run."""

from __future__ import annotations

from model.errors import ClipforgeError


class DataError(ClipforgeError, ValueError):
    """A data source that cannot be used as given: missing path, unknown format, bad columns, too many bad images."""


def check_bad_fraction(n_bad: int, n_seen: int, max_bad_fraction: float) -> None:
    """Fail the run once more than max_bad_fraction of the images seen could not be read.

    A few broken files in a scraped data set are normal and only skipped; a large share
    usually means a wrong images_root, so we stop with a message that says so.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")
    if n_bad < 0 or n_seen < 0 or n_bad > n_seen:
        raise DataError(f"inconsistent image counts: {n_bad} bad of {n_seen} seen")
    if n_seen == 0 or n_bad == 0:
        return
    fraction = n_bad / n_seen
    if fraction > max_bad_fraction:
        raise DataError(
            f"{n_bad} of {n_seen} images ({fraction:.1%}) were missing, corrupt or too large, more than the allowed "
            f"{max_bad_fraction:.1%} (max_bad_fraction); check that images_root points at the image folder, "
            "or raise max_bad_fraction to train on the readable ones"
        )
