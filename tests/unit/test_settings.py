"""Settings from flags, environment and a TOML file: per-model lists, validation, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedserve.errors import ConfigError
from embedserve.kinds import ModelKind
from embedserve.settings import DEFAULT_DENSE_MODEL, DEFAULT_SPARSE_MODEL, ModelSettings, Settings, load_settings


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "embedserve.toml"
    path.write_text(text)
    return path


def test_no_flags_env_or_file_gives_the_defaults() -> None:
    settings = load_settings([], {})
    assert settings == Settings()
    assert settings.models == (
        ModelSettings(DEFAULT_DENSE_MODEL, batch_size=32, backend="onnx", dtype="auto"),
        ModelSettings(DEFAULT_SPARSE_MODEL, batch_size=32, backend="onnx", dtype="auto"),
    )
    assert settings.port == 50051
    assert settings.queue_size == 16384
    assert settings.max_inputs_per_request == 2048
    assert settings.address == f"{settings.host}:50051"


def test_model_names_is_a_semicolon_separated_list_and_blanks_are_ignored() -> None:
    settings = load_settings([], {"MODEL_NAMES": " a/one ; b/two;; "})
    assert [m.name for m in settings.models] == ["a/one", "b/two"]
    assert all(m.batch_size == 32 and m.backend == "onnx" and m.dtype == "auto" for m in settings.models)


def test_per_model_values_line_up_with_model_names() -> None:
    settings = load_settings(
        [],
        {
            "MODEL_NAMES": "a;b;c",
            "BATCH_SIZES": "8;16;32",
            "BACKEND": "onnx;torch;ONNX",
            "DTYPES": "fp32;fp16;int8",
            "MODEL_KINDS": "dense;sparse;rerank",
        },
    )
    assert settings.models == (
        ModelSettings("a", batch_size=8, backend="onnx", dtype="fp32", kind=ModelKind.DENSE),
        ModelSettings("b", batch_size=16, backend="torch", dtype="fp16", kind=ModelKind.SPARSE),
        ModelSettings("c", batch_size=32, backend="onnx", dtype="int8", kind=ModelKind.RERANK),
    )


def test_a_single_per_model_value_applies_to_every_model() -> None:
    settings = load_settings([], {"MODEL_NAMES": "a;b", "BATCH_SIZES": "64", "BACKEND": "torch", "DTYPES": "fp16"})
    assert [(m.batch_size, m.backend, m.dtype) for m in settings.models] == [(64, "torch", "fp16")] * 2


@pytest.mark.parametrize("variable", ["BATCH_SIZES", "BACKEND", "DTYPES", "MODEL_KINDS"])
def test_a_per_model_list_of_the_wrong_length_says_how_to_fix_it(variable: str) -> None:
    values = {"BATCH_SIZES": "8;16;32", "BACKEND": "onnx;torch;onnx", "DTYPES": "fp32;fp16;int8"}
    values["MODEL_KINDS"] = "dense;dense;dense"
    with pytest.raises(ConfigError) as caught:
        load_settings([], {"MODEL_NAMES": "a;b", variable: values[variable]})
    message = str(caught.value)
    assert f"{variable} has 3 values but 2 models are configured" in message
    assert "MODEL_NAMES order" in message and "single value" in message


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"BATCH_SIZES": "lots"}, "BATCH_SIZES must be a whole number"),
        ({"BATCH_SIZES": "0"}, "BATCH_SIZES must be at least 1"),
        ({"BACKEND": "tensorrt"}, "BACKEND must be one of onnx, torch"),
        ({"DTYPES": "bf8"}, "DTYPES must be one of auto, fp32, fp16, int8"),
        ({"MODEL_KINDS": "colbert"}, "MODEL_KINDS must be one of"),
        ({"QUEUE_SIZE": "-5"}, "QUEUE_SIZE must be at least 1"),
        ({"MAX_BATCH_TOKENS": "1.5"}, "MAX_BATCH_TOKENS must be a whole number"),
        ({"EMBEDSERVE_PORT": "-1"}, "EMBEDSERVE_PORT must be 0 or more"),
        ({"EMBEDSERVE_PORT": "http"}, "EMBEDSERVE_PORT must be a whole number"),
        ({"INTRA_OP_THREADS": "-2"}, "INTRA_OP_THREADS must be 0 or more"),
        ({"GRACE_PERIOD": "soon"}, "GRACE_PERIOD must be a number of seconds"),
        ({"MODEL_NAMES": "a;b;a"}, "MODEL_NAMES lists a model twice"),
        ({"METRICS_PORT": "65536"}, "METRICS_PORT must be a port from 0 to 65535, or off"),
        ({"METRICS_PORT": "no"}, "METRICS_PORT must be a whole number"),
    ],
)
def test_bad_values_are_config_errors_that_name_the_setting(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings([], environ)


def test_an_unknown_log_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        load_settings([], {"LOG_LEVEL": "LOUD"})


def test_the_metrics_port_is_9000_by_default_any_port_or_off() -> None:
    assert load_settings([], {}).metrics_port == 9000
    assert load_settings([], {"METRICS_PORT": "0"}).metrics_port == 0
    assert load_settings(["--metrics-port", "9100"], {"METRICS_PORT": "OFF"}).metrics_port == 9100
    assert load_settings([], {"METRICS_PORT": " Off "}).metrics_port is None


def test_zero_is_allowed_where_it_means_pick_for_me() -> None:
    settings = load_settings([], {"EMBEDSERVE_PORT": "0", "INTRA_OP_THREADS": "0"})
    assert settings.port == 0
    assert settings.intra_op_threads == 0


def test_scalar_settings_are_parsed_from_text() -> None:
    settings = load_settings(
        [],
        {
            "EMBEDSERVE_HOST": " 127.0.0.1 ",
            "QUEUE_SIZE": "5000",
            "MAX_CONCURRENCY": "7",
            "MAX_INPUTS_PER_REQUEST": "100",
            "MAX_BATCH_TOKENS": "4096",
            "STREAM_WINDOW": "3",
            "INTRA_OP_THREADS": "4",
            "EMBEDSERVE_CACHE_DIR": "/tmp/exports",
            "GRACE_PERIOD": "2.5",
            "MAX_MESSAGE_BYTES": "1024",
            "LOG_LEVEL": "debug",
        },
    )
    assert settings.host == "127.0.0.1"
    assert (settings.queue_size, settings.max_concurrency, settings.max_inputs_per_request) == (5000, 7, 100)
    assert (settings.max_batch_tokens, settings.stream_window, settings.intra_op_threads) == (4096, 3, 4)
    assert settings.cache_dir == Path("/tmp/exports")
    assert settings.grace_period == 2.5
    assert settings.max_message_bytes == 1024
    assert settings.log_level == "DEBUG"


def test_cache_dir_expands_the_home_directory() -> None:
    assert load_settings([], {"EMBEDSERVE_CACHE_DIR": "~/x"}).cache_dir == Path("~/x").expanduser()


def test_flags_beat_environment_which_beats_the_config_file(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        'model_names = ["file/a", "file/b"]\nqueue_size = 9000\nmax_batch_tokens = 1000\nstream_window = 5\n',
    )
    settings = load_settings(
        ["--config", str(config), "--queue-size", "7000"],
        {"QUEUE_SIZE": "8000", "MAX_BATCH_TOKENS": "2000"},
    )
    assert settings.queue_size == 7000  # flag over env and file
    assert settings.max_batch_tokens == 2000  # env over file
    assert settings.stream_window == 5  # file over default
    assert [m.name for m in settings.models] == ["file/a", "file/b"]


def test_model_flags_beat_model_environment() -> None:
    settings = load_settings(
        ["--model-names", "flag/a;flag/b", "--batch-sizes", "4;5", "--backend", "torch", "--dtypes", "fp16"],
        {"MODEL_NAMES": "env/a", "BATCH_SIZES": "99", "BACKEND": "onnx", "DTYPES": "fp32"},
    )
    assert settings.models == (
        ModelSettings("flag/a", batch_size=4, backend="torch", dtype="fp16"),
        ModelSettings("flag/b", batch_size=5, backend="torch", dtype="fp16"),
    )


def test_an_empty_environment_variable_falls_through_to_the_config_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "queue_size = 9000\n")
    settings = load_settings(["--config", str(config)], {"QUEUE_SIZE": "  "})
    assert settings.queue_size == 9000


def test_the_config_file_can_come_from_the_environment_and_lists_are_per_model(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        'model_names = "x;y"\nbatch_sizes = [8, 16]\nbackend = ["torch", "onnx"]\ndtypes = "fp16"\n'
        'host = "::1"\nport = 0\ngrace_period = 1.5\n',
    )
    settings = load_settings([], {"EMBEDSERVE_CONFIG": str(config)})
    assert settings.models == (
        ModelSettings("x", batch_size=8, backend="torch", dtype="fp16"),
        ModelSettings("y", batch_size=16, backend="onnx", dtype="fp16"),
    )
    assert (settings.host, settings.port, settings.grace_period) == ("::1", 0, 1.5)


def test_the_config_flag_beats_the_config_environment_variable(tmp_path: Path) -> None:
    from_flag = write_config(tmp_path, "stream_window = 2\n")
    from_env = tmp_path / "other.toml"
    from_env.write_text("stream_window = 3\n")
    settings = load_settings(["--config", str(from_flag)], {"EMBEDSERVE_CONFIG": str(from_env)})
    assert settings.stream_window == 2


def test_unknown_config_file_keys_are_rejected_by_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, "queue-size = 10\nqueue_size = 100\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match=r"unknown keys in .*: batchsize, queue-size"):
        load_settings(["--config", str(config)], {})


@pytest.mark.parametrize("text", [None, "queue_size = = 3\n"], ids=["missing", "malformed"])
def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "embedserve.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(["--config", str(path)], {})


def test_a_queue_smaller_than_one_request_is_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {"QUEUE_SIZE": "100", "MAX_INPUTS_PER_REQUEST": "101"})
    assert "QUEUE_SIZE (100) is below MAX_INPUTS_PER_REQUEST (101)" in str(caught.value)
    assert "raise QUEUE_SIZE or lower MAX_INPUTS_PER_REQUEST" in str(caught.value)
    assert load_settings([], {"QUEUE_SIZE": "100", "MAX_INPUTS_PER_REQUEST": "100"}).queue_size == 100


def test_the_default_queue_must_still_fit_a_raised_request_limit() -> None:
    with pytest.raises(ConfigError, match="QUEUE_SIZE"):
        load_settings(["--max-inputs-per-request", "20000"], {})


def test_settings_are_frozen() -> None:
    settings = load_settings([], {})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_no_api_keys_by_default_means_no_authentication() -> None:
    assert load_settings([], {}).api_keys == ()


def test_api_keys_are_a_semicolon_separated_list_and_empty_keys_are_ignored() -> None:
    settings = load_settings([], {"API_KEYS": " secret-1 ;; secret-2; "})
    assert settings.api_keys == ("secret-1", "secret-2")


def test_api_keys_come_from_the_flag_over_the_environment_over_the_config_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'api_keys = ["file-1", "file-2"]\n')
    assert load_settings(["--config", str(config)], {}).api_keys == ("file-1", "file-2")
    assert load_settings(["--config", str(config)], {"API_KEYS": "env-1"}).api_keys == ("env-1",)
    from_flag = load_settings(["--config", str(config), "--api-keys", "flag-1;flag-2"], {"API_KEYS": "env-1"})
    assert from_flag.api_keys == ("flag-1", "flag-2")


def test_an_empty_api_keys_list_in_the_config_file_means_no_authentication(tmp_path: Path) -> None:
    config = write_config(tmp_path, "api_keys = []\n")
    assert load_settings(["--config", str(config)], {}).api_keys == ()


def test_api_keys_of_only_separators_is_a_config_error_rather_than_silently_no_authentication() -> None:
    with pytest.raises(ConfigError, match="API_KEYS lists no keys"):
        load_settings([], {"API_KEYS": " ; ;"})


def test_api_keys_never_appear_in_the_settings_repr() -> None:
    settings = load_settings([], {"API_KEYS": "very-secret"})
    assert "very-secret" not in repr(settings)


def test_the_server_listens_on_loopback_by_default() -> None:
    assert Settings().host == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "keyed", "warns"),
    [
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
        ("localhost", False, False),
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.1.2.3", False, True),
        ("embedserve.internal", False, True),
        ("0.0.0.0", True, False),
    ],
)
def test_listening_beyond_loopback_with_no_api_key_warns_and_says_what_to_set(
    host: str, keyed: bool, warns: bool
) -> None:
    from embedserve.app import exposure_warning

    warning = exposure_warning(host, keyed)
    assert (warning is not None) is warns
    if warning:
        assert f"listening on {host}" in warning and "API_KEYS" in warning and "EMBEDSERVE_HOST=127.0.0.1" in warning
