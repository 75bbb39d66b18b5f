"""Config parsing, validation and composition through Hydra's Compose API."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from elastic_runner.config import (
    ConfigError,
    ElasticRunConfig,
    parse_nnodes,
    parse_nproc_per_node,
    register_configs,
    validate,
)
from elastic_runner.plugins import make_plugin_manager
from elastic_runner.registry import Registry
from elastic_runner.rendezvous.local import LocalRendezvousConfig
from elastic_runner.resources import conf_dir, example_path


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


def test_parse_nproc_per_node() -> None:
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
