"""Config parsing, validation and composition through Hydra's Compose API."""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from elastic_runner.config import (
    MAX_SECONDS,
    ConfigError,
    ElasticRunConfig,
    JobConfig,
    RedactingFilter,
    ValidConfig,
    check_nproc_per_node,
    describe_config_error,
    is_secret_name,
    may_hold_secrets,
    parse_console_streams,
    parse_env,
    parse_log_prefix,
    parse_master_addr,
    parse_master_port,
    parse_nnodes,
    parse_nproc_per_node,
    parse_run_id,
    parse_seconds,
    redact,
    redact_text,
    register_configs,
    validate,
)
from elastic_runner.plugins import make_plugin_manager
from elastic_runner.registry import Registry
from elastic_runner.rendezvous.kit import settings_from
from elastic_runner.rendezvous.local import LocalRendezvousConfig
from elastic_runner.rendezvous.tcp import TcpRendezvousConfig
from elastic_runner.resources import conf_dir, example_path
from elastic_runner.run import _write_config
from elastic_runner.spec import RunContext


@pytest.fixture
def composed() -> Iterator[Callable[..., DictConfig]]:
    register_configs(Registry(make_plugin_manager(autoload=False)))
    OmegaConf.register_new_resolver("er.example", example_path, replace=True)

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield _compose


@pytest.mark.parametrize(
    ("text", "expected"), [("1", (1, 1)), ("2", (2, 2)), ("1:4", (1, 4)), (" 3:3 ", (3, 3))]
)
def test_parse_nnodes(text: str, expected: tuple[int, int]) -> None:
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text", ["0", "3:1", "a", "1:2:3", "-1", "", "1:"])
def test_parse_nnodes_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^nnodes="):
        parse_nnodes(text)


def test_parse_nproc_per_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ELASTIC_RUNNER_DEVICE_ROOT", str(tmp_path))  # no GPU, on any machine
    assert parse_nproc_per_node(4) == 4
    assert parse_nproc_per_node("2") == 2
    assert (
        parse_nproc_per_node("cpu") == parse_nproc_per_node("auto") == len(os.sched_getaffinity(0))
    )
    for bad in (0, -1, "abc", True, 1.5):
        with pytest.raises(ConfigError, match=r"^job.nproc_per_node="):
            parse_nproc_per_node(bad)


def test_defaults_compose_to_the_schema(composed: Callable[..., DictConfig]) -> None:
    cfg = composed("+job=hello")
    conf = OmegaConf.to_object(cfg)
    assert isinstance(conf, ElasticRunConfig)
    assert isinstance(conf.rdzv, LocalRendezvousConfig)
    assert (conf.nnodes, conf.max_restarts, conf.stop_timeout) == ("1", 0, 30.0)
    assert conf.rdzv.id is None
    assert (conf.events.sink, conf.metrics.handler, conf.timer.server) == ("jsonl", "none", "none")
    assert conf.job.module == "elastic_runner.demo.hello" and conf.job.nproc_per_node == 4
    validate(conf)


def test_resnet_preset_points_at_the_bundled_example(composed: Callable[..., DictConfig]) -> None:
    from hydra.core.hydra_config import HydraConfig  # noqa: F401

    cfg = composed("+job=resnet")
    assert cfg.job.entrypoint.endswith("examples/resnet/train.py")
    assert os.path.isfile(cfg.job.entrypoint)


def test_nnodes_number_becomes_a_string(composed: Callable[..., DictConfig]) -> None:
    assert composed("+job=hello", "nnodes=2").nnodes == "2"


def test_entrypoint_and_module_are_exclusive(composed: Callable[..., DictConfig]) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", "job.entrypoint=x.py"))
    assert isinstance(conf, ElasticRunConfig)
    with pytest.raises(ConfigError, match="not both"):
        validate(conf)


def _valid(composed: Callable[..., DictConfig], *overrides: str) -> ValidConfig:
    conf = OmegaConf.to_object(composed(*overrides))
    assert isinstance(conf, ElasticRunConfig)
    return validate(conf)


