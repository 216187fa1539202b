"""Request validation (OpenAI shapes), error bodies, the serving config, the backend seam, `eraser serve` args."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from serve.backend import BackendContext, ClusterBackend, PendingOnlyBackend, load_backend
from serve.config import EngineConfig, ServeConfig
from serve.errors import ServeConfigError
from serve.protocol import ChatCompletionRequest, CompletionRequest, error_body, validation_message


def message(model, body):
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return validation_message(caught.value)


def test_completion_request_defaults_and_prompt_forms():
    request = CompletionRequest.model_validate({"model": "acme", "prompt": "hi"})
    assert request.max_tokens == 16 and request.sampling(16).temperature == 1.0
    assert CompletionRequest.model_validate({"model": "a", "prompt": ["hi"]}).prompt_input() == "hi"
    assert CompletionRequest.model_validate({"model": "a", "prompt": [1, 2]}).prompt_input() == [1, 2]
    options = CompletionRequest.model_validate({"model": "a", "prompt": "x", "stop": "\n", "seed": 3,
                                                "temperature": 0}).sampling(5)
    assert (options.stop, options.seed, options.temperature, options.max_tokens) == (("\n",), 3, 0, 5)


@pytest.mark.parametrize("body, words, param", [
    ({"prompt": "hi"}, "missing required parameter 'model'", "model"),
    ({"model": "a", "prompt": "hi", "n": 3}, "only n=1", "n"),
    ({"model": "a", "prompt": "hi", "bogus": 1}, "unrecognized request argument supplied: bogus", "bogus"),
    ({"model": "a", "prompt": ["a", "b"]}, "batches", None),
    ({"model": "a", "prompt": "hi", "echo": True}, "echo", None),
    ({"model": "a", "prompt": "hi", "temperature": 3}, "temperature", "temperature"),
    ({"model": "a", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "at most 4", "stop"),
])
def test_completion_request_errors_name_the_parameter(body, words, param):
    text, where = message(CompletionRequest, body)
    assert words in text and where == param


def test_chat_request_renders_text_parts_and_prefers_max_completion_tokens():
    request = ChatCompletionRequest.model_validate({
        "model": "a", "max_tokens": 3, "max_completion_tokens": 7,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]})
    assert request.template_messages()[1] == {"role": "user", "content": "hello"}
    assert request.requested_tokens() == 7
    assert "messages" in message(ChatCompletionRequest, {"model": "a", "messages": []})[0]
    user = [{"role": "user", "content": "x"}]
    assert message(ChatCompletionRequest, {"model": "a", "messages": user, "tools": []})[1] == "tools"
    assert "role" in message(ChatCompletionRequest, {"model": "a", "messages": [{"role": "robot", "content": "x"}]})[0]


def test_error_body_has_openai_shape():
    assert error_body(401, "no", "invalid_api_key") == {
        "error": {"message": "no", "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


def test_config_validates_fields_and_reads_the_environment(monkeypatch):
    with pytest.raises(ValidationError, match="max_lora_rank"):
        EngineConfig(max_lora_rank=12)
    with pytest.raises(ValidationError, match="max_cpu_loras"):
        EngineConfig(max_loras=8, max_cpu_loras=4)
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig.from_args({"engine": {"model": "m"}, "replicas": 3})
    with pytest.raises(ValidationError, match="erasure_backend"):
        ServeConfig.from_args({"erasure_backend": "no-colon"})
    monkeypatch.setenv("ERASER_SERVE_ENGINE__MAX_LORAS", "8")
    monkeypatch.setenv("ERASER_SERVE_REFRESH_INTERVAL_S", "9")
    config = ServeConfig.from_args({"engine": {"model": "m", "max_cpu_loras": 32}, "refresh_interval_s": 1})
    assert (config.engine.model, config.engine.max_loras, config.engine.max_cpu_loras) == ("m", 8, 32)
    assert config.refresh_interval_s == 1  # explicit beats the environment


def test_the_token_rate_limit_is_on_by_default_validated_and_can_be_turned_off(monkeypatch):
    assert ServeConfig().tenant_tokens_per_minute == 100_000
    with pytest.raises(ValidationError, match="tenant_tokens_per_minute"):
        ServeConfig.from_args({"tenant_tokens_per_minute": 0})
    assert ServeConfig.from_args({"tenant_tokens_per_minute": None}).tenant_tokens_per_minute is None
    monkeypatch.setenv("ERASER_SERVE_TENANT_TOKENS_PER_MINUTE", "null")
    assert ServeConfig().tenant_tokens_per_minute is None
    monkeypatch.setenv("ERASER_SERVE_TENANT_TOKENS_PER_MINUTE", "6000")
    assert ServeConfig().tenant_tokens_per_minute == 6000


def test_serve_config_yaml_is_valid():
    from pathlib import Path

    config = ServeConfig.from_file(Path(__file__).resolve().parents[2] / "serve" / "serve_config.yaml")
    assert config.engine.model and config.autoscaling is not None
    assert config.erasure_backend == "serve.backend:cluster_backend"


def test_build_app_requires_a_model():
    from serve.app import build_app

    with pytest.raises(ServeConfigError, match="engine.model"):
        build_app({"engine": {"model": ""}})


class FakeService:
    def __init__(self):
        self.hooks, self.submitted, self.processed, self.onboarded = {}, [], [], []

    def register_publish_hook(self, name, hook):
        self.hooks[name] = hook

    def submit(self, receipt):
        self.submitted.append(receipt)

    def process(self, tenants):
        self.processed.append(list(tenants))

    def onboard(self, tenant, data_version=None):
        self.onboarded.append((tenant, data_version))


def test_cluster_backend_registers_the_switch_hook_and_runs_rounds():
    import time
    from types import SimpleNamespace

    notifier = lambda tenant, head: {"switched_at": "now"}  # noqa: E731
    service = FakeService()
    backend = ClusterBackend(service, BackendContext(store_settings=None, notify_switch=notifier, app_name="app"))
    assert service.hooks == {"serve:app": notifier}
    backend.submit(SimpleNamespace(tenant="acme", request_id="r1"))
    assert backend.train("acme", "d000002")["status"] == "started"
    deadline = time.time() + 5
    while (not service.processed or not service.onboarded) and time.time() < deadline:
        time.sleep(0.01)
    assert service.processed == [["acme"]] and service.onboarded == [("acme", "d000002")]


def test_load_backend():
    context = BackendContext(store_settings=None, notify_switch=lambda *a: None, app_name="app")
    assert isinstance(load_backend(None, context), PendingOnlyBackend)
    with pytest.raises(ServeConfigError, match="cannot be imported"):
        load_backend("serve.nothing:factory", context)
    with pytest.raises(NotImplementedError):
        PendingOnlyBackend(context).train("acme")


def test_serve_command_arguments_become_the_config(tmp_path, monkeypatch):
    from cli.serve_cmd import config_from_args, register

    monkeypatch.delenv("ERASER_SERVE_ERASURE_BACKEND", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    (tmp_path / "serve.yaml").write_text("engine:\n  model: from-file\n  max_loras: 2\nrefresh_interval_s: 7\n")
    args = parser.parse_args(["serve", "--config", str(tmp_path / "serve.yaml"), "--max-lora-rank", "32",
                              "--backend", "local"])
    config = config_from_args(args, {"endpoint": "http://127.0.0.1:9", "bucket": "bkt"})
    assert (config.engine.model, config.engine.max_loras, config.engine.max_lora_rank) == ("from-file", 2, 32)
    assert config.refresh_interval_s == 7 and config.store["endpoint"] == "http://127.0.0.1:9"
    assert config.erasure_backend == "serve.backend:local_cluster_backend"
    default = config_from_args(parser.parse_args(["serve", "--model", "m"]))
    assert default.engine.model == "m" and default.erasure_backend == "serve.backend:local_cluster_backend"
    remote = config_from_args(parser.parse_args(["serve", "--model", "m", "--address", "10.0.0.1:6379"]))
    assert remote.erasure_backend == "serve.backend:cluster_backend"


def test_closing_the_cluster_backend_stops_its_reconciler():
    from types import SimpleNamespace

    stopped = []

    class WithReconciler(FakeService):
        def start_reconciler(self):
            return SimpleNamespace(stop=lambda: stopped.append(True))

    backend = ClusterBackend(WithReconciler(), BackendContext(store_settings=None, notify_switch=None, app_name="a"))
    backend.close()
    assert stopped == [True]
