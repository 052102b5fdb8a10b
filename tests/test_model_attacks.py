"""Tests for fedepic.attacks.model_attacks against the papers' formulas on hand-made vectors."""

import math

import pytest
import torch

from fedepic.attacks.model_attacks import (
    alie,
    alie_z,
    apply_model_attack,
    gaussian,
    ipm,
    minmax,
    model_attack_arguments,
    scaling,
    sign_flip,
)
from fedepic.config import load_config
from fedepic.extensions import MODEL_ATTACKS

HONEST = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]])
OWN = torch.tensor([1.0, -2.0, 0.5])


def test_sign_flip_and_scaling():
    assert torch.equal(sign_flip(HONEST, OWN), -OWN)
    assert torch.equal(sign_flip(HONEST, OWN, scale=3.0), -3.0 * OWN)
    assert torch.equal(scaling(HONEST, OWN, factor=10.0), 10.0 * OWN)
    assert torch.equal(scaling(HONEST, OWN, factor=2.5), 2.5 * OWN)


def test_gaussian_seeded_and_scaled():
    a = gaussian(HONEST, OWN, torch.Generator().manual_seed(0), sigma=2.0)
    b = gaussian(HONEST, OWN, torch.Generator().manual_seed(0), sigma=2.0)
    c = gaussian(HONEST, OWN, torch.Generator().manual_seed(1), sigma=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = 2.0 * torch.randn(3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, expected)
    big = gaussian(torch.zeros(1, 20000), torch.zeros(20000), torch.Generator().manual_seed(0), sigma=0.5)
    assert float(big.std()) == pytest.approx(0.5, rel=0.03)
    with pytest.raises(ValueError, match="sigma"):
        gaussian(HONEST, OWN, None, sigma=-1.0)


def test_alie_z_paper_formula():
    # n=10, f=2: s = floor(6) - 2 = 4, z = Phi^-1(6/10)
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    # n=50, f=12: s = 26 - 12 = 14, z = Phi^-1(36/50)
    assert alie_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)
    with pytest.raises(ValueError, match="alie"):
        alie_z(5, 0)


def test_alie_mean_minus_z_std():
    mu = HONEST.mean(dim=0)
    sd = HONEST.std(dim=0)  # unbiased, as documented
    z = alie_z(4, 1)  # default n = m + f = 3 + 1; s = 3 - 1 = 2; z = Phi^-1(0.5) = 0
    assert z == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(alie(HONEST, OWN, None, f=1, n=None, z=None), mu - z * sd)
    assert torch.allclose(alie(HONEST, OWN, None, f=2, n=10, z=None), mu - alie_z(10, 2) * sd)
    assert torch.allclose(alie(HONEST, OWN, None, f=1, n=None, z=1.5), mu - 1.5 * sd)
    with pytest.raises(ValueError, match="at least 2"):
        alie(HONEST[:1], OWN, None, f=1, n=None, z=None)


def test_ipm():
    assert torch.allclose(ipm(HONEST, OWN, epsilon=0.1), -0.1 * HONEST.mean(dim=0))
    assert torch.allclose(ipm(HONEST, OWN, epsilon=2.0), -2.0 * HONEST.mean(dim=0))


def _max_dist(mal, honest):
    return float((honest - mal).norm(dim=1).max())


def test_minmax_hits_the_distance_budget():
    honest = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.2]])
    budget = float(torch.cdist(honest, honest).max())
    mu, p = honest.mean(dim=0), -honest.std(dim=0)
    mal = minmax(honest, torch.zeros(2))
    gamma = float((mal - mu).norm() / p.norm())
    assert torch.allclose(mal, mu + gamma * p, atol=1e-6)
    assert _max_dist(mal, honest) <= budget + 1e-6
    # gamma is maximal: a slightly larger step breaks the constraint
    assert _max_dist(mu + (gamma + 1e-3) * p, honest) > budget
    # gamma is the exact optimum: the constraint is tight
    assert _max_dist(mal, honest) == pytest.approx(budget, abs=1e-5)


@pytest.mark.parametrize("kind", ["unit_vec", "sign"])
def test_minmax_other_perturbations(kind):
    mal = minmax(HONEST, OWN, perturbation=kind)
    budget = float(torch.cdist(HONEST, HONEST).max())
    assert _max_dist(mal, HONEST) == pytest.approx(budget, abs=1e-5)
    mu = HONEST.mean(dim=0)
    direction = -mu / mu.norm() if kind == "unit_vec" else -torch.sign(mu)
    step = mal - mu
    assert torch.allclose(step / step.norm(), direction / direction.norm(), atol=1e-5)


