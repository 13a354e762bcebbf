"""The study: an Optuna RDB storage (SQLite in the output folder, or any PostgreSQL / MySQL server) plus four small
tables of rad's own that make workers on one or many hosts cooperate.

The default is `sqlite:///DIR/study.db`; `rad search --storage postgresql://...` puts the study on a server so
that workers on other hosts join it. Both go through the same code: Optuna's public API for trials (RDBStorage
with heartbeats, `enqueue_trial`, its stale-trial retry callback) and SQLAlchemy Core for rad's tables, each row
keyed by the study's name, so one database holds many studies:

- `rad_search_claims`: one row per mask, naming the trial that measures it. A worker claims a mask inside one
  transaction that first locks the study's row of `rad_search_locks` (`SELECT ... FOR UPDATE`; on SQLite, whose
  driver ignores that, every transaction begins with `BEGIN IMMEDIATE` instead). Claimers are thus serialised:
  no mask is measured twice and the budget is shared exactly, however many processes join. A claim whose trial
  failed (a dead worker's trial is failed by Optuna's heartbeat after the grace period and re-queued by
  its retry callback) is void, and the mask may be claimed again.
- `rad_search_evaluations`: measurements made outside the optimiser (baselines, re-measurements), so a resumed
  search does not redo them.
- `rad_search_workers`: one row per process that joined, giving each a distinct index (and sampler seed).
- `rad_search_locks`: the row claimers lock.

Optuna's own tables are never written except through Optuna's API.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
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
import sqlalchemy as sa
from optuna.trial import TrialState

from rad.errors import RadError
from rad.search.objectives import Evaluation
from rad.utils.identity import check_same_settings
from rad.utils.locks import file_lock

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
STUDY_NAME = "rad-search"
SETTINGS_ATTR = "rad_settings"
SQLITE_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 10
MAX_RETRY = 2  # a mask whose measurement kills its worker three times is not re-queued again
DIALECTS = ("sqlite", "postgresql", "mysql")

_TABLES = sa.MetaData()
CLAIMS = sa.Table(
    "rad_search_claims", _TABLES,
    sa.Column("study", sa.String(255), primary_key=True), sa.Column("mask", sa.String(500), primary_key=True),
    sa.Column("trial", sa.Integer, nullable=False), sa.Column("worker", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False))
EVALUATIONS = sa.Table(
    "rad_search_evaluations", _TABLES,
    sa.Column("study", sa.String(255), primary_key=True), sa.Column("key", sa.String(500), primary_key=True),
    sa.Column("value", sa.Float, nullable=False), sa.Column("details", sa.Text, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False))
WORKERS = sa.Table(
    "rad_search_workers", _TABLES,
    sa.Column("study", sa.String(255), primary_key=True), sa.Column("worker", sa.Integer, primary_key=True),
    sa.Column("pid", sa.Integer, nullable=False), sa.Column("host", sa.String(255), nullable=False),
    sa.Column("started", sa.Float, nullable=False))
LOCKS = sa.Table("rad_search_locks", _TABLES, sa.Column("study", sa.String(255), primary_key=True))
_OLD_TABLE = "rad_claims"  # rad's tables before they were keyed by study (SQLite only)


def mask_key(mask) -> str:
    return ",".join(str(int(i)) for i in sorted(mask))


def parse_mask_key(key: str) -> tuple[int, ...]:
    return tuple(int(i) for i in key.split(",")) if key else ()


# -- where the study lives -------------------------------------------------------------------------------


def storage_url(folder: str | Path | None, storage: str | None) -> str:
    """The SQLAlchemy URL of the study: `storage` as given, else the SQLite file in `folder`."""
    if storage:
        return storage
    if folder is None:
        raise RadError("A search needs an --out folder or a --storage URL.")
    return f"sqlite:///{Path(folder) / STUDY_FILE}"


def shown_url(url: str) -> str:
    """The URL as logs and search.json show it: the password hidden."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<malformed URL>"


