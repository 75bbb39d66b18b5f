"""Real composition errors from Hydra's Compose API, each turned into one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from elastic_runner.config import register_configs
from elastic_runner.hydra_errors import describe_hydra_error
from elastic_runner.plugins import BrokenPlugin, make_plugin_manager
from elastic_runner.registry import Registry
from elastic_runner.resources import conf_dir, example_path


@pytest.fixture
def error_of() -> Iterator[Callable[..., str | None]]:
    """Composes ``overrides`` (which must fail) and describes the error."""
    register_configs(Registry(make_plugin_manager(autoload=False)))
    OmegaConf.register_new_resolver("er.example", example_path, replace=True)

    def _error_of(*overrides: str, broken: list[BrokenPlugin] | None = None) -> str | None:
        with (
            initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"),
            pytest.raises(Exception) as info,
        ):
            compose("config", overrides=list(overrides))
        return describe_hydra_error(info.value, list(overrides), broken)

    yield _error_of


def test_unknown_option_lists_the_allowed_ones(error_of: Callable[..., str | None]) -> None:
    line = error_of("+job=hello", "rdzv=nope")
    assert line is not None
    assert line.startswith("rdzv=nope: no such option in group 'rdzv'; allowed: ")
    assert "etcd" in line and "tcp" in line


def test_unknown_key_lists_the_keys_of_its_node(error_of: Callable[..., str | None]) -> None:
    line = error_of("+job=hello", "rdzv.prot=1")  # rdzv=local by default
    assert line == (
        "rdzv.prot=1: no such key; allowed keys at rdzv: "
        "backend, id, local_addr, master_addr, master_port"
    )


def test_wrong_type_names_key_and_value(error_of: Callable[..., str | None]) -> None:
    line = error_of("+job=hello", "max_restarts=lots")
    assert line is not None
    assert line.startswith("max_restarts=lots: ")


def test_unparsable_override_says_to_quote(error_of: Callable[..., str | None]) -> None:
    line = error_of("+job=hello", "job.args=[")
    assert line is not None
    assert line.startswith("job.args=[: cannot parse this override")
    assert "quote" in line


def test_missing_option_names_broken_plugins(error_of: Callable[..., str | None]) -> None:
    broken = BrokenPlugin(
        name="acme",
        value="acme_plugin",
        distribution="acme",
        version="1.0",
        error="ImportError: no acme",
    )
    line = error_of("+job=hello", "rdzv=acme", broken=[broken])
    assert line is not None
    assert line.startswith("rdzv=acme: no such option in group 'rdzv'")
    assert "installed plugins that failed to load: " in line
    assert line.endswith("plugin 'acme' (acme_plugin, from acme): ImportError: no acme")


def test_every_line_is_one_line(error_of: Callable[..., str | None]) -> None:
    for overrides in (["rdzv=nope"], ["rdzv.prot=1"], ["job.args=["], ["max_restarts=x"]):
        line = error_of("+job=hello", *overrides)
        assert line is not None and "\n" not in line, line


def test_other_exceptions_are_not_described() -> None:
    assert describe_hydra_error(ValueError("boom"), []) is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["logs.prefix=${local_rank}"],
            "logs.prefix=${local_rank}: Interpolation key 'local_rank' not found; write "
            "\\${...} for a literal ${...}; the prefix's fields are {role}, {rank}, "
            "{local_rank}, {node}",
        ),
        (
            ["job.args=[--lr,${local_rank}]"],
            "job.args=[--lr,${local_rank}]: Interpolation key 'local_rank' not found (at "
            "job.args[1]); write \\${...} for a literal ${...}; a worker's local rank in "
            "job.args is %local_rank%",
        ),
        (
            ["job.role=${oc.env:ER_TEST_NO_SUCH_VARIABLE}"],
            "job.role=${oc.env:ER_TEST_NO_SUCH_VARIABLE}: KeyError raised while resolving "
            "interpolation: \"Environment variable 'ER_TEST_NO_SUCH_VARIABLE' not found\"; "
            "write \\${...} for a literal ${...}",
        ),
    ],
)
def test_interpolation_errors_are_one_line_naming_the_key(
    composed_error: Callable[..., str | None], overrides: list[str], expected: str
) -> None:
    assert composed_error("+job=hello", *overrides) == expected


def test_a_value_set_whole_names_the_override(error_of: Callable[..., str | None]) -> None:
    line = error_of("+job=hello", "+job.env={X:null}")
    assert line == "job.env={X:null}: field 'job.env.X' is not Optional"


@pytest.mark.parametrize(
    "overrides",
    [
        ["rdzv=tcp", "rdzv.token=[s3cr3t-value,2]"],
        ["rdzv=tcp", "rdzv.token=[s3cr3t-value"],
        ["rdzv=tcp", "rdzv.token={a:s3cr3t-value}"],
        ["rdzv=etcd", "rdzv.password=[s3cr3t-value]"],
        ["rdzv.token=s3cr3t-value"],  # no such key under rdzv=local
        ["+job.env.HF_TOKEN=[s3cr3t-value]"],
    ],
)
def test_errors_never_show_a_secret(
    error_of: Callable[..., str | None], overrides: list[str]
) -> None:
    line = error_of("+job=hello", *overrides)
    assert line is not None and "\n" not in line, line
    assert "s3cr3t" not in line, line
    assert "***" in line, line


@pytest.fixture
def composed_error() -> Iterator[Callable[..., str | None]]:
    """Composes ``overrides`` (which compose) and describes the error of turning the
    result into the schema's objects, as ``elastic-run`` does."""
    register_configs(Registry(make_plugin_manager(autoload=False)))
    OmegaConf.register_new_resolver("er.example", example_path, replace=True)

    def _error_of(*overrides: str) -> str | None:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        with pytest.raises(Exception) as info:
            OmegaConf.to_object(cfg)
        return describe_hydra_error(info.value, list(overrides))

    yield _error_of
