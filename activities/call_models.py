"""The input and output models of the activities a blueprint may call (the catalog of
`workflows.blueprint.catalog` names them, with timeouts and retries; activities/blueprint_calls.py
implements them). Frozen, unknown keys refused."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from core.names import MAX_NAME, MAX_TEXT, NAME_PATTERN, ROLE_PATTERN

TemplateName = Annotated[str, Field(pattern=f"^{NAME_PATTERN}$", description="a mail template")]
RoleName = Annotated[str, Field(pattern=f"^{ROLE_PATTERN}$", max_length=MAX_NAME)]


class ActivityModel(BaseModel):
    """Base of the catalog's parameter and result models: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NotifyCustomerInput(ActivityModel):
    template: TemplateName
    to: EmailStr | None = Field(None, description="default: the instance's customer e-mail")


class NotifyRoleInput(ActivityModel):
    role: RoleName
    template: TemplateName


class Notified(ActivityModel):
    recipients: int = Field(description="how many people the mail went to")


class RecordNoteInput(ActivityModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class NoteRecorded(ActivityModel):
    note_id: str
