"""Config model and loader: interpolation, validation messages with key paths, secrets hidden."""

from pathlib import Path

import pytest

from pipeline.core.config import config_from_dict, template_fields
from pipeline.core.errors import ConfigError
from pipeline.edges.configfile import interpolate, load_config

MINIMAL = """
request: {model: m}
input: {manifest: data/m.csv}
output: {path: out/x.parquet}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.endpoint.is_local
    assert config.request.stream_options == {"include_usage": True}
    assert config.run.concurrency == 16
    assert config.output.output_format == "parquet"
    assert config.input.manifest_format == "csv"


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        config.run.concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("request: {model: m, temperature: 3.5}", "request.temperature: must be <= 2, got 3.5"),
        ("request: {model: m, top_p: -0.1}", "request.top_p: must be >= 0, got -0.1"),
        ("request: {model: m, presence_penalty: 2.5}", "request.presence_penalty: must be <= 2, got 2.5"),
        ("request: {model: m, frequency_penalty: -3}", "request.frequency_penalty: must be >= -2, got -3"),
        ("request: {model: m, stop: [a, b, c, d, e]}", "request.stop: must have at most 4 items"),
        ("request: {model: m, logit_bias: {'50256': -101}}", "request.logit_bias.50256: must be >= -100, got -101"),
        ("request: {model: m, logit_bias: {abc: 1}}", "request.logit_bias: keys must be token ids"),
        ("request: {model: m, n: 0}", "request.n: must be >= 1, got 0"),
        ("request: {model: m, temprature: 1}", "request.temprature: unknown key (did you mean 'temperature'?)"),
        ("request: {model: m, extra_body: {stream: false}}", "request.extra_body: may not set stream"),
        ("request: {model: m, prompt: 'Describe {}'}", "request.prompt: template field {} must be a manifest column"),
        ("request: {}", "request.model: required key is missing"),
        ("request: {model: m}\nbogus: 1", "bogus: unknown key"),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path, text, expected):
    rest = "\ninput: {manifest: data/m.csv}\noutput: {path: out/x.parquet}\n"
    path = write(tmp_path, text + rest)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_input_takes_one_source_at_most(tmp_path):
    path = write(tmp_path, "request: {model: m}\ninput: {manifest: m.csv, directory: d}\noutput: {path: o.csv}\n")
    with pytest.raises(ConfigError, match="exactly one of input.manifest or input.directory"):
        load_config(path)


def test_input_with_no_source_loads_but_cannot_be_read(tmp_path):
    """No manifest nor directory: a config for run_job(config, manifest=df); reading it says what is missing."""
    from pipeline.edges.manifest import ManifestReader

    path = write(tmp_path, "request: {model: m}\ninput: {}\noutput: {path: o.csv}\n")
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"set input.manifest .* or input.directory .*manifest=df"):
        ManifestReader(config.input)


def test_unknown_output_suffix_needs_format(tmp_path):
    path = write(tmp_path, "request: {model: m}\ninput: {manifest: m.csv}\noutput: {path: out/x.dat}\n")
    with pytest.raises(ConfigError, match="set output.format"):
        load_config(path)


def test_env_interpolation_with_defaults():
    env = {"KEY": "sk-test", "EMPTY": ""}
    doc = {"a": "${KEY}", "b": "x-${MISSING:-dflt}-y", "c": ["${EMPTY:-fallback}"], "d": "$${KEY}"}
    assert interpolate(doc, env) == {"a": "sk-test", "b": "x-dflt-y", "c": ["fallback"], "d": "${KEY}"}


def test_missing_env_var_names_key_and_variable(tmp_path):
    path = write(tmp_path, "endpoint: {api_key: '${NOPE_NOT_SET}'}\n" + MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "endpoint.api_key: environment variable NOPE_NOT_SET is not set" in str(info.value)


def test_api_key_is_secret_everywhere(tmp_path):
    secret = "sk-very-secret-value-1234567890"
    config = load_config(write(tmp_path, "endpoint: {api_key: '${K}'}\n" + MINIMAL), env={"K": secret})
    assert config.endpoint.api_key.get_secret_value() == secret
    assert secret not in repr(config)
    assert secret not in str(config.model_dump())
    # a bad key type never echoes the value
    with pytest.raises(ConfigError) as info:
        config_from_dict({"endpoint": {"api_key": ["sk-leak-me"]}, "request": {"model": "m"},
                          "input": {"manifest": "m.csv"}, "output": {"path": "o.csv"}})
    assert "sk-leak-me" not in str(info.value)
    assert "<hidden>" in str(info.value)


def test_empty_api_key_means_none(tmp_path):
    config = load_config(write(tmp_path, "endpoint: {api_key: '${K:-}'}\n" + MINIMAL), env={})
    assert config.endpoint.api_key is None


def test_toml_config(tmp_path):
    text = '[request]\nmodel = "m"\ntemperature = 0.5\n[input]\nmanifest = "a.jsonl"\n[output]\npath = "o.csv"\n'
    config = load_config(write(tmp_path, text, "job.toml"))
    assert config.request.temperature == 0.5
    assert config.input.manifest_format == "jsonl"
    assert config.output.output_format == "csv"


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "request: [unclosed"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_base_url_validation(tmp_path):
    path = write(tmp_path, "endpoint: {base_url: 'ftp://x'}\n" + MINIMAL)
    with pytest.raises(ConfigError, match="endpoint.base_url: must be 'local' or an http"):
        load_config(path)


def test_template_fields():
    assert template_fields("Describe {path} for {label}; literal {{x}}") == ["path", "label"]
    with pytest.raises(ValueError):
        template_fields("broken {")


def test_shipped_configs_are_valid():
    env = {"OPENAI_API_KEY": "k", "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com", "AZURE_OPENAI_API_KEY": "k"}
    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path, env=env)


# --- hostile config files: alias bombs, deep nesting, bytes that are not UTF-8 -------------------------


def laughs(levels: int, width: int = 10) -> str:
    """The "billion laughs": each anchor is a list of ``width`` aliases of the one before; the request
    carries the last one."""
    lines = ['l0: &l0 "lol"']
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines.append(f"request: {{model: m, extra_body: {{bomb: *l{levels}}}}}")
    return "input: {manifest: m.csv}\noutput: {path: o.csv}\n" + "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_before_it_expands(tmp_path):
    path = write(tmp_path, laughs(9))  # 10**9 strings once expanded, from a dozen lines: never built
    with pytest.raises(ConfigError, match=r"expands to more than 100,000 values \(YAML aliases") as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_million_values_through_aliases_is_refused_too(tmp_path):
    path = write(tmp_path, laughs(6))
    with pytest.raises(ConfigError, match="refused as a config bomb"):
        load_config(path, env={})


def test_merge_key_bomb_is_refused(tmp_path):
    # each level merges the previous mapping twice: the parser's merge alone doubles per level
    lines = ["m0: &m0 {a: 1}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, 40)]
    path = write(tmp_path, MINIMAL + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="refused as a config bomb"):
        load_config(path, env={})


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL.replace("request: {model: m}", "request: {model: m, extra_body: &a {x: [*a]}}"))
    with pytest.raises(ConfigError, match="a YAML alias refers to a value that contains it"):
        load_config(path, env={})


def test_ordinary_aliases_still_work_and_stay_shared(tmp_path):
    text = MINIMAL.replace("request: {model: m}", "request: {model: m, extra_body: {a: &h {k: '${V}'}, b: *h}}")
    config = load_config(write(tmp_path, text), env={"V": "v"})
    assert config.request.extra_body == {"a": {"k": "v"}, "b": {"k": "v"}}
    import yaml

    document = interpolate(yaml.safe_load("a: &x {k: '${V}', l: [1, '${V}']}\nb: *x\n"), {"V": "v"})
    assert document["a"] == {"k": "v", "l": [1, "v"]}
    assert document["b"] is document["a"]  # interpolated once, not copied per alias


@pytest.mark.parametrize(("name", "text"), [
    ("deep.yaml", "request: " + "[" * 20_000 + "]" * 20_000 + "\n"),
    ("deep-flow.yaml", "request: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"),
    ("deep.toml", "x = " + "[" * 20_000 + "]" * 20_000 + "\n"),
    ("nested.yaml", "request: " + "[" * 100 + "]" * 100 + "\n"),
])
def test_deeply_nested_config_is_one_config_error(tmp_path, name, text):
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError, match="nested") as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_config_that_is_not_utf8_is_one_config_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(MINIMAL.replace("model: m", "model: caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset \d+\); save the config as UTF-8"):
        load_config(path, env={})


def test_yaml_syntax_error_is_one_line_without_the_source_text(tmp_path):
    path = write(tmp_path, "endpoint: {api_key: sk-secret-123\nrequest: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .*\(line \d+, column \d+\)$") as info:
        load_config(path, env={})
    assert "\n" not in str(info.value) and "sk-secret-123" not in str(info.value)
