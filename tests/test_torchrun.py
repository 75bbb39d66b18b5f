"""The torchrun front end's pieces, without torch: reading the command line and ``PET_*``
(options.py), the mapping onto the config (translate.py), the Hydra command line and
the patch (front.py), and the hint for torchrun lines given to the Hydra form (hints.py).
What torch itself decides is compared in tests/integration/test_torchrun_golden.py."""

from __future__ import annotations

import logging
import posixpath
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from elastic_runner.config import ConfigError
from elastic_runner.config_patch import ConfigPatch, literal
from elastic_runner.spec import LOCAL_RANK_PLACEHOLDERS
from elastic_runner.torchrun.console import log_prefix_from_template
from elastic_runner.torchrun.front import SOURCES, prepare, split_torchrun_form
from elastic_runner.torchrun.hints import misuse_hint
from elastic_runner.torchrun.options import TorchrunUsageError, parse_torchrun_args
from elastic_runner.torchrun.translate import (
    Translation,
    _parse_rdzv_conf,
    _run_dir_override,
    _split_endpoint,
    _worker_arg,
    hydra_quoted,
    translate,
)

BACKENDS = ("local", "tcp", "static", "etcd")
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)


def run(argv: str, **env: str) -> Translation:
    """Parse and translate a torchrun line (split like a shell line)."""
    import shlex

    return translate(parse_torchrun_args(shlex.split(argv), env), env, backends=BACKENDS)


def fails(argv: str, **env: str) -> str:
    with pytest.raises(TorchrunUsageError) as error:
        run(argv, **env)
    message = str(error.value)
    assert message.isprintable(), message  # one line
    return message


# -- options.py: the command line and PET_* ----------------------------------------------------


def test_the_command_line_beats_pet_which_beats_the_default() -> None:
    env = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "4", "PET_MAX_RESTARTS": "2"}
    args = parse_torchrun_args(["--nnodes=2", "t.py"], env)
    assert (args.nnodes, args.nproc_per_node, args.max_restarts) == ("2", "4", 2)
    assert args.rdzv_backend == "static"  # neither: torch's default
    assert {"nnodes", "nproc_per_node", "max_restarts"} <= args.given
    assert "rdzv_backend" not in args.given


def test_a_flag_beats_pet_zero() -> None:
    args = parse_torchrun_args(["--standalone", "t.py"], {"PET_STANDALONE": "0"})
    assert args.standalone


@pytest.mark.parametrize(
    ("value", "on"),
    [("", True), ("1", True), ("2", True), ("true", True), ("Yes", True), ("0", False)],
)
def test_pet_standalone(value: str, on: bool) -> None:
    """``PET_STANDALONE=""`` is what Kubeflow's training-operator sets for a standalone
    elastic job (torch itself crashes on it): on."""
    assert parse_torchrun_args(["t.py"], {"PET_STANDALONE": value}).standalone is on


@pytest.mark.parametrize("name", ["PET_NNODES", "PET_MAX_RESTARTS", "PET_ROLE", "PET_NODE_RANK"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_pet_value_is_unset(name: str, value: str) -> None:
    args = parse_torchrun_args(["t.py"], {name: value})
    assert name[4:].lower() not in args.given
    assert (args.nnodes, args.max_restarts, args.role, args.node_rank) == ("1:1", 0, "default", 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PET_MAX_RESTARTS": "x"},
            "PET_MAX_RESTARTS='x': invalid int value (for --max-restarts/--max_restarts)",
        ),
        (
            {"PET_MONITOR_INTERVAL": "soon"},
            "PET_MONITOR_INTERVAL='soon': invalid float value "
            "(for --monitor-interval/--monitor_interval)",
        ),
        (
            {"PET_START_METHOD": "thread"},
            "PET_START_METHOD='thread': invalid choice (choose from spawn, fork, forkserver)",
        ),
        ({"PET_MODULE": "maybe"}, "PET_MODULE='maybe': expected 1 or 0"),
        ({"PET_NODE_RANK": "1\n2"}, "PET_NODE_RANK='1\\n2': invalid int value"),
    ],
)
def test_a_bad_pet_value_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(TorchrunUsageError) as error:
        parse_torchrun_args(["t.py"], env)
    assert str(error.value).startswith(message)
    assert str(error.value).isprintable()


