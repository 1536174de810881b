"""LocalClients end to end on the tiny model: compressed uploads with error feedback
(bytes logged, residual kept on disk, exact resume) and heterogeneous LoRA ranks."""

import threading

from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.federation.inprocess import run
from fedtune.model.lora import load_adapter
from tests.federation.test_inprocess import StopAfter, records
from tests.federation.test_inprocess_strategies import SMALL, assert_same_run


def fits(run_dir):
    return records(run_dir, "fit")


def test_int8_upload_is_about_four_times_smaller_and_keeps_a_residual(tiny_overrides, tmp_path):
    plain = run(load_config(None, tiny_overrides + SMALL + [f"output.dir={tmp_path / 'plain'}"]))
    int8 = run(load_config(None, tiny_overrides + SMALL + ["compression.method=int8", f"output.dir={tmp_path / 'int8'}"]))

    dense = [f["upload_bytes"] for f in fits(plain.run_dir)]
    small = [f["upload_bytes"] for f in fits(int8.run_dir)]
    assert all(f["upload_bytes"] == f["upload_bytes_fp32"] for f in fits(plain.run_dir))
    assert all(3.5 < d / s < 4.0 for d, s in zip(dense, small))  # 1 byte per value + a bf16 scale per 64
    residual = load_file(str(sorted((int8.run_dir / "client_state" / "client_00000").glob("*.safetensors"))[-1]))
    assert residual and all(k.startswith("residual/") for k in residual)
    assert 0 < max(v.abs().max().item() for v in residual.values()) < 1e-3  # what int8 dropped: small, not zero
    a, _ = load_adapter(plain.run_dir / "adapter")
    b, _ = load_adapter(int8.run_dir / "adapter")
    assert sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 < 0.05 * sum(a[k].norm() ** 2 for k in a) ** 0.5


def test_topk_with_error_feedback_resumes_exactly(tiny_overrides, tmp_path):
    base = tiny_overrides + SMALL + ["federation.rounds=3", "compression.method=topk", "compression.topk_fraction=0.05"]
    straight = run(load_config(None, base + [f"output.dir={tmp_path / 'straight'}"]))
    cut = load_config(None, base + [f"output.dir={tmp_path / 'cut'}"])
    stop = threading.Event()
    assert run(cut, progress=StopAfter(stop, 2), stop=stop).rounds_done == 2
    run(cut, resume=True)
    assert_same_run(straight.run_dir, tmp_path / "cut")
    ratio = [f["upload_bytes_fp32"] / f["upload_bytes"] for f in fits(straight.run_dir)]
    assert all(12 < r < 14 for r in ratio)  # 5% of entries at 6 bytes (bf16 value + int32 index) vs 4 bytes each


def test_clients_of_lower_rank_train_only_their_slices(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + SMALL + ["lora.r=4", "lora.client_ranks=[1, 4]", "seed=3",
                                                      "federation.rounds=1", f"output.dir={tmp_path / 'het'}"])
    result = run(cfg)
    assert [f["rank"] for f in fits(result.run_dir)] == [1, 1, 4]  # drawn per client from (seed, "ranks")
    adapter, _ = load_adapter(result.run_dir / "adapter")
    a = next(v for k, v in adapter.items() if "lora_A" in k)  # (r, in)
    b = next(v for k, v in adapter.items() if "lora_B" in k)  # (out, r)
    assert a.shape[0] == 4 and b.shape[1] == 4
    assert all(b[:, j].abs().sum() > 0 for j in range(4))  # slices 1..3 came from the rank-4 clients alone
