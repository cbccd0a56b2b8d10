"""The one settings object. Every value can be set by an environment variable PROCFLOW_<NAME>."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(".data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROCFLOW_", env_file=".env", extra="ignore")

    # Temporal
    temporal_address: str = Field(
        "127.0.0.1:7233", description="host:port of the Temporal frontend"
    )
    temporal_namespace: str = "default"
    task_queue: str = Field("procflow", description="task queue the workers poll")
    temporal_ui_url: str = "http://127.0.0.1:8233"
    temporal_rpc_timeout_s: float = Field(5.0, description="bound on one API->Temporal call")
    temporal_max_concurrency: int = Field(
        32,
        ge=1,
        description="requests in flight to Temporal per API process; a request that gets no "
        "slot within temporal_rpc_timeout_s is answered 503 with Retry-After",
    )

    # Business records
    database_url: str = Field(
        f"sqlite+aiosqlite:///{DATA_DIR}/procflow.db",
        description="SQLAlchemy async URL; postgresql+asyncpg://... in production",
    )

    # Mail
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_timeout_s: float = 10.0
    mail_from: str = "procflow@localhost"
    mail_poll_s: float = Field(
        2.0,
        gt=0,
        description="the worker's mail dispatcher looks for due outbox rows this often (it is "
        "also woken at once when its own worker queues mail)",
    )
    mail_batch_size: int = Field(50, ge=1, description="outbox rows claimed per SMTP session")
    mail_max_backoff_s: float = Field(
        600.0, gt=0, description="longest wait before retrying a mail the SMTP server refused"
    )

    # Worker
    worker_max_cached_workflows: int = Field(
        1000,
        ge=0,
        description="instances a worker keeps in memory (about 0.15 MB each); the least recent "
        "beyond it are evicted and replayed from history on their next step",
    )

    # Credentials
    jwt_secret: str = Field(
        "change-me-in-production-procflow-dev-secret",
        min_length=16,
        description="HMAC key that signs access tokens",
    )
    jwt_algorithm: str = "HS256"
    jwt_ttl_minutes: int = 60

    # Embedded payment sandbox: customers whose charges are declined (for demos and tests)
    sandbox_decline_customers: list[str] = Field(default_factory=lambda: ["CUST-DECLINE"])
    sandbox_pause_before_charge_s: float = Field(
        0.0,
        ge=0,
        description="fault tests only: the sandbox provider waits this long before a new charge "
        "(a worker killed there has charged nothing); 0 in every real deployment",
    )
    sandbox_pause_after_charge_s: float = Field(
        0.0,
        ge=0,
        description="fault tests only: the sandbox provider waits this long after a new charge "
        "committed, before answering (a worker killed there has charged); 0 in real deployments",
    )

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    update_wait_s: float = Field(30.0, description="how long a decision waits for the process")
    api_max_body_bytes: int = Field(
        64 * 1024, ge=1, description="largest request body accepted (larger: 413)"
    )
    api_rate_limit_per_minute: int = Field(
        120,
        ge=1,
        description="requests per authenticated user and minute (token bucket, per API replica; "
        "more: 429 with Retry-After)",
    )
    api_auth_rate_limit_per_minute: int = Field(
        30,
        ge=1,
        description="sign-in attempts (POST /auth/token) per client IP and minute, per API "
        "replica (more: 429 with Retry-After)",
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
