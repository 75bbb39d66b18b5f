"""End to end through ``elastic-run`` in a subprocess with real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elastic_runner.workers.environment import CONTRACT_VARIABLES
from tests.conftest import (
    PROBE,
    ElasticRunner,
    assert_nothing_survives,
    probe_job,
    probe_records,
)


@pytest.mark.parametrize("nproc", [1, 4])
def test_worker_environment_contract(
    elastic_run: ElasticRunner, probe_out: Path, nproc: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ER_TEST_INHERITED", "from-agent")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    run = elastic_run(
        *probe_job(probe_out, "--lr=%local_rank%", nproc=nproc),
        "max_restarts=2",
        "+job.env.ER_TEST_EXTRA=extra",
    )
    assert run.returncode == 0, run.stderr
    records = probe_records(probe_out)
    assert sorted(records) == [(0, r) for r in range(nproc)]
    ports = set()
    error_files = set()
    for (_, rank), rec in records.items():
        env = rec["env"]
        assert all(k in env for k in CONTRACT_VARIABLES), set(CONTRACT_VARIABLES) - set(env)
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["GROUP_RANK"] == "0"
        assert env["ROLE_NAME"] == "default"
        assert env["LOCAL_WORLD_SIZE"] == env["WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == str(nproc)
        assert env["GROUP_WORLD_SIZE"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert 0 < int(env["MASTER_PORT"]) < 65536
        ports.add(env["MASTER_PORT"])
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
        assert env["TORCHELASTIC_RUN_ID"] == run.run_id
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["TORCHELASTIC_ERROR_FILE"] == str(
            run.run_dir / "attempt_1" / str(rank) / "error.json"
        )
        error_files.add(env["TORCHELASTIC_ERROR_FILE"])
        if nproc > 1:
            assert env["OMP_NUM_THREADS"] == "1"
        else:
            assert "OMP_NUM_THREADS" not in env
        assert env["ER_TEST_INHERITED"] == "from-agent"
        assert env["ER_TEST_EXTRA"] == "extra"
        assert "HYDRA_FULL_ERROR" not in env
        # `<agent's python> -u script args`, with the placeholder replaced per worker.
        assert rec["executable"] == sys.executable
        assert rec["orig_argv"][:3] == [sys.executable, "-u", str(PROBE)]
        assert rec["rest"] == [f"--lr={rank}"]
    assert len(ports) == 1
    assert len(error_files) == nproc


def test_agent_values_pass_through(
    elastic_run: ElasticRunner, probe_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    run = elastic_run(*probe_job(probe_out, nproc=2), "job.role=trainer")
    assert run.returncode == 0, run.stderr
    for rec in probe_records(probe_out).values():
        assert rec["env"]["OMP_NUM_THREADS"] == "3"
        assert rec["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
        assert rec["env"]["ROLE_NAME"] == "trainer"


def test_each_run_gets_its_own_master_port(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    outs = [tmp_path / "p1", tmp_path / "p2"]
    procs = []
    for out in outs:
        out.mkdir()
        procs.append(elastic_run.popen(*probe_job(out, "--sleep", "0.5", nproc=2))[0])
    for proc in procs:
        assert proc.wait(30) == 0
    ports = {probe_records(out)[0, 0]["env"]["MASTER_PORT"] for out in outs}
    assert len(ports) == 2


def test_hello_preset_succeeds(elastic_run: ElasticRunner) -> None:
    run = elastic_run("+job=hello")
    assert run.returncode == 0, run.stderr
    for rank in range(4):
        assert f"[default{rank}]: hello from rank {rank} of 4" in run.stdout
    assert "4 workers succeeded (1 attempt, 0 restarts)" in run.stderr
    assert f"run directory: {run.run_dir}" in run.stderr
    assert (run.run_dir / "config.yaml").read_text().count(run.run_id) == 1
    for rank in range(4):
        log = run.run_dir / "attempt_1" / str(rank) / "stdout.log"
        assert log.read_text().startswith(f"hello from rank {rank} of 4")
    names = [e["name"] for e in run.events()]
    assert names[:2] == ["elastic_runner.rendezvous.join", "torchelastic.worker.status.RENDEZVOUS"]
    assert names.count("torchelastic.worker.status.START") == 4
    assert names.count("torchelastic.worker.status.SUCCEEDED") == 5  # 4 workers + agent


def test_executable_on_path_and_module(elastic_run: ElasticRunner) -> None:
    run = elastic_run(
        "job.entrypoint=printenv", "job.args=[RANK,LOCAL_WORLD_SIZE]", "job.nproc_per_node=2"
    )
    assert run.returncode == 0, run.stderr
    assert "[default1]: 1" in run.stdout and "[default0]: 2" in run.stdout
    run = elastic_run("job.module=elastic_runner.demo.hello", "job.nproc_per_node=cpu")
    assert run.returncode == 0, run.stderr
    assert f"of {len(os.sched_getaffinity(0))}" in run.stdout


def test_failing_worker_without_restarts_exits_1_and_names_it(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    run = elastic_run(
        *probe_job(
            probe_out,
            "--ranks",
            "2",
            "--exit-code",
            "3",
            "--stderr",
            "ValueError: bad batch",
            "--sleep",
            "30",
            "--sleep-others",
            "--on-term",
            "--wait-for-peers",
            nproc=3,
        ),
    )
    assert run.returncode == 1
    report = run.stderr[run.stderr.index("job failed") :]
    assert "root cause: rank 2 (local_rank 2" in report
    assert "exit code 3" in report
    assert "ValueError: bad batch" in report  # the tail of its stderr
    assert "stopped by the agent: ranks 0, 1" in report
    assert "Traceback" not in run.stderr
    # the agent stopped the others (they got SIGTERM) instead of waiting for them
    assert sorted(p.name for p in probe_out.glob("term_r*")) == ["term_r0", "term_r1"]
    assert run.seconds < 15
    states = [(e["rank"], e["state"]) for e in run.events() if e["source"] == "WORKER"]
    assert (2, "FAILED") in states


def test_sigkill_on_first_attempt_then_success(elastic_run: ElasticRunner, probe_out: Path) -> None:
    run = elastic_run(
        *probe_job(probe_out, "--ranks", "1", "--sigkill-on-restart", "0", nproc=2),
        "max_restarts=1",
    )
    assert run.returncode == 0, run.stderr
    records = probe_records(probe_out)
    assert {(0, 1), (1, 0), (1, 1)} <= set(records)
    assert records[0, 1]["env"]["TORCHELASTIC_RESTART_COUNT"] == "0"
    assert records[1, 1]["env"]["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert records[1, 0]["env"]["TORCHELASTIC_ERROR_FILE"].endswith("attempt_2/0/error.json")
    failed = [e for e in run.events() if e["state"] == "FAILED"]
    assert failed[0]["rank"] == 1 and failed[0]["metadata"]["signal"] == "SIGKILL"
    assert run.seconds < 20


def test_exhausted_restarts_exit_1_after_max_restarts_plus_one_attempts(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    run = elastic_run(
        *probe_job(probe_out, "--ranks", "0", "--exit-code", "7", nproc=2), "max_restarts=2"
    )
    assert run.returncode == 1
    assert sorted({restart for restart, _ in probe_records(probe_out)}) == [0, 1, 2]
    assert sorted(p.name for p in run.run_dir.glob("attempt_*")) == [
        "attempt_1",
        "attempt_2",
        "attempt_3",
    ]
    assert "failed in the last of 3 attempts: restarts used up (max_restarts=2)" in run.stderr
    assert "root cause: rank 0" in run.stderr and "exit code 7" in run.stderr
    # logs of earlier attempts are kept
    for attempt in (1, 2, 3):
        assert "probe rank 0" in (run.run_dir / f"attempt_{attempt}/0/stdout.log").read_text()


@pytest.mark.parametrize(
    ("signum", "code"),
    # SIGUSR1 is signals.preempt's default: 75, not 138
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGUSR1, 75)],
)
def test_signal_to_agent_stops_workers_and_exits_128_plus_n(
    elastic_run: ElasticRunner, probe_out: Path, signum: int, code: int
) -> None:
    proc, _, _ = elastic_run.popen(*probe_job(probe_out, "--sleep", "60", "--on-term", nproc=2))
    deadline = time.monotonic() + 20
    while len(probe_records(probe_out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(probe_records(probe_out)) == 2
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    name = signal.Signals(signum).name
    # forwarded as the same signal: each worker's handler saw it
    assert [p.read_text() for p in sorted(probe_out.glob("term_r*"))] == [name, name]
    assert f"{'preempted' if code == 75 else 'stopped'} by {name}" in err


def test_worker_ignoring_sigterm_is_killed_after_stop_timeout(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1] + os.environ['RANK'], 'w').close()\n"
        "time.sleep(60)\n"
    )
    proc, _, _ = elastic_run.popen(
        f"job.entrypoint={script}", f"job.args=[{tmp_path}/started]", "stop_timeout=1"
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "started0").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 143
    assert 0.9 < elapsed < 5


BAD_INPUTS = [
    (["+job=hello", "watchdog.stacks=gdb"], "watchdog.stacks=gdb: allowed: auto, py-spy, "),
    (["+job=hello", "watchdog.no_output_timeout=-1"], "no_output_timeout=-1.0: expected seconds"),
    (["+job=hello", "logs.live=maybe"], "logs.live=maybe: allowed: auto, true, false"),
    (["+job=hello", "health.port=70000"], "health.port=70000: expected 0 (off) to 65535"),
    (["+job=hello", "health.restart_loop=0"], "health.restart_loop=0: expected an integer >= 1"),
    (
        ["+job=hello", "timer=file", "timer.path=/etc/passwd"],
        "timer.path=/etc/passwd: exists and is not a FIFO",
    ),
    ([], "job.entrypoint=(unset): required"),
    (["job.entrypoint=does/not/exist.py"], "job.entrypoint=does/not/exist.py: no such file"),
    (["job.entrypoint=no-such-program-x"], "job.entrypoint=no-such-program-x: not a .py"),
    (["+job=hello", "job.nproc_per_node=0"], "job.nproc_per_node=0: expected an integer >= 1"),
    (["+job=hello", "job.nproc_per_node=abc"], "job.nproc_per_node=abc: expected an integer"),
    (["+job=hello", "nnodes=3:1"], "nnodes=3:1: expected N or MIN:MAX"),
    (["+job=hello", "nnodes=x"], "nnodes=x: expected N or MIN:MAX"),
    (
        ["+job=hello", "rdzv=nope"],
        "rdzv=nope: no such option in group 'rdzv'; allowed: etcd, local, static, tcp",
    ),
    (["+job=nope"], "job=nope: no such option in group 'job'; allowed: hello, resnet"),
    (["job=hello"], "select a preset with +job=NAME"),
    (
        ["+job=hello", "foo=1"],
        "foo=1: no such key; allowed keys at top level: checks, events, exclusion, fault, health",
    ),
    (["+job=hello", "job.nprocs=2"], "job.nprocs=2: no such key; allowed keys at job: args"),
    (["+job=hello", "max_restarts=abc"], "max_restarts=abc: Value 'abc'"),
    (["+job=hello", "max_restarts=-1"], "max_restarts=-1: expected an integer >= 0"),
    (["+job=hello", "stop_timeout=-1"], "stop_timeout=-1.0: expected seconds >= 0"),
    (
        ["+job=hello", "exclusion.cooldown_max=1"],
        "exclusion.cooldown_max=1.0: expected seconds >= exclusion.cooldown (60)",
    ),
    (["+job=hello", "exclusion.failures=-2"], "exclusion.failures=-2: expected failures >= 0"),
    (
        ["+job=hello", "rdzv=tcp", "rdzv.failover=maybe"],
        "rdzv.failover=maybe: Value 'maybe' is not a valid bool",
    ),
    (["+job=hello", "job.args=[a"], "job.args=[a: cannot parse this override"),
    (["+job=hello", "nnodes=2"], "nnodes=2: rdzv=local runs one node"),
    (["+job=hello", "signals.forward=[SIGKILL]"], "signals.forward=SIGKILL: allowed: SIGTERM"),
    (["+job=hello", "job.limits.memory=lots"], "job.limits.memory=lots: expected a size"),
    (["+job=hello", "restart.backoff.factor=0.5"], "restart.backoff.factor=0.5: expected"),
    (["+job=hello", "restart.min_uptime=-2"], "restart.min_uptime=-2.0: expected seconds"),
    # hostile or mistaken values (issue 14): NaN passed every "< 0" check, an infinity
    # crashed at start, a bad template or environment was a traceback
    (["+job=hello", "stop_timeout=nan"], "stop_timeout=nan: expected seconds >= 0 (a finite"),
    (["+job=hello", "restart.backoff.initial=nan"], "restart.backoff.initial=nan: expected"),
    (["+job=hello", "resources.interval=inf"], "resources.interval=inf: expected seconds >= 0"),
    (["+job=hello", "watchdog.heartbeat_timeout=1e300"], "heartbeat_timeout=1e+300: expected"),
    (["+job=hello", "restart.backoff.factor=nan"], "restart.backoff.factor=nan: expected"),
    (["+job=hello", "logs.prefix='{nope}'"], "logs.prefix={nope}: unknown field {nope}; allowed"),
    (["+job=hello", "logs.prefix='{rank:>20000000}'"], "a width over 200 characters"),
    (["+job=hello", "+job.env={X:[1,2]}"], "job.env.X=[1, 2]: expected a string"),
    (["+job=hello", "job.nproc_per_node=10000"], "job.nproc_per_node=10000: more than 32"),
    (["+job=hello", "logs.prefix=${local_rank}"], "logs.prefix=${local_rank}: Interpolation"),
    (["+job=hello", "job.args=[${local_rank}]"], "local rank in job.args is %local_rank%"),
    (["+job=hello", "logs=null"], "logs=null: expected the name of an option of group 'logs'"),
    (["+job=hello", "rdzv=5"], "rdzv=5: expected the name of an option of group 'rdzv'"),
    (
        ["+job=hello", "rdzv=tcp", "rdzv.endpoint=127.0.0.1:1", "rdzv.heartbeat_interval=0"],
        "rdzv.heartbeat_interval=0.0: expected seconds > 0",
    ),
    (
        ["+job=hello", "rdzv=etcd", "rdzv.endpoint=127.0.0.1:1", "rdzv.request_timeout=inf"],
        "rdzv.request_timeout=inf: expected seconds >= 0",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(
    elastic_run: ElasticRunner, overrides: list[str], message: str
) -> None:
    run = elastic_run(*overrides)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("elastic-run: error: ")
    assert message in lines[0]
    assert not list(run.run_dir.glob("attempt_*")), "no worker may start"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ('"A=B": c', "job.env='A=B': expected variable names of letters, digits and '_'"),
        ('X: "a\\0b"', "job.env.X='a\\x00b': contains a NUL character"),
        ("X: [1, 2]", "job.env.X=[1, 2]: expected a string"),
    ],
)
def test_a_preset_environment_no_override_can_spell_is_one_line(
    elastic_run: ElasticRunner, tmp_path: Path, env: str, message: str
) -> None:
    """Names with ``=`` and values with NUL come from a config file (``--config-dir``)."""
    (tmp_path / "conf" / "job").mkdir(parents=True)
    preset = f"module: elastic_runner.demo.hello\nenv:\n  {env}\n"
    (tmp_path / "conf" / "job" / "bad.yaml").write_text(preset)
    run = elastic_run("--config-dir", str(tmp_path / "conf"), "+job=bad")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"elastic-run: error: {message}"), lines
    assert not list(run.run_dir.glob("attempt_*"))


def test_more_workers_than_the_process_limit_is_one_line(elastic_run: ElasticRunner) -> None:
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (8, 8))

    argv, run_dir, _ = elastic_run.command("+job=hello", "job.nproc_per_node=8")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, preexec_fn=low_limit, cwd=run_dir.parent
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "elastic-run: error: job.nproc_per_node=8: more workers than this user may run "
        "(process limit, ulimit -u: 8)"
    ]
    assert not list(run_dir.glob("attempt_*"))


def test_resnet_preset_without_torch_fails_with_install_hint(
    elastic_run: ElasticRunner,
) -> None:
    pytest.importorskip("hydra")
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed here")
    except ImportError:
        pass
    run = elastic_run("+job=resnet")
    assert run.returncode == 1
    assert "pip install torch==2.13.0" in run.stderr
    assert "Traceback" not in run.stderr


def test_workers_die_with_a_sigkilled_agent(elastic_run: ElasticRunner, probe_out: Path) -> None:
    proc, _, run_id = elastic_run.popen(*probe_job(probe_out, "--sleep", "60", nproc=3))
    deadline = time.monotonic() + 20
    while len(probe_records(probe_out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = [rec["pid"] for rec in probe_records(probe_out).values()]
    assert len(pids) == 3
    proc.kill()
    proc.communicate(timeout=10)
    assert_nothing_survives({run_id}, within=3)


def test_user_presets_from_config_dir(elastic_run: ElasticRunner, tmp_path: Path) -> None:
    (tmp_path / "myconf" / "job").mkdir(parents=True)
    (tmp_path / "myconf" / "job" / "mine.yaml").write_text(
        "entrypoint: printenv\nargs: [ROLE_NAME, WORLD_SIZE]\nrole: trainer\nnproc_per_node: 2\n"
    )
    run = elastic_run("--config-dir", str(tmp_path / "myconf"), "+job=mine")
    assert run.returncode == 0, run.stderr
    assert "[trainer1]: trainer" in run.stdout and "[trainer0]: 2" in run.stdout


def test_sequential_sweep_runs_each_point_as_its_own_job(
    elastic_run: ElasticRunner, tmp_path: Path
) -> None:
    argv, _, _ = elastic_run.command()
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            argv[0],
            "--multirun",
            "job.entrypoint=sh",
            'job.args=[-c,"exit $((LOCAL_WORLD_SIZE-1))"]',
            "job.nproc_per_node=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr  # the point with 2 workers failed
    ids = {(sweep / p / "config.yaml").read_text().split("id: ")[1].split()[0] for p in "01"}
    assert len(ids) == 2
    assert_nothing_survives(ids)
    assert "1 worker succeeded" in done.stderr and "job failed" in done.stderr


def _start_sleepers(
    elastic_run: ElasticRunner, probe_out: Path, *overrides: str
) -> subprocess.Popen[str]:
    proc, _, _ = elastic_run.popen(
        *probe_job(probe_out, "--sleep", "60", "--on-term", nproc=2), *overrides
    )
    deadline = time.monotonic() + 20
    while len(probe_records(probe_out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(probe_records(probe_out)) == 2
    return proc


def test_signal_not_in_forward_reaches_workers_as_sigterm(
    elastic_run: ElasticRunner, probe_out: Path
) -> None:
    proc = _start_sleepers(elastic_run, probe_out, "signals.forward=[SIGTERM,INT]")
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGUSR2, err
    assert [p.read_text() for p in sorted(probe_out.glob("term_r*"))] == ["SIGTERM"] * 2
    assert "stopped by SIGUSR2: sending SIGTERM to the workers" in err


def test_ignore_sighup_keeps_the_run_going(elastic_run: ElasticRunner, probe_out: Path) -> None:
    proc = _start_sleepers(elastic_run, probe_out, "signals.ignore_sighup=true")
    # A handled SIGHUP would be the first stop signal and reach the workers as SIGHUP.
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143
    assert [p.read_text() for p in sorted(probe_out.glob("term_r*"))] == ["SIGTERM"] * 2
