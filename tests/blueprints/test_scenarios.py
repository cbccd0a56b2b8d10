"""The scenario files beside the seed blueprints (`blueprints/*.scenarios.yml`, the format in
tests/blueprints/scenarios.py): each scenario runs on the time-skipping server, and a seed's
scenarios together take every transition its paths can take and every max_visits redirect.

With PROCFLOW_RECORD_HISTORIES=<dir> the scenarios that let no time pass run on the dev
server instead (histories with updates written by the time-skipping server do not replay)
and each writes its history to <dir>/blueprint__<process>__<scenario>.json:

    PROCFLOW_RECORD_HISTORIES=tests/histories .venv/bin/python -m pytest -q \
        tests/blueprints/test_scenarios.py
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from tests.blueprints import scenarios
from tests.blueprints.conftest import SEEDS
from tests.support import start_dev_server
from tests.workflows.conftest import start_time_skipping

FILES = sorted(SEEDS.glob("*.scenarios.yml"))
LOADED = {path.name: scenarios.load(path) for path in FILES}
CASES = [(file, s.name) for file, loaded in LOADED.items() for s in loaded.spec.scenarios]
RECORD = os.environ.get("PROCFLOW_RECORD_HISTORIES")


@dataclass
class Runs:
    """The scenario runs of the session: each scenario runs once, on the time-skipping
    server (its own: the instants it skips to move no other test's clock), or on the dev
    server when recording and it lets no time pass."""

    time_skipping: scenarios.ScenarioWorker
    dev: scenarios.ScenarioWorker | None
    done: dict[tuple[str, str], scenarios.Outcome | Exception] = field(default_factory=dict)

    async def outcome(self, file: str, name: str) -> scenarios.Outcome:
        key = (file, name)
        if key not in self.done:
            loaded = LOADED[file]
            dev = None if loaded.scenario(name).passes_time else self.dev
            try:
                self.done[key] = await scenarios.run(
                    dev or self.time_skipping,
                    loaded,
                    name,
                    record=Path(RECORD) if dev is not None and RECORD else None,
                )
            except Exception as err:  # kept: the coverage test names it
                self.done[key] = err
        found = self.done[key]
        if isinstance(found, Exception):
            raise found
        return found


async def _dev_server() -> WorkflowEnvironment:
    """The dev server, as tests/workflows/conftest.py's `ts_env` starts it for recording."""
    return await start_dev_server()


@pytest_asyncio.fixture(scope="session")
async def runs() -> AsyncIterator[Runs]:
    async with contextlib.AsyncExitStack() as stack:
        time_skipping = await start_time_skipping()
        stack.push_async_callback(time_skipping.shutdown)
        dev = None
        if RECORD:
            dev_env = await _dev_server()
            stack.push_async_callback(dev_env.shutdown)
            dev = await stack.enter_async_context(scenarios.scenario_worker(dev_env))
        worker = await stack.enter_async_context(scenarios.scenario_worker(time_skipping))
        yield Runs(worker, dev)


@pytest.mark.parametrize(("file", "name"), CASES, ids=[f"{f}::{n}" for f, n in CASES])
async def test_scenario(runs: Runs, file: str, name: str) -> None:
    await runs.outcome(file, name)


@pytest.mark.parametrize("file", list(LOADED))
async def test_scenarios_take_every_transition_of_their_seed(runs: Runs, file: str) -> None:
    loaded = LOADED[file]
    expected = scenarios.transitions_of(loaded.blueprint)
    taken: set[str] = set()
    failed = []
    for s in loaded.spec.scenarios:
        try:
            taken.update((await runs.outcome(file, s.name)).transitions)
        except Exception:
            failed.append(s.name)
    missing = [t for t in expected if t not in taken]
    assert not missing, f"{file}: no scenario takes {', '.join(missing)}" + (
        f" (failed scenarios: {', '.join(failed)})" if failed else ""
    )
    unknown = sorted(taken - set(expected))
    assert not unknown, f"{file}: taken, but no path of the walk takes them: {unknown}"


def test_every_seed_has_a_scenario_file() -> None:
    seeds = sorted(p.name.removesuffix(".yaml") for p in SEEDS.glob("*.yaml"))
    assert sorted(loaded.spec.blueprint for loaded in LOADED.values()) == seeds


# ----------------------------------------------------------------------------- the runner itself
GOOD = """
blueprint: complaint
actors: {sam: [support]}
scenarios:
  - name: broken
    requester: rita
    start: {ticket_no: T-BAD-1, company_name: ACME, customer_email: a@b.co, channel: web,
            summary: broken}
    steps:
"""


def _file(tmp_path: Path, steps: str, end: str = "running: true") -> Path:
    path = tmp_path / "complaint.scenarios.yml"
    path.write_text(GOOD + steps + "    " + end + "\n")
    return path


def test_a_file_naming_an_unknown_step_or_key_is_refused_naming_where(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "      - decide: {step: acknowledge, by: sam, outcome: acknowledged}\n"
        "      - decide: {step: acknowledgement, by: sam, outcome: acknowledged}\n"
        "      - expect: {stage: resolving, open: [record]}\n"
        "      - decide: {step: record, by: someone, outcome: recorded}\n"
        "      - decide: {step: record, by: sam, outcome: filed}\n"
        "      - event: {name: feedback}\n",
    )
    with pytest.raises(scenarios.ScenarioFileError) as err:
        scenarios.load(path)
    problems = str(err.value).splitlines()
    assert problems == [
        "complaint.scenarios.yml: 5 problem(s):",
        "  scenario 'broken' (#0), step 1 (decide): step: unknown task step 'acknowledgement'; "
        "known: acknowledge, record, resolve, decide, follow_up",
        "  scenario 'broken' (#0), step 2 (expect): stage: unknown stage 'resolving'; known: "
        "acknowledge, record, resolve, manager_review, notify, feedback, follow_up, decline, "
        "closed, declined, cancelled, failed",
        "  scenario 'broken' (#0), step 3 (decide): by: unknown actor (list it under actors) "
        "'someone'; known: sam",
        "  scenario 'broken' (#0), step 4 (decide): outcome: unknown outcome 'filed'; known: "
        "recorded, not_a_complaint",
        "  scenario 'broken' (#0), step 5 (event): name: unknown event 'feedback'; known: "
        "feedback_received",
    ]

    path = _file(tmp_path, "      - decide: {step: record, by: sam, outcome: x, colour: red}\n")
    with pytest.raises(scenarios.ScenarioFileError, match=r"step 0: decide\.colour: Extra"):
        scenarios.load(path)
    path = _file(tmp_path, "      - {advance: P1D, expect: {stage: record}}\n")
    with pytest.raises(
        scenarios.ScenarioFileError, match=r"step 0: Value error, a step is exactly"
    ):
        scenarios.load(path)
    path = _file(
        tmp_path, "      - refused: {decide: {step: record, by: sam, outcome: x}, error: Nope}\n"
    )
    with pytest.raises(scenarios.ScenarioFileError, match=r"refused\.error: .*'Nope' is not an"):
        scenarios.load(path)


async def test_a_wrong_expectation_fails_naming_the_step(runs: Runs, tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "      - decide: {step: acknowledge, by: sam, outcome: acknowledged}\n"
        "      - expect: {stage: record, candidates: {record: [support]}}\n"
        "      - expect: {stage: resolve, open: [record], visits: {record: 2}}\n",
    )
    loaded = scenarios.load(path)
    with pytest.raises(scenarios.ScenarioFailed) as err:
        await scenarios.run(runs.time_skipping, loaded, "broken")
    assert str(err.value) == (
        "complaint.scenarios.yml: scenario 'broken', step 2 (expect): stage is 'record', not "
        "'resolve'; visits of record: 1, not 2"
    )


async def test_a_refusal_that_does_not_come_and_a_closed_step_fail(
    runs: Runs, tmp_path: Path
) -> None:
    loaded = scenarios.load(
        _file(
            tmp_path,
            "      - refused: {decide: {step: acknowledge, by: sam, outcome: acknowledged},"
            " error: NotPermitted}\n",
        )
    )
    with pytest.raises(scenarios.ScenarioFailed, match=r"step 0 \(refused\): accepted; expected"):
        await scenarios.run(runs.time_skipping, loaded, "broken")
    loaded = scenarios.load(
        _file(
            tmp_path,
            "      - decide: {step: record, by: sam, outcome: recorded}\n",
            end="end: {stage: closed, outcome: closed}",
        )
    )
    with pytest.raises(
        scenarios.ScenarioFailed, match=r"step 0 \(decide\): step 'record' has no open task"
    ):
        await scenarios.run(runs.time_skipping, loaded, "broken")
    loaded = scenarios.load(
        _file(
            tmp_path,
            "      - decide: {step: acknowledge, by: sam, outcome: acknowledged}\n",
            end="end: {stage: closed, outcome: closed}",
        )
    )
    with pytest.raises(scenarios.ScenarioFailed, match=r"end: still running in stage 'record'"):
        await scenarios.run(runs.time_skipping, loaded, "broken")
