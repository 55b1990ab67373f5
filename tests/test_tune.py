"""Tuning on many workers: worker processes sharing one study (SQLite, a journal file, PostgreSQL), a killed worker's trial retried, pruning.

Workers are real processes of the command line (`python -m movierec.cli tune`), each training `tiny-llama`
(a 2-layer random Llama with SmolLM2's vocabulary) on a small slice of ML-100K, so a trial takes seconds.
The PostgreSQL test runs its own server (`tests/postgres.py`) and is skipped, with the reason, where the
server binaries or the psycopg driver are missing.
"""
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from movierec.core import PROJECT_ROOT
from movierec.data import MovieLens, load_movielens
from movierec.model import smollm2_tokenizer, tiny_llama
from movierec.params import Params
from movierec.prompts import PrepareConfig, prepare
from movierec.tune import SPACE, TuneConfig, open_storage, tune

import postgres

optuna.logging.set_verbosity(optuna.logging.WARNING)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
# a trial of seconds: 4 steps of the tiny model, RMSE reported at steps 2 and 4, 12 validation ratings
TINY_TRIAL = dict(base_model="tiny-llama", device="cpu", max_steps=4, eval_steps=2, train_examples=16, val_examples=8,
                  val_sample=12, prune_sample=4)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def flags(**knobs) -> list[str]:
    return [a for k, v in knobs.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ml100k_dir) -> Path:
    "Examples of ML-100K's first 20 users, in the layout `prepare` writes."
    ml = load_movielens(ml100k_dir)
    out = tmp_path_factory.mktemp("data")
    prepare(PrepareConfig(seed=0), out, ml=MovieLens(ml.name, ml.ratings[ml.ratings.user_id <= 20], ml.movies, ml.scale))
    return out


@pytest.fixture(scope="module")
def postgres_url():
    "A database on a PostgreSQL server of the test's own, stopped at the end."
    if reason := postgres.missing(): pytest.skip(f"PostgreSQL test skipped: {reason}")
    with postgres.postgres_server() as url: yield url


def start_worker(data: Path, out: Path, log: Path, **knobs) -> subprocess.Popen:
    "`movierec tune` in a process of its own, its output in `log`."
    cmd = [sys.executable, "-m", "movierec.cli", "tune", "--data", str(data), "--out", str(out), *flags(**{**TINY_TRIAL, **knobs})]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=PROJECT_ROOT)


