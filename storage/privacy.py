"""Erasing a person (/forgetme): every module that keeps personal data offers ``forget_person``."""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import MODULES
from storage.people import LoginLock, User
from storage.state import forget_user_state


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """Unlink the card and erase the chat data of ``telegram_id`` from every table.

    The library's own record of the card (loans, fines) is the library's, not chat data, and stays;
    what the bot learnt from the chat goes.
    """
    for module in MODULES:
        hook = getattr(module, "forget_person", None)
        if hook is not None:
            await hook(session, telegram_id)
    await forget_user_state(session, telegram_id)
    await session.execute(delete(LoginLock).where(LoginLock.key == f"user:{telegram_id}"))
    await session.execute(delete(User).where(User.telegram_id == telegram_id))
