"""AutoProg: stage bounds, the manual schedule, MoGrow from the slowest EMA at stage changes, the
growth-schedule search (candidates, the power-law fit, the winner), JSON state and resume, and
end-to-end runs through the Trainer."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.growth import new_layer_sources
from asvit_kernels.train import autoprog
from asvit_kernels.train.autoprog import (AutoProg, config_for_depth, elastic_vit_for_autoprog, fit_power_law,
                                          manual_depths, manual_sizes, search_candidates, select_candidate,
                                          stage_bounds)
from asvit_kernels.train.ema import EmaModel


def tiny_model(depth=6, seed=0) -> ElasticViT:
    torch.manual_seed(seed)
    return elastic_vit_for_autoprog(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2,
                                    mlp_ratio=2.0, num_classes=10)


class FakeTrainer:
    """The attributes a strategy may use (strategy.py), with real EMA copies; counts resets."""

    def __init__(self, model, epochs, decays=(0.9, 0.99), steps_per_epoch=6):
        from types import SimpleNamespace
        self.model = model
        self.emas = [EmaModel(model, d) for d in decays]
        self.config = SimpleNamespace(epochs=epochs, ema_decays=tuple(decays), seed=0, batch_size=4)
        self.device = torch.device("cpu")
        self.epoch, self.steps_per_epoch = 0, steps_per_epoch
        # The Trainer has no reset_emas (AutoProg grows every EMA copy from itself): this fake has
        # none either, so a strategy calling one fails with AttributeError; ema_resets stays 0.
        self.optimizer_resets = self.ema_resets = 0
        self.records = []
        g = torch.Generator().manual_seed(1)
        self.val = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(10, (4,), generator=g)) for _ in range(3)]

    def reset_optimizer(self):
        self.optimizer_resets += 1

    def val_batches(self, limit=None):
        yield from self.val[:limit]

    def resize(self, images, size):
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    def log(self, record):
        json.dumps(record)  # records must be JSON
        self.records.append(dict(record))


@torch.no_grad()
def fake_steps(trainer, strategy, epoch, steps=None):
    """What the trainer's loop does around the strategy, a "step" being a random weight change."""
    for k in range(trainer.steps_per_epoch if steps is None else steps):
        gen = torch.Generator().manual_seed(1000 * epoch + k)
        size = strategy.before_step(trainer, epoch, k, gen)
        assert size is not None
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
        for e in trainer.emas:
            e.update(trainer.model)
        strategy.after_step(trainer, epoch, k, float("nan"))


def run_epoch(trainer, strategy, epoch):
    strategy.on_epoch_start(trainer, epoch)
    fake_steps(trainer, strategy, epoch)
    strategy.on_epoch_end(trainer, epoch)
    trainer.epoch = epoch + 1


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("epochs,stages,expected", [
    (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    (10, 4, [(0, 3), (3, 5), (5, 8), (8, 10)]),  # 2.5 and 7.5 round up
    (300, 4, [(0, 75), (75, 150), (150, 225), (225, 300)]),
    (7, 3, [(0, 2), (2, 5), (5, 7)]),
    (5, 1, [(0, 5)]),
    (2, 4, [(0, 1), (1, 1), (1, 2), (2, 2)]),  # fewer epochs than stages: empty stages
    (1, 4, [(0, 0), (0, 1), (1, 1), (1, 1)]),
])
def test_stage_bounds(epochs, stages, expected):
    b = stage_bounds(epochs, stages)
    assert b == expected
    assert b[0][0] == 0 and b[-1][1] == epochs and all(x[1] == y[0] for x, y in zip(b, b[1:]))


def test_stage_bounds_validates():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="epochs"):
            stage_bounds(bad, 4)
        with pytest.raises(ValueError, match="stages"):
            stage_bounds(4, bad)