def test_job_python_is_null_true_or_false_and_false_not_with_a_module(
    composed: Callable[..., DictConfig],
) -> None:
    assert _valid(composed, "+job=hello").config.job.python is None
    assert _valid(composed, "job.entrypoint=x", "job.python=true").config.job.python is True
    assert _valid(composed, "job.entrypoint=x.py", "job.python=false").config.job.python is False
    assert _valid(composed, "+job=hello", "job.python=true").config.job.python is True
    with pytest.raises(ConfigError) as info:
        _valid(composed, "+job=hello", "job.python=false")
    assert str(info.value).startswith("job.python=false: not with job.module")
    conf = OmegaConf.to_object(composed("+job=hello"))
    assert isinstance(conf, ElasticRunConfig)
    conf.job.python = "yes"  # type: ignore[assignment]  # as a program may set it
    with pytest.raises(ConfigError, match=r"^job.python=yes: allowed: null, true, false"):
        validate(conf)


@pytest.mark.parametrize("role", ["", " ", "trainer", "a b", "é" * 128])
def test_job_role_may_be_empty(composed: Callable[..., DictConfig], role: str) -> None:
    assert _valid(composed, "+job=hello", f"job.role='{role}'").config.job.role == role


@pytest.mark.parametrize("role", ["x" * 129, "a\nb", "\t", "a\x1b[2Jb"])
def test_job_role_is_at_most_128_printable_characters(
    composed: Callable[..., DictConfig], role: str
) -> None:
    conf = OmegaConf.to_object(composed("+job=hello"))
    assert isinstance(conf, ElasticRunConfig)
    conf.job.role = role
    with pytest.raises(ConfigError) as info:
        validate(conf)
    assert str(info.value).endswith(": expected at most 128 printable characters (may be empty)")
    assert str(info.value).startswith("job.role=")


def test_console_local_ranks_and_streams(composed: Callable[..., DictConfig]) -> None:
    valid = _valid(composed, "+job=hello")
    assert valid.config.logs.console_local_ranks is None
    assert valid.config.logs.console_streams == ["stdout", "stderr"]
    assert valid.console_streams == {1, 2}
    valid = _valid(
        composed, "+job=hello", "logs.console_local_ranks=[0,3]", "logs.console_streams=[stderr]"
    )
    assert valid.config.logs.console_local_ranks == [0, 3]
    assert valid.console_streams == {2}
    assert _valid(composed, "+job=hello", "logs.console_streams=[]").console_streams == set()
    with pytest.raises(ConfigError) as info:
        _valid(composed, "+job=hello", "logs.console_local_ranks=[1,-1]")
    assert str(info.value) == "logs.console_local_ranks=[1, -1]: expected local ranks >= 0"
    for bad in ("[stdout,both]", "[1]", "[STDERR]"):
        with pytest.raises(ConfigError) as info:
            _valid(composed, "+job=hello", f"logs.console_streams={bad}")
        assert str(info.value).endswith(
            ": expected a list of stdout and stderr (empty: none reaches the console)"
        )


def test_parse_console_streams() -> None:
    assert parse_console_streams(["stdout"]) == {1}
    assert parse_console_streams(("stderr", "stdout", "stderr")) == {1, 2}
    assert parse_console_streams([]) == frozenset()
    with pytest.raises(ConfigError, match=r"^logs.console_streams=stdout: expected a list"):
        parse_console_streams("stdout")


# -- numbers -------------------------------------------------------------------------------

NUMERIC_KEYS = [
    "stop_timeout",
    "restart.backoff.initial",
    "restart.backoff.max",
    "restart.min_uptime",
    "resources.interval",
    "logs.collapse_window",
    "watchdog.no_output_timeout",
    "watchdog.heartbeat_timeout",
    "health.restart_window",
]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300"])
def test_every_duration_refuses_nan_infinities_negatives_and_huge(
    composed: Callable[..., DictConfig], key: str, value: str
) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", f"{key}={value}"))
    assert isinstance(conf, ElasticRunConfig)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=\S+: expected seconds >= 0 "):
        validate(conf)


