"""The emulator's groups as they change under a bot, as Telegram does it.

* A group that becomes a supergroup (made public, topics enabled, more than 200 members) gets a new
  id. Both chats get a service message (``migrate_to_chat_id`` in the old one,
  ``migrate_from_chat_id`` in the new one), and every call naming the old id is answered 400
  "Bad Request: group chat was upgraded to a supergroup chat" with ``parameters.migrate_to_chat_id``.
* The bot removed from a group (``left`` / ``kicked``) or restricted without the right to post:
  the bot gets a ``my_chat_member`` update; sends then get 403 "Forbidden: bot was kicked from the
  group chat" or 400 "Bad Request: not enough rights to send text messages to the chat".
* A forum supergroup with topics: ``message_thread_id`` must name one of its topics ("message
  thread not found" otherwise); the message carries it back with ``is_topic_message``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.emulator import Params

JSON = dict[str, Any]

SEND_METHODS = frozenset(
    "sendmessage sendphoto senddocument sendsticker sendmediagroup copymessage forwardmessage sendvideo "
    "sendaudio sendvoice sendanimation sendlocation sendvenue sendcontact sendpoll senddice".split()
)
RIGHTS = (
    "can_send_messages can_send_audios can_send_documents can_send_photos can_send_videos can_send_video_notes "
    "can_send_voice_notes can_send_polls can_send_other_messages can_add_web_page_previews can_change_info "
    "can_invite_users can_pin_messages can_manage_topics can_edit_tag can_react_to_messages"
).split()
ADMIN_RIGHTS = (
    "can_be_edited is_anonymous can_manage_chat can_delete_messages can_manage_video_chats can_restrict_members "
    "can_promote_members can_change_info can_invite_users can_post_stories can_edit_stories can_delete_stories "
    "can_pin_messages can_manage_topics"
).split()


@dataclass
class GroupChanges:
    migrated: dict[int, int] = field(default_factory=dict)  # old group id -> its supergroup's id
    bot_member: dict[int, JSON] = field(default_factory=dict)  # chat id -> the bot's ChatMember
    forums: dict[int, dict[int, str]] = field(default_factory=dict)  # chat id -> thread id -> topic name


class GroupControls:
    """Test controls and checks of the emulator (mixed into :class:`bot.emulator.Emulator`)."""

    groups: GroupChanges

    def upgrade_group(
        self: Any, chat_id: int, new_id: int | None = None, *, by_user: int = 1, announce: bool = True
    ) -> int:
        """The group ``chat_id`` becomes a supergroup; its new id (``-100…``). Without ``announce``
        the bot gets no service message (as when it dropped its pending updates): only the errors
        of its next sends tell it."""
        old = self._chat(chat_id, "group")
        new_id = new_id if new_id is not None else -(1_000_000_000_000 + abs(chat_id))
        new = self._chat(new_id, "supergroup", old.title)
        self.groups.migrated[chat_id] = new_id
        if chat_id in self.groups.bot_member:
            self.groups.bot_member[new_id] = self.groups.bot_member[chat_id]
        user = self._users.get(by_user) or self._stub_user_api(by_user)
        for chat, key, value in ((old, "migrate_to_chat_id", new_id), (new, "migrate_from_chat_id", chat_id)):
            api: JSON = {"message_id": chat.next_message_id, "from": user, "chat": chat.api(), "date": int(time.time()), key: value}
            self._add_message(chat, api, from_bot=False, source_text=None)
            if announce:
                self._emit_update({"update_id": self._new_update_id(), "message": api})
        return new_id

    def set_bot_member(self: Any, chat_id: int, status: str, *, can_send_messages: bool = True, by_user: int = 1) -> None:
        """The bot's membership of a group changes (``member``, ``administrator``, ``restricted``,
        ``left``, ``kicked``); the bot gets a ``my_chat_member`` update as from Telegram."""
        chat = self._chat(chat_id)
        old = self.groups.bot_member.get(chat_id) or self._member_api("member", True)
        new = self._member_api(status, can_send_messages)
        self.groups.bot_member[chat_id] = new
        if status in ("left", "kicked"):
            self._blocked.add(chat_id)
        else:
            self._blocked.discard(chat_id)
        user = self._users.get(by_user) or self._stub_user_api(by_user)
        self._emit_update(
            {
                "update_id": self._new_update_id(),
                "my_chat_member": {
                    "chat": chat.api(), "from": user, "date": int(time.time()),
                    "old_chat_member": old, "new_chat_member": new,
                },
            }
        )

    def make_forum(self: Any, chat_id: int, topics: Mapping[int, str]) -> None:
        """The supergroup has topics (thread id -> name); the general topic needs no thread id."""
        self._chat(chat_id, "supergroup")
        self.groups.forums[chat_id] = dict(topics)

    def _member_api(self: Any, status: str, can_send_messages: bool) -> JSON:
        member: JSON = {"status": status, "user": self.bot_user}
        if status == "restricted":
            member.update(dict.fromkeys(RIGHTS, True), is_member=True, until_date=0, can_send_messages=can_send_messages)
        elif status == "administrator":
            member.update(dict.fromkeys(ADMIN_RIGHTS, True), is_anonymous=False, can_be_edited=False)
        elif status == "kicked":
            member["until_date"] = 0
        return member

    def _group_refusal(self: Any, method: str, p: Params) -> None:
        """What Telegram refuses because of what happened to the group (raises :class:`ApiError`)."""
        from bot.emulator import ApiError

        raw = p.raw.get("chat_id")
        try:
            chat_id = int(raw) if raw not in (None, "") else None
        except (TypeError, ValueError):
            return
        if chat_id is None:
            return
        if chat_id in self.groups.migrated:
            raise ApiError(
                400, "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": self.groups.migrated[chat_id]},
            )
        member = self.groups.bot_member.get(chat_id)
        if member is None:
            return
        if member["status"] in ("left", "kicked") and method.lower() in ("getchat", "getchatmember", "sendchataction"):
            raise ApiError(403, "Forbidden: bot was kicked from the group chat")
        if method.lower() in SEND_METHODS and member["status"] == "restricted" and not member.get("can_send_messages"):
            raise ApiError(400, "Bad Request: not enough rights to send text messages to the chat")

    def _thread(self: Any, chat_id: int, p: Params) -> JSON:
        """``message_thread_id`` of a send to a forum: checked, and carried by the message."""
        from bot.emulator import ApiError

        thread = p.get_int("message_thread_id")
        topics = self.groups.forums.get(chat_id)
        if not thread or topics is None:
            return {}
        if thread not in topics:
            raise ApiError(400, "Bad Request: message thread not found")
        return {"message_thread_id": thread, "is_topic_message": True}

    def _bot_member_of(self: Any, chat_id: int) -> JSON | None:
        return self.groups.bot_member.get(chat_id)

    def _forum_flag(self: Any, chat_id: int) -> JSON:
        return {"is_forum": True} if chat_id in self.groups.forums else {}

    def messages_api(self: Any, chat_id: int) -> list[JSON]:
        """The Bot API objects of a chat's messages, oldest first (with ``message_thread_id``,
        service fields and everything the flat views leave out)."""
        chat = self._chats.get(chat_id)
        return [dict(m.api) for m in chat.messages.values()] if chat else []