def wait_all(workers: list[subprocess.Popen], logs: list[Path], timeout: float = 400) -> None:
    t0 = time.time()
    for w, log in zip(workers, logs):
        try: rc = w.wait(timeout=max(1, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            for other in workers: other.kill()
            raise AssertionError(f"worker {w.pid} still running after {timeout}s:\n{log.read_text()[-3000:]}")
        assert rc == 0, f"worker {w.pid} exited with {rc}:\n{log.read_text()[-3000:]}"


def worker_pids(trials) -> Counter:
    "How many trials each worker process ran (the trial's `worker` attribute is `host:pid`)."
    return Counter(int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials)


def _storage(url: str | None, out: Path):
    "The storage the workers used: `url`, or the default SQLite file in `out`."
    return open_storage(TuneConfig(storage=url), out)


def check_shared(study, budget: int, workers: list[subprocess.Popen], outs: list[Path]) -> None:
    "Every trial ran once, by one of the workers, and the study stopped at its total budget."
    trials = study.trials
    states = Counter(t.state for t in trials)
    assert sum(states[s] for s in FINISHED) == budget and set(states) <= set(FINISHED), states
    assert [t.number for t in trials] == list(range(budget)), "numbers without gaps: no trial lost"
    assert set(worker_pids(trials)) == {w.pid for w in workers}, f"both workers took trials: {worker_pids(trials)}"
    lrs = [t.params["learning_rate"] for t in trials]
    assert len(set(lrs)) == len(lrs), "workers sample differently: no two trials alike"
    folders = [d.name for out in outs for d in (out / "trials").iterdir()]
    assert sorted(folders) == [f"{n:03d}" for n in range(budget)], "each trial trained once, in one place"
    for t in trials:
        if t.state == TrialState.COMPLETE: assert (Path(t.user_attrs["adapter"]) / "train.json").exists()
    for out in outs: assert (out / "best.yaml").exists() and (out / "tune.json").exists()


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_share_a_study(data, tmp_path, storage):
    "Two processes on one study (the default SQLite file in their common --out, or a journal file) run its 8 trials between them."
    url = {"sqlite": None, "journal": f"journal://{tmp_path}/shared/study.log"}[storage]
    out, logs = tmp_path / "tune", [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(data, out, log, trials=8, **({"storage": url} if url else {})) for log in logs]
    wait_all(workers, logs)
    study = optuna.load_study(study_name="movierec", storage=_storage(url, out))
    check_shared(study, 8, workers, [out])


def test_two_workers_on_postgresql(data, tmp_path, postgres_url):
    "Two processes, each with its own --out as if on two machines, share one study on a PostgreSQL server."
    outs, logs = [tmp_path / f"machine{i}" for i in range(2)], [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(data, out, log, trials=8, storage=postgres_url) for out, log in zip(outs, logs)]
    wait_all(workers, logs)
    study = optuna.load_study(study_name="movierec", storage=postgres_url)
    check_shared(study, 8, workers, outs)
    assert Params.load(outs[0] / "best.yaml") == Params.load(outs[1] / "best.yaml"), "both summaries are the whole study's"


def test_killed_worker_trial_is_retried(data, tmp_path):
    "A worker killed with SIGKILL mid-trial: the heartbeat marks its trial failed and the other worker runs it again."
    out, logs = tmp_path / "tune", [tmp_path / f"worker{i}.log" for i in range(2)]
    slow = dict(trials=4, heartbeat=2, max_steps=40, eval_steps=10, prune_sample=0)  # trials long enough to be killed in
    victim, survivor = [start_worker(data, out, log, **slow) for log in logs]
    deadline, storage, killed = time.time() + 300, None, None
    while killed is None:
        assert time.time() < deadline and victim.poll() is None, f"the victim never ran a trial:\n{logs[0].read_text()[-3000:]}"
        time.sleep(0.2)
        if storage is None and (out / "study.db").exists(): storage = _storage(None, out)
        try: study = optuna.load_study(study_name="movierec", storage=storage)
        except (KeyError, ValueError): continue  # the workers have not created it yet
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs and victim.pid in worker_pids([t])]
        if running:
            time.sleep(1.0)  # well inside its training (its first heartbeat is written as it starts)
            os.kill(victim.pid, signal.SIGKILL); victim.wait()
            killed = running[0].number
    wait_all([survivor], logs[1:])
    trials = optuna.load_study(study_name="movierec", storage=storage).trials
    assert trials[killed].state == TrialState.FAIL, "the dead worker's trial is marked failed"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, "and run once more"
    assert retries[0].params == trials[killed].params and worker_pids(retries) == {survivor.pid: 1}, "by the other worker"
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == 4 and states[TrialState.FAIL] == 1 and len(trials) == 5, states


def _history(value: float) -> list:
    "Five finished trials that reported `value` as their validation RMSE at every evaluation."
    dists = {"lora_rank": CategoricalDistribution(SPACE["lora_rank"]), "alpha_over_rank": CategoricalDistribution(SPACE["alpha_over_rank"]),
             "learning_rate": FloatDistribution(*SPACE["learning_rate"], log=True), "batch_size": CategoricalDistribution(SPACE["batch_size"])}
    params = {"lora_rank": 8, "alpha_over_rank": 2, "learning_rate": 1e-4, "batch_size": 4}
    return [create_trial(params=params, distributions=dists, value=value, intermediate_values={2: value, 4: value}) for _ in range(5)]


@pytest.mark.parametrize("history, pruned", [(0.3, True), (9.0, False)])
def test_pruner_stops_a_clearly_worse_trial(data, tmp_path, history, pruned):
    "After five trials that reported RMSE 0.3, a random model (RMSE > 1) is pruned at its first evaluation; after 9.0 it is not."
    out = tmp_path / "tune"
    out.mkdir()
    optuna.create_study(study_name="movierec", storage=f"sqlite:///{out / 'study.db'}").add_trials(_history(history))
    tok = smollm2_tokenizer()
    p = Params().replace(**TINY_TRIAL, trials=6)
    study = tune(p, data, out, model_factory=lambda: (tiny_llama(tok), tok))
    last = study.trials[-1]
    assert len(study.trials) == 6 and last.state == (TrialState.PRUNED if pruned else TrialState.COMPLETE)
    if pruned:
        assert list(last.intermediate_values) == [2] and last.intermediate_values[2] > 1, "stopped at the first evaluation"
        assert not (out / "trials" / f"{last.number:03d}" / "train.json").exists(), "its training did not finish"
    else:
        assert list(last.intermediate_values) == [2, 4] and last.value > 1
