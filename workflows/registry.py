"""The registry of process types: the one list that the worker, the policy endpoints, the seed
script and the generic API (`/process-types`, `/processes/...`, the inbox) read.

A process type is registered once, here (or by `register` in tests); nothing else lists
processes by hand. Imported by the API and the worker, never by workflow code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from workflows import sales_order
from workflows.blueprint.interpreter import BlueprintWorkflow
from workflows.policy import POLICY_MODELS, STRICT, PolicyModel


@dataclass(frozen=True)
class ProcessEvent:
    """An external event the gateway accepts (`POST /processes/{type}/{key}/events/{name}`):
    its body model and the workflow update that takes it."""

    name: str
    model: type[BaseModel]
    update: str
    description: str
    roles: frozenset[str] = frozenset()  # who may report it (empty: any signed-in user)


@dataclass(frozen=True)
class ProcessType:
    """What the system needs to know of one process type."""

    name: str  # ProcessType search attribute, policy type, workflow-id prefix
    title: str
    description: str
    workflow: type  # the workflow class (a subclass of the kernel)
    input_model: type[BaseModel]  # the workflow's run input
    start_model: type[BaseModel]  # the body of POST /processes/{type}: no requester in it
    build_input: Callable[[Any, str], BaseModel]  # (validated body, requester) -> run input
    business_key: Callable[[Any], str]  # the business key of a start body
    workflow_id: Callable[[str], str]  # deterministic id from the business key
    status_model: type[BaseModel]
    stages: tuple[str, ...]
    terminal_stages: frozenset[str]
    roles: tuple[str, ...]  # roles that act in it (tasks, cancel, events)
    policy_model: type[PolicyModel] | None = None
    events: Mapping[str, ProcessEvent] = field(default_factory=dict)
    cancel_update: str | None = None  # update taking {reason, actor}; None: not cancellable
    cancel_roles: frozenset[str] = frozenset()  # besides the requester
    start_roles: frozenset[str] = frozenset()  # who may start one (empty: any signed-in user)
    # a blueprint's: its workflow type is this name (a dynamic workflow), and `version` the
    # content hash its new instances run (workflows/blueprint/types.py builds the entry)
    workflow_name: str | None = None
    version: str | None = None

    def default_policy(self) -> dict | None:
        """The built-in policy document (what version 0 means); None: the type has no policy."""
        if self.policy_model is None:
            return None
        return self.policy_model().model_dump(mode="json")

    def validate_policy(self, document: dict, *, strict: bool = False) -> PolicyModel:
        """The document as the type's policy model; pydantic.ValidationError if it is not one,
        ValueError if the type has no policy. strict (publishing): every key must be given."""
        if self.policy_model is None:
            raise ValueError(f"process type {self.name} has no policy")
        return self.policy_model.model_validate(document, context={STRICT: strict})

    @property
    def cancellable(self) -> bool:
        return self.cancel_update is not None

    @property
    def is_blueprint(self) -> bool:
        return self.version is not None

    def workflow_type(self) -> Any:
        """What `Client.start_workflow` takes: the run method, or a blueprint's type name."""
        return self.workflow_name or self.workflow.run  # type: ignore[attr-defined]


SALES_ORDER = ProcessType(
    name=sales_order.PROCESS_TYPE,
    title="Sales order",
    description="Order to cash: validation, a tiered approval chain by amount, payment "
    "(prepaid, installments), stock, shipment and invoice; cancellation refunds.",
    workflow=sales_order.SalesOrderWorkflow,
    input_model=sales_order.SalesOrderInput,
    start_model=sales_order.OrderDetails,
    build_input=sales_order.submission,
    business_key=lambda details: details.order_no,
    workflow_id=sales_order.sales_order_workflow_id,
    status_model=sales_order.SalesOrderStatus,
    stages=tuple(s.value for s in sales_order.Stage),
    terminal_stages=frozenset(s.value for s in sales_order.TERMINAL_STAGES),
    roles=("requester", "sales", "vice-president", "sales-director", "finance", "manager"),
    policy_model=POLICY_MODELS[sales_order.PROCESS_TYPE],
    events=MappingProxyType(
        {
            "payment": ProcessEvent(
                name="payment",
                model=sales_order.PaymentEvent,
                update="pay",
                description="the payment provider reports money received for the order",
                roles=frozenset({"finance"}),
            )
        }
    ),
    start_roles=frozenset({"requester", "sales", "manager"}),
    cancel_update="cancel",
    cancel_roles=frozenset(sales_order.CANCEL_ROLES),
)

# Read it as `registry.PROCESS_TYPES` (not `from ... import`): `register` and `unregister`
# rebind it to a new read-only mapping instead of changing one in place, because production
# workers share the workflows package between instances (sandbox passthrough) and it keeps no
# mutable module state (tests/workflows/test_module_state.py).
PROCESS_TYPES: Mapping[str, ProcessType] = MappingProxyType({SALES_ORDER.name: SALES_ORDER})


class UnknownProcessType(KeyError):
    pass


def get(name: str) -> ProcessType:
    """The registered type of this name; UnknownProcessType (a KeyError) otherwise."""
    try:
        return PROCESS_TYPES[name]
    except KeyError:
        raise UnknownProcessType(name) from None


def register(process_type: ProcessType) -> ProcessType:
    """Add a process type (tests add their own); the same type again is a no-op, another type
    under a registered name is refused, except a blueprint's newer version replacing its
    older one (a publish)."""
    global PROCESS_TYPES
    existing = PROCESS_TYPES.get(process_type.name)
    replaces = existing is not None and existing.is_blueprint and process_type.is_blueprint
    if existing is not None and existing is not process_type and not replaces:
        raise ValueError(f"process type {process_type.name!r} is already registered")
    PROCESS_TYPES = MappingProxyType({**PROCESS_TYPES, process_type.name: process_type})
    return process_type


def unregister(name: str) -> None:
    """Remove a process type registered by `register` (tests clean up with it)."""
    global PROCESS_TYPES
    if name == SALES_ORDER.name:
        raise ValueError("the built-in process types cannot be removed")
    PROCESS_TYPES = MappingProxyType({k: t for k, t in PROCESS_TYPES.items() if k != name})


def workflows() -> list[type]:
    """The workflow classes a worker runs (one per class, in registration order), and the
    interpreter of every blueprint."""
    coded = [t.workflow for t in PROCESS_TYPES.values()]
    return list(dict.fromkeys([*coded, BlueprintWorkflow]))


def process_type_of(workflow_type: str) -> str | None:
    """The registered process type that runs as this workflow type (for log lines)."""
    for ptype in PROCESS_TYPES.values():
        name = ptype.workflow_name
        if name is None:
            definition = getattr(ptype.workflow, "__temporal_workflow_definition", None)
            name = getattr(definition, "name", None) or ptype.workflow.__name__
        if name == workflow_type:
            return ptype.name
    return None


def with_policy() -> list[ProcessType]:
    """The registered types that have a policy document (policy endpoints, seeds)."""
    return [t for t in PROCESS_TYPES.values() if t.policy_model is not None]


def terminal_stages() -> frozenset[str]:
    """Every stage in which some registered process has ended (the reconciler keeps them)."""
    return frozenset().union(*(t.terminal_stages for t in PROCESS_TYPES.values()))
