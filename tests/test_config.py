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
    assert load_config(None, ["graph.k=null", "graph.radius_um=300"]).graph.k is None
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


def _numeric_keys():
    """Every numeric key of every config section, dotted (``train.lr``), with its dataclass field."""
    import dataclasses
    import typing

    from gnnst.config import Config

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif {int, float} & ({tp} | set(typing.get_args(tp))) and tp is not bool:
                out.append((f"{prefix}{f.name}", f))

    walk(Config, "")
    return out


def test_every_numeric_key_has_a_range():
    keys = _numeric_keys()
    assert len(keys) > 30
    missing = [k for k, f in keys if "range" not in f.metadata]
    assert not missing, f"numeric config keys without a range (use gnnst.config.num): {missing}"


@pytest.mark.parametrize("override, message", [
    ("train.batch_nodes=0", "config key 'train.batch_nodes': expected an integer >= 1 or null, got 0"),
    ("graph.k=0", "config key 'graph.k': expected an integer >= 1 or null, got 0"),
    ("graph.radius_um=0", "config key 'graph.radius_um': expected a number > 0 or null, got 0.0"),
    ("train.num_hops=-1", "config key 'train.num_hops': expected an integer >= 0, got -1"),
    ("train.epochs=0", "config key 'train.epochs': expected an integer >= 1, got 0"),
    ("train.lr=0", "config key 'train.lr': expected a number > 0, got 0.0"),
    ("train.lr=.nan", "config key 'train.lr': expected a number > 0, got nan"),
    ("train.weight_decay=-0.1", "config key 'train.weight_decay': expected a number >= 0, got -0.1"),
    ("train.warmup_epochs=-1", "config key 'train.warmup_epochs': expected an integer >= 0, got -1"),
    ("train.patience=0", "config key 'train.patience': expected an integer >= 1, got 0"),
    ("train.val_fraction=1", "config key 'train.val_fraction': expected a number in [0, 1), got 1.0"),
    ("train.ensemble=0", "config key 'train.ensemble': expected an integer >= 1, got 0"),
    ("train.num_threads=0", "config key 'train.num_threads': expected an integer >= 1 or null, got 0"),
    ("patch.size_um=0", "config key 'patch.size_um': expected a number > 0 or null, got 0.0"),
    ("patch.pad_value=256", "config key 'patch.pad_value': expected an integer in [0, 255], got 256"),
    ("encoder.batch_size=0", "config key 'encoder.batch_size': expected an integer >= 1 or null, got 0"),
    ("encoder.num_threads=0", "config key 'encoder.num_threads': expected an integer >= 1 or null, got 0"),
    ("eval.n_heg=0", "config key 'eval.n_heg': expected an integer >= 1, got 0"),
    ("eval.n_hvg=0", "config key 'eval.n_hvg': expected an integer >= 1, got 0"),
    ("expression.n_top_expressed=0", "config key 'expression.n_top_expressed': expected an integer >= 1, got 0"),
    ("expression.n_top_variable=0", "config key 'expression.n_top_variable': expected an integer >= 1, got 0"),
    ("expression.min_spot_fraction=1.5", "config key 'expression.min_spot_fraction': expected a number in [0, 1], got 1.5"),
    ("expression.target_sum=0", "config key 'expression.target_sum': expected a number > 0 or null, got 0.0"),
    ("ablation.ensemble=0", "config key 'ablation.ensemble': expected an integer >= 1, got 0"),
    ("seed=-1", "config key 'seed': expected an integer >= 0, got -1"),
    ("num_workers=-1", "config key 'num_workers': expected an integer >= 0, got -1"),
    ("model.hidden=0", "config key 'model.hidden': expected an integer >= 1, got 0"),
    ("model.dropout=1", "config key 'model.dropout': expected a number in [0, 1), got 1.0"),
    ("model.mask_ratio=0", "config key 'model.mask_ratio': expected a number in (0, 1), got 0.0"),
    ("model.blend_alpha=1.5", "config key 'model.blend_alpha': expected a number in [0, 1], got 1.5"),
    ("model.w_mse=-1", "config key 'model.w_mse': expected a number >= 0, got -1.0"),
    ("model.retrieval_k=0", "config key 'model.retrieval_k': expected an integer >= 1, got 0"),
    ("model.edge_scale_um=0", "config key 'model.edge_scale_um': expected a number > 0, got 0.0"),
])
def test_ranges_are_checked_at_load(override, message):
    """Checked when the config is loaded, before any file is read; one line naming key and value."""
    with pytest.raises(GnnstError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_every_numeric_key_rejects_a_value_outside_its_range():
    """Each range is enforced: the value just outside its bound (or NaN) is refused, naming the key."""
    for key, f in _numeric_keys():
        rng = f.metadata["range"]
        bad = rng.lo - 1 if rng.lo is not None else rng.hi + 1 if rng.hi is not None else float("nan")
        if rng.lo is not None and rng.lo_open:
            bad = rng.lo
        integer = isinstance(f.default, int) or "int" in str(f.type)
        value = int(bad) if integer else float(bad)
        with pytest.raises(GnnstError, match=f"config key '{key}'"):
            load_config(None, [f"{key}={value}"])


def test_range_errors_name_the_config_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  batch_nodes: 0\n")
    with pytest.raises(GnnstError, match=r"'train.batch_nodes': expected an integer >= 1 or null, got 0 \(in .*c.yaml"):
        load_config(y)


def test_graph_needs_k_or_radius_and_choices_are_checked():
    with pytest.raises(GnnstError, match="set at least one of graph.k and graph.radius_um"):
        load_config(None, ["graph.k=null"])
    with pytest.raises(GnnstError, match="'eval.hvg': expected one of 'seurat', 'variance'"):
        load_config(None, ["eval.hvg=dispersion"])
    with pytest.raises(GnnstError, match=r"'eval.baselines\[0\]': expected one of 'mean', 'ridge', 'ridge_neighbours'"):
        load_config(None, ["eval.baselines=[lasso]"])
    assert load_config(None, ["eval.hvg=variance", "eval.select_on_heldout=true"]).eval.select_on_heldout is True
