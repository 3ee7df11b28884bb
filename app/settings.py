"""Service configuration: one validated settings class, read from CLIPFORGE_* environment variables.

Invalid values stop start-up with a message that names the setting (`SettingsError`), so a
typo in a deployment fails loudly instead of serving with a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.config import Precision
from model.device import resolve_device
from model.errors import ClipforgeError
from model.image import DEFAULT_MAX_PIXELS

ENV_PREFIX = "CLIPFORGE_"


class SettingsError(ClipforgeError):
    """Settings that cannot be served with; the message names each bad setting."""


def _split_list(value: Any) -> Any:
    """Lists from the environment as comma-separated text ("a,b") or a JSON array."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a valid JSON array: {exc}") from exc
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything `clipforge serve` can be told; each field is also CLIPFORGE_<NAME> in the environment."""

    # env_ignore_empty: `CLIPFORGE_LABELS_FILE=` in an env file means "not set", not the path "".
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, env_ignore_empty=True)

    # what to serve
    checkpoint: Path = Field(description="checkpoint directory written by `clipforge train`")
    index: Path | None = Field(
        None, description="index: a FAISS index directory, a Milvus collection (milvus://HOST:PORT/COLLECTION, "
                          "milvus+https://HOST:PORT/COLLECTION, milvus-lite:PATH.db/COLLECTION) or a location file "
                          "naming one; without one the search and image endpoints answer 503",
    )
    labels_file: Path | None = Field(None, description="text file of default zero-shot labels, one per line")
    onnx: Path | None = Field(
        None, description="an ONNX export of the checkpoint (`clipforge model export CKPT --to onnx:DIR`): the model "
                          "thread encodes with onnxruntime on the CPU instead of torch; the export must carry the "
                          "checkpoint's content hash",
    )
    device: str = Field(
        "cpu", description="torch device for the model: cpu, cuda, cuda:N or auto (a GPU when one is visible)"
    )
    precision: Precision = Field(
        "fp32", description="weights and activations of the torch forward passes: fp32, or bf16 (faster on CPUs "
                            "with AMX or AVX512-BF16; on a ViT-B/32-sized model, embeddings within cosine 0.9999 "
                            "of fp32's)",
    )
    threads: int | None = Field(
        None, ge=1, le=1024,
        description="intra-op threads for torch and FAISS (default: all cores; 1 is faster on a machine shared with other jobs)",
    )
    # where to listen
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # auth
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="keys accepted as `Authorization: Bearer <key>` for writes"
    )
    protect_reads: bool = Field(
        False,
        description="require an API key for every API endpoint except /healthz and /readyz; the web page (/, "
                    "/static), /openapi.json and /docs stay open, and the page sends the key its user types in",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="origins allowed by CORS")
    # limits
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body in bytes")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest image in pixels (decompression-bomb guard)")
    max_texts: int = Field(256, ge=1, description="most texts per request")
    max_text_chars: int = Field(1000, ge=1, description="longest text in characters")
    max_labels: int = Field(1000, ge=1, description="most labels per classification")
    max_prompts: int | None = Field(
        None, ge=1,
        description="most label x template prompts one classification may encode (default: 8 x max_labels)",
    )
    max_images: int = Field(32, ge=1, description="most images per request")
    max_k: int = Field(100, ge=1, description="most search results per query")
    max_head_bytes: int = Field(
        2 * 1024 * 1024, ge=16 * 1024,
        description="largest request line plus headers; longer ones get a 431 and the connection is closed",
    )
    max_thumbnail: int = Field(1024, ge=16, description="largest thumbnail side in pixels")
    # image decoding: a small upload can decode to gigabytes (a 82 KB PNG of 6000 x 6000 16-bit pixels)
    memory_limit_bytes: int | None = Field(
        None, ge=64 * 1024 * 1024,
        description="memory the service may use, which sizes the decode budget below "
                    "(default: the container's cgroup limit, else the machine's RAM)",
    )
    decode_memory_bytes: int | None = Field(
        None, ge=16 * 1024 * 1024,
        description="memory the image decodes running at once may hold together: a decode waits until its "
                    "estimated share fits (default: a quarter of memory_limit_bytes)",
    )
    max_decode_bytes: int | None = Field(
        None, ge=1024 * 1024,
        description="largest decoded image (width x height x bands x bytes per band, read from its header); "
                    "a larger one gets a 413 before it is decoded (default: a quarter of decode_memory_bytes)",
    )
    # micro-batching
    batching: bool = Field(True, description="coalesce concurrent encodes into one forward pass")
    max_batch_size: int = Field(32, ge=1, le=4096, description="most items per forward pass")
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0, description="longest a request waits for a batch to fill")
    text_cache_size: int = Field(4096, ge=0, description="text embeddings kept in the LRU cache (0 turns it off)")
    index_mmap: bool = Field(
        False, description="memory-map the FAISS index instead of reading it in: for an index larger than the "
        "memory the service may use (its float16 rows stay on disk, read as queries need them)",
    )
    index_reload_s: float = Field(
        5.0, ge=0.0, description="how often to pick up index changes made by other processes (0: never)"
    )
    # operations
    log_level: str = Field("info", description="debug, info, warning or error")
    shutdown_timeout_s: float = Field(
        10.0, gt=0.0, description="seconds shutdown waits for in-flight requests before cancelling them (more than 0)"
    )

    _split = field_validator("api_keys", "cors_origins", mode="before")(_split_list)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"checkpoint directory {value} does not exist")
        return value

    @field_validator("index")
    @classmethod
    def _index_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        from index.errors import IndexStoreError
        from index.locations import is_milvus_text, resolve_location

        if is_milvus_text(str(value)):  # a collection on a server: checked when the service opens it
            try:
                resolve_location(value)
            except IndexStoreError as exc:
                raise ValueError(str(exc)) from None
        elif not value.exists():
            raise ValueError(f"index {value} does not exist (build one with `clipforge index build`)")
        return value

    @field_validator("onnx")
    @classmethod
    def _onnx_export_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"ONNX export folder {value} does not exist (write one with "
                             "`clipforge model export CKPT --to onnx:DIR`)")
        return value

    @field_validator("labels_file")
    @classmethod
    def _labels_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"labels file {value} does not exist")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            return str(resolve_device(value))
        except ClipforgeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("api_keys")
    @classmethod
    def _keys_are_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            if len(key.get_secret_value()) < 8:
                raise ValueError("every API key must be at least 8 characters")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"must be one of debug, info, warning, error, got {value!r}")
        return level

    @model_validator(mode="after")
    def _reads_need_keys(self) -> Settings:
        if self.protect_reads and not self.api_keys:
            raise ValueError("protect_reads needs at least one key in api_keys")
        if self.onnx is not None and self.device != "cpu":
            raise ValueError(f"the ONNX path runs on the CPU; drop onnx or serve on device cpu, not {self.device}")
        if self.onnx is not None and self.precision != "fp32":
            raise ValueError(f"precision {self.precision} applies to the torch path; the ONNX export runs in fp32 "
                             "(drop onnx or precision)")
        return self

    @property
    def prompt_limit(self) -> int:
        """Labels x templates per classification: each prompt is a text encode, so this bounds a request's work."""
        return self.max_prompts if self.max_prompts is not None else 8 * self.max_labels

    @property
    def memory_limit(self) -> int:
        """memory_limit_bytes, or what the container or machine allows (app/memory.py)."""
        from .memory import memory_limit

        return self.memory_limit_bytes if self.memory_limit_bytes is not None else memory_limit()

    @property
    def decode_memory(self) -> int:
        """The bytes concurrent image decodes may hold together (app/decode.py's DecodeGate)."""
        return self.decode_memory_bytes if self.decode_memory_bytes is not None else self.memory_limit // 4

    @property
    def decode_limit(self) -> int:
        """The largest decoded size of one image, in bytes."""
        return self.max_decode_bytes if self.max_decode_bytes is not None else self.decode_memory // 4

    @property
    def effective_batch_size(self) -> int:
        """Batch-1 serving when batching is off: one forward pass per request."""
        return self.max_batch_size if self.batching else 1

    def default_labels(self) -> list[str]:
        """Labels from the labels file (blank lines and # comments skipped)."""
        if self.labels_file is None:
            return []
        lines = self.labels_file.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    def public_limits(self) -> dict[str, int]:
        """The limits a client may want to know (shown by GET /info)."""
        limits = {
            name: getattr(self, name)
            for name in ("max_upload_bytes", "max_pixels", "max_texts", "max_text_chars", "max_labels",
                         "max_images", "max_k", "max_thumbnail")
        }
        return {**limits, "max_prompts": self.prompt_limit, "max_decode_bytes": self.decode_limit}


def load_settings(**overrides: Any) -> Settings:
    """Environment plus explicit overrides (CLI flags win), or a SettingsError naming each bad setting."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """'invalid setting port (CLIPFORGE_PORT): ...' per problem, without echoing secret values."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        name = ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
        where = f"{name} ({ENV_PREFIX}{name.upper()})" if name else "settings"
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"invalid setting {where}: {message}")
    return "; ".join(parts)
