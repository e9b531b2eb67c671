"""TF Serving's config formats: models.config, batching parameters, SSL config, CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvlm.serving.config import (
    BatchingConfig,
    ModelConfig,
    load_model_config,
    load_ssl_config,
    parse_batching_parameters,
    parse_model_config,
)

REPO = Path(__file__).resolve().parents[2]

MODELS = """
model_config_list {
  config {
    name: 'kvlm'
    base_path: 'models/kvlm'
    model_platform: 'tensorflow'
    model_version_policy { specific { versions: 1 versions: 3 } }
    version_labels { key: 'stable' value: 1 }
    version_labels { key: 'canary' value: 3 }
  }
  config {
    name: 'other'
    base_path: '/abs/other'
    model_version_policy { latest { num_versions: 2 } }
  }
  config { name: 'every' base_path: '/abs/every' model_version_policy { all {} } }
}
"""


def test_models_config_is_parsed_with_policies_and_labels(tmp_path):
    kvlm, other, every = parse_model_config(MODELS, tmp_path)
    assert kvlm.name == "kvlm" and kvlm.base_path == (tmp_path / "models/kvlm").resolve()
    assert kvlm.policy == "specific" and kvlm.versions == (1, 3)
    assert kvlm.labels == {"stable": 1, "canary": 3}
    assert kvlm.select([1, 2, 3, 4]) == [1, 3]
    assert other.base_path == Path("/abs/other") and other.select([1, 5, 3]) == [3, 5]
    assert every.select([2, 1]) == [1, 2]


def test_shipped_serving_configs_parse():
    models = load_model_config(REPO / "serving" / "models.config")
    assert [m.name for m in models] == ["kvlm"]
    batching = parse_batching_parameters((REPO / "serving" / "batching.config").read_text())
    assert batching.max_batch_size >= 8 and batching.num_batch_threads >= 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_config_list { config { name: '../x' base_path: '/m' } }", "Invalid model name"),
        ("model_config_list { config { name: '/etc' base_path: '/m' } }", "Invalid model name"),
        ("model_config_list { config { name: 'a' } }", "needs `name` and `base_path`"),
        ("model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }", "unique"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'onnx' } }", "model_platform"),
        ("model_config_list { }", "lists no models"),
        ("model_config_list { config { nme: 'a' } }", "Invalid model config"),
        ("", "model_config_list"),
    ],
)
def test_bad_models_config_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_model_config(text)


def test_batching_parameters():
    config = parse_batching_parameters(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 500 }\n"
        "num_batch_threads { value: 3 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 16\n"
        "pad_variable_length_inputs: false\nthread_pool_name { value: 'x' }\n"
    )
    assert config == BatchingConfig(16, 500, 100, 3, (4, 16))
    assert parse_batching_parameters("") == BatchingConfig()
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        parse_batching_parameters("max_batch_size { value: 16 }\nallowed_batch_sizes: 8")
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        parse_batching_parameters("max_batch_size { value: 0 }")
    with pytest.raises(ValueError, match="Invalid batching parameters"):
        parse_batching_parameters("max_batch_size: 3")


def test_ssl_config(tmp_path):
    path = tmp_path / "ssl.config"
    path.write_text('server_key: "KEY"\nserver_cert: "CERT"\ncustom_ca: "CA"\nclient_verify: true\n')
    tls = load_ssl_config(path)
    assert (tls.server_key, tls.server_cert, tls.custom_ca, tls.client_verify) == (b"KEY", b"CERT", b"CA", True)
    path.write_text('server_key: "KEY"\n')
    with pytest.raises(ValueError, match="server_cert"):
        load_ssl_config(path)


def test_serve_flags(tmp_path, monkeypatch):
    from kvlm.cli import build_parser
    from kvlm.cli.serve import server_options

    parser = build_parser()
    args = parser.parse_args(["serve", "--model_name", "kvlm", "--model_base_path", str(tmp_path), "--enable_batching=true"])
    options = server_options(args)
    assert options.port == 8500 and options.host == "127.0.0.1"
    assert options.models == [ModelConfig("kvlm", tmp_path.resolve())]
    assert options.batching == BatchingConfig()
    monkeypatch.setenv("KVLM_AUTH_TOKEN", "secret")
    assert server_options(parser.parse_args(["serve", "--model_base_path", str(tmp_path)])).auth_token == "secret"
    for argv, message in [
        (["serve"], "exactly one"),
        (["serve", "--model_base_path", "x", "--model_config_file", "y"], "exactly one"),
        (["serve", "--model_base_path", "x", "--batching_parameters_file", "b"], "needs --enable_batching"),
        (["serve", "--model_base_path", "x", "--ssl_cert_file", "c"], "--ssl_key_file"),
        (["serve", "--model_name", "../up", "--model_base_path", "x"], "Invalid model name"),
        (["serve", "--model_base_path", "x", "--port", "70000"], "--port"),
    ]:
        with pytest.raises(ValueError, match=message):
            server_options(parser.parse_args(argv))
    with pytest.raises(FileNotFoundError, match="Model config file"):
        server_options(parser.parse_args(["serve", "--model_config_file", str(tmp_path / "missing.config")]))


def test_rest_monitoring_and_limit_flags(tmp_path):
    from kvlm.cli import build_parser
    from kvlm.cli.serve import server_options

    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    parser = build_parser()
    base = ["serve", "--model_base_path", str(tmp_path)]
    defaults = server_options(parser.parse_args(base))
    assert (defaults.rest_api_port, defaults.prometheus_path, defaults.max_image_pixels) == (None, None, 4096 * 4096)
    options = server_options(parser.parse_args(base + [
        "--rest_api_port", "8501", "--monitoring_config_file", str(monitoring), "--max_image_pixels", "0",
        "--max_decode_bytes", "1000", "--rest_api_timeout_in_ms", "2500",
    ]))
    assert (options.rest_api_port, options.rest_host, options.prometheus_path) == (8501, "127.0.0.1", "/metrics")
    assert (options.max_image_pixels, options.max_decode_bytes, options.rest_api_timeout_seconds) == (0, 1000, 2.5)
    with pytest.raises(ValueError, match="needs|REST port"):
        server_options(parser.parse_args(base + ["--monitoring_config_file", str(monitoring)]))
    monitoring.write_text("prometheus_config { enable: true, path: 'metrics' }\n")
    with pytest.raises(ValueError, match="must start with '/'"):
        server_options(parser.parse_args(base + ["--rest_api_port", "0", "--monitoring_config_file", str(monitoring)]))


def test_sessions_leave_idle_threads_asleep_unless_asked_to_spin(tmp_path):
    """`--tensorflow_thread_spinning` reaches the sessions loaded after it; off by default."""
    from kvlm.cli import build_parser
    from kvlm.serving import models
    from kvlm.serving.server import configure_tensorflow

    parser = build_parser()
    base = ["serve", "--model_base_path", str(tmp_path)]
    assert parser.parse_args(base).tensorflow_thread_spinning is False
    assert parser.parse_args(base + ["--tensorflow_thread_spinning"]).tensorflow_thread_spinning is True
    try:
        configure_tensorflow(thread_spinning=True)
        assert models._session_config().experimental.disable_thread_spinning is False
    finally:
        configure_tensorflow()
    assert models._session_config().experimental.disable_thread_spinning is True
