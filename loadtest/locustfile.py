"""Locust load test of a RobustDEQ server (TorchServe with the RobustDEQ archives).

Usually run by ``robustdeq loadtest`` (``make loadtest``), which starts a server, writes
the payloads and the stages, runs this file headless and reports. It also runs on its own
against a server started with ``make serve``:

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080

Every user speaks ``ROBUSTDEQ_PROTOCOL``: ``own`` (default; a PNG body to
``/predictions/<model>``, TorchServe only) or ``oip`` (an OIP v2 BYTES image to
``/v2/models/<model>/infer``, the options as parameters; TorchServe or the KServe runtime, e.g.
``ROBUSTDEQ_PROTOCOL=oip locust ... --host http://127.0.0.1:8085`` after ``robustdeq serve
--runtime kserve``).

User classes (each request type is reported under its own name):

* ``PlainUser``: ``POST /predictions/<model>``, no defense: request type ``plain``;
* ``DefendedUser``: ``POST /predictions/<model>-defended`` with ``X-T-f`` / ``X-R`` (or the
  OIP route with ``T_f`` / ``R`` parameters), one
  request type per setting (``defended T_f=2 R=10``, ...; ``ROBUSTDEQ_DEFENDED_SETTINGS``);
* ``MixedUser``: plain traffic with a share of defended T_f=2, R=10 requests
  (``ROBUSTDEQ_DEFENDED_FRACTION``, default 0.1).

Payloads are real CIFAR-10 test images; a response counts as a failure unless it is a 200
with the documented JSON shape and the label the library predicts in-process
(``robustdeq.loadtest.traffic.check_answer``). The token is ``ROBUSTDEQ_TOKEN`` or read
from the run folder ``ROBUSTDEQ_RUN_DIR`` (default ``.serve``). ``StagedShape`` drives the
load: the stages in ``ROBUSTDEQ_STAGES`` (JSON), or a default ramp of plain users.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, events, task

from robustdeq.loadtest.samples import SampleRecorder
from robustdeq.loadtest.traffic import (
    DEFAULT_DEFENDED_SETTINGS,
    ENV,
    PLAIN,
    PROTOCOLS,
    DefendedSetting,
    PayloadSet,
    Stage,
    build_payloads,
    check_answer,
    check_oip_answer,
    oip_request,
)
from robustdeq.serving.runfolder import DEFAULT_MODELS

MODEL = os.environ.get(ENV["model"], DEFAULT_MODELS[0])
PROTOCOL = os.environ.get(ENV["protocol"], "own")
if PROTOCOL not in PROTOCOLS:
    raise SystemExit(f"{ENV['protocol']}={PROTOCOL!r}: use one of {', '.join(PROTOCOLS)}")
DEFAULT_STAGES = [Stage(20, users, "PlainUser") for users in (1, 2, 4, 8)]
STAGES = Stage.load_list(os.environ[ENV["stages"]]) if os.environ.get(ENV["stages"]) else DEFAULT_STAGES
SETTINGS = (
    DefendedSetting.parse_list(os.environ[ENV["defended"]])
    if os.environ.get(ENV["defended"])
    else list(DEFAULT_DEFENDED_SETTINGS)
)
MIXED_FRACTION = float(os.environ.get(ENV["mixed_fraction"], "0.1"))
MIXED_SETTING = DefendedSetting(2, 10)
RECORDER = SampleRecorder()
_payloads = None
_b64 = None


def payloads() -> PayloadSet:
    """The payload file written by ``robustdeq loadtest``, else built here once (seconds)."""
    global _payloads
    if _payloads is None:
        path = os.environ.get(ENV["payloads"])
        if path:
            _payloads = PayloadSet.load(path)
        else:
            from robustdeq.serving.archive import SHIPPED

            _payloads = build_payloads(SHIPPED[MODEL], MODEL, settings=[*SETTINGS, MIXED_SETTING])
    return _payloads


def payloads_b64():
    """The payloads' PNGs as base64 strings (OIP's BYTES elements), encoded once."""
    global _b64
    if _b64 is None:
        _b64 = [base64.b64encode(png).decode("ascii") for png in payloads().pngs]
    return _b64


def inference_token() -> str:
    token = os.environ.get(ENV["token"])
    if token:
        return token
    from robustdeq.serving.runfolder import read_keys

    return read_keys(Path(os.environ.get(ENV["run_dir"], ".serve")))["inference"]


@events.init.add_listener
def _prepare(environment, **_):
    payloads()
    environment.robustdeq_token = inference_token()


@events.request.add_listener
def _record(name, start_time, response_time, exception=None, **kwargs):
    RECORDER.on_request(name, start_time, response_time, exception)


@events.quitting.add_listener
def _save(environment, **_):
    path = os.environ.get(ENV["samples"])
    if path:
        RECORDER.save(path)


class _Classifier(FastHttpUser):
    """Sends payloads, checks answers, and paces itself to the current stage's rate."""

    abstract = True
    connection_timeout = 10.0
    network_timeout = 120.0

    def on_start(self):
        self.rng = random.Random()
        self.headers = {"Authorization": f"Bearer {self.environment.robustdeq_token}", "Content-Type": "image/png"}
        self._due = None

    def wait_time(self):
        """Constant pacing at the stage's per-user rate (no catch-up bursts); 0 when unpaced."""
        stage = StagedShape.current
        rate = stage.per_user_rate(type(self).__name__) if stage is not None else None
        if not rate:
            return 0.0
        now, interval = time.monotonic(), 1.0 / rate
        if self._due is None:
            self._due = now + self.rng.random() * interval  # spread the users' phases
        else:
            self._due = max(self._due + interval, now - interval)
        return max(0.0, self._due - now)

    def classify(self, setting=None):
        data = payloads()
        i = self.rng.randrange(len(data))
        headers = dict(self.headers)
        expected = data.expected[PLAIN if setting is None else setting.key][i]
        name = PLAIN if setting is None else setting.name
        lane = MODEL if setting is None else f"{MODEL}-defended"
        if PROTOCOL == "oip":
            path, check = f"/v2/models/{lane}/infer", check_oip_answer
            body = json.dumps(oip_request(payloads_b64()[i], setting))
            headers["Content-Type"] = "application/json"
        else:
            path, body, check = f"/predictions/{lane}", data.pngs[i], check_answer
            if setting is not None:
                headers.update({"X-Defense": "on", "X-T-f": str(setting.T_f), "X-R": str(setting.R)})
        with self.client.post(path, data=body, headers=headers, name=name, catch_response=True) as resp:
            problem = check(resp.status_code or 0, resp.text or "", expected, setting)
            if problem:
                resp.failure(problem)
            else:
                resp.success()


