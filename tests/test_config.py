from pathlib import Path

import pytest
import torch

from fedtune.config import (
    RunConfig,
    config_hash,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    resume_differences,
)
from fedtune.errors import ConfigError


def one_line_error(overrides: list[str]) -> str:
    """The ConfigError these overrides raise, checked to be a single line."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_defaults_are_valid():
    cfg = load_config(None, [])
    assert isinstance(cfg, RunConfig)
    assert cfg.lora.target_modules == "all-linear"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 2\nlora:\n  r: 4\n")
    cfg = load_config(path, ["federation.rounds=5", "lora.r=16", "train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.federation.rounds == 5
    assert cfg.lora.r == 16
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; floats accept it
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_tilde_resets_to_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 7\n")
    assert load_config(path, ["~federation.rounds"]).federation.rounds == RunConfig().federation.rounds


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["federation.round=5"])
    assert "federation.round: unknown key (did you mean 'federation.rounds'?)" in str(e.value)


def test_bad_choice_suggests():
    with pytest.raises(ConfigError, match="partition.method: 'dirichelt' is not one of .*did you mean 'dirichlet'"):
        load_config(None, ["partition.method=dirichelt"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.r=0", "lora.r: must be > 0, got 0"),
        ("lora.r=-3", "lora.r: must be > 0"),
        ("federation.fraction=1.5", "federation.fraction: must be <= 1, got 1.5"),
        ("federation.rounds=two", "federation.rounds: expected an integer, got 'two'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("lora.dropout=1.0", "lora.dropout: must be < 1"),
        ("data.skip_invalid=maybe", "data.skip_invalid: expected true or false"),
        ("federation.clients_per_round=11", "federation.clients_per_round: 11 is more than partition.num_clients=10"),
        ("lora=5", "lora: expected a section"),
    ],
)
def test_impossible_values_name_the_key(override, message):
    assert message in one_line_error([override])


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.r=0", "federation.rounds=0", "nope=1"])
    assert len(e.value.problems) == 3


def test_clients_per_round_and_fraction_exclusive():
    with pytest.raises(ConfigError, match="set one, not both"):
        load_config(None, ["federation.clients_per_round=2", "federation.fraction=0.5"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml line .*not valid YAML"):
        load_config(bad)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides({}, ["federation.rounds"])


def test_dump_round_trip():
    cfg = load_config(None, ["lora.r=4", "eval.sample_prompts=[hi, there]"])
    import yaml

    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_resume_differences_ignore_resumable_keys():
    a = load_config(None, [])
    b = load_config(None, ["federation.rounds=9", "output.dir=x", "eval.every=2"])
    assert resume_differences(a, b) == []
    assert config_hash(a) == config_hash(b)
    c = load_config(None, ["lora.r=4"])
    assert resume_differences(a, c) == ["lora.r (run: 8, now: 4)"]
    assert config_hash(a) != config_hash(c)


def test_every_setting_has_help():
    rows = describe()
    assert rows and all(help for _, _, help in rows)


def test_dpo_section_and_its_checks():
    cfg = load_config(None, ["task=dpo", "dpo.beta=0.5", "dpo.loss_type=robust", "dpo.label_smoothing=0.2", "dpo.reference=global"])
    assert (cfg.task, cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.reference) == ("dpo", 0.5, "robust", "global")
    assert cfg.data.columns.chosen == "chosen" and cfg.data.columns.prompt == "prompt"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["task=dpo", "dpo.loss_type=hinge", "dpo.label_smoothing=0.1"])
    assert err.value.problems == ["dpo.label_smoothing: only the sigmoid and robust losses use it, not loss_type=hinge; set it to 0"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dpo.beta=0", "dpo.label_smoothing=0.5", "dpo.reference=ref", "dpo.loss_typ=ipo"])
    assert err.value.problems == [
        "dpo.beta: must be > 0, got 0.0",
        "dpo.label_smoothing: must be < 0.5, got 0.5",
        "dpo.reference: 'ref' is not one of initial, base, global",
        "dpo.loss_typ: unknown key (did you mean 'dpo.loss_type'?)",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.name=fedprox", "strategy.mu=-0.5"], "strategy.mu: must be >= 0, got -0.5"),
        (["strategy.name=fedadam", "strategy.beta1=1.0"], "strategy.beta1: must be < 1, got 1.0"),
        (["strategy.name=fedyogi", "strategy.beta2=-0.1"], "strategy.beta2: must be >= 0, got -0.1"),
        (["strategy.name=fedadam", "strategy.tau=0"], "strategy.tau: must be > 0"),
        (["strategy.name=fedavgm", "strategy.server_lr=0"], "strategy.server_lr: must be > 0"),
        (["strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.5"], "strategy.trim_beta: must be < 0.5"),
        (["strategy.name=fedadam", "strategy.mu=0.1"], "strategy.mu: not used by strategy.name=fedadam with strategy.aggregator=mean; remove it"),
        (["strategy.aggregator=median", "strategy.krum_f=1"], "strategy.krum_f: not used by strategy.name=fedavg with strategy.aggregator=median"),
        (["strategy.aggregator=trimmed_mean"], "strategy.trim_beta: trimmed_mean needs the fraction to trim"),
        (["strategy.aggregator=krum"], "strategy.krum_f: krum needs the number of attackers to tolerate"),
        (["strategy.aggregator=krum", "strategy.krum_f=2", "federation.clients_per_round=6"],
         "strategy.krum_f: krum with f=2 needs more than 2f+2=6 updates per round, but 6 clients are sampled"),
        (["strategy.aggregator=multikrum", "strategy.krum_f=1", "federation.fraction=0.4"],
         "strategy.krum_f: multikrum with f=1 needs more than 2f+2=4 updates per round, but 4 clients are sampled"),
        (["strategy.aggregator=krum", "strategy.krum_f=1", "federation.clients_per_round=6", "federation.dropout=0.1"],
         "federation.min_clients: with federation.dropout a round may aggregate only 1 updates, but krum with strategy.krum_f=1 needs 5"),
        (["strategy.aggregator=multikrum", "strategy.krum_f=1", "strategy.multikrum_m=6", "federation.clients_per_round=6"],
         "strategy.multikrum_m: 6 is more than the 6 updates a round may have minus strategy.krum_f=1"),
        (["federation.min_clients=5", "federation.clients_per_round=4"], "federation.min_clients: 5 is more than the 4 clients sampled per round"),
        (["federation.dropout=1.0"], "federation.dropout: must be < 1"),
        (["train.local_steps_per_client=[2, 0]"], "train.local_steps_per_client: every value must be >= 1"),
        (["strategy.name=fedsgd"], "strategy.name: 'fedsgd' is not one of"),
        (["task=dpo", "data.instruction_categories=8"], "data.instruction_categories: categories from instructions are for task=sft"),
        (["data.instruction_categories=0"], "data.instruction_categories: must be >= 1"),
    ],
)
def test_bad_strategy_and_participation_settings_name_the_key(overrides, message):
    assert message in one_line_error(overrides)


def test_good_strategy_settings():
    cfg = load_config(None, ["strategy.name=fedyogi", "strategy.server_lr=0.003", "strategy.aggregator=multikrum",
                             "strategy.krum_f=1", "federation.clients_per_round=6", "federation.dropout=0.2",
                             "federation.min_clients=5", "train.local_steps_per_client=[2, 4]"])
    assert cfg.strategy.server_lr == 0.003 and cfg.federation.min_clients == 5
    assert cfg.train.local_steps_per_client == [2, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.client_ranks=[0, 9]"], "lora.client_ranks: [0, 9] outside 1..lora.r=8"),
        (["lora.client_ranks=[2, 8]", "strategy.aggregator=median"], "lora.client_ranks: heterogeneous ranks are merged by lora.hetlora_aggregation"),
        (["compression.method=fp8"], "compression.method: 'fp8' is not one of none, int8, int4, topk"),
        (["compression.topk_fraction=0"], "compression.topk_fraction: must be > 0"),
    ],
)
def test_bad_rank_and_compression_settings_name_the_key(overrides, message):
    assert message in one_line_error(overrides)


DP = ["privacy.dp=central", "privacy.clip_norm=0.5"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.dp=central"], "privacy.clip_norm: dp=central needs the clipping norm C"),
        (DP + ["strategy.aggregator=median"], "strategy.aggregator: dp=central adds noise to the sum of the clipped deltas, which median"),
        (DP + ["strategy.name=scaffold"], "strategy.name: scaffold sends control variates that dp does not clip or noise"),
        (DP + ["federation.sampling=weighted"], "federation.sampling: the privacy accountant assumes uniform sampling"),
        (DP + ["privacy.norm_bound_factor=5"], "privacy.norm_bound_factor: with dp a bound relative to the round's median norm"),
        (DP + ["privacy.noise_multiplier=0", "privacy.target_epsilon=3"], "privacy.target_epsilon: with privacy.noise_multiplier=0 epsilon is infinite"),
        (["privacy.target_epsilon=3"], "privacy.target_epsilon: needs privacy.dp=central or local"),
        (["privacy.dp=secret"], "privacy.dp: 'secret' is not one of off, central, local"),
        (["attack.kind=poison", "attack.scale=2"], "attack.scale: attack.kind=poison does not use it; remove it"),
        (["attack.fraction=0.05"], "attack.fraction: 0.05 of partition.num_clients=10 is less than one client"),
        (["attack.fraction=0.2", "attack.kind=backdoor", "task=dpo"], "attack.kind: backdoor rewrites instruction data and needs task=sft"),
    ],
)
def test_privacy_and_attack_problems_name_the_key(overrides, message):
    assert message in one_line_error(overrides)


def test_local_dp_composes_with_robust_aggregators():
    cfg = load_config(None, ["privacy.dp=local", "privacy.clip_norm=0.5", "strategy.aggregator=trimmed_mean", "strategy.trim_beta=0.1"])
    assert cfg.privacy.dp == "local"


@pytest.mark.parametrize(
    "text,message",
    [
        ("data:\n  path: a.jsonl\nlora:\n  r: 4\ndata:\n  limit: 5\n", "line 5: key 'data' appears twice (first on line 1); merge the two into one"),
        ("lora:\n  r: 4\n  alpha: 8\n  r: 16\n", "line 4: key 'r' appears twice (first on line 2)"),
    ],
)
def test_a_repeated_yaml_key_is_refused_with_its_lines(tmp_path, text, message):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert f"dup.yaml {message}" in str(e.value) and "\n" not in str(e.value)


def test_yaml_merge_keys_may_override():
    import yaml

    from fedtune.config import _UniqueKeyLoader

    assert yaml.load("base: &b {r: 4, alpha: 8}\nlora:\n  <<: *b\n  r: 16\n", Loader=_UniqueKeyLoader)["lora"] == {"r": 16, "alpha": 8}


def test_a_config_that_is_not_utf8_or_unreadable_is_a_config_error(tmp_path, monkeypatch):
    f = tmp_path / "latin.yaml"
    f.write_bytes("seed: 1\n# Müller\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml line 2: not UTF-8 text \(byte 0xfc\); save the file as UTF-8"):
        load_config(f)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # chmod 0 does not stop root
    with pytest.raises(ConfigError, match=r"config file .*latin.yaml: cannot read it \(Permission denied\)"):
        load_config(f)


@pytest.mark.parametrize("seed,ok", [(0, True), (2**63 - 1, True), (-1, False), (2**63, False)])
def test_seed_range_is_what_the_generators_take(seed, ok):
    from fedtune.seeding import generator, torch_seed

    if ok:
        cfg = load_config(None, [f"seed={seed}"])
        generator(cfg.seed, "sampling", 3).random()
        torch.Generator().manual_seed(torch_seed(cfg.seed, "torch", 1, 2))
    else:
        assert "seed: must be" in one_line_error([f"seed={seed}"])


def test_column_defaults_are_the_field_names():
    """data.sources.check_mapped treats a column named like its field as the default (which a
    file may lack) and any other name as an explicit mapping (which must exist)."""
    from dataclasses import asdict

    from fedtune.config import ColumnsConfig

    assert all(field == column for field, column in asdict(ColumnsConfig()).items())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["federation.clients_per_round=2"], ["federation.clients_per_round: a round may aggregate 2 update(s); with fewer than 3 the norm check"]),
        (["federation.clients_per_round=2", "strategy.aggregator=median"],
         ["federation.clients_per_round: a round may aggregate 2 update(s); with fewer than 3 the norm check",
          "federation.clients_per_round: a round may aggregate 2 update(s); with fewer than 3 strategy.aggregator=median is their mean"]),
        (["federation.clients_per_round=5", "federation.dropout=0.2", "federation.min_clients=2"],
         ["federation.min_clients: a round may aggregate 2 update(s); with fewer than 3 the norm check"]),
        (["federation.clients_per_round=2", "privacy.dp=local", "privacy.clip_norm=1", "strategy.aggregator=median"],
         ["federation.clients_per_round: a round may aggregate 2 update(s); with fewer than 3 strategy.aggregator=median is their mean"]),
        (["federation.clients_per_round=2", "privacy.dp=local", "privacy.clip_norm=1"], []),  # no norm check under dp
        (["federation.clients_per_round=3"], []),
        (["federation.clients_per_round=5", "federation.dropout=0.2", "federation.min_clients=3"], []),
        (["federation.clients_per_round=1", "federation.mode=centralized"], []),
    ],
)
def test_small_round_warnings(overrides, expected):
    from fedtune.config import small_round_warnings

    got = small_round_warnings(load_config(None, overrides))
    assert len(got) == len(expected) and all(g.startswith(e) for g, e in zip(got, expected))
    assert all("\n" not in g and ("min_clients=3" in g or "at least 3 clients" in g) for g in got)  # one line, names the fix


@pytest.mark.parametrize("key", ["output.dir", "data.path", "model.name"])
def test_empty_paths_are_refused(key):
    """An empty output.dir would become the working directory (and overwrite would clear it)."""
    with pytest.raises(ConfigError, match=f"{key}: must not be empty"):
        load_config(None, [f"{key}="])
    with pytest.raises(ConfigError, match=f"{key}: must not be empty"):
        load_config(None, [f"{key}=  "])


def test_federated_eval_fields_are_validated_and_auto_resolves_by_engine():
    from fedtune.config import federated_eval

    cfg = load_config(None, [])
    assert cfg.eval.federated == "auto" and not federated_eval(cfg) and not federated_eval(cfg, deployment=True)
    flower = load_config(None, ["federation.engine=flower"])
    assert not federated_eval(flower) and federated_eval(flower, deployment=True)  # a deployment's server holds no data
    assert not federated_eval(load_config(None, ["federation.engine=flower", "flower.heldout_path=h.jsonl"]), deployment=True)
    assert federated_eval(load_config(None, ["eval.federated=true"])) and not federated_eval(load_config(None, ["eval.federated=false"]), True)
    assert "eval.federated: 'sometimes' is not one of true, false, auto" in one_line_error(["eval.federated=sometimes"])
    assert "eval.client_holdout: must be < 1" in one_line_error(["eval.client_holdout=1"])
    assert "eval.client_holdout: must be > 0" in one_line_error(["eval.client_holdout=0"])
    assert "eval.federated_clients: 11 is more than partition.num_clients=10" in one_line_error(["eval.federated_clients=11"])
    assert "eval.federated_clients: must be >= 1" in one_line_error(["eval.federated_clients=0"])


def test_federated_eval_and_client_holdout_cannot_change_on_resume():
    base = load_config(None, [])
    for override in ("eval.federated=true", "eval.client_holdout=0.2"):
        changed = load_config(None, [override])
        assert config_hash(changed) != config_hash(base) and resume_differences(base, changed)[0].startswith(override.split("=")[0])
    assert config_hash(load_config(None, ["eval.federated_clients=2", "eval.every=2"])) == config_hash(base)  # these may change


def test_too_few_bootstrap_resamples_for_the_confidence_are_refused():
    """1 resample gave 'federated is 7% [8%, 8%]' and called a gap 'lower' on an interval of one draw."""
    from fedtune.config import min_bootstrap_resamples

    assert (min_bootstrap_resamples(0.95), min_bootstrap_resamples(0.9), min_bootstrap_resamples(0.99)) == (40, 20, 200)
    message = one_line_error(["eval.bootstrap_resamples=1"])
    assert message.startswith("eval.bootstrap_resamples: 1 resample(s) leave none") and "use at least 40" in message
    assert "use at least 200" in one_line_error(["eval.bootstrap_resamples=199", "eval.confidence=0.99"])
    load_config(None, ["eval.bootstrap_resamples=40"])
    load_config(None, ["eval.bootstrap_resamples=3", "eval.confidence=0.01"])