def test_options_without_pet_ignore_it() -> None:
    args = parse_torchrun_args(["t.py"], {"PET_LOGS_SPECS": "x", "PET_NUMA_BINDING": "node"})
    assert (args.logs_specs, args.numa_binding) == (None, None)


def test_the_scripts_arguments_are_verbatim() -> None:
    argv = ["--nproc_per_node", "2", "t.py", "--nproc-per-node", "9", "-m", "--x=1", "a b", ""]
    args = parse_torchrun_args(argv, {})
    assert args.nproc_per_node == "2"
    assert (args.training_script, args.training_script_args) == ("t.py", argv[3:])
    assert not args.module


def test_spellings_and_abbreviations() -> None:
    for argv in (
        ["--nproc-per-node", "2"],
        ["--nproc_per_node=2"],
        ["--nproc-p", "2"],
        ["--nproc_p=2"],
    ):
        assert parse_torchrun_args([*argv, "t.py"], {}).nproc_per_node == "2"
    with pytest.raises(TorchrunUsageError, match="ambiguous option: --max"):
        parse_torchrun_args(["--max", "3", "t.py"], {})


def test_duplicate_filters_are_torchs_comma_list() -> None:
    args = parse_torchrun_args(["--duplicate-stdout-filters", "a,,b,c", "t.py"], {})
    assert args.duplicate_stdout_filters == ["a,b", "c"]


def test_no_script_names_the_usage() -> None:
    with pytest.raises(TorchrunUsageError, match=r"^the training script is missing: "):
        parse_torchrun_args(["--nproc-per-node", "2"], {})


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse_torchrun_args(["--help"], {})
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: elastic-run torchrun")


# -- translate.py ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("", ("localhost", 7)),
        ("  ", ("localhost", 7)),
        ("head", ("head", 7)),
        (" head:29400 ", ("head", 29400)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        ("[::1]:5", ("::1", 5)),
        ("[::1]", ("::1", 7)),
        ("[fd00::5]:65535", ("fd00::5", 65535)),
        ("::1:29400", ("::1", 29400)),  # not an address: torch's last colon
        ("fe80::1:8080", ("fe80::1", 8080)),  # torch's reading of an ambiguous line
        ("fe80::1", ("fe80::1", 7)),  # torch: host "fe80:", port 1
        ("::1", ("::1", 7)),
        ("node-1.example_x", ("node-1.example_x", 7)),
    ],
)
def test_split_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert _split_endpoint(endpoint, 7) == expected


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("h:", "the port must be an integer from 0 to 65535"),
        ("h:x", "the port must be an integer from 0 to 65535"),
        ("h:65536", "the port must be an integer from 0 to 65535"),
        ("h:123456", "the port must be an integer from 0 to 65535"),
        ("h:-1", "the port must be an integer from 0 to 65535"),
        ("h:\u00b2", "the port must be an integer from 0 to 65535"),  # a digit to isdigit()
        ("[::1]:x", "the port must be an integer from 0 to 65535"),
        ("bad host:1", "'bad host' is not a host name or address"),
        ("h/x:1", "'h/x' is not a host name or address"),
        ("fe80::1%eth0", "is not a host name or address"),
    ],
)
def test_split_endpoint_rejects(endpoint: str, message: str) -> None:
    with pytest.raises(TorchrunUsageError) as error:
        _split_endpoint(endpoint, 7)
    assert str(error.value).startswith(f"--rdzv-endpoint={endpoint!r}: ")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("  ", {}),
        ("a=1", {"a": "1"}),
        (" a = 1 , b=x=y ", {"a": "1", "b": "x=y"}),
    ],
)
def test_parse_rdzv_conf(text: str, expected: dict[str, str]) -> None:
    assert _parse_rdzv_conf(text) == expected


@pytest.mark.parametrize("text", ["a", "a=", "a= ", "=1", " =1", "a=1,", "a=1,,b=2", ","])
def test_parse_rdzv_conf_rejects(text: str) -> None:
    with pytest.raises(TorchrunUsageError, match=r"expected <key1>=<value1>,\.\.\."):
        _parse_rdzv_conf(text)


