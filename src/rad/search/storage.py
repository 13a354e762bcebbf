"""The study on disk: Optuna's SQLite storage plus three small tables that make workers cooperate.

`DIR/study.db` holds the Optuna study (trials, parameters, values, heartbeats) and, in the same file:

- `rad_claims`: one row per mask, naming the trial that measures it. A worker claims a mask inside one
  `BEGIN IMMEDIATE` transaction (SQLite's write lock serialises claimers), after checking that no live
  trial holds it and that the budget has a free slot. So no mask is measured twice and the budget is
  shared exactly, however many processes join. A claim whose trial failed (or whose worker died: Optuna's
  heartbeat marks its trial FAIL after the grace period) is void, and the mask may be claimed again.
- `rad_evaluations`: measurements made outside the optimiser (baselines, re-measurements), so a resumed
  search does not redo them.
- `rad_workers`: one row per process that joined, giving each a distinct index (and sampler seed).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

from rad.errors import RadError
from rad.search.objectives import Evaluation
from rad.utils.identity import check_same_settings

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
STUDY_NAME = "rad-search"
SETTINGS_ATTR = "rad_settings"
SQLITE_TIMEOUT_S = 120

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rad_claims (
    mask TEXT PRIMARY KEY, trial INTEGER NOT NULL, worker INTEGER NOT NULL, claimed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rad_evaluations (
    key TEXT PRIMARY KEY, value REAL NOT NULL, details TEXT NOT NULL, seconds REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rad_workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL, host TEXT NOT NULL, started REAL NOT NULL);
"""


def mask_key(mask) -> str:
    return ",".join(str(int(i)) for i in sorted(mask))


def parse_mask_key(key: str) -> tuple[int, ...]:
    return tuple(int(i) for i in key.split(",")) if key else ()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (released by the OS if the process dies)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Claim:
    """The answer to "may this trial measure this mask?".

    kind: "claimed" (measure it), "cached" (measured before: `value` of trial `trial`), "busy" (another
    live trial is measuring it now) or "full" (the budget is taken by finished and running measurements).
    """

    kind: str
    value: float | None = None
    trial: int | None = None

    @property
    def reason(self) -> str:
        """Why a "busy" or "full" claim is skipped, for the pruned trial's message."""
        return f"trial {self.trial} is measuring it" if self.kind == "busy" else "no budget left"


@dataclass(frozen=True)
class BudgetStatus:
    """The shared budget: masks measured, masks being measured by live trials, their keys; all trials."""

    evaluated: int
    in_flight: int
    claimed: frozenset[str]
    trials: int = 0


TrialStates = dict[int, tuple[TrialState, float | None]]


def trial_states(study: optuna.Study) -> TrialStates:
    return {t.number: (t.state, t.value) for t in study.get_trials(deepcopy=False)}


def _classify(trial: int, states: TrialStates) -> str:
    """"done", "void" or "live" (a trial newer than the snapshot is live: it was just created)."""
    if trial not in states:
        return "live"
    state = states[trial][0]
    if state == TrialState.COMPLETE:
        return "done"
    if state in (TrialState.FAIL, TrialState.PRUNED):
        return "void"
    return "live"


