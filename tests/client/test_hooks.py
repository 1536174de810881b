import torch

from fedtune.client.hooks import LocalTerms
from fedtune.types import PROX_MU, SERVER_CONTROL
from tests.tolerance import close

CPU = torch.device("cpu")


def params(**values):
    return {k: torch.nn.Parameter(torch.tensor(v)) for k, v in values.items()}


def t(v):
    return torch.tensor(v)


def test_no_terms_for_fedavg():
    assert LocalTerms.build({"a": t([1.0])}, {}, None, CPU) is None
    assert LocalTerms.build({"a": t([1.0])}, None, None, CPU) is None


def test_fedprox_adds_mu_times_distance_to_the_global_adapter():
    p = params(a=[1.0, 3.0])
    p["a"].grad = t([0.5, 0.5])
    terms = LocalTerms.build({"a": t([0.0, 4.0])}, {PROX_MU: 0.1}, None, CPU)
    terms.apply(p)
    assert torch.allclose(p["a"].grad, t([0.5 + 0.1 * 1.0, 0.5 + 0.1 * -1.0]))  # g + mu (w - x)
    assert terms.control_delta() is None


def test_scaffold_corrects_the_gradient_and_returns_the_mean_raw_gradient_minus_c_i():
    p = params(a=[0.0, 0.0])
    c, c_i = {"a": t([1.0, 2.0])}, {"a": t([0.5, -1.0])}
    terms = LocalTerms.build({"a": t([0.0, 0.0])}, {SERVER_CONTROL: c}, c_i, CPU)
    for g in ([2.0, 0.0], [4.0, 2.0]):
        p["a"].grad = t(g)
        terms.apply(p)
        assert torch.allclose(p["a"].grad, t(g) - c_i["a"] + c["a"])  # g - c_i + c
    # c_i^+ = mean raw gradient = [3, 1];  Delta c_i = c_i^+ - c_i = [2.5, 2]
    assert torch.allclose(terms.control_delta()["a"], t([2.5, 2.0]))


def test_missing_gradient_counts_as_zero():
    p = params(a=[1.0])
    terms = LocalTerms.build({"a": t([0.0])}, {PROX_MU: 2.0, SERVER_CONTROL: {"a": t([1.0])}}, None, CPU)
    terms.apply(p)
    assert torch.allclose(p["a"].grad, t([0.0 + 1.0 + 2.0]))  # 0 - c_i(0) + c(1) + mu (w - x)(2)
    assert torch.allclose(terms.control_delta()["a"], t([0.0]))


def test_no_steps_leaves_the_client_variate_unchanged():
    terms = LocalTerms.build({"a": t([0.0])}, {SERVER_CONTROL: {"a": t([1.0])}}, {"a": t([3.0])}, CPU)
    assert torch.equal(terms.control_delta()["a"], t([0.0]))


def test_equals_the_papers_option_two_under_plain_sgd():
    # Karimireddy et al. option II: c_i^+ = c_i - c + (x - y_i) / (K lr), with plain SGD at a constant lr.
    torch.manual_seed(0)
    x = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    c, c_i = {k: torch.randn(v.shape) for k, v in x.items()}, {k: torch.randn(v.shape) for k, v in x.items()}
    targets = [{k: torch.randn(v.shape) for k, v in x.items()} for _ in range(5)]
    w = {k: torch.nn.Parameter(v.clone()) for k, v in x.items()}
    lr, opt = 0.05, torch.optim.SGD(list(w.values()), lr=0.05)
    terms = LocalTerms.build(x, {SERVER_CONTROL: c}, c_i, CPU)
    for target in targets:  # K = 5 steps on changing quadratic losses
        sum(((w[k] - target[k]) ** 2 * (1 + w[k] ** 2)).sum() for k in w).backward()
        terms.apply(w)
        opt.step()
        opt.zero_grad(set_to_none=True)
    option_two = {k: c_i[k] - c[k] + (x[k] - w[k].detach()) / (len(targets) * lr) for k in x}
    ours = {k: c_i[k] + terms.control_delta()[k] for k in x}
    assert all(close(ours[k], option_two[k], 1e-5) for k in x)  # summed gradients vs (x - y) / (K lr)
