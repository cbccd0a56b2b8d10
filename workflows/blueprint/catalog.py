"""The activity catalog: what a blueprint's `call` step may run, as data.

Each entry names an activity, says in one line what it does, and gives the model of its
parameters (a blueprint's `with`, checked at publish), the model of its result, its timeout
and how often it is retried. Blueprints choose among these and set parameters only: never a
timeout, a retry or a URL. The activities themselves are implemented in `activities/` (the
interpreter references them by these names); their models are in activities/call_models.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.call_models import (
        ActivityModel,
        NoteRecorded,
        Notified,
        NotifyCustomerInput,
        NotifyRoleInput,
        RecordNoteInput,
    )


@dataclass(frozen=True)
class CatalogEntry:
    """An activity a blueprint may call."""

    name: str
    description: str  # one line
    input_model: type[ActivityModel]  # the `with` of a call
    output_model: type[ActivityModel]
    timeout: timedelta  # start to close
    retries: int  # attempts after the first, then the step fails


CATALOG: Mapping[str, CatalogEntry] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            CatalogEntry(
                name="notify_customer",
                description="Mail the customer a template filled with the instance's data.",
                input_model=NotifyCustomerInput,
                output_model=Notified,
                timeout=timedelta(seconds=30),
                retries=5,
            ),
            CatalogEntry(
                name="notify_role",
                description="Mail everyone who holds a role a template about the instance.",
                input_model=NotifyRoleInput,
                output_model=Notified,
                timeout=timedelta(seconds=30),
                retries=5,
            ),
            CatalogEntry(
                name="record_note",
                description="Add a note to the instance's record (audit log).",
                input_model=RecordNoteInput,
                output_model=NoteRecorded,
                timeout=timedelta(seconds=10),
                retries=3,
            ),
        )
    }
)
