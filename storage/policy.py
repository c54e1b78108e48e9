"""The library's policy: circulation rules, notice schedule, opening hours, branches, places, service
levels and emergency templates. Built-in defaults, overridden by a TOML file
(``LIBRARYBOT_POLICY_FILE``); a bad file is refused with the line or key that is wrong.

Example file (every key optional)::

    [circulation]
    loan_days = 30
    renewal_days = 30
    max_renewals = 2
    renew_from = "due_date"        # or "today"
    overdue_block_days = 30
    fine_per_day = 0.10
    fine_limit = 10.00
    currency = "¥"
    hold_shelf_days = 7
    non_loanable_types = ["reference"]
    non_renewable_types = ["reserve"]

    [circulation.categories.student]
    max_renewals = 1

    [circulation.item_types.dvd]
    loan_days = 7
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, and the line or key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoanRules(_Strict):
    """Rules for one reader category or item type; unset fields fall back to the general rules."""

    loan_days: int | None = Field(default=None, ge=1)
    renewal_days: int | None = Field(default=None, ge=1)
    max_renewals: int | None = Field(default=None, ge=0)
    overdue_block_days: int | None = Field(default=None, ge=0)
    fine_per_day: float | None = Field(default=None, ge=0)
    fine_limit: float | None = Field(default=None, ge=0)
    min_days_before_due: int | None = Field(default=None, ge=0)
    min_days_between_renewals: int | None = Field(default=None, ge=0)


class Circulation(_Strict):
    loan_days: int = Field(default=30, ge=1)
    renewal_days: int = Field(default=30, ge=1)
    max_renewals: int = Field(default=2, ge=0)
    renew_from: Literal["due_date", "today"] = "due_date"
    overdue_block_days: int = Field(default=30, ge=0)
    fine_per_day: float = Field(default=0.10, ge=0)
    fine_limit: float = Field(default=10.0, ge=0)
    # Renewal refused when the due date is further away than this (0 = renew any time).
    min_days_before_due: int = Field(default=0, ge=0)
    # A loan renewed less than this many days ago is not renewed again (0 = no minimum): two presses
    # a minute apart must not move the due date two periods out.
    min_days_between_renewals: int = Field(default=1, ge=0)
    hold_shelf_days: int = Field(default=7, ge=1)
    non_loanable_types: list[str] = ["reference"]
    non_renewable_types: list[str] = ["reserve"]
    categories: dict[str, LoanRules] = {}
    item_types: dict[str, LoanRules] = {}
    # Returned loans are kept (for statistics, not as reading history) this many days, then erased.
    loan_history_days: int = Field(default=30, ge=0)
    currency: str = "¥"  # shown before fine amounts


class Notices(_Strict):
    time: dt.time = dt.time(8, 0)
    due_soon_days: list[int] = [3, 1]
    overdue_levels: list[int] = [1, 7, 14]
    staff_alert_days: int = Field(default=14, ge=1)
    hold_expiry_warning_days: int = Field(default=1, ge=0)


class Branch(_Strict):
    code: str
    name_zh: str
    name_en: str


class Place(_Strict):
    """A floor or area of the building, offered as a button when reporting an incident or a ticket."""

    code: str
    name_zh: str
    name_en: str


class OpeningDay(_Strict):
    days_zh: str
    days_en: str
    hours: str  # "08:00–22:00", or "closed"


class Library(_Strict):
    name_zh: str = "示例图书馆"
    name_en: str = "Sample Library"
    address_zh: str = "示例市文化路 1 号"
    address_en: str = "1 Culture Road, Sample City"
    phone: str = "+86 10 0000 0000"
    email: str = "service@library.example"
    website: str = "https://library.example"
    hours: list[OpeningDay] = [
        OpeningDay(days_zh="周一至周五", days_en="Monday–Friday", hours="08:00–22:00"),
        OpeningDay(days_zh="周六、周日", days_en="Saturday–Sunday", hours="09:00–18:00"),
    ]
    hours_note_zh: str = "法定节假日开放时间另行通知。"
    hours_note_en: str = "Opening hours on public holidays are announced separately."
    branches: list[Branch] = [
        Branch(code="main", name_zh="总馆", name_en="Main Library"),
        Branch(code="east", name_zh="东区分馆", name_en="East Branch"),
    ]
    places: list[Place] = [
        Place(code="1F", name_zh="一层 大厅与借还处", name_en="1F Lobby and circulation desk"),
        Place(code="2F", name_zh="二层 自然科学阅览区", name_en="2F Sciences reading area"),
        Place(code="3F", name_zh="三层 社会科学阅览区", name_en="3F Social Sciences reading area"),
        Place(code="4F", name_zh="四层 自习室", name_en="4F Study rooms"),
        Place(code="B1", name_zh="地下一层 密集书库", name_en="B1 Compact stacks"),
    ]


class DeskHours(_Strict):
    """When the reference desk is staffed: ISO weekdays (1 = Monday) and ``HH:MM`` times (``24:00`` allowed)."""

    weekdays: list[int] = [1, 2, 3, 4, 5]
    opens: str = Field(default="08:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    closes: str = Field(default="21:00", pattern=r"^(([01]\d|2[0-3]):[0-5]\d|24:00)$")


class Service(_Strict):
    ticket_first_response_hours: float = Field(default=24, gt=0)
    ticket_autoclose_days: int = Field(default=7, ge=1)
    tickets_per_day: int = Field(default=5, ge=1)
    incident_ack_minutes: float = Field(default=5, gt=0)
    ack_minutes: float = Field(default=10, gt=0)  # staff acknowledgement of an emergency broadcast
    # The reference desk (#16): a question nobody takes within this many minutes gets the reader told when to expect an answer.
    reference_wait_minutes: float = Field(default=10, gt=0)
    reference_hours: list[DeskHours] = [DeskHours(), DeskHours(weekdays=[6, 7], opens="09:00", closes="17:00")]


class Template(_Strict):
    zh: str
    en: str


def _default_templates() -> dict[str, Template]:
    return {
        "fire": Template(
            zh="【火警】{place}发生火情。请立即沿最近的安全出口撤离，不要使用电梯，听从工作人员指挥。（{time}）",
            en="FIRE at {place}. Leave the building now by the nearest exit. Do not use the lifts. Follow staff instructions. ({time})",
        ),
        "flood": Template(
            zh="【漏水】{place}出现漏水积水。请远离该区域并保管好个人物品，听从工作人员指挥。（{time}）",
            en="FLOODING at {place}. Keep away from the area and follow staff instructions. ({time})",
        ),
        "earthquake": Template(
            zh="【地震】请就近躲避在坚固桌下，远离窗户和书架；震动停止后沿安全通道有序撤离。（{time}）",
            en="EARTHQUAKE. Take cover under a sturdy table away from windows and shelves; when the shaking stops, leave calmly by the marked exits. ({time})",
        ),
        "power": Template(
            zh="【停电】{place}停电。请留在原地，等待工作人员引导，勿使用电梯。（{time}）",
            en="POWER OUTAGE at {place}. Stay where you are and wait for staff; do not use the lifts. ({time})",
        ),
        "weather": Template(
            zh="【恶劣天气】受恶劣天气影响，图书馆将于{time}起调整开放。请留在室内安全区域，关注后续通知。",
            en="SEVERE WEATHER. The library changes its opening from {time}. Stay indoors in a safe area and watch for further notices.",
        ),
        "security": Template(
            zh="【安全威胁】{place}出现安全威胁。请远离该区域，锁好门窗并保持安静，等待进一步通知。（{time}）",
            en="SECURITY THREAT at {place}. Keep away from the area, stay behind locked doors and keep quiet until further notice. ({time})",
        ),
        "evacuation": Template(
            zh="【紧急疏散】请所有人立即从{place}有序撤离至室外集合点。（{time}）",
            en="EVACUATION. Everyone must leave {place} now and go to the outdoor assembly point. ({time})",
        ),
        "other": Template(
            zh="【紧急通知】{place}：请听从工作人员指挥。（{time}）",
            en="EMERGENCY NOTICE for {place}: please follow staff instructions. ({time})",
        ),
        "allclear": Template(
            zh="【解除】此前的紧急情况已经解除，图书馆恢复正常。感谢您的配合。（{time}）",
            en="ALL CLEAR. The emergency is over and the library is back to normal. Thank you for your cooperation. ({time})",
        ),
    }


class IllPartner(_Strict):
    """A partner library (合作馆) reached over ISO 18626; ``[[ill.partners]]`` in rota order."""

    agency_id: str  # TYPE:VALUE, e.g. ISIL:CN-110000-A
    name_zh: str = Field(min_length=1)
    name_en: str = Field(min_length=1)
    endpoint: str  # where its ISO 18626 messages are POSTed
    auth_header: str = ""  # sent as Authorization, when set

    @field_validator("agency_id")
    @classmethod
    def _agency_id(cls, value: str) -> str:
        kind, sep, rest = value.strip().partition(":")
        if not sep or not kind.strip() or not rest.strip() or " " in kind.strip():
            raise ValueError("must be TYPE:VALUE, e.g. ISIL:CN-110000-A")
        return f"{kind.strip()}:{rest.strip()}"

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        url = urlparse(value.strip())
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.strip()

    def name(self, lang: str) -> str:
        return self.name_zh if lang == "zh" else self.name_en


class Ill(_Strict):
    """Interlibrary loan with partner libraries."""

    partners: list[IllPartner] = []

    @field_validator("partners")
    @classmethod
    def _unique(cls, value: list[IllPartner]) -> list[IllPartner]:
        seen: set[str] = set()
        for partner in value:
            if partner.agency_id in seen:
                raise ValueError(f"agency_id {partner.agency_id} is listed twice")
            seen.add(partner.agency_id)
        return value

    def partner(self, agency_id: str) -> IllPartner | None:
        """The partner with this agency id (as ``TYPE:VALUE``), if listed."""
        return next((p for p in self.partners if p.agency_id == agency_id), None)


class Policy(_Strict):
    circulation: Circulation = Circulation()
    notices: Notices = Notices()
    library: Library = Library()
    service: Service = Service()
    templates: dict[str, Template] = Field(default_factory=_default_templates)
    # Returned items with no hold are shelved here; shown in availability.
    retention_note: str = ""
    ill: Ill = Ill()  # partner libraries over ISO 18626 (#22)

    @field_validator("templates")
    @classmethod
    def _keep_default_templates(cls, value: dict[str, Template]) -> dict[str, Template]:
        return {**_default_templates(), **value}

    def loan_rules(self, category: str, item_type: str) -> Circulation:
        """The general circulation rules with the category's, then the item type's overrides applied."""
        merged = self.circulation.model_dump()
        for override in (self.circulation.categories.get(category), self.circulation.item_types.get(item_type)):
            if override is not None:
                merged.update({k: v for k, v in override.model_dump().items() if v is not None})
        return Circulation.model_validate(merged)

    def place_name(self, code: str, lang: str) -> str | None:
        for place in self.library.places:
            if place.code == code:
                return place.name_zh if lang == "zh" else place.name_en
        return None


def load_policy(path: str | Path | None) -> Policy:
    """The policy from ``path`` (TOML) over the built-in defaults; the defaults alone when None."""
    if path is None or str(path) == "":
        return Policy()
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise PolicyError(f"{path}: {problems}") from None
