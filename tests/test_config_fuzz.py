"""Property-based tests of configuration: random values for every key of the schema (the
core's and each built-in option's of ``rdzv``, ``events``, ``metrics``, ``timer``)
through the path ``elastic-run`` takes (Hydra's compose API with overrides, or a merge as
a preset file makes one, then ``OmegaConf.to_object``, ``validate`` and, for store-based
rendezvous, ``settings_from``). Each either passes, and then every value is one the run
can use, or fails with one line: a ``ConfigError``, or a Hydra/OmegaConf error that
``describe_hydra_error`` turns into one line. Never any other exception, and never a
secret in the line.

Deterministic under CI (``derandomize``); elsewhere each run tries new examples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hydra import compose, initialize_config_dir  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from elastic_runner.config import (  # noqa: E402
    _SECONDS_NAME,
    MAX_PREFIX,
    MAX_SECONDS,
    MAX_WORKERS_PER_CPU,
    ConfigError,
    ElasticRunConfig,
    LogsConfig,
    ValidConfig,
    describe_config_error,
    is_secret_name,
    quote_null_options,
    register_configs,
    validate,
)
from elastic_runner.hydra_errors import describe_hydra_error  # noqa: E402
from elastic_runner.plugins import make_plugin_manager  # noqa: E402
from elastic_runner.registry import ComponentKind, Registry  # noqa: E402
from elastic_runner.rendezvous.kit import StoreRendezvousConfig, settings_from  # noqa: E402
from elastic_runner.resources import conf_dir, example_path  # noqa: E402
from elastic_runner.spec import RunContext  # noqa: E402

REGISTRY = Registry(make_plugin_manager(autoload=False))

FUZZ = settings(
    max_examples=int(os.environ.get("ER_FUZZ_EXAMPLES", "60")),  # more: a deeper local run
    deadline=None,
    derandomize="CI" in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _keys(cls: type[Any], prefix: str = "") -> list[str]:
    """Every leaf key of a schema, dotted (``restart.backoff.initial``)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys += _keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


GROUP_OF = {kind.group: kind for kind in ComponentKind}
#: ``logs`` is a group of one option, whose keys are the core's: fuzzed with them (and
#: ``logs`` itself, given a value as a group: ``logs=null``).
CORE_KEYS = [k for k in _keys(ElasticRunConfig) if k.split(".")[0] not in GROUP_OF] + [
    f"logs.{k}" for k in _keys(LogsConfig)
]
#: Each group's options and their keys (the discriminator aside: selecting sets it).
OPTIONS = {
    kind.group: {
        spec.name: [f"{kind.group}.{k}" for k in _keys(spec.config_class) if k != kind.name_key]
        for spec in (REGISTRY.get(kind, name) for name in REGISTRY.names(kind))
    }
    for kind in ComponentKind
}
#: What an option needs to compose at all (its mandatory keys).
NEEDS = {
    "tcp": ["rdzv.endpoint=127.0.0.1:29400", "rdzv.id=fuzz"],
    "static": ["rdzv.endpoint=127.0.0.1:29400", "rdzv.id=fuzz", "rdzv.node_rank=0"],
    "etcd": ["rdzv.endpoint=127.0.0.1:2379", "rdzv.id=fuzz"],
}

# -- values ----------------------------------------------------------------------------------

_chars = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")
_special = st.sampled_from(
    [
        *("${local_rank}", "${oc.env:NOPE}", "{nope}", "{rank:>20000000}", "a/b", ".."),
        *("'", '"', "\\", "{", "}", "[", "]", ",", "=", ":", "%local_rank%", " ", "\n"),
    ]
)
texts = st.one_of(
    st.text(_chars, max_size=20),
    st.lists(st.one_of(_special, st.text(_chars, max_size=4)), max_size=4).map("".join),
)
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0, -0.0, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
)
ints = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 65536, 10000]),
    st.integers(),
)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_names, inner, max_size=3)
    ),
    max_leaves=6,
)


def render(value: Any) -> str:
    """``value`` in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # nan, inf, -inf, 1e+300: all in the grammar
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    # quoted: a quote and the backslashes before it, and trailing backslashes, escaped
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``a.b``: what a preset file sets."""
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}  # a later key under an earlier value replaces it
        tree = tree[part]
    tree[last] = value


# -- the path elastic-run takes ------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_config() -> Iterator[Callable[[list[str]], DictConfig]]:
    register_configs(REGISTRY)
    OmegaConf.register_new_resolver("er.example", example_path, replace=True)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        # as elastic-run's command line does: events=null selects the option "null"
        yield lambda overrides: compose("config", overrides=quote_null_options(overrides))


def outcome(build: Callable[[], DictConfig], argv: list[str]) -> ValidConfig | str:
    """What ``elastic-run`` does with a config: its parsed values, or the one line it
    prints (exit 2). Any exception that is neither is a bug: it propagates."""
    try:
        conf = OmegaConf.to_object(build())
        assert isinstance(conf, ElasticRunConfig)
        valid = validate(conf)
        if isinstance(conf.rdzv, StoreRendezvousConfig):  # what the backend's factory checks
            context = RunContext(conf.rdzv.id or "fuzz", Path("."), "node", 1, 1)
            settings_from(
                conf.rdzv,
                context,
                node_rank=getattr(conf.rdzv, "node_rank", None),
                close_timeout=getattr(conf.rdzv, "close_timeout", None),
            )
        return valid
    except ConfigError as exc:
        return describe_config_error(exc)
    except Exception as exc:
        line = describe_hydra_error(exc, argv)
        if line is None:
            raise
        return line


