"""A model's identity is its content, and a job pinned to one refuses any other (no Ray)."""

from __future__ import annotations

import json

import pytest

from visualprm_ray.model import source
from visualprm_ray.model.source import ModelIdentity, ModelIdentityError, model_identity, resolve_model_source
from visualprm_ray.model.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny checkpoints that differ only in their weights' values (same shapes, same files)."""
    import shutil

    root = tmp_path_factory.mktemp("models")
    a = write_tiny_checkpoint(root / "a", seed=0)
    other = write_tiny_checkpoint(root / "other", seed=1)
    b = shutil.copytree(a, root / "b")
    shutil.copy(other / "model.safetensors", b / "model.safetensors")
    return a, b


def test_weights_that_differ_only_in_value_are_different_models(two_models, tmp_path):
    a, b = two_models
    ia, ib = (model_identity(m, cache_dir=tmp_path) for m in (a, b))
    assert [n for n in ia.files if ia.files[n] != ib.files[n]] == ["model.safetensors"]
    assert {n: f["size"] for n, f in ia.files.items()} == {n: f["size"] for n, f in ib.files.items()}
    assert ia.digest != ib.digest and ia.kind == "content"
    # The same content under another name is the same model.
    again = write_tiny_checkpoint(tmp_path / "a-again", seed=0)
    assert model_identity(again, cache_dir=tmp_path).digest == ia.digest


def test_digests_are_kept_per_file_version_and_a_rewritten_file_is_hashed_again(
    two_models, tmp_path, monkeypatch
):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(two_models[0], model)
    first = model_identity(model, cache_dir=tmp_path / "cache")
    hashed = []
    real = source._file_sha256
    monkeypatch.setattr(source, "_file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert model_identity(model, cache_dir=tmp_path / "cache").digest == first.digest
    assert hashed == []  # nothing read again: the node's cache knew every file version
    weights = model / "model.safetensors"
    shutil.copy(two_models[1] / "model.safetensors", weights)  # retrained in place
    changed = model_identity(model, cache_dir=tmp_path / "cache")
    assert hashed == [weights.name] and changed.digest != first.digest


def test_a_directory_that_is_not_the_pinned_model_is_refused(two_models, tmp_path):
    import shutil

    a, b = two_models
    pinned = model_identity(a, cache_dir=tmp_path)
    assert resolve_model_source(a, cache_dir=str(tmp_path), pinned=pinned) == a
    model = tmp_path / "m"
    shutil.copytree(b, model)
    with pytest.raises(ModelIdentityError, match=r"refusing to load .*changed model\.safetensors"):
        resolve_model_source(model, cache_dir=str(tmp_path), pinned=pinned)


def test_identity_round_trips_through_plain_data(two_models, tmp_path):
    identity = model_identity(two_models[0], cache_dir=tmp_path)
    assert ModelIdentity.from_dict(identity.to_dict()) == identity
    assert identity.to_dict()["digest"] == identity.digest


def _upload(local, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_an_object_store_prefix_changed_mid_run_is_refused_by_every_actor(
    s3_env, two_models, tmp_path, monkeypatch
):
    """The driver pins the listing; a retrained checkpoint uploaded to the same prefix afterwards
    is never fetched, by the scorers or the preparers (no Ray needed: the stages are plain classes)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    a, b = two_models
    _upload(a, s3_env, "models/prm")
    uri = f"s3://{s3_env}/models/prm"
    pinned = model_identity(uri)
    assert pinned.kind == "object_store" and all(f["etag"] for f in pinned.files.values())
    cache = tmp_path / "cache"
    assert resolve_model_source(uri, cache_dir=str(cache), pinned=pinned).is_dir()
    _upload(b, s3_env, "models/prm")  # the prefix changes under the running job
    assert model_identity(uri).digest != pinned.digest
    for where in (cache, tmp_path / "fresh-node"):  # a node with the old copy cached, and a new one
        with pytest.raises(ModelIdentityError, match=r"changed model\.safetensors"):
            resolve_model_source(uri, cache_dir=str(where), pinned=pinned)

    from visualprm_ray.job.config import JobConfig
    from visualprm_ray.job.stages.prepare import PrepareStage
    from visualprm_ray.job.stages.score import ScoreStage

    config = JobConfig.from_sources(
        None, [f"model.cache_dir={cache}"], input_uri="/in", output_uri="/out", model_source=uri
    )
    with pytest.raises(ModelIdentityError):
        ScoreStage(config, uri, "cpu", model_identity=pinned.to_dict())
    # A preparer fetches and checks the config and tokenizer files alone (never the weights): new
    # weights leave what it uses as pinned, a changed config is refused.
    PrepareStage(config, uri, model_identity=pinned.to_dict())
    import boto3

    changed = json.loads((b / "config.json").read_text()) | {"retrained": True}
    boto3.client("s3").put_object(
        Bucket=s3_env, Key="models/prm/config.json", Body=json.dumps(changed).encode()
    )
    with pytest.raises(ModelIdentityError, match=r"config\.json"):
        PrepareStage(config, uri, model_identity=pinned.to_dict())


def test_a_hub_id_is_pinned_to_its_commit(monkeypatch, tmp_path):
    """No hub is reachable here: the two hub calls are stood in for, and what they are asked is checked."""
    import types

    import huggingface_hub

    calls = {}

    class FakeApi:
        def model_info(self, repo_id):
            calls["info"] = repo_id
            sibling = types.SimpleNamespace(rfilename="model.safetensors", size=10)
            return types.SimpleNamespace(sha="abc123", siblings=[sibling])

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls["download"] = (repo_id, revision, allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    identity = model_identity("OpenGVLab/VisualPRM-8B")
    assert identity.kind == "hub" and identity.revision == "abc123"
    assert resolve_model_source("OpenGVLab/VisualPRM-8B", pinned=identity) == tmp_path
    assert calls["download"][:2] == ("OpenGVLab/VisualPRM-8B", "abc123")
    assert "*.py" not in calls["download"][2]  # checkpoint code is never fetched