def test_manual_sizes_and_depths():
    assert manual_sizes(224, 4) == [128, 160, 192, 224]
    assert manual_depths(12, 4) == [6, 8, 10, 12]
    assert manual_depths(18, 4) == [9, 12, 15, 18]
    assert manual_sizes(224, 4, 16) == [112, 144, 192, 224]  # 149.3 -> 144, 186.7 -> 192
    assert manual_sizes(32, 4, 8) == [16, 24, 24, 32]
    assert manual_sizes(32, 4) == [32, 32, 32, 32]  # at least one multiple
    assert manual_sizes(224, 1) == [224] and manual_depths(12, 1) == [12]
    assert manual_depths(2, 4) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="size_multiple"):
        manual_sizes(200, 4, 32)


def test_drop_path_scale_rises_per_stage():
    s = AutoProg(max_size=224, max_depth=12, search=False)
    assert [s.drop_path_scale(e, 8) for e in range(8)] == pytest.approx(
        [0.5, 0.5, 2 / 3, 2 / 3, 5 / 6, 5 / 6, 1.0, 1.0])
    s = AutoProg(max_size=224, max_depth=12, search=False, reg_scale=(0.0, 0.3), stages=2)
    assert [s.drop_path_scale(e, 4) for e in range(4)] == pytest.approx([0.0, 0.0, 0.3, 0.3])