def test_backoff_factor_is_finite_and_bounded(composed: Callable[..., DictConfig]) -> None:
    for value in ("nan", "inf", "0.5", "1e300"):
        conf = OmegaConf.to_object(composed("+job=hello", f"restart.backoff.factor={value}"))
        assert isinstance(conf, ElasticRunConfig)
        with pytest.raises(ConfigError, match=r"^restart\.backoff\.factor=.*from 1 to 100"):
            validate(conf)


def test_parse_seconds() -> None:
    assert parse_seconds("k", 0) == 0.0
    assert parse_seconds("k", 2.5) == 2.5
    assert parse_seconds("k", MAX_SECONDS) == MAX_SECONDS
    assert parse_seconds("k", 1e-9, positive=True) == 1e-9
    for bad in (math.nan, math.inf, -math.inf, -0.1, MAX_SECONDS * 2, True, "3", None):
        with pytest.raises(ConfigError, match=r"^k=.*: expected seconds >= 0 \(a finite"):
            parse_seconds("k", bad)
    with pytest.raises(ConfigError, match=r"^k=0: expected seconds > 0"):
        parse_seconds("k", 0, positive=True)


def test_plugin_floats_must_be_finite_too(composed: Callable[..., DictConfig]) -> None:
    base = ("+job=hello", "rdzv=etcd", "rdzv.endpoint=127.0.0.1:2379", "rdzv.id=x")
    for value in ("nan", "inf", "-5"):
        conf = OmegaConf.to_object(composed(*base, f"rdzv.request_timeout={value}"))
        assert isinstance(conf, ElasticRunConfig)
        with pytest.raises(ConfigError, match=r"^rdzv\.request_timeout=.*: expected seconds"):
            validate(conf)


@pytest.mark.parametrize(
    "key",
    ["join_timeout", "last_call_timeout", "heartbeat_timeout", "exit_barrier_timeout"],
)
def test_store_rendezvous_timings_are_finite(key: str) -> None:
    for value in (math.nan, math.inf, -1.0):
        config = TcpRendezvousConfig(endpoint="127.0.0.1:1", id="job")
        setattr(config, key, value)
        with pytest.raises(ConfigError, match=rf"^rdzv\.{key}=.*: expected seconds >= 0"):
            settings_from(config, RunContext("job", Path("."), "node", 1, 1))


def test_store_heartbeat_interval_must_be_positive_and_finite() -> None:
    for value in (0.0, math.nan, math.inf):
        config = TcpRendezvousConfig(endpoint="127.0.0.1:1", id="job", heartbeat_interval=value)
        with pytest.raises(
            ConfigError, match=r"^rdzv\.heartbeat_interval=.*: expected seconds > 0"
        ):
            settings_from(config, RunContext("job", Path("."), "node", 1, 1))


def test_nul_in_any_string_is_refused(composed: Callable[..., DictConfig]) -> None:
    conf = OmegaConf.to_object(composed("+job=hello"))
    assert isinstance(conf, ElasticRunConfig)
    conf.job.args = ["ok", "a\0b"]
    with pytest.raises(ConfigError, match=r"^job\.args\[1\]='a\\x00b': contains a NUL"):
        validate(conf)


# -- rdzv.id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["team", "team.exp1", "a", "run_42-b", "9" * 128, None, ""])
def test_parse_run_id_accepts(good: str | None) -> None:
    assert parse_run_id(good) == (good or None)


