"""The job as a user runs it, over S3 with credentials, and a checkpoint that ships code.

- no checkpoint code runs: the checkpoint's ``auto_map`` modules are replaced by modules that
  would leave a marker file if anything imported them, in the actors as in the driver;
- the credentials appear nowhere: not in the job's output streams, the manifest, the job
  record, the output files, nor any log file Ray wrote for the job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from visualprm_ray.sample_data import make_groups, write_shards
from visualprm_ray.storage import pyarrow_filesystem

pytestmark = pytest.mark.slow

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYsecret0123"
KEY_ID = "AKIAVISUALPRMTESTKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLEsessiontoken0123456789"

_MARKER = """\
from pathlib import Path

Path(__file__).with_name(Path(__file__).stem + ".imported").write_text("imported")
raise ImportError("checkpoint code must never be imported")
"""


def _model_with_code(tiny_model: Path, target: Path) -> Path:
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "config.json").read_text())
    for ref in config["auto_map"].values():
        (target / f"{ref.split('.')[0]}.py").write_text(_MARKER)
    return target


def test_no_checkpoint_code_and_no_credentials_anywhere(s3_env, s3_server, tiny_model, tmp_path, monkeypatch):
    bucket = s3_env
    # moto accepts any credentials; these are distinctive so that any leak is found by search.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    write_shards(tmp_path / "in", make_groups(4, candidates=2, seed=3), 1)
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/rollouts/", recursive=True)
    local_model = _model_with_code(tiny_model, tmp_path / "model-with-code")

    temp_root = tempfile.mkdtemp(prefix="vps", dir="/tmp")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=temp_root)
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "visualprm_ray",
            "score",
            "--input",
            f"s3://{bucket}/rollouts/",
            "--output",
            f"s3://{bucket}/scores/",
            "--model",
            str(local_model),
            "--set",
            "model.dtype=float32",
            "--set",
            "runtime.cpus_per_preparer=0.5",
            "--set",
            f"storage.endpoint_url={s3_server.endpoint_url}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(local_model.glob("*.imported")), "checkpoint code was imported"

    texts = {"stdout": result.stdout, "stderr": result.stderr}
    fs.invalidate_cache()
    for key in fs.find(f"{bucket}/scores/"):
        texts[key] = fs.cat_file(key).decode("latin-1")
    logs = [p for p in Path(temp_root).rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert logs, "Ray wrote no logs where they were expected"
    for path in logs:
        texts[str(path)] = path.read_bytes().decode("latin-1")
    for name, text in texts.items():
        for secret in (SECRET, TOKEN, KEY_ID):
            assert secret not in text, f"{secret[:6]}... found in {name}"
    shutil.rmtree(temp_root, ignore_errors=True)

    out_fs, out_path = pyarrow_filesystem(f"s3://{bucket}/scores/")
    table = pq.read_table(out_path, filesystem=out_fs)
    assert len(table) == 8 and table["error"].null_count == 8
