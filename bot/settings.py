"""Settings from the environment (and a ``.env`` file), named as in the product specification."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOKEN_PATTERN = re.compile(r"^\d{3,20}:[A-Za-z0-9_-]{20,}$")


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

    @field_validator("staff_chat_id", "policy_file", "webhook_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

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
