"""The search on a shared study: the claim protocol on SQLite and on a real PostgreSQL server, CLI workers racing on
one PostgreSQL study with one killed mid-trial, and the storage URL's errors."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from rad.cli import main
from rad.errors import RadError
from rad.search import SearchConfig
from rad.search.storage import CLAIMS, StudyStore, check_storage, mask_key, trial_states
from tests.postgres_server import driver_available, postgres_bin, postgres_server
from tests.test_search import WORKER_ENV, _poll_until, _worker_cmd, tiny_folder  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
HAVE_POSTGRES = postgres_bin() is not None and driver_available()
needs_postgres = pytest.mark.skipif(
    not HAVE_POSTGRES and os.environ.get("RAD_REQUIRE_POSTGRES") != "1",
    reason="PostgreSQL or psycopg is not installed (make postgres-tools; make setup)")


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


def _study_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------ the protocol


def _race_claims(make_store, budget: int, masks: list[tuple[int, ...]]) -> list[tuple[int, str, str]]:
    """Two stores (two engines, as two hosts have), two threads each, claiming random masks of `masks` for fresh
    trials that stay RUNNING: (trial, mask, answer) of every claim."""
    answers: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    stores = [make_store() for _ in range(2)]
    studies = [store.open(optuna.samplers.RandomSampler(seed=i), {"k": 2}, resume=True)
               for i, store in enumerate(stores)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        store, study = stores[index % 2], studies[index % 2]
        rng = random.Random(index)
        try:
            for _ in range(15):
                trial = study.ask()
                mask = masks[rng.randrange(len(masks))]
                claim = store.claim(mask_key(mask), trial.number, index, budget, trial_states(study))
                with lock:
                    answers.append((trial.number, mask_key(mask), claim.kind))
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert not errors, errors
    return answers


def _check_race(answers: list[tuple[int, str, str]], budget: int) -> None:
    claimed = [mask for _, mask, kind in answers if kind == "claimed"]
    assert len(answers) == 60
    assert len(claimed) == budget, "the budget is shared exactly"
    assert len(set(claimed)) == budget, "no mask is claimed twice"
    assert {kind for _, _, kind in answers} <= {"claimed", "busy", "full"}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # plain ask() here; the search uses optimize()
def test_claims_racing_on_one_sqlite_study_share_the_budget_exactly(tmp_path):
    masks = [(a, b) for a in range(5) for b in range(a + 1, 5)]  # 10 masks
    answers = _race_claims(lambda: StudyStore(tmp_path, heartbeat_seconds=5), budget=6, masks=masks)
    _check_race(answers, budget=6)


@needs_postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_claims_racing_on_one_postgresql_study_share_the_budget_exactly(postgres_url):
    masks = [(a, b) for a in range(5) for b in range(a + 1, 5)]
    name = _study_name()
    answers = _race_claims(lambda: StudyStore(url=postgres_url, study_name=name, heartbeat_seconds=5),
                           budget=6, masks=masks)
    _check_race(answers, budget=6)
    # The claims are rows of rad's own table, keyed by the study: another study in the database is apart.
    other = StudyStore(url=postgres_url, study_name=_study_name(), heartbeat_seconds=5)
    study = other.open(optuna.samplers.RandomSampler(seed=0), {"k": 2}, resume=False)
    assert other.status(trial_states(study)).evaluated == 0 and not other.claimed_masks(study)
    assert other.register_worker() == 0
    other.close()
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(CLAIMS).where(CLAIMS.c.study == name)).scalar()
    engine.dispose()
    assert rows == 6


@needs_postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_joining_worker_with_other_settings_changes_nothing(postgres_url):
    name = _study_name()
    store = StudyStore(url=postgres_url, study_name=name, heartbeat_seconds=5)
    study = store.open(optuna.samplers.RandomSampler(seed=0), {"k": 2, "objective": "agreement"}, resume=False)
    study.enqueue_trial({"x": 0.5})
    before = [(t.number, t.state, t.params) for t in study.get_trials()]
    store.close()
    with pytest.raises(RadError, match="already holds a search; pass --resume"):
        StudyStore(url=postgres_url, study_name=name).open(optuna.samplers.RandomSampler(), {"k": 2}, resume=False)
    with pytest.raises(RadError, match="started with k = 2, not 3"):
        StudyStore(url=postgres_url, study_name=name).open(
            optuna.samplers.RandomSampler(), {"k": 3, "objective": "agreement"}, resume=True)
    after = optuna.load_study(study_name=name, storage=postgres_url)
    assert [(t.number, t.state, t.params) for t in after.get_trials()] == before
    assert after.user_attrs["rad_settings"] == {"k": 2, "objective": "agreement"}


# ------------------------------------------------------------------------------------- workers on a server


def _pg_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except KeyError:  # not created yet
        return []


def _running_claim_of(url: str, name: str, worker: int) -> int | None:
    """A RUNNING trial of `worker` that holds a claim (it is measuring its mask), or None."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            owned = {int(t) for t, in conn.execute(sa.select(CLAIMS.c.trial).where(
                CLAIMS.c.study == name, CLAIMS.c.worker == worker))}
    except sa.exc.ProgrammingError:  # the table does not exist yet
        return None
    finally:
        engine.dispose()
    for trial in _pg_trials(url, name):
        if trial.number in owned and trial.state.name == "RUNNING":
            return trial.number
    return None


