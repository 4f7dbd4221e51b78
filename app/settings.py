"""Service settings: every field also comes from an `HFF_<FIELD>` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.early_exit import EarlyExitMode
from contract.model_dir import MANIFEST_FILE


class Settings(BaseSettings):
    """What `hff-serve` serves and how; `HFF_MAX_BATCH_SIZE=32 hff-serve ...` and so on."""

    model_config = SettingsConfigDict(env_prefix="HFF_", extra="ignore", case_sensitive=False)

    # A model repository, <model>/<version>/ model dirs (README, "Model repository"); when set it
    # is served and MODEL_DIR is not
    MODEL_REPOSITORY: Path | None = None
    MODEL_DIR: Path = Path("models/digits")  # an exported model dir (manifest.json + ONNX graphs)
    POLL_S: float | None = Field(None, gt=0.0)  # poll the repository for new versions; unset: off
    HOST: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface (containers)
    PORT: int = Field(8000, ge=0, le=65535)
    MAX_BATCH_SIZE: int = Field(64, ge=1, le=4096)  # rows per onnxruntime call; 1 = batching off
    MAX_BATCH_WAIT_MS: float = Field(2.0, ge=0.0, le=1000.0)  # longest a batch waits to fill
    QUEUE_BOUND: int = Field(4096, ge=1)  # instances waiting for a batch; beyond it: 429
    MAX_INSTANCES: int = Field(256, ge=1)  # instances in one request; beyond it: 413
    MAX_BODY_BYTES: int = Field(16 * 1024 * 1024, ge=1024)  # request body limit; beyond it: 413
    REQUEST_TIMEOUT_S: float = Field(30.0, gt=0.0)  # a request still unanswered after this: 504
    QUEUE_BYTES: int = Field(64 * 1024 * 1024, ge=1024)  # body bytes admitted and unanswered
    QUEUE_WAIT_S: float = Field(10.0, ge=0.0)  # longest a request waits for room; then 429
    DECODE_THREADS: int = Field(1, ge=1, le=64)  # threads that parse bodies and decode images
    HEADER_TIMEOUT_S: float = Field(10.0, gt=0.0)  # request line + headers must arrive within
    MAX_HEADER_BYTES: int = Field(16 * 1024, ge=1024)  # request line + headers; beyond: 431
    BODY_TIMEOUT_S: float = Field(30.0, gt=0.0)  # the body must arrive within this; then 408
    KEEP_ALIVE_TIMEOUT_S: float = Field(5.0, gt=0.0)  # an idle keep-alive connection is closed
    MAX_CONNECTIONS: int = Field(1000, ge=1)  # open connections + requests; beyond: 503
    SHUTDOWN_TIMEOUT_S: float = Field(30.0, ge=0.0)  # after SIGTERM, requests still open are cut
    DEVICE: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when onnxruntime offers it
    THREADS: int = Field(0, ge=0, le=1024)  # onnxruntime intra-op threads; 0 = cores we may use
    # on CPU, whole-graph calls (early exit off) run this many at a time, the threads shared out
    # between them; a call that runs alone has them all (app.batcher); 1: one call at a time
    CONCURRENT_CALLS: int = Field(2, ge=1, le=64)
    # on CPU, a model call whose recent CPU time is under this runs on the event loop instead of
    # the inference thread (small models: the hand-off costs more than it overlaps); 0 = never;
    # unset: 1 ms, and every call in a worker with one onnxruntime thread (app.service)
    INLINE_CALL_MS: float | None = Field(None, ge=0.0, le=1000.0)
    EARLY_EXIT: EarlyExitMode = "auto"  # default mode: auto (manifest thresholds), off, or 0.9
    # Under load 'auto' moves to cheaper operating points to keep queueing under this; unset: off
    LATENCY_TARGET_MS: float | None = Field(None, gt=0.0, le=600_000.0)
    # The load controller never uses a point whose accuracy lower bound (on val) is below this;
    # unset: the calibrated expected accuracy - 0.02
    MIN_ACCURACY: float | None = Field(None, ge=0.0, le=1.0)
    # run-to-the-end (faster at saturation on CPU: README, "Overload benchmark"), or stage queues
    SCHEDULING: Literal["stage", "batch"] = "batch"
    API_KEY: SecretStr | None = None  # when set, predict/model routes need X-API-Key or Bearer
    LOG_LEVEL: Literal["debug", "info", "warning", "error"] = "info"
    # the HTTP server: uvicorn, or granian (the granian extra; Rust HTTP and the RSGI interface)
    SERVER: Literal["uvicorn", "granian"] = "uvicorn"
    # processes serving the port (SO_REUSEPORT), each with its own batcher; 1: this process
    # serves (README, "Several worker processes")
    WORKERS: int = Field(1, ge=1, le=64)

    @field_validator("MODEL_REPOSITORY")
    @classmethod
    def _model_repository(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"{v} is not a directory (a model repository holds <model>/<version>/ "
                             "model dirs)")
        return v

    @field_validator("MODEL_DIR")
    @classmethod
    def _model_dir(cls, v: Path, info: ValidationInfo) -> Path:
        if info.data.get("MODEL_REPOSITORY") is not None:
            return v  # the repository is served; an image's default HFF_MODEL_DIR does not matter
        if not v.is_dir():
            raise ValueError(f"model dir {v} does not exist (export one with hff-export)")
        if not (v / MANIFEST_FILE).is_file():
            raise ValueError(f"{v} holds no {MANIFEST_FILE}: not a model dir written by hff-export")
        return v

    @field_validator("LATENCY_TARGET_MS", "MIN_ACCURACY", "MODEL_REPOSITORY", "POLL_S",
                     "INLINE_CALL_MS", mode="before")
    @classmethod
    def _unset(cls, v):
        return None if isinstance(v, str) and v.strip() == "" else v  # VAR= (empty) means unset

    @field_validator("API_KEY", mode="before")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        if v is not None and str(v) == "":
            return None  # HFF_API_KEY= (empty) means no key, not an empty key
        if v is not None and len(str(v)) < 8:
            raise ValueError("an API key needs at least 8 characters")
        return v

    @model_validator(mode="after")
    def _workers_on_uvicorn(self) -> Settings:
        if self.WORKERS > 1 and self.SERVER != "uvicorn":
            raise ValueError("HFF_WORKERS > 1 runs uvicorn workers; with HFF_SERVER=granian "
                             "set HFF_WORKERS=1")
        return self

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _log_level(cls, v: str) -> str:
        return v.lower() if isinstance(v, str) else v