C10D = "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id j"


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("join_timeout=60", {"rdzv.join_timeout": 60.0}),
        ("is_host=yes,close_timeout=5", {"rdzv.is_host": True, "rdzv.close_timeout": 5.0}),
        ("is_host=0", {"rdzv.is_host": False}),
        # torch's keep-alive: dead after keep_alive_max_attempt (3) missed beats
        ("keep_alive_interval=2", {"rdzv.heartbeat_interval": 2.0, "rdzv.heartbeat_timeout": 6.0}),
        ("keep_alive_max_attempt=4", {"rdzv.heartbeat_timeout": 20.0}),
        (
            "keep_alive_interval=2,heartbeat_timeout=9",
            {"rdzv.heartbeat_interval": 2.0, "rdzv.heartbeat_timeout": 9.0},
        ),
        ("read_timeout=9,store_type=tcp,timeout=1", {}),
    ],
)
def test_rdzv_conf_keys(conf: str, expected: dict[str, object]) -> None:
    values = run(f"{C10D} --rdzv-conf {conf} t.py").values
    assert {
        k: v
        for k, v in values.items()
        if k.startswith("rdzv.") and k not in ("rdzv.endpoint", "rdzv.id")
    } == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            f"{C10D} --rdzv-conf is_host=maybe t.py",
            "--rdzv-conf is_host='maybe': expected a boolean",
        ),
        (f"{C10D} --rdzv-conf join_timeout=1.5 t.py", "expected a whole number of seconds"),
        # one node needs no store, but torch reads the values all the same
        ("--standalone --rdzv-conf is_host=maybe t.py", "expected a boolean"),
        ("--rdzv-conf join_timeout t.py", "expected <key1>=<value1>"),
        ("--master-port 1 --rdzv-conf timeout=x t.py", "expected a whole number of seconds"),
    ],
)
def test_rdzv_conf_errors(argv: str, message: str) -> None:
    assert message in fails(argv)


def test_one_node_keeps_torchs_run_id() -> None:
    """torchtitan's localhost:0 line: TORCHELASTIC_RUN_ID is torch's "none"."""
    translation = run("--rdzv-backend c10d --rdzv-endpoint localhost:0 t.py")
    assert translation.overrides == ("rdzv=local",)
    assert translation.values["rdzv.id"] == "none"
    # --standalone and torch's auto-standalone: a fresh id (torch: a uuid)
    assert "rdzv.id" not in run("--standalone --rdzv-id x t.py").values
    assert "rdzv.id" not in run("--rdzv-id x t.py").values


@pytest.mark.parametrize(
    ("master", "addr", "endpoint"),
    [
        ("[fd00::5]", "fd00::5", "[fd00::5]:29501"),
        ("fd00::5", "fd00::5", "[fd00::5]:29501"),
        (" head", "head", "head:29501"),
    ],
)
def test_static_master_addr_is_read_as_torchs_endpoint(
    master: str, addr: str, endpoint: str
) -> None:
    values = run(f"--nnodes 2 --master-addr '{master}' t.py").values
    assert (values["rdzv.master_addr"], values["rdzv.master_port"]) == (addr, 29500)
    assert values["rdzv.endpoint"] == endpoint


def test_static_master_addr_and_port_as_torch_reads_them() -> None:
    assert "--master-addr/--master-port='127.0.0.1:70000'" in fails(
        "--nnodes 2 --master-port 70000 t.py"
    )
    assert "'head ' is not a host name" in fails("--nnodes 2 --master-addr 'head ' t.py")


