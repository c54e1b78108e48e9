"""Settings from the environment (and a ``.env`` file), named as in the product specification."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOKEN_PATTERN = re.compile(r"^\d{3,20}:[A-Za-z0-9_-]{20,}$")
STAFF_TOPIC_KINDS = ("overdue", "ill", "tickets", "incidents", "reference", "events", "system")


def parse_staff_topics(value: str | None) -> dict[str, int]:
    """``LIBRARYBOT_STAFF_TOPICS`` (``incidents=12,ill=34``) as {kind: thread id}."""
    topics: dict[str, int] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        kind, sep, thread = part.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in STAFF_TOPIC_KINDS or not thread.strip().isdigit() or int(thread) <= 0:
            raise ValueError(
                f"LIBRARYBOT_STAFF_TOPICS: {part.strip()!r} is not kind=thread_id with a kind among {', '.join(STAFF_TOPIC_KINDS)}"
            )
        topics[kind] = int(thread)
    return topics


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    telegram_bot_token: SecretStr | None = Field(default=None, alias="TELEGRAM_BOT_TOKEN")
    database_url: str = Field(default="sqlite+aiosqlite:///librarybot.db", alias="LIBRARYBOT_DATABASE_URL")
    telegram_api_url: str = Field(default="https://api.telegram.org/bot", alias="LIBRARYBOT_TELEGRAM_API_URL")
    staff_chat_id: int | None = Field(default=None, alias="LIBRARYBOT_STAFF_CHAT_ID")
    timezone: str = Field(default="Asia/Shanghai", alias="LIBRARYBOT_TIMEZONE")
    language: str = Field(default="zh", alias="LIBRARYBOT_LANGUAGE")
    policy_file: str | None = Field(default=None, alias="LIBRARYBOT_POLICY_FILE")
    webhook_url: str | None = Field(default=None, alias="LIBRARYBOT_WEBHOOK_URL")
    webhook_secret: SecretStr | None = Field(default=None, alias="LIBRARYBOT_WEBHOOK_SECRET")
    listen: str = Field(default="127.0.0.1:8443", alias="LIBRARYBOT_LISTEN")
    broadcast_rate: float = Field(default=30, gt=0, alias="LIBRARYBOT_BROADCAST_RATE")
    paid_broadcast: bool = Field(default=False, alias="LIBRARYBOT_PAID_BROADCAST")
    log_level: str = Field(default="INFO", alias="LIBRARYBOT_LOG_LEVEL")
    ils: str = Field(default="local", alias="LIBRARYBOT_ILS")
    # The library's own system over SIP2 (LIBRARYBOT_ILS=sip2); see storage/ils_sip2.py and the README.
    sip2_host: str = Field(default="", alias="LIBRARYBOT_SIP2_HOST", validate_default=True)
    sip2_port: int = Field(default=6001, gt=0, lt=65536, alias="LIBRARYBOT_SIP2_PORT")
    sip2_user: str = Field(default="", alias="LIBRARYBOT_SIP2_USER")
    sip2_password: SecretStr | None = Field(default=None, alias="LIBRARYBOT_SIP2_PASSWORD")
    sip2_institution: str = Field(default="", alias="LIBRARYBOT_SIP2_INSTITUTION")
    sip2_location: str = Field(default="", alias="LIBRARYBOT_SIP2_LOCATION")
    sip2_tls: bool = Field(default=False, alias="LIBRARYBOT_SIP2_TLS")
    sip2_encoding: str = Field(default="utf-8", alias="LIBRARYBOT_SIP2_ENCODING")
    sip2_error_detection: bool = Field(default=True, alias="LIBRARYBOT_SIP2_ERROR_DETECTION")
    sip2_timeout: float = Field(default=5.0, gt=0, alias="LIBRARYBOT_SIP2_TIMEOUT")
    sip2_pool_size: int = Field(default=4, ge=1, alias="LIBRARYBOT_SIP2_POOL_SIZE")
    sip2_heartbeat_seconds: float = Field(default=60.0, ge=0, alias="LIBRARYBOT_SIP2_HEARTBEAT_SECONDS")
    sip2_terminal_password: SecretStr | None = Field(default=None, alias="LIBRARYBOT_SIP2_TERMINAL_PASSWORD")
    sip2_tls_verify: bool = Field(default=True, alias="LIBRARYBOT_SIP2_TLS_VERIFY")
    sip2_tls_ca_file: str | None = Field(default=None, alias="LIBRARYBOT_SIP2_TLS_CA_FILE")
    sip2_rate: float = Field(default=10.0, gt=0, alias="LIBRARYBOT_SIP2_RATE")  # requests/s of the notice cycle
    # A staff group with topics: "kind=thread_id,…" (see STAFF_TOPIC_KINDS); other alerts go to the general topic.
    staff_topics: str | None = Field(default=None, alias="LIBRARYBOT_STAFF_TOPICS")
    # Interlibrary loan with partner libraries over ISO 18626 (#22): this library's agency id, TYPE:VALUE,
    # and where POST /iso18626 is served; the exchange runs only when the agency id is set.
    ill_agency_id: str | None = Field(default=None, alias="LIBRARYBOT_ILL_AGENCY_ID")
    ill_listen: str = Field(default="127.0.0.1:8444", alias="LIBRARYBOT_ILL_LISTEN")

    @field_validator("ill_agency_id", mode="before")
    @classmethod
    def _ill_agency_id(cls, value: object) -> object:
        if value is None or str(value).strip() == "":
            return None
        kind, sep, rest = str(value).strip().partition(":")
        if not sep or not kind.strip() or not rest.strip():
            raise ValueError("LIBRARYBOT_ILL_AGENCY_ID must be TYPE:VALUE, e.g. ISIL:CN-110000-L")
        return f"{kind.strip()}:{rest.strip()}"

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        value = value.strip().lower()[:2]
        if value not in ("zh", "en"):
            raise ValueError("LIBRARYBOT_LANGUAGE must be zh or en")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        ZoneInfo(value)  # raises for an unknown zone
        return value

    @field_validator("ils")
    @classmethod
    def _known_ils(cls, value: str) -> str:
        value = value.strip().lower() or "local"
        if value not in ("local", "sip2"):
            raise ValueError("LIBRARYBOT_ILS must be local or sip2")
        return value

    @field_validator("sip2_host")
    @classmethod
    def _sip2_host_when_sip2(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if info.data.get("ils") == "sip2" and not value:
            raise ValueError("LIBRARYBOT_ILS=sip2 needs LIBRARYBOT_SIP2_HOST, the host name of the library's SIP2 server")
        return value

    @field_validator("sip2_encoding")
    @classmethod
    def _sip2_encoding(cls, value: str) -> str:
        from storage.sip2.protocol import check_encoding

        return check_encoding(value.strip() or "utf-8")

    @field_validator("sip2_tls_ca_file", mode="before")
    @classmethod
    def _empty_ca_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("staff_chat_id", "policy_file", "webhook_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("staff_topics")
    @classmethod
    def _staff_topics(cls, value: str | None) -> str | None:
        parse_staff_topics(value)  # raises with the reason
        return value or None

    @property
    def staff_topic_map(self) -> dict[str, int]:
        """The staff group's topic (``message_thread_id``) for each kind of alert that has one."""
        return parse_staff_topics(self.staff_topics)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def effective_broadcast_rate(self) -> float:
        """Telegram allows 30 messages/s, up to 1000 with paid broadcasts."""
        return min(self.broadcast_rate, 1000 if self.paid_broadcast else 30)

    def token(self) -> str:
        """The bot token, or a clear error when it is missing or malformed."""
        if self.telegram_bot_token is None or not self.telegram_bot_token.get_secret_value().strip():
            raise ValueError("TELEGRAM_BOT_TOKEN is not set: get one from @BotFather and set it in the environment or .env")
        token = self.telegram_bot_token.get_secret_value().strip()
        if not TOKEN_PATTERN.match(token):
            raise ValueError("TELEGRAM_BOT_TOKEN does not look like a bot token (digits, a colon, then letters)")
        return token

    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)