class PlainUser(_Classifier):
    @task
    def plain(self):
        self.classify()


class DefendedUser(_Classifier):
    @task
    def defended(self):
        self.classify(self.rng.choice(SETTINGS))


class MixedUser(_Classifier):
    @task
    def mixed(self):
        self.classify(MIXED_SETTING if self.rng.random() < MIXED_FRACTION else None)


USER_CLASSES = {cls.__name__: cls for cls in (PlainUser, DefendedUser, MixedUser)}


class StagedShape(LoadTestShape):
    """The stages of ``ROBUSTDEQ_STAGES`` one after the other, then stop.

    Locust keeps running users when a tick changes only the user classes, so a stage whose
    classes or their counts differ from the previous one starts with one tick at zero users
    (its users finish their request first; the report leaves each stage's first seconds
    out). Each class's weight is set to its user count, so Locust spawns exactly those."""

    current = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index = -1
        self._drained = True

    def tick(self):
        elapsed, end = self.get_run_time(), 0.0
        for index, stage in enumerate(STAGES):
            end += stage.duration
            if elapsed < end:
                classes = [USER_CLASSES[name] for name in stage.classes]
                if index != self._index:
                    previous = STAGES[self._index] if self._index >= 0 else None
                    self._index = index
                    self._drained = previous is None or previous.classes == stage.classes
                    for name, count in stage.classes.items():  # Locust splits users by weight
                        USER_CLASSES[name].weight = count
                    StagedShape.current = stage
                    RECORDER.start_stage(index, time.time())
                if not self._drained:
                    self._drained = True
                    return 0, 100.0, classes
                return stage.total_users, stage.total_users * 4.0, classes
        return None
