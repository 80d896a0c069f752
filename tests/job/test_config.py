"""The job configuration: defaults, strictness, descriptions, overrides and round trips."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml
from pydantic import BaseModel

from visualprm_ray.job.config import (
    ConfigError,
    ImagesConfig,
    InputConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RuntimeConfig,
    ScoringConfig,
    describe_fields,
)

MINIMAL = """
input:
  uri: s3://bucket/rollouts/
model:
  source: /models/VisualPRM-8B
output:
  uri: /tmp/scores
"""


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def minimal(tmp_path):
    return write(tmp_path, MINIMAL)


def test_minimal_config_and_defaults(minimal):
    cfg = JobConfig.from_yaml(minimal)
    assert cfg.input.uri == "s3://bucket/rollouts/"
    assert cfg.model.source == "/models/VisualPRM-8B"
    assert cfg.output.uri == "/tmp/scores"

    assert cfg.input.layout == "auto"
    assert (cfg.input.id_column, cfg.input.question_column, cfg.input.image_column) == (
        "id",
        "question",
        "image",
    )
    assert (cfg.input.responses_column, cfg.input.response_column, cfg.input.steps_column) == (
        "responses",
        "response",
        "steps",
    )
    assert cfg.input.passthrough == "all"
    assert cfg.input.keep_image_bytes is False
    assert cfg.input.num_blocks is None

    assert cfg.images == ImagesConfig(root=None, max_tiles=None, max_pixels=64_000_000, max_bytes=50_000_000)

    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.model.cache_dir is None
    assert cfg.model.system_message is None
    assert cfg.model.tokenizer == "auto"

    assert cfg.scoring == ScoringConfig(
        max_steps=12,
        token_budget=16384,
        vision_batch=16,
        context_policy="error",
        max_context=None,
        threshold=0.5,
    )

    assert cfg.output.mode == "resume"
    assert cfg.output.include_response is True
    assert cfg.output.compression == "zstd"
    assert cfg.output.min_rows_per_file is None and cfg.output.target_file_bytes == 64 << 20

    rt = cfg.runtime
    assert rt.ray_address is None and rt.device == "auto"
    assert rt.num_scorers is None and rt.num_preparers is None
    assert (rt.gpus_per_scorer, rt.cpus_per_scorer, rt.cpus_per_preparer) == (1.0, 1.0, 1.0)
    assert rt.groups_per_batch == 8
    assert rt.on_error == "record"
    assert rt.progress_interval_s == 30.0
    assert rt.max_actor_start_failures == 10

    # Defaults are fresh instances, not shared between configs.
    other = JobConfig.from_yaml(minimal)
    assert other.images is not cfg.images and other.storage is not cfg.storage


def test_empty_section_means_defaults(tmp_path):
    cfg = JobConfig.from_yaml(write(tmp_path, MINIMAL + "images:\nscoring:\n"))
    assert cfg.images == ImagesConfig()
    assert cfg.scoring == ScoringConfig()


def test_missing_required_fields_are_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_yaml(write(tmp_path, "input:\n  layout: flat\n"))
    message = str(info.value)
    assert "input.uri: required" in message
    assert "model: required" in message
    assert "output: required" in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        JobConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        JobConfig.from_yaml(write(tmp_path, "input: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        JobConfig.from_yaml(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "extra, bad_key",
    [
        ("bogus: 1\n", "bogus"),
        ("images:\n  max_tile: 4\n", "images.max_tile"),
        ("scoring:\n  token_budgets: 4096\n", "scoring.token_budgets"),
        ("runtime:\n  gpu: 1\n", "runtime.gpu"),
        ("storage:\n  endpoint: http://x\n", "storage.endpoint"),
    ],
)
def test_extra_keys_rejected_at_every_level(tmp_path, extra, bad_key):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_yaml(write(tmp_path, MINIMAL + extra))
    assert f"{bad_key}: unknown key" in str(info.value)


def test_extra_key_inside_required_section(tmp_path):
    text = MINIMAL.replace("  uri: /tmp/scores", "  uri: /tmp/scores\n  compresion: gzip")
    with pytest.raises(ConfigError) as info:
        JobConfig.from_yaml(write(tmp_path, text))
    assert "output.compresion: unknown key" in str(info.value)
    assert "compression" in str(info.value)  # the valid keys are listed


def _walk_fields(model_cls: type[BaseModel], prefix: str = ""):
    for name, field in model_cls.model_fields.items():
        yield f"{prefix}{name}", field
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk_fields(annotation, f"{prefix}{name}.")


def test_every_field_has_a_description():
    names = []
    for name, field in _walk_fields(JobConfig):
        names.append(name)
        assert field.description and len(field.description.strip()) >= 10, f"{name} has no real description"
    # The walk really reaches every section, the storage one included.
    for section in ("input", "images", "model", "scoring", "output", "runtime", "storage"):
        assert any(n.startswith(section + ".") for n in names), section


def test_every_model_forbids_extra():
    for model_cls in (
        JobConfig,
        InputConfig,
        ImagesConfig,
        ModelConfig,
        ScoringConfig,
        OutputConfig,
        RuntimeConfig,
        JobConfig.model_fields["storage"].annotation,
    ):
        assert model_cls.model_config.get("extra") == "forbid", model_cls.__name__


def test_describe_fields_covers_everything():
    rows = describe_fields(JobConfig)
    by_name = {row[0]: row for row in rows}
    leaf_names = [
        name
        for name, field in _walk_fields(JobConfig)
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    ]
    assert sorted(by_name) == sorted(leaf_names)
    assert by_name["input.uri"][1:3] == ("str", "required")
    assert by_name["scoring.max_steps"][1:3] == ("int | None", "12")
    assert by_name["runtime.device"][1:3] == ("'auto' | 'cuda' | 'cpu'", "auto")
    assert by_name["input.keep_image_bytes"][2] == "false"
    assert by_name["model.cache_dir"][2] == "null"
    assert "list[str]" in by_name["input.passthrough"][1]
    assert all(row[3] for row in rows)


# ------------------------------------------------------------------------------------------- overrides


def test_set_overrides_are_nested_and_typed(minimal):
    cfg = JobConfig.from_sources(
        minimal,
        [
            "scoring.max_steps=8",
            "scoring.threshold=0.75",
            "output.include_response=false",
            "input.keep_image_bytes=true",
            "scoring.max_steps=null",  # a later --set of the same key wins
            "input.passthrough=[a, b]",
            "runtime.num_scorers=4",
            "images.max_tiles=6",
        ],
    )
    assert cfg.scoring.max_steps is None
    assert cfg.scoring.threshold == 0.75
    assert cfg.output.include_response is False
    assert cfg.input.keep_image_bytes is True
    assert cfg.input.passthrough == ["a", "b"]
    assert cfg.runtime.num_scorers == 4
    assert cfg.images.max_tiles == 6
    # Untouched values survive from the file.
    assert cfg.input.uri == "s3://bucket/rollouts/"


def test_set_on_text_fields_keeps_the_raw_string(minimal):
    cfg = JobConfig.from_sources(
        minimal,
        [
            "model.system_message=Note: be strict, yes",
            "input.id_column=2024",
            "model.cache_dir=null",
            "runtime.ray_address='null'",
            "input.passthrough=none",
        ],
    )
    assert cfg.model.system_message == "Note: be strict, yes"
    assert cfg.input.id_column == "2024"
    assert cfg.model.cache_dir is None
    assert cfg.runtime.ray_address == "null"
    assert cfg.input.passthrough == "none"


def test_precedence_yaml_then_flags_then_set(minimal):
    cfg = JobConfig.from_sources(minimal, [], input_uri="/data/in", model_source=None)
    assert cfg.input.uri == "/data/in"  # flag beats YAML
    assert cfg.model.source == "/models/VisualPRM-8B"  # a None flag was not given

    cfg = JobConfig.from_sources(minimal, ["input.uri=/data/set"], input_uri="/data/in")
    assert cfg.input.uri == "/data/set"  # --set beats the flag

    cfg = JobConfig.from_sources(
        None,
        ["runtime.device=cpu"],
        input_uri="/in",
        output_uri="/out",
        model_source="org/model",
        runtime_ray_address="ray://head:10001",
    )
    assert (cfg.input.uri, cfg.output.uri, cfg.model.source) == ("/in", "/out", "org/model")
    assert cfg.runtime.ray_address == "ray://head:10001"
    assert cfg.runtime.device == "cpu"


def test_flags_alone_without_file_must_still_be_complete():
    with pytest.raises(ConfigError, match=r"output: required"):
        JobConfig.from_sources(None, [], input_uri="/in", model_source="m")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("scoring.max_step=3", r"unknown key 'scoring\.max_step'.*valid keys at scoring: max_steps"),
        ("bogus.x=1", r"unknown key 'bogus'.*valid keys at top level: input, images"),
        ("input.uri.x=1", r"'input\.uri' is a value, not a section"),
        ("scoring=3", None),  # a section replaced by a scalar: caught by validation
        ("scoring.max_steps", r"expected KEY=VALUE"),
        ("=3", r"expected KEY=VALUE"),
        ("scoring..max_steps=3", r"malformed key"),
        ("scoring.max_steps=[1", r"not valid YAML"),
    ],
)
def test_bad_override_paths_give_clear_errors(minimal, override, expected):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_sources(minimal, [override])
    if expected is not None:
        assert f"--set {override}" in str(info.value)
        assert re.search(expected, str(info.value)), str(info.value)
    else:
        assert "scoring:" in str(info.value)


def test_unknown_flag_is_rejected(minimal):
    with pytest.raises(ConfigError, match="unknown flag 'inputs_uri'"):
        JobConfig.from_sources(minimal, [], inputs_uri="/x")
    with pytest.raises(ConfigError, match=r"unknown key 'input\.url'"):
        JobConfig.from_sources(minimal, [], input_url="/x")


# -------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, field",
    [
        ("runtime.device=tpu", "runtime.device"),
        ("input.layout=wide", "input.layout"),
        ("model.dtype=float8", "model.dtype"),
        ("output.mode=append", "output.mode"),
        ("output.compression=lz4", "output.compression"),
        ("scoring.context_policy=drop", "scoring.context_policy"),
        ("input.passthrough=some", "input.passthrough"),
    ],
)
def test_invalid_literal_choices_rejected(minimal, override, field):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_sources(minimal, [override])
    message = str(info.value)
    assert f"{field}:" in message
    assert override.split("=")[1] in message  # the offending value is shown


@pytest.mark.parametrize(
    "override, field",
    [
        ("scoring.token_budget=255", "scoring.token_budget"),
        ("scoring.threshold=1.5", "scoring.threshold"),
        ("scoring.threshold=-0.1", "scoring.threshold"),
        ("scoring.max_steps=0", "scoring.max_steps"),
        ("scoring.vision_batch=0", "scoring.vision_batch"),
        ("runtime.num_scorers=0", "runtime.num_scorers"),
        ("runtime.gpus_per_scorer=0", "runtime.gpus_per_scorer"),
        ("runtime.groups_per_batch=-1", "runtime.groups_per_batch"),
        ("runtime.progress_interval_s=0", "runtime.progress_interval_s"),
        ("runtime.max_actor_start_failures=-1", "runtime.max_actor_start_failures"),
        ("images.max_pixels=0", "images.max_pixels"),
        ("output.min_rows_per_file=0", "output.min_rows_per_file"),
        ("input.num_blocks=0", "input.num_blocks"),
    ],
)
def test_numeric_validators(minimal, override, field):
    with pytest.raises(ConfigError, match=rf"{field}: "):
        JobConfig.from_sources(minimal, [override])


def test_numeric_validators_accept_the_boundaries(minimal):
    cfg = JobConfig.from_sources(
        minimal,
        [
            "scoring.token_budget=256",
            "scoring.threshold=0",
            "scoring.max_steps=1",
            "runtime.gpus_per_scorer=0.25",
            "runtime.max_actor_start_failures=0",
        ],
    )
    assert cfg.scoring.token_budget == 256 and cfg.scoring.threshold == 0.0 and cfg.scoring.max_steps == 1
    assert cfg.runtime.gpus_per_scorer == 0.25 and cfg.runtime.max_actor_start_failures == 0
    assert JobConfig.from_sources(minimal, ["scoring.threshold=1"]).scoring.threshold == 1.0


def test_output_must_differ_from_input(minimal):
    with pytest.raises(ConfigError, match=r"output\.uri must differ from input\.uri"):
        JobConfig.from_sources(minimal, ["output.uri=s3://bucket/rollouts"])


# ---------------------------------------------------------------------------------------------- output


def test_yaml_round_trip(tmp_path, minimal):
    original = JobConfig.from_sources(
        minimal,
        [
            "input.passthrough=[qid, source]",
            "input.layout=flat",
            "model.system_message=Line one: 'quoted' \"double\" null",
            "scoring.max_steps=null",
            "scoring.threshold=0.3",
            "runtime.gpus_per_scorer=0.5",
            "output.compression=none",
            "images.root=gs://bucket/images",
        ],
    )
    text = original.to_yaml()
    again = JobConfig.from_yaml(write(tmp_path, text, "round.yaml"))
    assert again == original
    assert again.model.system_message == "Line one: 'quoted' \"double\" null"
    # The YAML is complete: every section and every default is spelled out.
    data = yaml.safe_load(text)
    assert list(data) == ["input", "images", "model", "scoring", "output", "runtime", "storage"]
    assert data["scoring"]["token_budget"] == 16384


def test_redacted_dict_is_plain_data(minimal):
    cfg = JobConfig.from_sources(minimal, ["input.passthrough=[a]"])
    data = cfg.redacted_dict()
    assert isinstance(data, dict)
    assert data["input"]["uri"] == "s3://bucket/rollouts/"
    assert data["input"]["passthrough"] == ["a"]
    assert data["scoring"]["max_steps"] == 12
    yaml.safe_dump(data)  # only plain types


def test_redacted_dict_runs_strings_through_redact(minimal, monkeypatch):
    import visualprm_ray.storage as storage

    seen = []

    def fake_redact(text):
        seen.append(text)
        return text.replace("secret", "***")

    monkeypatch.setattr(storage, "redact", fake_redact, raising=False)
    cfg = JobConfig.from_sources(minimal, ["model.source=s3://key:secret@bucket/model"])
    data = cfg.redacted_dict()
    assert data["model"]["source"] == "s3://key:***@bucket/model"
    assert "s3://bucket/rollouts/" in seen
    assert cfg.model.source == "s3://key:secret@bucket/model"  # the config itself is untouched