class StudyStore:
    """Opens (creating or resuming) the study in `folder` and coordinates claims on it.

    The optimiser sees four calls: `refresh` (heartbeat check, then the shared budget), `claim_next` (may
    this trial measure its mask?), `finish` (record the measurement) and `run_trial` (one trial, dropping
    a result whose trial was declared dead meanwhile). `clock` gives the local time (tests move it).
    """

    def __init__(self, folder: str | Path, *, heartbeat_seconds: int = 10,
                 clock: Callable[[], datetime.datetime] = datetime.datetime.now):
        self.folder = Path(folder)
        self.path = self.folder / STUDY_FILE
        self.heartbeat_seconds = int(heartbeat_seconds)
        self.clock = clock
        self.storage: optuna.storages.RDBStorage | None = None

    # -- opening -------------------------------------------------------------------------------------

    def open(self, sampler: optuna.samplers.BaseSampler, settings: dict, *, resume: bool) -> optuna.Study:
        """The study, created or (with `resume`) loaded; a resumed study must have the same settings."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with file_lock(self.folder / ".study.lock"):  # two fresh workers must not both create the tables
            existed = self.path.exists() and self.path.stat().st_size > 0
            if existed and not resume:
                raise RadError(
                    f"{self.folder} already holds a search ({STUDY_FILE}); pass --resume to continue it "
                    "(or to join it as another worker), or choose another --out folder."
                )
            if not existed:
                conn = sqlite3.connect(self.path)
                try:  # persistent; with synchronous=NORMAL (see `_connect`) a commit needs no fsync
                    conn.execute("PRAGMA journal_mode=WAL")
                finally:
                    conn.close()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.storage = optuna.storages.RDBStorage(
                        f"sqlite:///{self.path}",
                        engine_kwargs={"creator": self._connect_autocommit},
                        heartbeat_interval=self.heartbeat_seconds,
                        grace_period=2 * self.heartbeat_seconds,
                    )
                # SQLite ignores SELECT ... FOR UPDATE, and the driver starts a transaction only at the first
                # write, so two processes could both read a WAITING (enqueued) trial and both run it. Every
                # Optuna transaction takes the write lock at its start instead: read-then-update is atomic.
                sqlalchemy.event.listen(self.storage.engine, "begin", _begin_immediate)
                study = optuna.create_study(
                    storage=self.storage, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                    load_if_exists=True,
                )
            except (sqlite3.DatabaseError, optuna.exceptions.OptunaError) as err:
                raise RadError(f"{self.path} is not a readable search study ({err}); remove it or pick "
                               "another --out folder.") from err
            except Exception as err:  # SQLAlchemy wraps sqlite errors in its own types
                if "sqlalchemy" not in type(err).__module__:
                    raise
                raise RadError(f"{self.path} is not a readable search study ({str(err)[:200]}); remove it "
                               "or pick another --out folder.") from err
            conn = self._connect()
            try:
                conn.executescript(_SCHEMA)
            finally:
                conn.close()
            stored = study.user_attrs.get(SETTINGS_ATTR)
            if stored is None:
                study.set_user_attr(SETTINGS_ATTR, settings)
            else:
                check_same_settings(
                    stored, decisive_settings(settings), what=f"The search in {self.folder}",
                    advice="resume it with the same settings, or choose another --out folder",
                    describe=lambda name, old, new: f"started with {name} = {old!r}, not {new!r}")
        if existed:
            logger.info("Resuming the search in %s (%d trials so far)", self.folder, len(study.trials))
        return study

    def _connect(self) -> sqlite3.Connection:
        """Every connection, Optuna's included: wait for locks instead of failing, and with WAL sync only at
        checkpoints (a killed process loses nothing; a power cut may lose the last trials, never the file)."""
        conn = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect_autocommit(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.isolation_level = None  # the driver never begins on its own; `_begin_immediate` does
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect_autocommit()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def register_worker(self) -> int:
        """A distinct index for this process: 0 for the first to join the study, 1 for the next, ..."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO rad_workers (pid, host, started) VALUES (?, ?, ?)",
                (os.getpid(), socket.gethostname(), time.time()),
            )
            return int(cursor.lastrowid) - 1

    # -- the claim protocol, as the optimiser uses it -------------------------------------------------

    def refresh(self, study: optuna.Study) -> BudgetStatus:
        """Fail the trials of dead workers (heartbeat), then count the shared budget."""
        self.fail_stale_trials(study)
        return self.status(trial_states(study))

    def claimed_masks(self, study: optuna.Study) -> frozenset[str]:
        """Masks measured or being measured by a live trial (any worker)."""
        return self.status(trial_states(study)).claimed

    def claim_next(self, study: optuna.Study, trial: optuna.Trial, mask, worker: int, budget: int) -> Claim:
        """Claim `mask` for the running `trial` (see `claim`) and note the answer on the trial."""
        trial.set_user_attr("mask", list(mask))
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("source", trial.user_attrs.get("source", "sampler"))
        claim = self.claim(mask_key(mask), trial.number, worker, budget, trial_states(study))
        if claim.kind == "cached":
            trial.set_user_attr("cached", True)
            trial.set_user_attr("cached_from", claim.trial)
        elif claim.kind in ("busy", "full"):
            trial.set_user_attr("skipped", claim.kind)
        return claim

    @staticmethod
    def finish(trial: optuna.Trial, evaluation: Evaluation) -> float:
        """Note a claimed mask's measurement on its trial; the value to tell Optuna (COMPLETE ends the claim)."""
        trial.set_user_attr("cached", False)
        trial.set_user_attr("details", evaluation.details)
        trial.set_user_attr("seconds", round(evaluation.seconds, 6))
        return float(evaluation.value)

    @staticmethod
    def run_trial(study: optuna.Study, objective: Callable[[optuna.Trial], float]) -> bool:
        """Run one trial with Optuna's heartbeat; False if it was declared dead while running (result dropped).

        A trial declared dead by a heartbeat check (this worker was too slow) cannot be told its value once
        the objective has returned; its mask is free again and another trial measures it. Anything else,
        an error of the objective included, is a real error.
        """
        ran: dict[str, int] = {}

        def tracked(trial: optuna.Trial) -> float:
            value = objective(trial)
            ran["number"] = trial.number
            return value

        try:
            study.optimize(tracked, n_trials=1)
        except RuntimeError:
            if "number" not in ran or study.get_trials(deepcopy=False)[ran["number"]].state != TrialState.FAIL:
                raise
            logger.warning("Trial %d was declared dead while running; its result is dropped.", ran["number"])
            return False
        return True

    # -- claims --------------------------------------------------------------------------------------

    def claim(self, key: str, trial: int, worker: int, budget: int, states: TrialStates) -> Claim:
        """Atomically decide whether `trial` measures mask `key` (see `Claim`); record the claim if so.

        `states` is a snapshot of trial states taken before the call. States only move forward (RUNNING to
        COMPLETE / FAIL / PRUNED), so a stale snapshot can only make a finished claim look live: the
        answer is then "busy" or "full", never a second measurement.
        """
        with self._transaction() as conn:
            evaluated = in_flight = 0
            mine: tuple[int, str] | None = None
            for mask, owner in conn.execute("SELECT mask, trial FROM rad_claims"):
                status = _classify(owner, states)
                evaluated += status == "done"
                in_flight += status == "live"
                if mask == key:
                    mine = (owner, status)
            if mine is not None and mine[1] == "done":
                return Claim("cached", value=states[mine[0]][1], trial=mine[0])
            if mine is not None and mine[1] == "live":
                return Claim("busy", trial=mine[0])  # (never this trial: each trial runs in one process)
            if evaluated + in_flight >= budget:
                return Claim("full")
            conn.execute(
                "INSERT OR REPLACE INTO rad_claims (mask, trial, worker, claimed_at) VALUES (?, ?, ?, ?)",
                (key, trial, worker, time.time()),
            )
            return Claim("claimed", trial=trial)

    def status(self, states: TrialStates) -> BudgetStatus:
        with self._transaction() as conn:
            rows = conn.execute("SELECT mask, trial FROM rad_claims").fetchall()
        evaluated = in_flight = 0
        claimed = set()
        for mask, owner in rows:
            status = _classify(owner, states)
            evaluated += status == "done"
            in_flight += status == "live"
            if status != "void":
                claimed.add(mask)
        return BudgetStatus(evaluated, in_flight, frozenset(claimed), trials=len(states))

    def fail_stale_trials(self, study: optuna.Study) -> None:
        """Optuna fails RUNNING trials whose heartbeat is stale; a worker killed between creating a trial
        and its first heartbeat leaves one with no heartbeat at all, which Optuna never fails: fail those
        too once they are older than the grace period."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        # Optuna writes datetime_start as naive local time (SQLAlchemy's text form), so compare in the same.
        cutoff = (self.clock() - datetime.timedelta(seconds=2 * self.heartbeat_seconds)).isoformat(" ")
        with contextlib.closing(self._connect_autocommit()) as conn:
            rows = conn.execute(
                "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND h.trial_id IS NULL AND t.datetime_start < ?", (cutoff,)
            ).fetchall()
        for (trial_id,) in rows:
            with contextlib.suppress(RuntimeError):  # it finished meanwhile (a slow but live worker)
                study._storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # -- measurements outside the optimiser ----------------------------------------------------------

    def get_evaluation(self, key: str) -> Evaluation | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT value, details, seconds FROM rad_evaluations WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return Evaluation(float(row[0]), json.loads(row[1]), float(row[2]))

    def put_evaluation(self, key: str, evaluation: Evaluation) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rad_evaluations (key, value, details, seconds) VALUES (?, ?, ?, ?)",
                (key, float(evaluation.value), json.dumps(evaluation.details), float(evaluation.seconds)),
            )

    @contextlib.contextmanager
    def finalising(self) -> Iterator[None]:
        """Held while one worker measures baselines and writes the outputs; the next one then reuses them."""
        with file_lock(self.folder / ".final.lock"):
            yield


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def decisive_settings(settings: dict) -> dict:
    """The settings a resumed or joined study must share: all but the info_ ones (recorded, not checked)."""
    return {name: value for name, value in settings.items() if not name.startswith("info_")}
