"""Reading a model folder's own config: kind, pooling, normalization, length limit, prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedserve.backends.config import detect_kind, load_model_config
from embedserve.errors import ConfigError
from embedserve.kinds import ModelKind

BERT = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 384,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}
POOLING_MODULE = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE_MODULE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
TRANSFORMER_MODULE = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}


def write_model(
    folder: Path,
    config: dict[str, Any],
    modules: list[dict[str, Any]] | None = None,
    pooling: dict[str, Any] | None = None,
    sentence_bert: dict[str, Any] | None = None,
    sentence_transformers: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> Path:
    """Writes the files a Hugging Face / sentence-transformers model folder would hold."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {
        "config.json": config,
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": sentence_bert,
        "config_sentence_transformers.json": sentence_transformers,
        "tokenizer_config.json": tokenizer,
    }
    for name, content in files.items():
        if content is not None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(content))
    return folder


def mean_pooling(**overrides: bool) -> dict[str, Any]:
    modes = {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": False,
    }
    modes.update(overrides)
    return modes


def sentence_transformer(folder: Path, **kwargs: Any) -> Path:
    """A dense sentence-transformers model like all-MiniLM-L6-v2: Transformer, mean Pooling, Normalize."""
    values: dict[str, Any] = {
        "config": BERT,
        "modules": [TRANSFORMER_MODULE, POOLING_MODULE, NORMALIZE_MODULE],
        "pooling": mean_pooling(),
        "sentence_bert": {"max_seq_length": 256, "do_lower_case": False},
    }
    values.update(kwargs)
    return write_model(folder, **values)


def test_a_sentence_transformers_model_is_dense_with_mean_pooling_normalize_and_its_length(tmp_path: Path) -> None:
    config = load_model_config(sentence_transformer(tmp_path))
    assert config.kind == "dense"
    assert config.pooling == "mean"
    assert config.normalize is True
    assert config.max_input_tokens == 256
    assert (config.hidden_size, config.vocab_size) == (384, 30522)
    assert config.path == tmp_path
    assert config.prompts == {} and config.default_prompt_name is None


def test_cls_pooling_without_normalize_is_read_from_the_pooling_module(tmp_path: Path) -> None:
    folder = sentence_transformer(
        tmp_path,
        modules=[TRANSFORMER_MODULE, POOLING_MODULE],
        pooling=mean_pooling(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False),
    )
    config = load_model_config(folder)
    assert config.pooling == "cls"
    assert config.normalize is False


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "lasttoken"),
        ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, "max"),
        ({}, "mean"),
    ],
)
def test_every_pooling_mode_is_detected(tmp_path: Path, flags: dict[str, bool], expected: str) -> None:
    assert load_model_config(sentence_transformer(tmp_path, pooling=mean_pooling(**flags))).pooling == expected


def test_a_pooling_config_with_no_supported_mode_is_a_config_error(tmp_path: Path) -> None:
    folder = sentence_transformer(tmp_path, pooling=mean_pooling(pooling_mode_mean_tokens=False))
    with pytest.raises(ConfigError, match="unsupported pooling"):
        load_model_config(folder)


def test_max_seq_length_never_exceeds_the_position_embeddings(tmp_path: Path) -> None:
    folder = sentence_transformer(tmp_path, sentence_bert={"max_seq_length": 4096})
    assert load_model_config(folder).max_input_tokens == 512