def test_constructor_validates_its_arguments():
    ok = dict(max_size=224, max_depth=12)
    cases = [(dict(max_size=0), "max_size"), (dict(max_depth=1.5), "max_depth"), (dict(stages=0), "stages"),
             (dict(size_multiple=0), "size_multiple"), (dict(size_multiple=48), "size_multiple"),
             (dict(sizes=[128, 160]), "sizes"), (dict(sizes=[128, 160, 0, 224]), "sizes"),
             (dict(search=False, depths=[6, 5, 8, 12]), "non-decreasing"),
             (dict(search=False, depths=[6, 8, 10, 13]), "max_depth"), (dict(depths=[6, 8, 10, 12]), "depths"),
             (dict(search_epochs=0), "search_epochs"), (dict(eval_batches=0), "eval_batches"),
             (dict(reg_scale=(1.0,)), "reg_scale"), (dict(reg_scale=(-1.0, 1.0)), "reg_scale")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            AutoProg(**{**ok, **kw})
    with pytest.raises(TypeError, match="search"):
        AutoProg(**ok, search=1)
    with pytest.raises(TypeError, match="sizes"):
        AutoProg(**ok, sizes="128")


def test_train_start_validates_against_the_model():
    model = tiny_model()
    t = FakeTrainer(model, 4)
    with pytest.raises(ValueError, match="max_depth"):
        AutoProg(max_size=32, max_depth=7).on_train_start(t, resumed=False)
    with pytest.raises(ValueError, match="patch size"):
        AutoProg(max_size=36, max_depth=6, size_multiple=4).on_train_start(t, resumed=False)
    with pytest.raises(ValueError, match="patch size"):
        AutoProg(max_size=32, max_depth=6, sizes=[12, 16, 24, 32]).on_train_start(t, resumed=False)
    with pytest.raises(TypeError, match="ElasticViT"):
        AutoProg(max_size=32, max_depth=6).on_train_start(FakeTrainer(torch.nn.Linear(2, 2), 4), resumed=False)
    s = AutoProg(max_size=32, max_depth=6)
    s.on_train_start(t, resumed=False)
    assert s.size_multiple == 32  # the default: 32 when it fits the patch and max_size
    s = AutoProg(max_size=24, max_depth=6)
    s.on_train_start(t, resumed=False)
    assert s.size_multiple == 8  # else the patch size


def test_elastic_vit_for_autoprog_is_elastic_in_depth_only():
    m = tiny_model(depth=5)
    s = m.space
    assert (s.patch_sizes, s.embed_dims, s.heads, s.qkv_dims, s.mlp_dims) == ((8,), (16,), (2,), (16,), (32,))
    assert s.depths == (1, 2, 3, 4, 5)
    cfg = config_for_depth(m, 3)
    assert cfg.depth == 3 and cfg.embed_dim == 16 and cfg.mlp_dim == (32,) * 3
    assert m.set_subnet(cfg) == cfg
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(m, 6)
    with pytest.raises(ValueError, match="num_heads"):
        elastic_vit_for_autoprog(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=3, num_classes=10)
    assert elastic_vit_for_autoprog(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                                    drop_path_rate=0.1).drop_path_rate == 0.1


# ------------------------------------------------------------------------------- manual schedule, MoGrow


def test_manual_schedule_mogrow_from_the_slowest_ema():
    model = tiny_model()
    t = FakeTrainer(model, epochs=4)
    s = AutoProg(max_size=32, max_depth=6, search=False, size_multiple=8, depths=[2, 3, 3, 6])
    s.on_train_start(t, resumed=False)
    assert s.sizes == [16, 24, 24, 32] and s.depths == [2, 3, 3, 6]
    before = state_of(model)
    s.on_epoch_start(t, 0)  # the first stage: no growth, no reset, only the sub-network
    assert model.config.depth == 2 and s.input_size() == 16
    assert s.describe() == {"strategy": "autoprog", "stage": 0, "size": 16, "depth": 2, "searching": False}
    assert t.optimizer_resets == t.ema_resets == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fake_steps(t, s, 0)
    s.on_epoch_end(t, 0)

    for epoch, old, new in ((1, 2, 3), (3, 3, 6)):
        if epoch == 3:
            s.on_epoch_start(t, 2)  # same depth: only the optimizer is reset
            assert t.optimizer_resets == 2 and t.ema_resets == 0
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_of(model).items())
            fake_steps(t, s, 2)
        emas = [state_of(e.module) for e in t.emas]
        mine = state_of(model)
        assert any(not torch.equal(emas[-1][k], mine[k]) for k in mine)  # the EMA differs from the model
        resets = t.optimizer_resets
        s.on_epoch_start(t, epoch)
        srcs = new_layer_sources(old, new)
        # The model grows from the slowest EMA; each EMA copy from its own previous self.
        for grown, before in [(model, emas[-1])] + [(e.module, b) for e, b in zip(t.emas, emas)]:
            for name, v in grown.state_dict().items():
                if not name.startswith("blocks."):
                    assert torch.equal(v, before[name]), name  # non-block parameters: the source's
                    continue
                _, slot, rest = name.split(".", 2)
                slot = int(slot)
                if slot < new:  # old layers included: every active slot is a copy of a source slot
                    assert torch.equal(v, before[f"blocks.{srcs[slot]}.{rest}"]), name
                elif grown is not model:
                    assert torch.equal(v, before[name]), name
                else:
                    assert torch.equal(v, mine[name]), name
        assert t.optimizer_resets == resets + 1 and t.ema_resets == 0
        assert model.config.depth == new and s.input_size() == s.sizes[epoch]
        rec = [r for r in t.records if r.get("event") == "autoprog_stage"][-1]
        assert rec["grown"] == [old, new] and "0.99" in rec["grown_from"]
        fake_steps(t, s, epoch)
        s.on_epoch_end(t, epoch)
    assert [c["depth"] for c in s.state_dict()["chosen"]] == [2, 3, 3, 6]


def test_mogrow_without_ema_grows_from_the_model():
    model = tiny_model()
    t = FakeTrainer(model, epochs=2, decays=())
    s = AutoProg(max_size=32, max_depth=6, search=False, stages=2, size_multiple=8)
    s.on_train_start(t, resumed=False)
    run_epoch(t, s, 0)
    mine = state_of(model)
    s.on_epoch_start(t, 1)
    srcs = new_layer_sources(3, 6)
    assert torch.equal(model.blocks[5].mlp["fc1"].weight, mine[f"blocks.{srcs[5]}.mlp.fc1.weight"])
    assert "no EMA" in t.records[-1]["grown_from"]