def check(result: ValidConfig | str, secrets: list[str]) -> None:
    if isinstance(result, str):
        assert result and result.isprintable(), repr(result)  # one line
        for secret in secrets:
            assert secret not in result, result
        return
    _usable(result)


def _usable(valid: ValidConfig) -> None:
    """A config that passed holds only values the run can use."""
    conf = valid.config
    for path, name, value in _leaves(conf):
        if isinstance(value, float):
            assert math.isfinite(value), path
            if _SECONDS_NAME.search(name) or path.startswith("restart.backoff."):
                assert path == "restart.backoff.factor" or 0 <= value <= MAX_SECONDS, path
        if isinstance(value, str):
            assert "\0" not in value, path
    assert 1 <= valid.nproc_per_node <= MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    assert conf.rdzv.id in (None, "") or re.fullmatch(r"[A-Za-z0-9][\w.-]{0,127}", conf.rdzv.id)
    assert len(conf.logs.prefix.format(role="r", rank=0, local_rank=0, node="n")) <= MAX_PREFIX
    for name, value in conf.job.env.items():
        assert re.fullmatch(r"[A-Za-z_]\w*", name) and isinstance(value, str), (name, value)


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _leaves(getattr(node, f.name), f"{path}{f.name}.")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path[:-1]}[{i}].")
    else:
        key = path[:-1]
        yield key, key.rpartition(".")[2], node


# -- the properties --------------------------------------------------------------------------

selections = st.fixed_dictionaries(
    {group: st.sampled_from(sorted(options)) for group, options in OPTIONS.items()}
)


def _keys_of(selection: dict[str, str]) -> list[str]:
    return CORE_KEYS + [k for group, name in selection.items() for k in OPTIONS[group][name]]


@FUZZ
@given(data=st.data(), selection=selections)
def test_random_overrides_pass_or_fail_in_one_line(
    compose_config: Callable[[list[str]], DictConfig], data: Any, selection: dict[str, str]
) -> None:
    keys = data.draw(st.lists(st.sampled_from(_keys_of(selection)), min_size=1, max_size=3))
    argv = ["+job=hello", *(f"{g}={n}" for g, n in selection.items())]
    argv += NEEDS.get(selection["rdzv"], [])
    secrets = []
    for key in keys:
        if is_secret_name(key.rpartition(".")[2]) and data.draw(st.booleans()):
            secret = data.draw(st.from_regex(r"[A-Za-z0-9]{8,16}", fullmatch=True))
            secrets.append(secret)
            argv.append(f"{key}={render(secret)}")
        else:
            argv.append(f"{key}={render(data.draw(values))}")
    env = data.draw(st.dictionaries(_names, values, max_size=2))
    argv += [f"+job.env.{name}={render(value)}" for name, value in env.items()]
    check(outcome(lambda: compose_config(argv), argv), secrets)


@FUZZ
@given(data=st.data(), selection=selections)
def test_random_preset_values_pass_or_fail_in_one_line(
    compose_config: Callable[[list[str]], DictConfig], data: Any, selection: dict[str, str]
) -> None:
    """As a preset file (``--config-dir``) sets them: any value, NUL and names no
    override can spell (``A=B``) included, merged into the composed schema."""
    argv = ["+job=hello", *(f"{g}={n}" for g, n in selection.items())]
    argv += NEEDS.get(selection["rdzv"], [])
    keys = data.draw(st.lists(st.sampled_from(_keys_of(selection)), min_size=1, max_size=3))
    any_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
    raw = st.one_of(values, any_text, st.lists(any_text, max_size=2))
    patch: dict[str, Any] = {}
    for key in keys:
        _set(patch, key, data.draw(raw))
    env = data.draw(st.dictionaries(any_text, raw, max_size=2))
    if env:
        _set(patch, "job.env", env)

    def build() -> DictConfig:
        cfg = compose_config(argv)
        merged = OmegaConf.merge(cfg, OmegaConf.create(patch))
        assert isinstance(merged, DictConfig)
        return merged

    check(outcome(build, argv), [])


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("stop_timeout=nan", "stop_timeout=nan: expected seconds >= 0 (a finite number"),
        ("restart.backoff.initial=nan", "restart.backoff.initial=nan: expected seconds >= 0"),
        ("resources.interval=inf", "resources.interval=inf: expected seconds >= 0"),
        ("logs.prefix='{nope}'", "logs.prefix={nope}: unknown field {nope}"),
        ("logs.prefix='{rank:>20000000}'", "logs.prefix={rank:>20000000}: a width over 200"),
        ("+job.env={X:[1,2]}", "job.env.X=[1, 2]: expected a string"),
        ("logs.prefix=${local_rank}", "logs.prefix=${local_rank}: Interpolation key"),
        ("rdzv.id=team/exp1", "rdzv.id=team/exp1: expected 1 to 128 letters"),
    ],
)
def test_reproduced_values_are_one_line(
    compose_config: Callable[[list[str]], DictConfig], override: str, line: str
) -> None:
    argv = ["+job=hello", override]
    result = outcome(lambda: compose_config(argv), argv)
    assert isinstance(result, str) and result.startswith(line), result


def test_every_key_is_fuzzed() -> None:
    """The key lists follow the schema (a new key is fuzzed without a test change)."""
    assert {"stop_timeout", "restart.backoff.initial", "logs.prefix", "job.env"} <= set(CORE_KEYS)
    assert "rdzv.request_timeout" in OPTIONS["rdzv"]["etcd"]
    assert "rdzv.token" in OPTIONS["rdzv"]["tcp"]
    assert set(string.ascii_lowercase) & {k[0] for k in CORE_KEYS}
