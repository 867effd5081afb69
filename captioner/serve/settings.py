"""The server's batching and limits: :class:`ServeSettings` (``captioner serve --help``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from captioner.errors import UserError


@dataclass(frozen=True)
class ServeSettings:
    """The server's batching and limits (``captioner serve --help``)."""

    max_batch: int = 32  # images decoded together at most (1: no micro-batching)
    max_wait_ms: float = 10.0  # how long a batch waits for more requests
    max_images: int = 16  # images per request
    max_upload_mb: float = 10.0  # bytes per image
    max_beam_size: int = 16  # the largest beam (and n-best) a request may ask for
    max_len: int = 100  # the longest caption a request may ask for, in tokens
    body_timeout_s: float = 30.0  # a request body must arrive within this, once its read starts
    # a request's headers must arrive within this of its connection opening (or of the previous
    # response on it): a client sending them a byte at a time holds no connection longer
    header_timeout_s: float = 10.0
    max_connections: int = 512  # open at once; one more is answered 503 and closed

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images", "max_beam_size", "max_len", "max_connections"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not 0 <= self.max_wait_ms <= 10_000:  # also refuses nan
            raise UserError(f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms}")
        if not (self.max_upload_mb > 0 and math.isfinite(self.max_upload_mb)):
            raise UserError(f"--max-upload-mb must be a number > 0, got {self.max_upload_mb}")
        for flag, seconds in (
            ("--body-timeout", self.body_timeout_s),
            ("--header-timeout", self.header_timeout_s),
        ):
            if not 0 < seconds <= 3600:  # also refuses nan
                raise UserError(f"{flag} must be in (0, 3600] seconds, got {seconds}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        """A request's largest body: its images and the form around them."""
        return self.max_images * self.max_upload_bytes + 2**20

    @property
    def body_limit(self) -> str:
        """The body limit as a 413 states it."""
        return f"{self.max_images} images x {self.max_upload_mb:g} MB (--max-upload-mb)"