@pytest.mark.parametrize(
    ("argv", "streams", "local_ranks", "noted"),
    [
        ("-r 3 -t 1", ["stdout"], None, False),
        ("--nproc-per-node 3 -r 0:3", ["stderr", "stdout"], [1, 2], False),
        ("--nproc-per-node 3 -r 0:3,1:1", ["stderr", "stdout"], [1, 2], True),
        ("--nproc-per-node 2 -r 3 -t 0:3,1:3", ["stderr", "stdout"], None, False),
        ("--nproc-per-node 2 -r 3 -t 0:3", ["stderr", "stdout"], [0], False),
        # a word: the ranks no mapping names show nothing, so the named ones are listed
        ("--nproc-per-node auto -r 3 -t 1:1", ["stdout"], [1], False),
        # ... else a silent rank cannot be left out before the count is known
        ("--nproc-per-node auto -r 0:3", ["stderr", "stdout"], None, True),
        ("--nproc-per-node 4 --local-ranks-filter 3,1 -r 0:3", ["stderr", "stdout"], [1, 3], False),
        ("--nproc-per-node 2 -r 3", [], None, False),
        # the filter first: rank 1's stderr is not shown, so rank 0's stdout alone
        ("--nproc-per-node 2 -r 0:3,1:1 -t 1 --local-ranks-filter 0", ["stdout"], [0], False),
        ("--nproc-per-node auto -r 0:3 --local-ranks-filter 1", ["stderr", "stdout"], [1], False),
        ("--nproc-per-node auto --local-ranks-filter 1 -r 3", [], None, False),
    ],
)
def test_console_per_local_rank(
    argv: str, streams: list[str], local_ranks: list[int] | None, noted: bool
) -> None:
    translation = run(f"{argv} t.py")
    assert translation.values["logs.console_streams"] == streams
    assert translation.values.get("logs.console_local_ranks") == local_ranks
    assert any("per local rank" in n for n in translation.notes) is noted


def test_local_ranks_filter_must_be_integers() -> None:
    assert "--local-ranks-filter='0,a'" in fails("--local-ranks-filter 0,a t.py")


@pytest.mark.parametrize(
    ("template", "formatted"),
    [
        ("[${role_name}:${rank}/$local_rank]", "[r:7/3]"),
        ("$$ {x} ${other} $other $", "$ {x} ${other} $other $"),
        ("{role}", "{role}"),
    ],
)
def test_log_prefix_from_template(template: str, formatted: str) -> None:
    assert log_prefix_from_template(template).format(role="r", rank=7, local_rank=3) == formatted


@PROPERTY
@given(st.text(alphabet="${}_ abrlkoncdei_x:[]%"))
def test_log_prefix_formats_as_torchs_template(template: str) -> None:
    expected = string.Template(template).safe_substitute(role_name="R", rank=7, local_rank=3)
    assert log_prefix_from_template(template).format(role="R", rank=7, local_rank=3) == expected


@pytest.mark.parametrize(
    ("arg", "ours"),
    [
        ("plain", "plain"),
        ("--rank=$local_rank", "--rank=${local_rank}"),
        ("${local_rank}x", "${local_rank}x"),
        ("$$5", "$5"),
        ("$HOME ${HOME} $", "$HOME ${HOME} $"),
    ],
)
def test_worker_arg_as_torchs_template(arg: str, ours: str) -> None:
    notes: list[str] = []
    assert _worker_arg(arg, notes) == ours
    assert notes == []


@pytest.mark.parametrize("arg", ["%local_rank%", "$${local_rank}"])
def test_worker_arg_torch_would_leave_is_noted(arg: str) -> None:
    notes: list[str] = []
    _worker_arg(arg, notes)
    assert notes and "torchrun would not" in notes[0]


@PROPERTY
@given(st.text(alphabet="${}_ lrankoc%x"))
def test_worker_arg_gives_each_rank_what_torch_gives(arg: str) -> None:
    notes: list[str] = []
    ours = _worker_arg(arg, notes)
    if notes:
        return
    for rank in ("0", "13"):
        substituted = ours
        for placeholder in LOCAL_RANK_PLACEHOLDERS:  # what WorkerSpec.argv_for does
            substituted = substituted.replace(placeholder, rank)
        assert substituted == string.Template(arg).safe_substitute(local_rank=rank)


def test_signals_torch_does_not_know_are_dropped_with_a_note() -> None:
    translation = run("--signals-to-handle SIGTERM,SIGFOO,,SIGUSR1 t.py")
    assert translation.values["signals.forward"] == ["SIGTERM", "SIGUSR1"]
    assert any("SIGFOO ignored" in n for n in translation.notes)


def test_shutdown_timeout_from_the_environment() -> None:
    assert run("t.py", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="45").values["stop_timeout"] == 45.0
    assert (
        run("--shutdown-timeout 5 t.py", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="45").values["stop_timeout"]
        == 5.0
    )
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT='soon'" in fails(
        "t.py", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="soon"
    )