def test_minmax_identical_honest_updates():
    honest = torch.ones(3, 4)
    assert torch.allclose(minmax(honest, torch.zeros(4)), torch.ones(4))


def test_registry_and_errors():
    assert set(MODEL_ATTACKS.names()) >= {"sign_flip", "gaussian", "scaling", "alie", "ipm", "minmax"}
    out = apply_model_attack("scaling", HONEST, OWN, None, factor=3.0)
    assert torch.equal(out, 3.0 * OWN)
    assert torch.equal(apply_model_attack("none", HONEST, OWN), OWN)
    with pytest.raises(ValueError, match="unknown model attack 'lie'; choose one of none, sign_flip"):
        apply_model_attack("lie", HONEST, OWN)
    with pytest.raises(ValueError, match="bad parameters"):
        apply_model_attack("ipm", HONEST, OWN, None, eps=1.0)
    with pytest.raises(ValueError, match="shape"):
        apply_model_attack("sign_flip", HONEST, torch.zeros(2))


def test_all_attacks_shape_and_finite():
    """Every registered attack, with the arguments the config gives it (schema defaults)."""
    gen = torch.Generator().manual_seed(0)
    for name in MODEL_ATTACKS.names():
        cfg = load_config(None, [f"attack.model={name}"])
        out = apply_model_attack(name, HONEST, OWN, gen, **model_attack_arguments(cfg, n=5, f=2))
        assert out.shape == OWN.shape and bool(torch.isfinite(out).all()), name
        assert not math.isnan(float(out.sum()))


def test_column_std_matches_torch():
    from fedepic.attacks.model_attacks import column_std

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(column_std(x), x.std(dim=0), atol=1e-6)


def test_config_binds_each_attacks_parameters_by_signature():
    cfg = load_config(None, ["attack.model=alie", "attack.alie_z=1.5"])
    assert model_attack_arguments(cfg, n=12, f=2) == {"f": 2, "n": 12, "z": 1.5}
    cfg = load_config(None, ["attack.model=gaussian", "attack.sigma=0.25"])
    assert model_attack_arguments(cfg, n=12, f=2) == {"sigma": 0.25}
    assert model_attack_arguments(load_config(None, ["attack.model=ipm"])) == {"epsilon": cfg.attack.ipm_eps}


def _cnn_states():
    from fedepic.config import load_config
    from fedepic.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("cnn", 10, 1, 28, [0.1307], [0.3081])
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k: v + 0.01 if k not in ("mean", "std") else v.clone() for k, v in global_state.items()}
    return model, global_state, trained, load_config


@pytest.mark.parametrize("attack", ["gaussian", "sign_flip", "scaling"])
def test_server_mode_client_attacks_leave_buffers_alone(attack):
    """The issue's defect: attack.model=gaussian on the cnn turned its std buffer 0.219 into -0.531, and
    FedAvg averaged it into the global model. Attacks act on the parameters only."""
    from fedepic.client_work import _attacked

    model, global_state, trained, load_config = _cnn_states()
    cfg = load_config(None, ["mode=federated", f"attack.model={attack}", "model.name=cnn"])
    from fedepic.vectors import parameter_mask

    attacked, _ = _attacked(cfg, global_state, trained, seed=3, mask=parameter_mask(model, trained))
    for key in ("mean", "std"):
        assert torch.equal(attacked[key], trained[key]), key
    assert any(not torch.equal(attacked[n], trained[n]) for n, _ in model.named_parameters())


def test_the_server_side_injection_leaves_buffers_alone():
    from fedepic.vectors import flatten_state, parameter_mask
    from fedepic.server_rounds import inject_model_attack

    model, global_state, trained, load_config = _cnn_states()
    cfg = load_config(None, ["mode=federated", "attack.model=alie", "model.name=cnn"])
    base = flatten_state(global_state)
    stack = torch.stack([flatten_state(trained) + 0.001 * k for k in range(4)])
    mask = parameter_mask(model, global_state)
    assert 0 < int((~mask).sum()) < mask.numel()
    out = inject_model_attack(cfg, [False, False, False, True], stack, base, seed=0, mask=mask)
    assert torch.equal(out.update[~mask], stack[3][~mask])  # the buffers are the malicious reply's own
    assert not torch.equal(out.update[mask], stack[3][mask])
