"""ViTAS supernet training strategy: identity-probability calibration into the FLOPs window, one
deterministic random sub-network per step, gradients only in the sampled slices, evaluation
configs on EMA copies, JSON state and the resume check, argument validation."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace, sample_subnet, subnet_flops
from asvit_kernels.search.evolution import calibrate_identity_prob
from asvit_kernels.train.strategy import Strategy
from asvit_kernels.train.vitas import SupernetTraining, smallest_config

SPACE = SubnetSpace.tiny()
IMG, CLASSES = 32, 10
# The tiny space at 32x32 spans 9.0e4 (smallest) .. 1.27e6 (largest) MACs; uniform depth averages
# ~3.4e5, so this window needs a high identity probability (~0.87).
WINDOW = (1.9e5, 2.5e5)


def supernet(sharing="first", private_qk=True, seed=0) -> ElasticViT:
    torch.manual_seed(seed)
    return ElasticViT(SPACE, img_size=IMG, num_classes=CLASSES, sharing=sharing, private_qk=private_qk)


def fake_trainer(model, seed=0):
    records = []
    return SimpleNamespace(model=model, emas=[SimpleNamespace(module=copy.deepcopy(model))],
                           config=SimpleNamespace(seed=seed, epochs=2), log=records.append,
                           device=torch.device("cpu"), records=records)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def started(model=None, **kw):
    s = SupernetTraining(**kw)
    t = fake_trainer(supernet() if model is None else model)
    s.on_train_start(t, resumed=False)
    return s, t


# ----------------------------------------------------------------------------- calibration


def test_calibrated_p_identity_puts_mean_flops_in_window():
    s, t = started(flops_range=WINDOW, calibration_samples=128)
    expected = calibrate_identity_prob(SPACE, IMG, WINDOW, samples=128, seed=0, num_classes=CLASSES, in_chans=3)
    assert s.p_identity == expected and 0 < expected < 1
    g = gen(1)
    flops = [subnet_flops(sample_subnet(g, SPACE, s.p_identity), IMG, num_classes=CLASSES) for _ in range(400)]
    mean = sum(flops) / len(flops)
    assert WINDOW[0] <= mean <= WINDOW[1]
    # Uniform depth would miss the window: the calibration is what brings the mean into it.
    g = gen(1)
    uniform = sum(subnet_flops(sample_subnet(g, SPACE), IMG, num_classes=CLASSES) for _ in range(400)) / 400
    assert uniform > WINDOW[1]


def test_p_identity_given_or_uniform():
    s, _ = started(p_identity=0.25, flops_range=WINDOW)
    assert s.p_identity == 0.25 and s.describe()["depth_sampling"] == "binomial"
    s, t = started()
    assert s.p_identity is None and s.describe()["depth_sampling"] == "uniform"
    s.on_epoch_start(t, 0)
    for step in range(120):
        s.before_step(t, 0, step, gen(step))
    assert set(s.describe()["depth_hist"]) == {str(d) for d in SPACE.depths}


def test_calibration_uses_the_trainer_seed():
    a, _ = started(flops_range=WINDOW, calibration_samples=32)
    b = SupernetTraining(flops_range=WINDOW, calibration_samples=32)
    b.on_train_start(fake_trainer(supernet(), seed=7), resumed=False)
    assert b.p_identity == calibrate_identity_prob(SPACE, IMG, WINDOW, samples=32, seed=7, num_classes=CLASSES)


# ----------------------------------------------------------------------------- sampling


def test_before_step_is_deterministic_and_selects_the_sample():
    s, t = started(flops_range=WINDOW, calibration_samples=64)
    cfgs = []
    for step in range(6):
        assert s.before_step(t, 0, step, gen(100 + step)) is None  # the supernet's own input size
        cfgs.append(t.model.config)
        assert t.model.config == sample_subnet(gen(100 + step), SPACE, s.p_identity)
    again = SupernetTraining(flops_range=WINDOW, calibration_samples=64)
    t2 = fake_trainer(supernet(seed=3))
    again.on_train_start(t2, resumed=False)
    for step in range(6):
        again.before_step(t2, 0, step, gen(100 + step))
        assert t2.model.config == cfgs[step]
    assert len(set(cfgs)) > 1


def test_epoch_accounting_and_log():
    s, t = started(p_identity=0.5)
    for epoch in range(2):
        s.on_epoch_start(t, epoch)
        cfgs = []
        for step in range(5):
            s.before_step(t, epoch, step, gen(10 * epoch + step))
            cfgs.append(t.model.config)
        s.on_epoch_end(t, epoch)
        rec = t.records[-1]
        json.dumps(rec)
        assert rec["epoch"] == epoch and rec["vitas_steps"] == 5 and rec["p_identity"] == 0.5
        assert rec["vitas_mean_flops"] == pytest.approx(sum(t.model.subnet_flops(c) for c in cfgs) / 5)
        assert rec["vitas_mean_depth"] == pytest.approx(sum(c.depth for c in cfgs) / 5)
        assert sum(rec["vitas_depth_hist"].values()) == 5 and sum(rec["vitas_patch_hist"].values()) == 5
    assert len(t.records) == 2  # per epoch, reset at each epoch start
    s.on_epoch_start(t, 2)
    s.on_epoch_end(t, 2)  # no step this epoch: nothing logged
    assert len(t.records) == 2
    d = s.describe()
    json.dumps(d)
    assert d["strategy"] == "vitas" and d["epoch_steps"] == 0


@pytest.mark.parametrize("sharing", ["first", "last", "cyclic"])
def test_only_the_sampled_slices_get_gradients(sharing):
    model = supernet(sharing=sharing)
    s, t = started(model, p_identity=0.6)
    step = next(i for i in range(100) if sample_subnet(gen(i), SPACE, 0.6).depth < SPACE.num_slots)
    s.before_step(t, 0, step, gen(step))
    cfg = model.config
    x, y = torch.randn(2, 3, IMG, IMG), torch.tensor([1, 2])
    F.cross_entropy(model(x), y).backward()
    used = {id(p): torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    for sl in model._slices(cfg):
        full = [torch.arange(n) if i is None else i for n, i in zip(sl.src.shape, sl.index)]
        used[id(sl.src)][torch.meshgrid(*full, indexing="ij")] = True
    touched = 0
    for name, p in model.named_parameters():
        mask = used[id(p)]
        if not mask.any():
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        assert not p.grad[~mask].any(), name  # no gradient outside the sub-network's channels
        touched += int(p.grad[mask].ne(0).any())
    assert touched > 0
    for l in range(cfg.depth, SPACE.num_slots):  # identity slots: untouched
        assert all(p.grad is None for p in model.blocks[l].parameters())
    other = [p for p in SPACE.patch_sizes if p != cfg.patch_size]
    assert all(model.patch_embed[str(p)].weight.grad is None for p in other)


# ----------------------------------------------------------------------------- evaluation


def test_prepare_eval_sets_the_eval_config_on_an_ema_copy():
    s, t = started()
    s.before_step(t, 0, 0, gen(0))
    sampled, ema = t.model.config, t.emas[0].module
    s.prepare_eval(ema)
    assert ema.config == SPACE.largest() and t.model.config == sampled
    s.prepare_eval(t.model)
    assert t.model.config == SPACE.largest()

    small, t2 = started(eval_config="smallest")
    small.prepare_eval(t2.emas[0].module)
    cfg = t2.emas[0].module.config
    assert cfg == smallest_config(SPACE) and cfg.depth == min(SPACE.depths)
    assert cfg.patch_size == max(SPACE.patch_sizes) and cfg.embed_dim == min(SPACE.embed_dims)

    given = SubnetConfig(8, 36, (3, 4), (24, 32), (96, 48))
    g, t3 = started(eval_config=given)
    g.prepare_eval(t3.emas[0].module)
    assert t3.emas[0].module.config == given
    with pytest.raises(TypeError, match="module"):
        g.prepare_eval(torch.nn.Linear(2, 2))


def test_eval_config_outside_the_space():
    s = SupernetTraining(eval_config=SubnetConfig(8, 40, (2,), (16,), (32,)))
    with pytest.raises(ValueError, match="eval_config"):
        s.on_train_start(fake_trainer(supernet()), resumed=False)


# ----------------------------------------------------------------------------- state


def test_state_round_trip_and_resume_check():
    s, _ = started(flops_range=WINDOW, calibration_samples=64)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["p_identity"] == s.p_identity

    resumed = SupernetTraining(flops_range=WINDOW, calibration_samples=64)
    resumed.load_state_dict(state)
    resumed.on_train_start(fake_trainer(supernet()), resumed=True)
    assert resumed.p_identity == s.p_identity and resumed.state_dict() == state

    for kw in ({"flops_range": (2.4e5, 3.0e5), "calibration_samples": 64},  # another window
               {"flops_range": WINDOW, "p_identity": 0.3},  # explicit p
               {}):  # uniform depth
        other = SupernetTraining(**kw)
        other.load_state_dict(state)
        with pytest.raises(ValueError, match="p_identity"):
            other.on_train_start(fake_trainer(supernet()), resumed=True)

    with pytest.raises(ValueError, match="keys"):
        SupernetTraining().load_state_dict({"stage": 1})


# ----------------------------------------------------------------------------- validation


def test_argument_validation():
    s = SupernetTraining()
    assert isinstance(s, Strategy) and s.name == "vitas" and s.find_unused_parameters
    with pytest.raises(ValueError, match="p_identity"):
        SupernetTraining(p_identity=1.5)
    with pytest.raises(TypeError, match="p_identity"):
        SupernetTraining(p_identity="0.5")
    with pytest.raises(ValueError, match="flops_range"):
        SupernetTraining(flops_range=(3e5, 2e5))
    with pytest.raises(TypeError, match="flops_range"):
        SupernetTraining(flops_range=3e5)
    with pytest.raises(ValueError, match="eval_config"):
        SupernetTraining(eval_config="medium")
    with pytest.raises(TypeError, match="eval_config"):
        SupernetTraining(eval_config=3)
    with pytest.raises(ValueError, match="calibration_samples"):
        SupernetTraining(calibration_samples=0)
    with pytest.raises(TypeError, match="model"):
        s.on_train_start(fake_trainer(torch.nn.Linear(2, 2)), resumed=False)
    with pytest.raises(RuntimeError, match="on_train_start"):
        SupernetTraining().before_step(fake_trainer(supernet()), 0, 0, gen(0))
    with pytest.raises(ValueError, match="flops_range"):  # a window no p_identity can reach
        SupernetTraining(flops_range=(1e9, 2e9)).on_train_start(fake_trainer(supernet()), resumed=False)


# ----------------------------------------------------------------------------- through the trainer


def _digits(n_train=128, n_val=64):
    data_mod = pytest.importorskip("asvit_kernels.train.data")
    pytest.importorskip("sklearn")
    data = data_mod.open_dataset("digits")
    assert data.image_size == IMG
    return data._replace(train=torch.utils.data.Subset(data.train, range(n_train)),
                         val=torch.utils.data.Subset(data.val, range(n_val)))


def _train_config(**kw):
    from asvit_kernels.train.trainer import TrainConfig
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0, "num_workers": 0,
                          "log_every": 2, "eval_batches": 1, "ema_decays": (0.9,), "amp": "off",
                          "progress": False, **kw})


@pytest.mark.parametrize("sharing", ["first", "last", "cyclic"])
def test_trainer_end_to_end(sharing, one_thread):
    from asvit_kernels.train.trainer import Trainer
    data = _digits()
    model = supernet(sharing=sharing)
    strategy = SupernetTraining(flops_range=WINDOW, calibration_samples=32, eval_config="largest")
    trainer = Trainer(model, data, _train_config(), strategy=strategy, device="cpu")
    out = trainer.fit()
    assert out["status"] == "finished" and out["epoch"] == 2
    epochs = out["epochs"]
    assert len(epochs) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
                                    and math.isfinite(r["val_loss_ema"]) for r in epochs)
    vitas = [r for r in trainer.history if "vitas_mean_flops" in r]
    assert [r["epoch"] for r in vitas] == [0, 1]
    assert all(r["vitas_steps"] == trainer.steps_per_epoch and r["p_identity"] == strategy.p_identity for r in vitas)
    # evaluated as the largest sub-network (the EMA copy too), trained on random ones
    assert trainer.emas[-1].module.config == SPACE.largest()
    assert out["strategy"]["sharing"] == sharing


def test_trainer_resume_checks_the_identity_probability(tmp_path, one_thread):
    from asvit_kernels.train.trainer import Trainer
    data = _digits(n_train=64, n_val=32)

    def trainer(window):
        strategy = SupernetTraining(flops_range=window, calibration_samples=32)
        return Trainer(supernet(sharing="cyclic"), data, _train_config(), strategy=strategy, run_dir=tmp_path,
                       device="cpu"), strategy

    first, s1 = trainer(WINDOW)
    assert first.fit(max_epochs_this_call=1)["status"] == "paused"
    with pytest.raises(ValueError, match="p_identity"):
        trainer((2.4e5, 3.0e5))[0].fit()
    again, s2 = trainer(WINDOW)
    out = again.fit()
    assert out["status"] == "finished" and s2.p_identity == s1.p_identity
    assert math.isfinite(out["epochs"][-1]["train_loss"])
