import json

import pytest
import torch

from fedtune.errors import CheckpointError
from fedtune.model.base import load_model, load_tokenizer
from fedtune.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_parameters,
    attach_lora,
    get_adapter,
    load_adapter,
    save_adapter,
    set_adapter,
)
from tests.tolerance import FORWARD, close

RANK, ALPHA = 4, 8


@pytest.fixture
def peft_model(tiny_model_dir):
    base = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    return attach_lora(base, r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear", seed=1, base_name=str(tiny_model_dir))


def test_canonical_keys_match_peft(peft_model):
    from peft import get_peft_model_state_dict

    params = adapter_parameters(peft_model)
    assert set(params) == set(get_peft_model_state_dict(peft_model))
    assert all(".default" not in k for k in params)
    a = get_adapter(params)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in a.values())
    lora_a = next(v for k, v in a.items() if "lora_A" in k)
    assert lora_a.shape[0] == RANK


def test_initial_adapter_is_seeded_and_starts_at_the_base(tiny_model_dir, peft_model):
    a = get_adapter(adapter_parameters(peft_model))
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if "lora_B" in k)  # B = 0: the base model
    again = attach_lora(
        load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu")),
        r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear", seed=1, base_name="x",
    )
    b = get_adapter(adapter_parameters(again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_get_round_trip_and_shape_checks(peft_model):
    params = adapter_parameters(peft_model)
    new = {k: torch.randn_like(v) for k, v in get_adapter(params).items()}
    set_adapter(params, new)
    got = get_adapter(params)
    assert all(torch.equal(new[k], got[k]) for k in new)
    k0 = next(iter(new))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        set_adapter(params, {k: v for k, v in new.items() if k != k0})
    with pytest.raises(CheckpointError, match="has shape"):
        set_adapter(params, {**new, k0: torch.zeros(3, 3)})


def test_saved_adapter_loads_in_plain_peft(tmp_path, tiny_model_dir, peft_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = adapter_parameters(peft_model)
    trained = {k: torch.randn_like(v) * 0.1 for k, v in get_adapter(params).items()}
    set_adapter(params, trained)
    out = tmp_path / "adapter"
    save_adapter(out, trained, peft_model.peft_config["default"])
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])  # adapter only
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == RANK and meta["lora_alpha"] == ALPHA

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    x = torch.randint(0, 1000, (2, 7))
    peft_model.eval()
    with torch.no_grad():
        assert close(plain(input_ids=x).logits, peft_model(input_ids=x).logits, FORWARD)

    tensors, cfg = load_adapter(out)
    assert all(torch.equal(tensors[k], trained[k]) for k in trained)


def test_load_adapter_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_adapter(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_adapter(tmp_path)


def test_tokenizer_pads_right_with_eos(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.padding_side == "right" and tok.pad_token is not None