def test_an_unknown_backend_names_the_known_ones() -> None:
    message = fails("--nnodes 2 --rdzv-backend nosuch --rdzv-endpoint h:1 t.py")
    assert message == (
        "--rdzv-backend='nosuch': unknown backend; known: c10d, static, etcd, etcd-v2"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--nnodes 1:2:3 t.py", "--nnodes='1:2:3': expected N or MIN:MAX"),
        ("--nnodes 2:1 t.py", "--nnodes='2:1': expected 0 < MIN <= MAX"),
        ("--max-restarts -1 t.py", "--max-restarts=-1: expected >= 0"),
        ("--no-python -m x", "don't use both the '--no-python' flag and the '--module' flag"),
        ("-r 4 t.py", "--redirects='4': expected 0 (none), 1 (stdout), 2 (stderr), 3 (both)"),
        ("--nnodes 2 --node-rank 2 t.py", "--node-rank=2: expected 0 to 1 with --nnodes=2"),
        ("--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:0 t.py", "port 0 picks a free port"),
        ("--nnodes 2 --rdzv-endpoint h t.py", "a port is required with the static backend"),
        ("--nnodes 2 --master-port 65535 t.py", "the agents' store listens on the next port"),
        ("--shutdown-timeout -1 t.py", "--shutdown-timeout=-1: expected >= 0"),
    ],
)
def test_bad_lines_are_one_line(argv: str, message: str) -> None:
    assert message in fails(argv)


# -- --log-dir: the run directory under it, through Hydra's grammar ----------------------------


def _parsed_run_dir(override: str) -> str:
    (parsed,) = OverridesParser.create().parse_overrides([override])
    assert parsed.key_or_group == "hydra.run.dir"
    return str(parsed.value())


@PROPERTY
@given(st.text(alphabet="a '\"\\/ü$}{=,[]()*:", min_size=1).filter(lambda t: "${" not in t))
def test_the_run_dir_override_reads_back_as_written(log_dir: str) -> None:
    run_dir = _parsed_run_dir(_run_dir_override(log_dir, "job.1"))
    assert re.fullmatch(re.escape(posixpath.join(log_dir, "job.1_")) + "[0-9a-f]{8}", run_dir), (
        run_dir
    )


@PROPERTY
@given(st.text())
def test_hydra_quoted_reads_back(text: str) -> None:
    (parsed,) = OverridesParser.create().parse_overrides([f"k={hydra_quoted(text)}"])
    assert parsed.value() == text


def test_run_dir_under_the_root_and_with_a_trailing_slash() -> None:
    assert re.fullmatch(r"/run_[0-9a-f]{8}", _parsed_run_dir(_run_dir_override("/", None)))
    assert re.fullmatch(r"logs/x_[0-9a-f]{8}", _parsed_run_dir(_run_dir_override("logs/", "x")))


def test_an_empty_log_dir_is_none_as_in_torch() -> None:
    assert run("--log-dir '' t.py").overrides == ("rdzv=local",)


@pytest.mark.parametrize("log_dir", ["${oc.env:HOME}", "a\nb", "a\0b"])
def test_log_dir_rejects(log_dir: str) -> None:
    with pytest.raises(TorchrunUsageError, match=r"^--log-dir="):
        _run_dir_override(log_dir, None)


# -- front.py -----------------------------------------------------------------------------------


@PROPERTY
@given(st.text())
def test_literal_resolves_to_itself(text: str) -> None:
    cfg = OmegaConf.create({"one": "", "many": []})
    cfg.one = literal(text)
    cfg.many = literal([text, "x"])
    assert cfg.one == text
    assert OmegaConf.to_container(cfg, resolve=True) == {"one": text, "many": [text, "x"]}


@PROPERTY
@given(st.text(alphabet="\\${}a:.", max_size=12))
def test_literal_resolves_to_itself_around_interpolations(text: str) -> None:
    cfg = OmegaConf.create({"value": literal(text)})
    assert cfg.value == text


@pytest.mark.parametrize(
    ("argv", "split"),
    [
        (["torchrun", "t.py"], ([], ["t.py"])),
        (
            ["x=1", "+y=2", "~z", "torchrun", "--nnodes", "2", "t.py", "torchrun"],
            (["x=1", "+y=2", "~z"], ["--nnodes", "2", "t.py", "torchrun"]),
        ),
        (["torchrun"], ([], [])),
        ([], None),
        (["x=1"], None),
        (["-m", "torchrun"], None),
        (["train.py", "torchrun"], None),
        (["--cfg", "job", "torchrun"], None),
    ],
)
def test_split_torchrun_form(argv: list[str], split: tuple[list[str], list[str]] | None) -> None:
    assert split_torchrun_form(argv) == split


