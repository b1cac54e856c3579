import pytest

from gnnst.config import load_config, parse_overrides
from gnnst.errors import GnnstError


def test_defaults_yaml_and_overrides_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("graph:\n  k: 8\ntrain:\n  lr: 0.01\n")
    cfg = load_config(y, ["train.lr=0.5"])
    assert cfg.graph.k == 8  # YAML over default
    assert cfg.train.lr == 0.5  # command line over YAML
    assert cfg.patch.size_um is None  # default: the encoder's own patch side (150 µm for efficientnet_lite0)


def test_unknown_keys_are_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("graph:\n  kk: 8\n")
    with pytest.raises(GnnstError, match=r"unknown config key 'graph.kk'.*c.yaml"):
        load_config(y)
    with pytest.raises(GnnstError, match="unknown config key 'nope'"):
        load_config(None, ["nope=1"])


def test_type_errors_name_the_key():
    with pytest.raises(GnnstError, match="graph.k.*integer"):
        load_config(None, ["graph.k=abc"])
    assert load_config(None, ["graph.k=null"]).graph.k is None
    assert load_config(None, ["graph.radius_um=300"]).graph.radius_um == 300.0


def test_choice_keys_list_the_choices():
    assert load_config(None, []).graph.storage == "auto"
    assert load_config(None, ["graph.storage=float16"]).graph.storage == "float16"
    with pytest.raises(GnnstError, match="graph.storage': expected one of 'auto', 'float32', 'float16', got 'half'"):
        load_config(None, ["graph.storage=half"])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(GnnstError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_missing_config_file():
    with pytest.raises(GnnstError, match="not found"):
        load_config("/nonexistent/c.yaml")