def test_on_epoch_start_is_idempotent_and_before_step_reselects():
    model = tiny_model()
    t = FakeTrainer(model, epochs=4)
    s = AutoProg(max_size=32, max_depth=6, search=False, size_multiple=8)
    s.on_train_start(t, resumed=False)
    run_epoch(t, s, 0)
    s.on_epoch_start(t, 1)
    snap, resets = state_of(model), t.optimizer_resets
    s.on_epoch_start(t, 1)  # a mid-epoch resume calls it again
    assert t.optimizer_resets == resets and all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    model.set_subnet(model.space.largest())  # e.g. someone evaluated another sub-network
    assert s.before_step(t, 1, 0, torch.Generator()) == 24 and model.config.depth == 4
    ema = t.emas[-1].module
    s.prepare_eval(ema)
    assert ema.config.depth == 4


# ------------------------------------------------------------------------------- search


def test_search_candidates():
    manual = [128, 160, 192, 224]
    kw = dict(max_size=224, max_depth=18, size_multiple=32, sizes=manual, depths=[9, 12, 15, 18])
    assert search_candidates(**kw) == [(r, l) for r in (128, 192, 224) for l in (9, 15, 18)]
    assert search_candidates(**kw, current=(128, 9)) == [(r, l) for r in (128, 160) for l in (12, 15, 18)]
    assert search_candidates(**kw, current=(192, 16)) == [(r, l) for r in (192, 224) for l in (18,)]
    assert search_candidates(**kw, current=(224, 18)) == [(224, 18)]
    assert search_candidates(max_size=224, max_depth=12, size_multiple=32, sizes=manual, depths=[6, 8, 10, 12]) == \
        [(r, l) for r in (128, 192, 224) for l in (6, 10, 12)]
    assert search_candidates(max_size=32, max_depth=6, size_multiple=8, sizes=[16, 24, 24, 32],
                             depths=[3, 4, 5, 6]) == [(r, l) for r in (16, 24, 32) for l in (3, 5, 6)]
    assert search_candidates(max_size=32, max_depth=6, size_multiple=8, sizes=[16, 24, 24, 32],
                             depths=[3, 4, 5, 6], current=(16, 3)) == [(r, l) for r in (16, 24) for l in (4, 5, 6)]


def test_fit_power_law_recovers_c_and_a():
    t = np.array([0.1, 0.2, 0.35, 0.5, 0.9])
    c, a = fit_power_law(t, 3.0 * t ** -0.7)
    assert c == pytest.approx(3.0) and a == pytest.approx(-0.7)
    c, a = fit_power_law([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert c == pytest.approx(1.0) and a == pytest.approx(1.0)
    assert fit_power_law([0.5, 0.5], [2.0, 8.0]) == (pytest.approx(4.0), 0.0)  # nothing to fit
    assert fit_power_law([], []) == (1.0, 0.0)
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0], [1.0, 2.0])


def _sse(c, a, times, losses):
    return float(sum((c * t ** a - y) ** 2 for t, y in zip(times, losses)))


def test_fit_power_law_least_squares_in_linear_space():
    """As released (scipy curve_fit): the fit minimises the squared error of the losses, not of
    their logs, so it beats the log-log line on that error and is a stationary point of it."""
    times = [1.0, 2.0, 4.0, 8.0, 3.0]
    losses = [2.0, 1.2, 1.0, 0.95, 1.3]
    c, a = fit_power_law(times, losses)
    a_log, log_c = np.polyfit(np.log(times), np.log(losses), 1)
    assert abs(a - a_log) > 1e-3                                      # a different fit ...
    assert _sse(c, a, times, losses) < _sse(np.exp(log_c), a_log, times, losses)  # ... and a better one
    for dc, da in [(1e-4, 0), (-1e-4, 0), (0, 1e-4), (0, -1e-4)]:
        assert _sse(c, a, times, losses) <= _sse(c + dc, a + da, times, losses)


def test_fit_power_law_falls_back_to_the_log_log_line_and_says_so(monkeypatch, caplog):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")
    monkeypatch.setattr(autoprog.scipy.optimize, "curve_fit", no_convergence)
    times, losses = [1.0, 2.0, 4.0], [2.0, 1.5, 1.4]
    a_log, log_c = np.polyfit(np.log(times), np.log(losses), 1)
    with caplog.at_level("WARNING", logger="asvit_kernels.train.autoprog"):
        assert fit_power_law(times, losses) == (pytest.approx(np.exp(log_c)), pytest.approx(a_log))
    assert "curve_fit" in caplog.text and "log-log" in caplog.text


