"""The project's tokenizer on the real InternLM2 files that VisualPRM-8B ships, against the ids the
real upstream ``InternLM2Tokenizer`` gives (``../shared/real-internlm2``, PROVENANCE.md there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from real_artifacts import TOKENIZER_FILES, real

from visualprm_ray.model.tokenizer import (
    PROMPT_TOKENS,
    TokenizerError,
    _load_sentencepiece,
    _nul_as_released,
    find_score_positions,
    load_tokenizer,
)

NUL_REFERENCE = Path(__file__).with_name("data") / "nul_sentencepiece_0_2_0.json"


def test_every_golden_string_encodes_to_the_upstream_ids(real_checkpoint, golden_ids):
    tokenizer = load_tokenizer(real_checkpoint)
    assert tokenizer.kind == "sentencepiece"
    assert len(golden_ids) == 31
    wrong = {
        g["name"]: tokenizer.encode(g["text"]) for g in golden_ids if tokenizer.encode(g["text"]) != g["ids"]
    }
    assert wrong == {}


def test_plus_minus_marker_and_specials_are_upstreams(real_checkpoint, reference_facts):
    tokenizer = load_tokenizer(real_checkpoint)
    assert tokenizer.plus_id == reference_facts["plus_id"] == 342
    assert tokenizer.minus_id == reference_facts["minus_id"]
    assert tokenizer.score_marker.tolist() == reference_facts["marker_ids"]
    assert (
        tokenizer.score_marker[: tokenizer.score_offset + 1].tolist() == reference_facts["assistant_role_ids"]
    )
    assert tokenizer.bos_id == reference_facts["added_tokens"]["<s>"]
    for content, tid in reference_facts["added_tokens"].items():
        assert tokenizer.token_to_id(content) == tid, content


def test_score_positions_of_the_four_conversations(real_checkpoint, golden_ids, reference_facts):
    tokenizer = load_tokenizer(real_checkpoint)
    texts = {g["name"]: g for g in golden_ids}
    positions = reference_facts["score_positions"]
    assert len(positions) == 4
    for name, expected in positions.items():
        ids = tokenizer.encode(texts[name]["text"])
        assert ids == texts[name]["ids"], name
        found = find_score_positions(np.asarray(ids), tokenizer, len(expected))
        assert found.tolist() == expected, name
        assert all(ids[p + 1] == tokenizer.plus_id for p in expected)


def test_nul_encodes_as_the_released_models_tokenizer_did():
    """sentencepiece >= 0.2.1 demotes piece 354 (a literal NUL); the ids stay those of 0.2.0."""
    sp = _load_sentencepiece(real("tokenizer.model"))
    encode = _nul_as_released(sp)
    cases = json.loads(NUL_REFERENCE.read_text())["cases"]
    assert len(cases) == 400 and all("\x00" in c["text"] for c in cases)
    wrong = [(c["text"], encode(c["text"]), c["ids"]) for c in cases if encode(c["text"]) != c["ids"]]
    assert wrong == []
    assert encode("before\x00after") == [14931, 354, 10840]


def test_loading_prints_no_sentencepiece_warning(real_checkpoint, capfd):
    capfd.readouterr()
    load_tokenizer(real_checkpoint)
    out, err = capfd.readouterr()
    assert "Piece at index" not in err + out and "null character" not in err + out


def _without(directory: Path, token: str) -> None:
    """Drop ``token`` from the checkpoint's added-token tables (a broken or foreign tokenizer config)."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    decoder = config.get("added_tokens_decoder", {})
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] != token}
    config.pop("additional_special_tokens", None)
    added_path = directory / "added_tokens.json"
    added = {k: v for k, v in json.loads(added_path.read_text()).items() if k != token}
    for path, data in ((config_path, config), (added_path, added)):
        path.unlink()
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("token", PROMPT_TOKENS)
def test_a_prompt_token_that_is_not_special_is_refused(tmp_path, token):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(real(name), directory / name)
    load_tokenizer(directory)  # as shipped: loads
    _without(directory, token)
    with pytest.raises(TokenizerError, match=f"does not make {token}"):
        load_tokenizer(directory)