def test_roberta_position_slots_reserved_for_padding_are_not_usable(tmp_path: Path) -> None:
    roberta = {**BERT, "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}
    folder = sentence_transformer(tmp_path, config={**roberta, "max_position_embeddings": 514}, sentence_bert=None)
    assert load_model_config(folder).max_input_tokens == 512


def test_without_sentence_transformers_files_the_tokenizer_limit_applies(tmp_path: Path) -> None:
    folder = write_model(tmp_path, BERT, tokenizer={"model_max_length": 128})
    assert load_model_config(folder).max_input_tokens == 128
    # The tokenizer's "unlimited" sentinel (a huge number) does not raise the limit.
    write_model(tmp_path, BERT, tokenizer={"model_max_length": 1000000000000000019884624838656})
    assert load_model_config(tmp_path).max_input_tokens == 512


def test_prompts_and_the_default_prompt_name_are_read(tmp_path: Path) -> None:
    prompts = {"query": "query: ", "passage": "passage: "}
    folder = sentence_transformer(
        tmp_path, sentence_transformers={"prompts": prompts, "default_prompt_name": "query", "similarity_fn_name": None}
    )
    config = load_model_config(folder)
    assert config.prompts == prompts
    assert config.default_prompt_name == "query"


def test_an_empty_default_prompt_name_means_none(tmp_path: Path) -> None:
    folder = sentence_transformer(tmp_path, sentence_transformers={"prompts": {}, "default_prompt_name": ""})
    config = load_model_config(folder)
    assert config.prompts == {} and config.default_prompt_name is None


def test_a_masked_lm_without_sentence_transformers_modules_is_sparse(tmp_path: Path) -> None:
    folder = write_model(tmp_path, {**BERT, "architectures": ["BertForMaskedLM"], "hidden_size": 768})
    config = load_model_config(folder)
    assert config.kind == "sparse"
    assert config.vocab_size == 30522


def test_a_sequence_classifier_is_rerank_with_cls_pooling_and_its_label_count(tmp_path: Path) -> None:
    classifier = {**BERT, "architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    config = load_model_config(write_model(tmp_path, classifier))
    assert config.kind == "rerank"
    assert config.pooling == "cls"
    assert config.num_labels == 1


def test_num_labels_comes_from_num_labels_or_id2label(tmp_path: Path) -> None:
    two = {**BERT, "architectures": ["BertForSequenceClassification"], "id2label": {"0": "no", "1": "yes"}}
    assert load_model_config(write_model(tmp_path / "a", two)).num_labels == 2
    three = {**BERT, "architectures": ["BertForSequenceClassification"], "num_labels": 3}
    assert load_model_config(write_model(tmp_path / "b", three)).num_labels == 3


def test_a_plain_encoder_without_modules_is_dense_with_mean_pooling(tmp_path: Path) -> None:
    config = load_model_config(write_model(tmp_path, BERT))
    assert (config.kind, config.pooling, config.normalize) == ("dense", "mean", False)


def test_an_explicit_kind_overrides_detection(tmp_path: Path) -> None:
    folder = write_model(tmp_path, {**BERT, "architectures": ["BertForMaskedLM"]})
    assert load_model_config(folder, kind=ModelKind.DENSE).kind == "dense"
    assert load_model_config(folder, kind=ModelKind.RERANK).kind == "rerank"
    assert load_model_config(sentence_transformer(tmp_path / "st"), kind=ModelKind.SPARSE).kind == "sparse"


def test_detect_kind_reads_the_architecture_of_plain_transformers_models() -> None:
    assert detect_kind(("BertModel",), has_st_modules=True) == "dense"
    assert detect_kind(("BertForMaskedLM",), has_st_modules=False) == "sparse"
    assert detect_kind(("XLMRobertaForSequenceClassification",), has_st_modules=False) == "rerank"
    assert detect_kind((), has_st_modules=False) == "dense"


def test_a_sentence_transformers_sparse_encoder_is_sparse(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path,
        {**BERT, "architectures": ["BertForMaskedLM"]},
        modules=[
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_SpladePooling",
                "type": "sentence_transformers.sparse_encoder.models.SpladePooling",
            },
        ],
        sentence_transformers={"model_type": "SparseEncoder", "prompts": {}, "default_prompt_name": None},
    )
    assert load_model_config(folder).kind == "sparse"


def test_a_sentence_transformers_cross_encoder_is_rerank(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path,
        {**BERT, "architectures": ["BertForSequenceClassification"]},
        modules=[
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}
        ],
        sentence_transformers={"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None},
    )
    assert load_model_config(folder).kind == "rerank"


def test_a_missing_config_json_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model_config(tmp_path)


def test_a_config_json_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_model_config(tmp_path)


def test_a_malformed_modules_json_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    write_model(tmp_path, BERT)
    (tmp_path / "modules.json").write_text("[{")
    with pytest.raises(ConfigError, match=r"modules\.json"):
        load_model_config(tmp_path)
