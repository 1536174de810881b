"""The base-evaluation cache: computed once, reused by content, never for changed content."""

import shutil

import torch

from fedtune.data.prompts import Encoded
from fedtune.evaluation.base_cache import BaseEvalCache, encoded_digest, is_noop
from fedtune.evaluation.heldout import HeldoutEvaluator


def test_a_result_is_computed_once_and_then_read_back(tmp_path):
    cache = BaseEvalCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"loss": 1.2345678901234567, "per_category": {"a": {"loss": 0.1}}}

    first, hit1 = cache.get_or_compute({"kind": "x", "rows": "r1"}, compute)
    again, hit2 = cache.get_or_compute({"rows": "r1", "kind": "x"}, compute)  # key order does not matter
    other, hit3 = cache.get_or_compute({"kind": "x", "rows": "r2"}, compute)
    assert (hit1, hit2, hit3) == (False, True, False) and len(calls) == 2
    assert again == first  # floats round-trip exactly
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left behind


def test_no_folder_means_no_cache(tmp_path):
    cache = BaseEvalCache(None)
    assert cache.get_or_compute({"k": 1}, lambda: 1) == (1, False)
    assert cache.get_or_compute({"k": 1}, lambda: 2) == (2, False)


def test_an_unwritable_cache_still_returns_the_result(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert BaseEvalCache(blocker / "sub").get_or_compute({"k": 1}, lambda: 7) == (7, False)


def test_is_noop_only_for_zero_lora_b():
    a = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    assert is_noop(a)
    assert not is_noop({**a, "x.lora_B.weight": torch.full((3, 2), 1e-30)})
    assert not is_noop({})


def rows():
    return [Encoded(torch.tensor([1, 2, 3, 4, 5]), 2), Encoded(torch.tensor([1, 7, 8]), 1)]


def test_the_heldout_key_changes_with_any_token_prompt_length_category_or_batching():
    base = HeldoutEvaluator(rows(), ["a", "b"], batch_size=2, pad_id=0).cache_key()
    assert HeldoutEvaluator(rows(), ["a", "b"], batch_size=2, pad_id=0).cache_key() == base
    changed = rows()
    changed[1] = Encoded(torch.tensor([1, 7, 9]), 1)
    shorter = rows()
    shorter[0] = Encoded(torch.tensor([1, 2, 3, 4, 5]), 3)
    assert encoded_digest(changed, ["a", "b"]) != base["rows"]
    assert encoded_digest(shorter, ["a", "b"]) != base["rows"]
    assert encoded_digest(rows(), ["a", "c"]) != base["rows"]
    assert encoded_digest(rows()[:1], ["a"]) != base["rows"]
    assert HeldoutEvaluator(rows(), ["a", "b"], batch_size=2, pad_id=0, packing=True).cache_key() != base


def test_the_model_fingerprint_follows_file_content(tiny_model_dir, tmp_path):
    from fedtune.model.base import load_model

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model = load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    cache = BaseEvalCache(tmp_path / "cache")
    first = cache.model_fingerprint(str(folder), model)
    assert cache.model_fingerprint(str(folder), model) == first
    assert list((tmp_path / "cache" / "files").iterdir())  # file hashes remembered by (path, size, mtime)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))  # same meaning, other bytes
    assert cache.model_fingerprint(str(folder), model) != first
    assert BaseEvalCache(None).model_fingerprint(str(folder), model) == cache.model_fingerprint(str(folder), model)


def test_a_damaged_or_foreign_cache_file_is_recomputed_not_a_crash(tmp_path):
    cache = BaseEvalCache(tmp_path)
    key = {"kind": "x", "rows": "r1"}
    cache.get_or_compute(key, lambda: {"loss": 1.0})
    (entry,) = tmp_path.glob("*.json")
    for damaged in ("[1, 2]", "null", '"text"', '{"result": 5}', '{"key": {"kind": "y"}, "result": 5}', "{trunc", "\udcff"):
        entry.write_bytes(damaged.encode("utf-8", "surrogateescape"))
        assert cache.get_or_compute(key, lambda: {"loss": 2.0}) == ({"loss": 2.0}, False), damaged
    entry.write_text('{"key": {"kind": "x", "rows": "r1"}, "result": [1]}')  # this key's, but not the shape asked for
    assert cache.get_or_compute(key, lambda: {"loss": 3.0}, valid=lambda r: isinstance(r, dict)) == ({"loss": 3.0}, False)
    assert cache.get_or_compute(key, lambda: {"loss": 4.0}, valid=lambda r: isinstance(r, dict)) == ({"loss": 3.0}, True)


def test_a_damaged_file_hash_memo_is_hashed_again(tiny_model_dir, tmp_path):
    from fedtune.model.base import load_model

    model = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    cache = BaseEvalCache(tmp_path / "cache")
    first = cache.model_fingerprint(str(tiny_model_dir), model)
    for memo in (tmp_path / "cache" / "files").iterdir():
        memo.write_bytes(b"\xff\xfe\x00")
    assert BaseEvalCache(tmp_path / "cache").model_fingerprint(str(tiny_model_dir), model) == first


def test_the_adapter_digest_follows_every_tensor_byte_name_and_the_lora_scaling():
    from types import SimpleNamespace

    from fedtune.evaluation.base_cache import adapter_digest

    lora = SimpleNamespace(r=2, lora_alpha=4, use_rslora=False)
    a = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.full((3, 2), 0.5)}
    same = {k: v.clone() for k, v in reversed(a.items())}  # key order does not matter
    assert adapter_digest(a, lora) == adapter_digest(same, lora)
    nudged = {**a, "x.lora_B.weight": torch.nextafter(a["x.lora_B.weight"], torch.tensor(1.0))}  # one ulp
    renamed = {"y.lora_A.weight": a["x.lora_A.weight"], "y.lora_B.weight": a["x.lora_B.weight"]}
    bf16 = {k: v.to(torch.bfloat16) for k, v in a.items()}  # same values, another dtype
    reshaped = {**a, "x.lora_A.weight": torch.ones(3, 2)}
    others = [adapter_digest(x, lora) for x in (nudged, renamed, bf16, reshaped)]
    others.append(adapter_digest(a, SimpleNamespace(r=2, lora_alpha=8, use_rslora=False)))  # twice the scaling
    others.append(adapter_digest(a, SimpleNamespace(r=2, lora_alpha=4, use_rslora=True)))
    others.append(adapter_digest(a, SimpleNamespace(r=2, lora_alpha=4, use_rslora=False, lora_dropout=0.05)))  # the lean forward
    assert len({adapter_digest(a, lora), *others}) == 1 + len(others)
