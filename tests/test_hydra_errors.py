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
    assert line == "rdzv.prot=1: no such key; allowed keys at rdzv: backend, id, local_addr"


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