@pytest.mark.parametrize(
    "bad", ["team/exp1", "/team", "..", ".hidden", "-x", "a b", "a:b", "x" * 129, "é", "a\nb"]
)
def test_parse_run_id_refuses(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_run_id(bad)
    line = describe_config_error(caught.value)
    assert line.startswith("rdzv.id=") and ": expected 1 to 128 letters" in line
    assert line.isprintable(), line


def test_run_id_is_checked_by_validate_and_by_store_backends(
    composed: Callable[..., DictConfig],
) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", "rdzv.id=team/exp1"))
    assert isinstance(conf, ElasticRunConfig)
    with pytest.raises(ConfigError, match=r"^rdzv\.id=team/exp1: .*no '/'"):
        validate(conf)
    config = TcpRendezvousConfig(endpoint="127.0.0.1:1", id="team/exp1")
    with pytest.raises(ConfigError, match=r"^rdzv\.id=team/exp1: "):
        settings_from(config, RunContext("team/exp1", Path("."), "node", 1, 1))


# -- rdzv.master_addr, rdzv.master_port --------------------------------------------------------


def test_parse_master_port_and_addr() -> None:
    assert parse_master_port(None) is None
    assert parse_master_port(1) == 1 and parse_master_port(65535) == 65535
    for bad in (0, -1, 65536, True, "29500", 1.5):
        with pytest.raises(ConfigError) as caught:
            parse_master_port(bad)
        assert (
            str(caught.value) == f"rdzv.master_port={bad}: expected a port from 1 to 65535, or null"
        )
    assert parse_master_addr(None) is None and parse_master_addr("") is None
    for good in ("node0", "10.0.0.1", "::1", "trainer-0.svc.cluster.local"):
        assert parse_master_addr(good) == good
    for bad in ("a b", "node0\n", "\tx", 5):
        with pytest.raises(ConfigError) as caught:
            parse_master_addr(bad)
        line = describe_config_error(caught.value)  # one line, whatever the value holds
        assert line.startswith("rdzv.master_addr=") and ": expected a host name" in line
        assert line.isprintable(), line


@pytest.mark.parametrize(
    "backend",
    [
        ("rdzv=local",),
        ("rdzv=tcp", "rdzv.endpoint=127.0.0.1:29400", "rdzv.id=x"),
        ("rdzv=etcd", "rdzv.endpoint=127.0.0.1:2379", "rdzv.id=x"),
    ],
)
def test_every_backend_has_the_pinned_master_keys_and_validate_checks_them(
    composed: Callable[..., DictConfig], backend: tuple[str, ...]
) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", *backend))
    assert isinstance(conf, ElasticRunConfig)
    assert (conf.rdzv.master_addr, conf.rdzv.master_port) == (None, None)  # unset: as before
    pinned = ("rdzv.master_addr=node0", "rdzv.master_port=29500")
    conf = OmegaConf.to_object(composed("+job=hello", *backend, *pinned))
    assert isinstance(conf, ElasticRunConfig)
    assert (conf.rdzv.master_addr, conf.rdzv.master_port) == ("node0", 29500)
    validate(conf)
    for bad, line in (
        ("rdzv.master_port=70000", "rdzv.master_port=70000: expected a port from 1 to 65535"),
        ("rdzv.master_port=0", "rdzv.master_port=0: expected a port from 1 to 65535"),
        ("rdzv.master_addr='a b'", "rdzv.master_addr=a b: expected a host name or IP address"),
    ):
        conf = OmegaConf.to_object(composed("+job=hello", *backend, bad))
        assert isinstance(conf, ElasticRunConfig)
        with pytest.raises(ConfigError) as caught:
            validate(conf)
        assert describe_config_error(caught.value).startswith(line)


def test_store_backends_check_the_pinned_master_keys_too() -> None:
    context = RunContext("job", Path("."), "node", 1, 1)
    config = TcpRendezvousConfig(endpoint="127.0.0.1:1", id="job", master_port=29500)
    assert settings_from(config, context).master_port == 29500
    assert settings_from(TcpRendezvousConfig(endpoint="h:1", id="job"), context).master_port is None
    config.master_port = 0
    with pytest.raises(ConfigError, match=r"^rdzv\.master_port=0: expected a port"):
        settings_from(config, context)


# -- logs.prefix -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["[{role}{local_rank}]:", "", "{node}/{rank:>5}", "{{literal}} {rank!s:^8}"]
)
def test_parse_log_prefix_accepts(good: str) -> None:
    assert parse_log_prefix(good) == good


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("{nope}", r"unknown field \{nope\}; allowed: \{role\}"),
        ("{}", r"unknown field \{\}"),
        ("{0}", r"unknown field \{0\}"),
        ("{rank.real}", r"unknown field \{rank\.real\}"),
        ("{role[0]}", r"unknown field"),
        ("{rank:>20000000}", r"a width over 200 characters"),
        ("{rank:>99999999999999999999999}", r"a width over 200"),
        ("{rank:{rank}}", r"nested fields"),
        ("{rank", r"not a valid template"),
        ("}", r"not a valid template"),
        ("{role:d}", r"cannot be formatted"),
        ("{rank!z}", r"cannot be formatted"),
        ("x" * 201, r"longer than 200 characters"),
        ("{rank:>150}{local_rank:>150}", r"longer than 200"),
    ],
)
def test_parse_log_prefix_refuses_with_one_line(bad: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^logs\.prefix=") as caught:
        parse_log_prefix(bad)
    assert re.search(why, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


# -- job.env ---------------------------------------------------------------------------------


def test_parse_env() -> None:
    assert parse_env({"A": "1", "_b2": "", "PATH_X": "a=b c"}) == {
        "A": "1",
        "_b2": "",
        "PATH_X": "a=b c",
    }
    cases: list[tuple[object, str]] = [
        ({"A=B": "c"}, r"^job\.env='A=B': expected variable names"),
        ({"1A": "c"}, r"^job\.env='1A': expected variable names"),
        ({"": "c"}, r"^job\.env='': expected"),
        ({"A B": "c"}, r"^job\.env='A B': "),
        ({"X": [1, 2]}, r"^job\.env\.X=\[1, 2\]: expected a string"),
        ({"X": {"a": 1}}, r"^job\.env\.X=.*: expected a string"),
        ({"X": None}, r"^job\.env\.X=\(unset\): expected a string"),
        ({"X": "a\0b"}, r"^job\.env\.X='a\\x00b': contains a NUL"),
        ({"X": "x" * 200_000}, r"^job\.env\.X=\(200000 characters\): too long"),
        ({"HF_TOKEN": "a\0b"}, r"^job\.env\.HF_TOKEN=\*\*\*: contains a NUL"),
        ({"HF_TOKEN": ["s3cr3t"]}, r"^job\.env\.HF_TOKEN=\*\*\*: expected a string"),
        ([1], r"^job\.env=\[1\]: expected a mapping"),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_env(env)


def test_env_given_whole_is_checked_by_validate(composed: Callable[..., DictConfig]) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", "+job.env={X:[1,2]}"))
    assert isinstance(conf, ElasticRunConfig)
    with pytest.raises(ConfigError, match=r"^job\.env\.X=\[1, 2\]: expected a string"):
        validate(conf)


# -- job.nproc_per_node limits ---------------------------------------------------------------


def test_nproc_per_node_within_the_process_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (20, 20))
    check_nproc_per_node(19)
    with pytest.raises(
        ConfigError, match=r"^job\.nproc_per_node=20: more workers than this user may run "
    ) as caught:
        check_nproc_per_node(20)
    assert "ulimit -u: 20" in str(caught.value)


def test_nproc_per_node_within_a_multiple_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    check_nproc_per_node(64)
    with pytest.raises(ConfigError, match=r"^job\.nproc_per_node=65: more than 32 workers per CPU"):
        check_nproc_per_node(65)


def test_validate_checks_nproc_per_node_limits(
    composed: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = OmegaConf.to_object(composed("+job=hello", "job.nproc_per_node=10000"))
    assert isinstance(conf, ElasticRunConfig)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    with pytest.raises(ConfigError, match=r"^job\.nproc_per_node=10000: more than 32 workers"):
        validate(conf)


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "password",
        "passwd",
        "client_secret",
        "HF_TOKEN",
        "GITHUB_TOKEN",
        "WANDB_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "api-token",
        "--api-key",
        "credentials",
        "gpg_passphrase",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)
    assert may_hold_secrets(name)  # the quick test before parsing a file never misses one


@pytest.mark.parametrize(
    "name",
    [
        *("key", "ca_cert", "cert", "user", "token_file", "token_env", "token_required"),
        *("monkey", "id", "endpoint", "PATH", "TOKENIZERS_PARALLELISM"),
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("rdzv.token=abc", "rdzv.token=***"),
        ("rdzv.token=abc: expected", "rdzv.token=***: expected"),
        ("+job.env.HF_TOKEN=abc", "+job.env.HF_TOKEN=***"),
        ("rdzv.token=a,b", "rdzv.token=***"),  # a sweep
        ("x=1,rdzv.password='a,b',rdzv=tcp", "x=1,rdzv.password=***,rdzv=tcp"),
        ('+job.args=["--api-token=abc"]', '+job.args=["--api-token=***"]'),
        ("+job.env={HF_TOKEN:abc,X:1}", "+job.env={HF_TOKEN:***,X:1}"),
        ("password: hunter2", "password: ***"),
        ("redis://u:hunter2@host:6379/0", "redis://u:***@host:6379/0"),
        ("#0 : rdzv.token=abc rdzv=tcp", "#0 : rdzv.token=*** rdzv=tcp"),
        ("rdzv.token=", "rdzv.token="),
        ("rdzv.endpoint=host:29400", "rdzv.endpoint=host:29400"),
        ("rdzv.key=/etc/tls/key.pem", "rdzv.key=/etc/tls/key.pem"),
        ("heartbeat to host:29400 failed: refused", "heartbeat to host:29400 failed: refused"),
    ],
)
def test_redact_text(text: str, hidden: str) -> None:
    assert redact_text(text) == hidden


def test_redact_tree() -> None:
    data = {
        "rdzv": {"token": "abc", "password": None, "key": "/k.pem", "user": "me"},
        "job": {"env": {"HF_TOKEN": "abc", "X": "1"}, "args": ["--password=abc", "plain"]},
        "hydra": {"overrides": {"task": ["rdzv.token=abc", "x=1"]}},
        "empty": {"token": ""},
    }
    assert redact(data) == {
        "rdzv": {"token": "***", "password": None, "key": "/k.pem", "user": "me"},
        "job": {"env": {"HF_TOKEN": "***", "X": "1"}, "args": ["--password=***", "plain"]},
        "hydra": {"overrides": {"task": ["rdzv.token=***", "x=1"]}},
        "empty": {"token": ""},
    }
    assert not may_hold_secrets("rdzv:\n  backend: local\n  id: null\n")
    assert may_hold_secrets("rdzv:\n  token: x\n")


def test_a_config_error_never_shows_a_secret() -> None:
    exc = ConfigError("rdzv.token", "s3cr3t-value", "too short")
    assert describe_config_error(exc) == "rdzv.token=***: too short"
    assert describe_config_error(ConfigError("nnodes", "x", "bad")) == "nnodes=x: bad"


def test_written_config_hides_secrets_and_is_private(tmp_path: Path) -> None:
    config = ElasticRunConfig(
        job=JobConfig(module="m", env={"HF_TOKEN": "s3cr3t-hf", "X": "1"}),
        rdzv=TcpRendezvousConfig(endpoint="h:1", id="job", token="s3cr3t-tok"),
    )
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o644)
    _write_config(path, config, "job")
    text = path.read_text()
    assert "s3cr3t" not in text
    assert "token: '***'" in text and "HF_TOKEN: '***'" in text and "X: '1'" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


def test_logging_filter_hides_secrets(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.redaction")
    handler = logging.Handler()
    seen: list[str] = []
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.error("Error executing job with overrides: %s", ["rdzv.token=s3cr3t", "x=1"])
        logger.error("plain %d", 1)
    finally:
        logger.removeHandler(handler)
    assert seen == ["Error executing job with overrides: ['rdzv.token=***', 'x=1']", "plain 1"]
