"""Config loading: defaults, overrides, unknown keys named with their file, secrets redacted."""
import pytest
import yaml

from rpp.config import Config, ConfigError, load_config, redact


def test_defaults_and_overrides():
    cfg = load_config(None, ["env.n_envs=4", "llm.mode=generate", "data.item_noun=book"])
    assert isinstance(cfg, Config)
    assert cfg.env.n_envs == 4 and cfg.llm.mode == "generate" and cfg.data.item_noun == "book"
    assert cfg.rollout_steps == 2 * cfg.env.steps_per_episode


def test_shipped_configs_load():
    for path in ["experiments/ml100k.yaml", "experiments/demo.yaml"]:
        load_config(path)


def test_unknown_key_named_with_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("env:\n  n_envz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "c.yaml" in str(err.value) and "env.n_envz" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(None, ["trainer.lr=1"])


@pytest.mark.parametrize("text,words", [
    ("env: [1, 2\n", ["not valid YAML"]),
    ("- a\n- b\n", ["mapping"]),
    ("llm:\n  mode: shout\n", ["llm.mode"]),
    ("env:\n  n_envs: 0\n", ["env.n_envs"]),
    ("env:\n  steps_per_episode: 3\ntrain:\n  n_steps: 4\n", ["multiple of env.steps_per_episode"]),
])
def test_bad_files(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for word in words:
        assert word in str(err.value)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["env.n_envs"])


def test_saved_config_has_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-1234567890")
    cfg = load_config(None, ["llm.backend=openai", "llm.base_url=http://127.0.0.1:1/v1"])
    out = tmp_path / "config.yaml"
    cfg.save(out)
    text = out.read_text()
    assert "sk-test-secret" not in text
    assert yaml.safe_load(text)["llm"]["api_key_env"] == "OPENAI_API_KEY"
    assert redact({"api_key": "abc", "api_key_env": "X", "max_new_tokens": 5, "nested": [{"token": "t"}]}) == {
        "api_key": "***", "api_key_env": "X", "max_new_tokens": 5, "nested": [{"token": "***"}]}
    assert load_config(out).llm.max_new_tokens == cfg.llm.max_new_tokens


def test_refiner_and_agp_generator_inherit_unset_endpoint_keys_from_llm():
    from rpp.config import load_config

    cfg = load_config(None, ["llm.backend=openai", "llm.base_url=http://127.0.0.1:9/v1", "llm.model=served",
                             "llm.timeout_s=5", "refiner.model=rewriter", "agp.generator.concurrency=2"])
    assert (cfg.refiner.backend, cfg.refiner.base_url, cfg.refiner.timeout_s) == ("openai", "http://127.0.0.1:9/v1", 5)
    assert cfg.refiner.model == "rewriter"                       # set: kept
    assert (cfg.agp.generator.model, cfg.agp.generator.concurrency) == ("served", 2)
    planted = load_config(None, ["llm.backend=planted"])
    assert planted.refiner.backend == "local"                    # a planted ranker is no text generator
