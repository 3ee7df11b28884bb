"""Serving limits that protect the process itself: prompt size, slow clients, queue depth, worker health.

They are read from the same CLIPFORGE_* environment as app/settings.py (each field is
CLIPFORGE_<NAME>) and kept in their own class so the connection and overload guards have one home.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .settings import ENV_PREFIX, SettingsError, describe_validation_error

# Bytes of UTF-8 per token of context that one expanded prompt may use: the model reads at most
# its context length in tokens, and English averages well under 8 bytes a token.
PROMPT_BYTES_PER_TOKEN = 8


class ServingLimits(BaseSettings):
    """What one request or one connection may cost the server; each field is also CLIPFORGE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, env_ignore_empty=True)

    # prompts: labels x templates are expanded before tokenizing, so their size is bounded here
    max_prompt_bytes: int | None = Field(
        None, ge=16,
        description="largest expanded prompt (template with its label) in UTF-8 bytes "
                    f"(default: {PROMPT_BYTES_PER_TOKEN} x the model's context length in tokens)",
    )
    max_prompt_bytes_total: int = Field(
        256 * 1024, ge=1024, description="most UTF-8 bytes of expanded prompts one classification may encode",
    )
    # slow or idle clients
    header_timeout_s: float = Field(
        5.0, gt=0.0, description="seconds a connection may take to send a request's headers before it is closed",
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0.0, description="seconds a request body may stall (no bytes arriving) before the request gets a 408",
    )
    body_timeout_s: float = Field(
        120.0, gt=0.0, description="seconds a whole request body may take to arrive before the request gets a 408",
    )
    max_connections: int = Field(
        512, ge=1, description="most open client connections; past it a new connection gets a 503 and is closed",
    )
    # overload and health
    max_queue: int = Field(
        256, ge=1, description="most requests waiting in each batcher's queue; past it a request gets a 503 at once",
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="the Retry-After of an overload 503, in seconds")
    worker_stall_s: float = Field(
        30.0, gt=0.0,
        description="seconds without a heartbeat from the model thread before /readyz answers 503 (dead or hung)",
    )

    def prompt_bytes(self, context_length: int) -> int:
        """The per-prompt bound for a model with this context length (in tokens)."""
        return self.max_prompt_bytes if self.max_prompt_bytes is not None else PROMPT_BYTES_PER_TOKEN * context_length

    @property
    def heartbeat_s(self) -> float:
        """How often the model thread is asked for a heartbeat: often enough that a stall is seen in time."""
        return min(1.0, self.worker_stall_s / 4)

    def public(self, context_length: int) -> dict[str, int]:
        """The limits a client may want to know (shown by GET /info beside the settings' limits)."""
        return {"max_prompt_bytes": self.prompt_bytes(context_length),
                "max_prompt_bytes_total": self.max_prompt_bytes_total, "max_queue": self.max_queue}


def load_limits(**overrides: Any) -> ServingLimits:
    """Environment plus explicit overrides, or a SettingsError naming each bad setting."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ServingLimits(**clean)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