def check_storage(url: str) -> None:
    """Refuse a malformed URL, an unsupported database or one that cannot be reached: before any model loads."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise RadError(f"--storage {url!r} is not a database URL; give one such as "
                       "postgresql://user:password@host:5432/db, or leave --storage out for SQLite "
                       "in --out.") from None
    if parsed.get_backend_name() not in DIALECTS:
        raise RadError(f"--storage {shown_url(url)}: rad's search runs on {', '.join(DIALECTS)} (Optuna's RDB "
                       f"storages), not {parsed.get_backend_name()}; give a URL of one of those.")
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise RadError("--storage sqlite needs a file (sqlite:///path/study.db): an in-memory study is lost "
                           "when the worker ends and no other worker can join it.")
        if not Path(database).parent.is_dir():
            raise RadError(f"--storage {url}: the folder {Path(database).parent} does not exist; create it or "
                           "give another path.")
        return
    try:
        engine = sa.create_engine(url, **_engine_kwargs(parsed))
    except ImportError as err:
        raise RadError(f"--storage {shown_url(url)} needs the database driver {err.name or err}; install it "
                       "with `pip install 'rad[postgres]'` (psycopg 3; for MySQL, a driver such as PyMySQL with a "
                       "mysql+pymysql:// URL).") from None
    except sa.exc.ArgumentError as err:
        raise RadError(f"--storage {shown_url(url)} is not a usable database URL ({err}).") from None
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as err:
        reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
        raise RadError(f"--storage {shown_url(url)} cannot be reached ({reason}); check that the server runs "
                       "and the URL's host, port, user and database are right.") from None
    finally:
        engine.dispose()


def _engine_kwargs(parsed: sa.engine.URL) -> dict:
    if parsed.get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    if parsed.get_backend_name() == "mysql":
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True,
                "pool_recycle": 3600}
    return {}


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
    """Opens (creating or resuming) a study and coordinates claims on it.

    `folder`: where the SQLite study lives when no `url` is given (DIR/study.db). `url`: any SQLAlchemy URL
    of SQLite, PostgreSQL or MySQL; `study_name` tells studies in one database apart.

    The optimiser sees four calls: `refresh` (heartbeat check, then the shared budget), `claim_next` (may
    this trial measure its mask?), `finish` (record the measurement) and `run_trial` (one trial, dropping
    a result whose trial was declared dead meanwhile). `clock` gives the local time (tests move it).
    """

    def __init__(self, folder: str | Path | None = None, *, url: str | None = None, study_name: str = STUDY_NAME,
                 heartbeat_seconds: int = 10,
                 clock: Callable[[], datetime.datetime] = datetime.datetime.now):
        self.folder = Path(folder) if folder is not None else None
        self.url = storage_url(folder, url)
        self.parsed = sa.engine.make_url(self.url)
        self.dialect = self.parsed.get_backend_name()
        self.study_name = study_name
        self.heartbeat_seconds = int(heartbeat_seconds)
        self.clock = clock
        self.storage: optuna.storages.RDBStorage | None = None
        self.engine: sa.Engine | None = None

    @property
    def where(self) -> str:
        """The study as messages name it."""
        if self.dialect == "sqlite" and self.folder is not None and self.url == storage_url(self.folder, None):
            return str(self.folder)
        return f"study {self.study_name!r} in {shown_url(self.url)}"

    @property
    def path(self) -> Path | None:
        """The SQLite file, if the study is one."""
        return Path(self.parsed.database) if self.dialect == "sqlite" else None

    # -- opening -------------------------------------------------------------------------------------

    def open(self, sampler: optuna.samplers.BaseSampler, settings: dict, *, resume: bool) -> optuna.Study:
        """The study, created or (with `resume`) loaded or joined; a resumed study must have the same settings.

        Nothing is written to an existing study before its settings are checked against these.
        """
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.engine = self._make_engine()
        with self.exclusive("open"):  # two fresh workers must not both create the tables or the study
            try:
                self._check_not_old_format()
                self.storage = self._make_optuna_storage()
                existed = self.study_name in optuna.study.get_all_study_names(self.storage)
                if existed and not resume:
                    raise RadError(
                        f"{self.where} already holds a search; pass --resume to continue it (or to join it as "
                        "another worker), or choose another --out folder or --study name."
                    )
                if existed:
                    stored = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                               sampler=sampler).user_attrs.get(SETTINGS_ATTR)
                    if stored is not None:
                        check_same_settings(
                            stored, decisive_settings(settings), what=f"The search in {self.where}",
                            advice="resume it with the same settings, or choose another --out folder or --study",
                            describe=lambda name, old, new: f"started with {name} = {old!r}, not {new!r}")
                study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                            direction="maximize", sampler=sampler, load_if_exists=True)
                if SETTINGS_ATTR not in study.user_attrs:
                    study.set_user_attr(SETTINGS_ATTR, settings)
                _TABLES.create_all(self.engine)
                with self.engine.begin() as conn:
                    present = conn.execute(sa.select(LOCKS.c.study).where(LOCKS.c.study == self.study_name))
                    if present.first() is None:
                        conn.execute(LOCKS.insert().values(study=self.study_name))
            except RadError:
                raise
            except (sqlite3.DatabaseError, optuna.exceptions.OptunaError, sa.exc.SQLAlchemyError) as err:
                raise RadError(f"{self.where} is not a readable search study ({str(err)[:200]}); remove it "
                               "or pick another --out folder.") from err
        if existed:
            logger.info("Resuming the search in %s (%d trials so far)", self.where, len(study.trials))
        return study

    def _make_engine(self) -> sa.Engine:
        if self.dialect != "sqlite":
            return sa.create_engine(self.url, **_engine_kwargs(self.parsed))
        engine = sa.create_engine(self.url, creator=self._connect_autocommit)
        sa.event.listen(engine, "begin", _begin_immediate)
        return engine

    def _make_optuna_storage(self) -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = _stale_trial_retry()
            if self.dialect != "sqlite":
                return optuna.storages.RDBStorage(
                    self.url, engine_kwargs=_engine_kwargs(self.parsed), heartbeat_interval=self.heartbeat_seconds,
                    grace_period=2 * self.heartbeat_seconds, **retry)
            if self.path is not None and not self.path.exists():
                conn = sqlite3.connect(self.path)
                try:  # persistent; with synchronous=NORMAL (see `_connect`) a commit needs no fsync
                    conn.execute("PRAGMA journal_mode=WAL")
                finally:
                    conn.close()
            storage = optuna.storages.RDBStorage(
                self.url, engine_kwargs={"creator": self._connect_autocommit},
                heartbeat_interval=self.heartbeat_seconds, grace_period=2 * self.heartbeat_seconds, **retry)
        # SQLite ignores SELECT ... FOR UPDATE, and the driver starts a transaction only at the first write,
        # so two processes could both read a WAITING (enqueued) trial and both run it. Every Optuna
        # transaction takes the write lock at its start instead: read-then-update is atomic. (A setting of
        # the connection, as Optuna documents for SQLite; its tables are untouched.)
        sa.event.listen(storage.engine, "begin", _begin_immediate)
        return storage

    def _check_not_old_format(self) -> None:
        if self.dialect == "sqlite" and sa.inspect(self.engine).has_table(_OLD_TABLE):
            raise RadError(f"{self.where} holds a search made by an older rad (its tables are not keyed by study); "
                           "finish it with that version, or start this search in another --out folder.")

    def _connect(self) -> sqlite3.Connection:
        """Every SQLite connection, Optuna's included: wait for locks instead of failing, and with WAL sync only
        at checkpoints (a killed process loses nothing; a power cut may lose the last trials, never the file)."""
        conn = sqlite3.connect(self.path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect_autocommit(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.isolation_level = None  # the driver never begins on its own; `_begin_immediate` does
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        """A transaction that holds the study's claim lock: claimers on every host are serialised."""
        with self.engine.begin() as conn:
            conn.execute(sa.select(LOCKS.c.study).where(LOCKS.c.study == self.study_name).with_for_update())
            yield conn

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A lock across processes and hosts held for the block, and released if the holder dies: a file lock
        beside an SQLite study, a session-level advisory lock on a server (PostgreSQL, MySQL)."""
        if self.dialect == "sqlite":
            with file_lock(self.path.parent / f".{self.path.name}.{name}.lock"):
                yield
            return
        key = f"rad-search:{self.study_name}:{name}"
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
                conn.execute(sa.text("SELECT pg_advisory_lock(:n)"), {"n": number})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:n)"), {"n": number})
                    conn.commit()
            else:
                conn.execute(sa.text("SELECT GET_LOCK(:k, -1)"), {"k": key[:64]})
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT RELEASE_LOCK(:k)"), {"k": key[:64]})

    def register_worker(self) -> int:
        """A distinct index for this process: 0 for the first to join the study, 1 for the next, ..."""
        with self._transaction() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(WORKERS)
                                 .where(WORKERS.c.study == self.study_name)).scalar_one()
            conn.execute(WORKERS.insert().values(study=self.study_name, worker=count, pid=os.getpid(),
                                                 host=socket.gethostname()[:255], started=time.time()))
        return int(count)

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

    def _claims(self, conn: sa.Connection) -> list[tuple[str, int]]:
        rows = conn.execute(sa.select(CLAIMS.c.mask, CLAIMS.c.trial).where(CLAIMS.c.study == self.study_name))
        return [(str(mask), int(trial)) for mask, trial in rows]

    def claim(self, key: str, trial: int, worker: int, budget: int, states: TrialStates) -> Claim:
        """Atomically decide whether `trial` measures mask `key` (see `Claim`); record the claim if so.

        `states` is a snapshot of trial states taken before the call. States only move forward (RUNNING to
        COMPLETE / FAIL / PRUNED), so a stale snapshot can only make a finished claim look live: the
        answer is then "busy" or "full", never a second measurement.
        """
        with self._transaction() as conn:
            evaluated = in_flight = 0
            mine: tuple[int, str] | None = None
            for mask, owner in self._claims(conn):
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
            if mine is not None:  # a void claim (its trial failed or was pruned) is replaced
                conn.execute(CLAIMS.delete().where(CLAIMS.c.study == self.study_name, CLAIMS.c.mask == key))
            conn.execute(CLAIMS.insert().values(study=self.study_name, mask=key, trial=trial, worker=worker,
                                                claimed_at=time.time()))
            return Claim("claimed", trial=trial)

    def status(self, states: TrialStates) -> BudgetStatus:
        with self._transaction() as conn:
            rows = self._claims(conn)
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
        """Fail the trials of dead workers.

        Optuna fails RUNNING trials whose heartbeat is stale (and its retry callback re-queues them). A
        worker killed between creating a trial and its first heartbeat (while its sampler proposes) leaves one
        that no heartbeat ever marks; such a trial holds no claim, so once it is older than the grace period
        it is failed here through `study.tell`. (A live worker whose sampler takes longer than that loses only
        that proposal: its result is dropped by `run_trial`.)
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        with self._transaction() as conn:
            claiming = {owner for _, owner in self._claims(conn)}
        # Optuna writes datetime_start as naive local time of the worker's host.
        cutoff = self.clock() - datetime.timedelta(seconds=2 * self.heartbeat_seconds)
        for trial in running:
            if trial.number in claiming or trial.datetime_start is None or trial.datetime_start >= cutoff:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                with contextlib.suppress(ValueError, RuntimeError):  # it finished meanwhile
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)

    # -- measurements outside the optimiser ----------------------------------------------------------

    def get_evaluation(self, key: str) -> Evaluation | None:
        with self._transaction() as conn:
            row = conn.execute(sa.select(EVALUATIONS.c.value, EVALUATIONS.c.details, EVALUATIONS.c.seconds)
                               .where(EVALUATIONS.c.study == self.study_name, EVALUATIONS.c.key == key)).first()
        if row is None:
            return None
        return Evaluation(float(row[0]), json.loads(row[1]), float(row[2]))

    def put_evaluation(self, key: str, evaluation: Evaluation) -> None:
        with self._transaction() as conn:
            conn.execute(EVALUATIONS.delete().where(EVALUATIONS.c.study == self.study_name, EVALUATIONS.c.key == key))
            conn.execute(EVALUATIONS.insert().values(
                study=self.study_name, key=key, value=float(evaluation.value),
                details=json.dumps(evaluation.details), seconds=float(evaluation.seconds)))

    @contextlib.contextmanager
    def finalising(self) -> Iterator[None]:
        """Held while one worker measures baselines and writes the outputs; the next one then reuses them."""
        with self.exclusive("final"):
            yield

    def close(self) -> None:
        """Return the connections (a server counts them)."""
        if self.storage is not None:
            self.storage.engine.dispose()
        if self.engine is not None:
            self.engine.dispose()


def _stale_trial_retry() -> dict:
    """Optuna's re-queue of a dead worker's trial, under its name in the installed version (renamed in 4.9)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def decisive_settings(settings: dict) -> dict:
    """The settings a resumed or joined study must share: all but the info_ ones (recorded, not checked)."""
    return {name: value for name, value in settings.items() if not name.startswith("info_")}
