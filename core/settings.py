"""The one settings object. Every value can be set by an environment variable PROCFLOW_<NAME>."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DATA_DIR = Path(".data")
DEV_JWT_SECRET = "change-me-in-production-procflow-dev-secret"
MIN_PRODUCTION_SECRET_BYTES = 32


class Settings(BaseSettings):
    # hide_input_in_errors: a startup error must not print the secrets or the database URL
    model_config = SettingsConfigDict(
        env_prefix="PROCFLOW_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    environment: Literal["embedded", "production"] = Field(
        "embedded",
        description="embedded: the dev stack of `make run`; production: refuses to start with "
        "the default JWT secret or one shorter than 32 bytes",
    )

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

    # Payload encryption (issue 14): AES-GCM on every payload the client, worker and API send
    payload_encryption: bool = Field(
        False, description="encrypt workflow payloads (AES-GCM) on the client, worker and API"
    )
    payload_keys: str = Field(
        "",
        description="encryption keys, `<key id>=<base64 of 32 bytes>` separated by commas, the "
        "newest last (it encrypts; every listed key decrypts); never commit them",
    )
    payload_keys_file: str = Field(
        "", description="a file holding payload_keys' text instead (one `id=key` per line)"
    )

    # Logs (issue 14)
    log_format: Literal["text", "json"] = Field(
        "text", description="text: readable lines; json: one JSON object per line"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Metrics (issue 14): Prometheus text format
    metrics_enabled: bool = Field(
        True,
        description="the API serves GET /metrics (unauthenticated, on the API port: request "
        "counts and latencies by route template, and the business series read from the "
        "database at scrape time)",
    )
    metrics_scrape_timeout_s: float = Field(
        5.0,
        gt=0,
        description="bound on the database queries of one /metrics scrape; past it (or on a "
        "database error) the business series are left out of that scrape and "
        "procflow_business_scrape_errors_total goes up",
    )
    worker_metrics_address: str = Field(
        "127.0.0.1:9464",
        description="host:port where the worker serves the Temporal SDK's own metrics "
        "(Prometheus, GET /metrics); empty: not served",
    )

    worker_health_address: str = Field(
        "127.0.0.1:9465",
        description="host:port where the worker answers GET /healthz (the Temporal worker, "
        "the mail dispatcher and the reconciler run) and GET /readyz (and Temporal answers "
        "and the database takes a write); 503 naming the part that is not; empty: not served",
    )

    # Traces (issue 14): OpenTelemetry, one decision one trace (core/tracing.py)
    tracing_enabled: bool = Field(
        False,
        description="trace the API (FastAPI), the Temporal client and the worker (workflow and "
        "activity spans) with OpenTelemetry",
    )
    otlp_endpoint: str = Field(
        "",
        description="OTLP/HTTP traces URL the spans are exported to (e.g. "
        "http://collector:4318/v1/traces); empty: tracing on exports nothing",
    )

    # Business records
    database_url: str = Field(
        f"sqlite+aiosqlite:///{DATA_DIR}/procflow.db",
        description="SQLAlchemy async URL; postgresql+asyncpg://... in production",
    )

    # Blueprints
    blueprints_dir: str = Field(
        "blueprints",
        description="directory of the seed blueprints (*.yaml), relative to the project root "
        "unless absolute; the API publishes each at start-up when its content is new (a seed "
        "published before is left alone); empty: no seeds",
    )

    # Process types
    process_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="modules of coded process types besides the built-in ones (comma-separated "
        "or a JSON list, e.g. bench.coded_complaint), imported at start-up by the worker and the "
        "API: each registers its types (workflows.registry.register) as it is imported, and the "
        "worker passes it through the workflow sandbox as it does the workflows package; one that "
        "cannot be imported stops the process with an error naming this setting",
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
    mail_lease_s: float = Field(
        60.0,
        gt=0,
        description="a claimed outbox row is left to its dispatcher this long; a dispatcher that "
        "dies holding it (worker killed) lets another send it once the lease ends (at least once)",
    )
    mail_max_backoff_s: float = Field(
        600.0, gt=0, description="longest wait before retrying a mail the SMTP server refused"
    )
    mail_max_attempts: int = Field(
        5,
        ge=1,
        description="attempts in all after which a mail whose last refusal was permanent (5xx, "
        "every recipient refused, an address the server cannot take) gives up: outbox status "
        "failed, an audit entry mail_failed, listed by GET /outbox?status=failed",
    )
    mail_max_transient_attempts: int = Field(
        50,
        ge=1,
        description="the same for transient failures (4xx, the SMTP server away); never fewer "
        "than mail_max_attempts. 50 with the default backoff: about 7 hours of retrying",
    )

    # Worker
    worker_max_cached_workflows: int = Field(
        1000,
        ge=0,
        description="instances a worker keeps in memory (about 0.15 MB each); the least recent "
        "beyond it are evicted and replayed from history on their next step",
    )
    reconcile_poll_s: float = Field(
        30.0,
        gt=0,
        description="the worker's read-model reconciler asks Temporal visibility this often for "
        "instances that ended abnormally (terminated, timed out, failed, canceled) and closes "
        "their open tasks and orders in the read model",
    )
    reconcile_lookback_s: float = Field(
        86400.0,
        gt=0,
        description="how far back a starting worker's reconciler looks for abnormal ends (what "
        "ended while no worker ran longer ago is not caught up)",
    )

    # Credentials
    jwt_secret: str = Field(
        DEV_JWT_SECRET,
        min_length=16,
        description="HMAC key that signs access tokens (in production: set, >= 32 bytes)",
    )
    jwt_algorithm: str = "HS256"
    jwt_ttl_minutes: int = Field(
        60,
        ge=1,
        le=1440,
        description="lifetime of an access token; tokens whose exp - iat is longer are refused",
    )

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
    api_auth_account_rate_limit_per_minute: int = Field(
        10,
        ge=1,
        description="sign-in attempts per username and minute, from any address, per API "
        "replica (more: 429 with Retry-After)",
    )
    auth_max_concurrent_hashes: int = Field(
        4,
        ge=1,
        description="password verifications (argon2, in worker threads) at once per API process",
    )
    auth_hash_wait_s: float = Field(
        2.0,
        gt=0,
        description="how long a sign-in waits for a free verification slot (then 503 with "
        "Retry-After)",
    )
    trusted_proxies: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="addresses or CIDRs of the reverse proxies whose X-Forwarded-For is believed "
        "(comma-separated or a JSON list); empty: the socket peer is the client",
    )

    @field_validator("trusted_proxies", "process_modules", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> Settings:
        if self.environment == "production":
            if self.jwt_secret == DEV_JWT_SECRET:
                raise ValueError(
                    "PROCFLOW_JWT_SECRET is the built-in development secret; in production set "
                    "it to a random string of at least 32 bytes (e.g. openssl rand -hex 32)"
                )
            if len(self.jwt_secret.encode()) < MIN_PRODUCTION_SECRET_BYTES:
                raise ValueError(
                    f"PROCFLOW_JWT_SECRET is {len(self.jwt_secret.encode())} bytes; in production "
                    f"it must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes"
                )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


class ProcessModuleError(RuntimeError):
    """A module named in PROCFLOW_PROCESS_MODULES cannot be imported: the process stops."""


def import_process_modules(modules: Sequence[str]) -> list[str]:
    """Import the modules of the setting `process_modules` (each registers its process types as
    it is imported); the modules, in order. ProcessModuleError naming the setting and the
    module if one cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:
            raise ProcessModuleError(
                f"PROCFLOW_PROCESS_MODULES names {name!r}, which cannot be imported: "
                f"{type(err).__name__}: {err}"
            ) from err
    return list(modules)