def test_select_candidate_is_the_argmin_of_loss_times_time_to_the_w():
    times = [1.0, 2.0, 4.0, 8.0, 3.0]
    losses = [2.0, 1.2, 1.0, 0.95, 1.3]
    a_fit = fit_power_law(times, losses)[1]
    best, a, w, scores = select_candidate(times, losses)
    assert a == pytest.approx(a_fit) and w == pytest.approx(-a_fit) and w > 0
    expected = [lo * t ** -a_fit for t, lo in zip(times, losses)]
    assert scores == pytest.approx(expected)
    assert best == int(np.argmin(expected)) and best != int(np.argmin(losses))
    # Loss rising with time: w = 0 and the lowest loss wins.
    best, a, w, scores = select_candidate([1.0, 2.0, 3.0], [1.3, 1.2, 1.5])
    assert a > 0 and w == 0.0 and best == 1 and scores == [1.3, 1.2, 1.5]
    # A candidate without a time cannot win.
    best, _, _, scores = select_candidate([1.0, None, 2.0], [1.0, 0.1, 0.9])
    assert scores[1] == math.inf and best in (0, 2)


def test_search_scores_candidates_with_the_fastest_ema_and_trains_the_winner(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(autoprog, "_clock", lambda: now[0])
    model = tiny_model()
    t = FakeTrainer(model, epochs=4, steps_per_epoch=40)
    s = AutoProg(max_size=32, max_depth=6, stages=2, search=True, size_multiple=8, search_epochs=1,
                 eval_batches=2)
    s.on_train_start(t, resumed=False)
    s.on_epoch_start(t, 0)
    cands = [(r, l) for r in (16, 24, 32) for l in (3, 5, 6)]
    assert s.describe() == {"strategy": "autoprog", "stage": 0, "size": 32, "depth": 6, "searching": True}
    seen = set()
    with torch.no_grad():
        for k in range(t.steps_per_epoch):
            r = s.before_step(t, 0, k, torch.Generator().manual_seed(k))
            seen.add((r, model.config.depth))
            now[0] += 1e-4 * r * r * model.config.depth  # a step time ~ tokens x depth
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
            for e in t.emas:
                e.update(model)
            s.after_step(t, 0, k, float("nan"))
    assert seen <= set(cands) and len(seen) >= 6
    s.on_epoch_end(t, 0)

    rec = s.state_dict()["searches"][0]
    assert [(c["size"], c["depth"]) for c in rec["candidates"]] == cands
    assert sum(c["steps"] for c in rec["candidates"]) == t.steps_per_epoch
    ema = copy.deepcopy(t.emas[0].module)   # the fastest EMA copy scores, as released
    losses, times = [], []
    for c in rec["candidates"]:
        ema.set_subnet(config_for_depth(ema, c["depth"]), s.slots_for(c["depth"]))
        with torch.no_grad():
            losses.append(np.mean([float(F.cross_entropy(ema(t.resize(x, c["size"]) if c["size"] != 32 else x), y))
                                   for x, y in t.val[:2]]))
        times.append(c["time"])
        if c["time"] is not None:
            assert c["time"] == pytest.approx(1e-4 * c["size"] ** 2 * c["depth"])
    assert [c["loss"] for c in rec["candidates"]] == pytest.approx(losses)
    best, a, w, scores = select_candidate(times, losses)
    assert rec["w"] == pytest.approx(w) and (rec["size"], rec["depth"]) == cands[best]
    assert s.describe() == {"strategy": "autoprog", "stage": 0, "size": cands[best][0], "depth": cands[best][1],
                            "searching": False}
    assert model.config.depth == cands[best][1] and s.input_size() == cands[best][0]
    assert any(r.get("event") == "autoprog_search" for r in t.records)
    # After the search: every step trains the winner at its size.
    assert s.before_step(t, 1, 0, torch.Generator()) == cands[best][0]
    s.on_epoch_end(t, 1)
    assert len(s.state_dict()["searches"]) == 1

    # The next stage is the last: it trains the target model (full size and depth), grown by MoGrow.
    r0, l0 = cands[best]
    resets = t.optimizer_resets
    s.on_epoch_start(t, 2)
    assert s.describe() == {"strategy": "autoprog", "stage": 1, "size": 32, "depth": 6, "searching": False}
    assert model.config.depth == 6 and t.optimizer_resets == resets + 1
    assert t.ema_resets == 0


def test_middle_stages_search_around_the_previous_winner():
    model = tiny_model()
    t = FakeTrainer(model, epochs=3, steps_per_epoch=4)
    s = AutoProg(max_size=32, max_depth=6, stages=3, search=True, size_multiple=8, search_epochs=1, eval_batches=1)
    s.on_train_start(t, resumed=False)
    s.on_epoch_start(t, 0)
    s._size, s._depth = 16, 3  # as if stage 0's search had picked (16, 3)
    s._searching = False
    s.on_epoch_start(t, 1)
    nxt = search_candidates(max_size=32, max_depth=6, size_multiple=8, sizes=s.sizes, depths=s.depths,
                            current=(16, 3))
    assert s.state_dict()["candidates"] == [list(c) for c in nxt]
    assert model.config.depth == max(l for _, l in nxt) == 6 and s.describe()["searching"]


def test_search_stage_shorter_than_search_epochs_searches_its_whole_length():
    model = tiny_model()
    t = FakeTrainer(model, epochs=4, steps_per_epoch=30)
    s = AutoProg(max_size=32, max_depth=6, stages=4, size_multiple=8, search_epochs=3, eval_batches=1)
    s.on_train_start(t, resumed=False)
    s.on_epoch_start(t, 0)
    assert s.state_dict()["search_end"] == 0
    fake_steps(t, s, 0)
    s.on_epoch_end(t, 0)
    assert not s.describe()["searching"] and len(s.searches) == 1


def test_state_dict_round_trip_resumes_the_same_configuration():
    model = tiny_model()
    t = FakeTrainer(model, epochs=4, steps_per_epoch=12)
    s = AutoProg(max_size=32, max_depth=6, stages=2, size_multiple=8, search_epochs=1, eval_batches=1)
    s.on_train_start(t, resumed=False)
    for when in ("mid-search", "after search"):
        if when == "mid-search":
            s.on_epoch_start(t, 0)
            fake_steps(t, s, 0, steps=5)
        else:
            fake_steps(t, s, 0, steps=7)
            s.on_epoch_end(t, 0)
        state = json.loads(json.dumps(s.state_dict()))
        # A resumed run: the model built as at the start, weights and EMAs loaded by the trainer.
        model2 = tiny_model(seed=123)
        model2.load_state_dict(model.state_dict())
        t2 = FakeTrainer(model2, epochs=4, steps_per_epoch=12)
        for e2, e in zip(t2.emas, t.emas):
            e2.load_state_dict(e.state_dict())
        weights = state_of(model2)
        s2 = AutoProg(max_size=32, max_depth=6, stages=2, size_multiple=8, search_epochs=1, eval_batches=1)
        s2.load_state_dict(state)
        s2.on_train_start(t2, resumed=True)
        s2.on_epoch_start(t2, 0)  # the interrupted epoch starts again: nothing changes
        assert s2.describe() == s.describe()
        assert s2.state_dict() == state
        assert model2.config == config_for_depth(model2, s.describe()["depth"])  # searching: the grown depth
        assert list(model2.slots) == s.slots_for(s.describe()["depth"])
        assert t2.optimizer_resets == t2.ema_resets == 0
        assert all(torch.equal(v, model2.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="keys"):
        s2.load_state_dict({"stage": 0})
    s3 = AutoProg(max_size=32, max_depth=6, stages=2)
    s3.load_state_dict({})  # an empty state (a run that never started) is accepted
    assert s3.describe()["stage"] == -1


# ------------------------------------------------------------------------------- end to end


def _digits():
    data_mod = pytest.importorskip("asvit_kernels.train.data")
    pytest.importorskip("sklearn")
    return data_mod.open_dataset("digits")


@pytest.mark.parametrize("search", [False, True])
def test_end_to_end_through_the_trainer(tmp_path, search):
    from asvit_kernels.train import TrainConfig, Trainer
    data = _digits()
    torch.manual_seed(0)
    model = elastic_vit_for_autoprog(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                     num_classes=data.num_classes)
    cfg = TrainConfig(epochs=4, batch_size=128, lr=2e-3, warmup_epochs=0.5, ema_decays=(0.99, 0.999), drop_path=0.1,
                      num_workers=0, log_every=5, progress=False)
    s = AutoProg(max_size=32, max_depth=4, stages=2, search=search, size_multiple=8, search_epochs=1,
                 eval_batches=2)
    trainer = Trainer(model, data, cfg, strategy=s, run_dir=tmp_path / "run", device="cpu")
    out = trainer.fit()
    assert out["status"] == "finished" and len(out["epochs"]) == 4
    for r in out["epochs"]:
        assert all(math.isfinite(r[k]) for k in ("train_loss", "val_loss", "val_acc", "val_loss_ema"))
    final = out["strategy"]
    assert final["stage"] == 1 and not final["searching"]
    chosen = s.state_dict()["chosen"]
    assert [c["stage"] for c in chosen] == [0, 1]
    assert (final["size"], final["depth"]) == (chosen[-1]["size"], chosen[-1]["depth"])
    assert model.config.depth == final["depth"]
    assert (final["size"], final["depth"]) == (32, 4)  # the last stage is the target model, searched or not
    if not search:
        assert [r["drop_path"] for r in out["epochs"]] == pytest.approx([0.05, 0.05, 0.1, 0.1])
    else:
        assert len(s.searches) == 1  # stage 0 only: the last stage is not searched
        assert all(c["loss"] is not None and math.isfinite(c["loss"]) for rec in s.searches
                   for c in rec["candidates"])
    events = [json.loads(line).get("event") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("autoprog_stage") == 2 and events.count("autoprog_search") == (1 if search else 0)


@pytest.mark.parametrize("search", [False, True])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, search):
    """Paused after epoch 1 (stage 0, after its search) and resumed in a new process-like set-up (a
    fresh model, trainer and strategy): the same stages, decisions and final weights bit for bit
    (CPU). Step times come from a fake clock so that the search decides the same in both runs."""
    from asvit_kernels.train import TrainConfig, Trainer
    ticks = iter(range(10 ** 9))
    monkeypatch.setattr(autoprog, "_clock", lambda: float(next(ticks)))  # every step takes 1 "second"
    data = _digits()

    def run(run_dir, pause):
        torch.manual_seed(0)
        model = elastic_vit_for_autoprog(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                         num_classes=data.num_classes)
        cfg = TrainConfig(epochs=4, batch_size=128, lr=2e-3, warmup_epochs=0.5, ema_decays=(0.99, 0.999),
                          num_workers=0, log_every=5, progress=False)
        s = AutoProg(max_size=32, max_depth=4, stages=2, search=search, size_multiple=8, search_epochs=1,
                     eval_batches=2)
        trainer = Trainer(model, data, cfg, strategy=s, run_dir=run_dir, device="cpu")
        return trainer.fit(max_epochs_this_call=pause), model, s

    _, model_a, s_a = run(tmp_path / "a", None)
    out, _, _ = run(tmp_path / "b", 1)
    assert out["status"] == "paused" and out["strategy"]["stage"] == 0
    out, model_b, s_b = run(tmp_path / "b", None)
    assert out["status"] == "finished"
    assert s_b.describe() == s_a.describe()
    assert s_b.state_dict()["chosen"] == s_a.state_dict()["chosen"]
    assert s_b.searches == s_a.searches and len(s_a.searches) == (1 if search else 0)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
