"""KernelOptions: the scorer's fast paths as settings, and the job's config section that mirrors them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from visualprm_ray.job.config import KernelsConfig
from visualprm_ray.model.scoring import options as options_module
from visualprm_ray.model.scoring.options import KernelOptions


def test_defaults_are_every_fast_path_off_and_parse_round_trips():
    assert KernelOptions().label() == ""
    options = KernelOptions.parse("attention=varlen, merge=compiled,rotary=static")
    assert options == KernelOptions(attention="varlen", merge="compiled", rotary="static")
    assert KernelOptions.parse(options.label()) == options and options.needs_shared_prefix
    assert not KernelOptions(leaf_ops="compiled", host_syncs="avoid").needs_shared_prefix


def test_an_unknown_choice_or_name_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        KernelOptions(attention="flash")
    with pytest.raises(TypeError):
        KernelOptions.parse("atention=varlen")


def test_the_job_config_section_mirrors_the_options():
    """Same names, same choices, same defaults: the score stage builds one from the other."""
    options = {f.name: f.default for f in dataclasses.fields(KernelOptions)}
    config = KernelsConfig()
    assert config.model_dump() == options
    for name, field in KernelsConfig.model_fields.items():
        assert field.description
        choices = field.annotation.__args__
        assert choices == typing.get_args(options_module._CHOICES[name])
        for choice in choices:
            assert getattr(KernelOptions(**{name: choice}), name) == choice
        with pytest.raises(ValueError):
            KernelOptions(**{name: "nonsense"})