def _kill_mid_trial(proc: subprocess.Popen, url: str, name: str, worker_index: int) -> int | None:
    """SIGKILL `proc` as soon as it holds a claim on a RUNNING trial; that trial's number if it was still
    RUNNING when the worker died, else None (it finished in between, or the worker ended first)."""
    seen: list[int | None] = [None]

    def measuring() -> bool:
        seen[0] = _running_claim_of(url, name, worker_index)
        return proc.poll() is not None or seen[0] is not None

    assert _poll_until(measuring, timeout=120, interval=0.01)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = {t.number: t.state.name for t in _pg_trials(url, name)}
    return seen[0] if states.get(seen[0]) == "RUNNING" else None


@needs_postgres
def test_two_workers_on_postgresql_share_the_budget_and_a_killed_workers_trial_is_requeued(
        tiny_folder, tmp_path, postgres_url):  # noqa: F811
    name, budget = _study_name(), 14
    shared = ["--storage", postgres_url, "--study", name, "--resume"]

    def worker(out: str) -> subprocess.Popen:
        # A 2 s heartbeat: a live worker's thread beats well within the 4 s grace on a loaded machine.
        return subprocess.Popen(_worker_cmd(tiny_folder, tmp_path / out, budget, *shared, heartbeat=2),
                                env=WORKER_ENV, cwd=REPO, stderr=subprocess.PIPE)

    first = worker("a")  # worker 0: created the study
    assert _poll_until(lambda: first.poll() is not None or len(_pg_trials(postgres_url, name)) >= 2, timeout=120)
    second = worker("b")
    # Kill worker 0 while it measures a mask. If the trial completes between the check and the kill (a short
    # window), start another worker and try again: what is tested is the killed mid-trial case.
    killed = _kill_mid_trial(first, postgres_url, name, worker_index=0)
    for attempt in range(1, 5):
        if killed is not None:
            break
        killed = _kill_mid_trial(worker(f"victim{attempt}"), postgres_url, name, worker_index=attempt + 1)
    _, err = second.communicate(timeout=240)
    assert second.returncode == 0, err.decode()[-2000:]
    assert killed is not None

    trials = _pg_trials(postgres_url, name)
    by_number = {t.number: t for t in trials}
    measured = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("cached") is False]
    masks = [mask_key(t.user_attrs["mask"]) for t in measured]
    assert len(masks) == budget and len(set(masks)) == budget  # the budget exactly, no mask twice
    assert by_number[killed].state.name == "FAIL"  # declared dead after the heartbeat grace
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1, "Optuna's stale-trial callback re-queues the dead worker's trial once"
    assert retries[0].params == by_number[killed].params
    assert retries[0].state.name == "COMPLETE" and retries[0].user_attrs["worker"] == 1
    assert mask_key(retries[0].user_attrs["mask"]) == mask_key(by_number[killed].user_attrs["mask"])
    assert json.loads((tmp_path / "b" / "search.json").read_text())["evaluations"] == budget

    # A worker that joins the finished study measures nothing, and writes the same choice.
    done = subprocess.run(_worker_cmd(tiny_folder, tmp_path / "c", budget, *shared, heartbeat=2), env=WORKER_ENV,
                          cwd=REPO, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    again = [t for t in _pg_trials(postgres_url, name) if t.state.name == "COMPLETE"
             and t.user_attrs.get("cached") is False]
    assert [(t.number, t.value) for t in again] == [(t.number, t.value) for t in measured]
    chosen = [json.loads((tmp_path / f / "search.json").read_text())["chosen_layers"] for f in ("b", "c")]
    assert chosen[0] == chosen[1]
    # Joining with other settings is refused before anything is written.
    count = len(_pg_trials(postgres_url, name))
    assert main(_worker_cmd(tiny_folder, tmp_path / "d", budget, *shared)[3:] + ["--max-new-tokens", "8"]) == 2
    assert len(_pg_trials(postgres_url, name)) == count


# ---------------------------------------------------------------------------------------------- bad URLs


@pytest.mark.parametrize("url, message", [
    ("not a url", "is not a database URL"),
    ("redis://localhost:6379/0", "runs on sqlite, postgresql, mysql"),
    ("sqlite://", "needs a file"),
    ("sqlite:////no/such/folder/study.db", "does not exist"),
    ("postgresql://rad@127.0.0.1:1/rad", "cannot be reached"),
])
def test_a_bad_storage_url_is_one_sentence_before_any_model_loads(url, message, tmp_path, monkeypatch, caplog):
    if url.startswith("postgresql") and not driver_available():
        pytest.skip("psycopg is not installed")
    with pytest.raises(RadError, match=message):
        check_storage(url)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the storage URL was checked")

    monkeypatch.setattr("rad.search.run.load_model", no_loading)
    args = ["search", "smollm2-135m", "--k", "2", "--out", str(tmp_path / "s"), "--storage", url]
    assert main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(message in e for e in errors), errors


def test_a_password_in_the_url_is_never_shown():
    with pytest.raises(RadError) as caught:
        check_storage("postgresql://rad:s3cret@127.0.0.1:1/rad")
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


def test_the_study_name_is_checked(tmp_path):
    with pytest.raises(RadError, match="--study must be"):
        SearchConfig(k=2, study_name="").validate()
    assert main(["search", "smollm2-135m", "--k", "2", "--out", str(tmp_path / "s"), "--study", "a\nb"]) == 2


def test_sqlite_is_the_same_code_as_a_server(tmp_path):
    """The default (--out) and an explicit sqlite URL open the same study."""
    store = StudyStore(tmp_path, heartbeat_seconds=5)
    study = store.open(optuna.samplers.RandomSampler(seed=0), {"k": 1}, resume=False)
    study.enqueue_trial({"x": 1.0})
    store.close()
    same = StudyStore(url=f"sqlite:///{tmp_path / 'study.db'}", heartbeat_seconds=5)
    again = same.open(optuna.samplers.RandomSampler(seed=0), {"k": 1}, resume=True)
    assert [t.system_attrs["fixed_params"] for t in again.get_trials()] == [{"x": 1.0}]
    same.close()


def test_an_old_format_study_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute("CREATE TABLE rad_claims (mask TEXT PRIMARY KEY, trial INTEGER)")
    with pytest.raises(RadError, match="made by an older rad"):
        StudyStore(tmp_path).open(optuna.samplers.RandomSampler(seed=0), {}, resume=True)