def test_prepare_takes_overrides_before_torchrun_and_from_the_environment() -> None:
    env = {"ELASTIC_RUN_OVERRIDES": "job.role=env 'logs.prefix=[{rank}] '"}
    overrides, patch = prepare(
        ["watchdog.no_output_timeout=300", "job.args=[a]"],
        ["--role", "cli", "t.py", "x"],
        env,
        BACKENDS,
    )
    assert overrides == [
        "rdzv=local",
        "watchdog.no_output_timeout=300",
        "job.args=[a]",
        "job.role=env",
        "logs.prefix=[{rank}] ",
    ]
    # the user's overrides win over what the torchrun options say
    assert "job.role" not in patch.values and "job.args" not in patch.values
    assert patch.values["job.entrypoint"] == "t.py"


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (["rdzv=tcp"], {}, "rdzv= is chosen by the torchrun options"),
        ([], {"ELASTIC_RUN_OVERRIDES": "+rdzv=tcp"}, "rdzv= is chosen by the torchrun options"),
        ([], {"ELASTIC_RUN_OVERRIDES": "'unclosed"}, "ELASTIC_RUN_OVERRIDES: No closing quotation"),
    ],
)
def test_prepare_errors(overrides: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(TorchrunUsageError, match=re.escape(message)):
        prepare(overrides, ["t.py"], env, BACKENDS)


def test_the_patch_assigns_literals_and_skips_keys_the_schema_lacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = OmegaConf.create({"job": {"args": [], "role": "default"}, "rdzv": {"id": None}})
    patch = ConfigPatch(
        {"job.args": ["${oc.env:HOME}", "\\${x}"], "rdzv.is_host": True, "rdzv.id": "j"},
        notes=("a note",),
    )
    with caplog.at_level(logging.INFO, logger="elastic_runner.config_patch"):
        patch.apply(cfg)
    assert OmegaConf.to_container(cfg, resolve=True) == {
        "job": {"args": ["${oc.env:HOME}", "\\${x}"], "role": "default"},
        "rdzv": {"id": "j"},
    }
    assert "a note; rdzv.is_host: not a key of this backend; ignored" in caplog.text


def test_the_patch_names_the_option_in_a_config_error() -> None:
    patch = ConfigPatch({"job.nproc_per_node": 0, "rdzv.join_timeout": -1.0}, sources=SOURCES)
    error: Any = ConfigError("job.nproc_per_node", 0, "expected an integer >= 1")
    assert patch.describe(error, "msg") == "--nproc-per-node (msg)"
    assert patch.describe(ConfigError("rdzv.join_timeout", -1.0, "x"), "m") == "--rdzv-conf (m)"
    assert patch.describe(ConfigError("logs.live", "x", "y"), "m") == "m"


# -- hints.py -----------------------------------------------------------------------------------


def test_misuse_hint_for_a_torchrun_option() -> None:
    hint = misuse_hint(["--nproc-per-node=2", "train.py", "--lr", "0.1"])
    assert hint == (
        "--nproc-per-node is a torchrun option; to run a torchrun command line, put "
        "'torchrun' before it: elastic-run torchrun --nproc-per-node=2 train.py --lr 0.1"
    )


def test_misuse_hint_for_a_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert misuse_hint(["train.py", "--lr", "0.1"]) == (
        "'train.py' is not a config override (key=value); to run a script: elastic-run "
        "torchrun train.py --lr 0.1 (or elastic-run job.entrypoint=train.py with "
        "job.args=[...])"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run me").write_text("")
    hint = misuse_hint(["run me"])
    assert hint is not None and "elastic-run torchrun 'run me'" in hint


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["job.entrypoint=x.py", "+job=hello", "~events"],
        ["-m", "rdzv=tcp,local"],  # Hydra's -m (multirun), not torchrun's
        ["-r", "x=1"],
        ["--cfg", "job"],
        ["not-a-file"],
    ],
)
def test_no_hint_for_the_hydra_form(argv: list[str]) -> None:
    assert misuse_hint(argv) is None
