"""train.retokenize: the paper's schedule and its scaling to other kernels and sizes, schedule
parsing, and the Retokenize strategy inside a Trainer (model and EMA copies at each epoch)."""
import math
import re

import pytest
import torch
from torch import nn

from _train_runner import Probe, config, small_digits, tiny_model

from asvit_kernels.train import Trainer
from asvit_kernels.train.retokenize import (PAPER_FRACTIONS, Retokenize, TokenStage, dilation_for, max_stride,
                                            parse_stages, stage_epochs, token_stages)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def genotype(k1: int) -> str:
    return f"{k1},2,3,1|4,1,2,1|4,1,4,1|4,1,6,1|32,8"


def sd(stages):
    return [(s.stride, s.dilation) for s in stages]


# ----------------------------------------------------------------------------- the schedule

def test_paper_schedule():
    st = token_stages(4, 224)
    assert sd(st) == [(16, 5), (8, 2), (4, 1)]
    assert [s.start for s in st] == list(PAPER_FRACTIONS)
    assert stage_epochs(st, 300) == [0, 80, 130]
    assert parse_stages("paper", 4, 224) == st
    assert [s.text() for s in st] == ["stride 16 dilation 5", "stride 8 dilation 2", "stride 4 dilation 1"]


@pytest.mark.parametrize("k1", [4, 5, 6, 7, 8])
def test_every_kernel_at_224_gives_14_28_56_grids(k1):
    st = token_stages(k1, 224)
    assert [s.stride for s in st] == [16, 8, 4]
    assert [s.dilation for s in st] == [max(1, round((s - 1) / (k1 - 1))) for s in (16, 8, 4)]
    assert st[-1].dilation == 1
    model = AsViT_at(k1, 224)
    for s, side in zip(st, (14, 28, 56)):
        model.set_tokenization(s.stride, s.dilation)
        assert model.tokenization == (s.stride, s.dilation)
        grids = model.stage_grids()
        assert grids[0] == (side, side)
        assert grids[1:] == [(math.ceil(side / 2),) * 2, (math.ceil(side / 4),) * 2, (math.ceil(side / 8),) * 2]


def AsViT_at(k1, img):
    from asvit_kernels.models.asvit import AsViT
    return AsViT.from_genotype(genotype(k1), num_classes=10, img_size=img)


def test_coarse_tokenization_forward_at_224():
    """The K1 = 4 model runs at each paper stage (SAME padding with the dilated kernel) and the
    same weights serve every stage."""
    torch.manual_seed(0)
    model = AsViT_at(4, 224).eval()
    x = torch.randn(1, 3, 224, 224)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for s in token_stages(4, 224):
            out = model.set_tokenization(s.stride, s.dilation)(x)
            assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("k1", [4, 8])
def test_small_images_cap_the_stride_and_merge_stages(k1):
    assert max_stride(32) == 7 and max_stride(224) == 55 and max_stride(20) == 4
    for img in (20, 32, 40, 64):
        cap = max_stride(img)
        assert math.ceil(img / cap) >= 5 and math.ceil(img / (cap + 1)) < 5
    st = token_stages(k1, 32)
    # 16 and 8 both cap to 7: one stage; stride 4 from 130/300 on
    assert [s.stride for s in st] == [7, 4]
    assert [s.start for s in st] == [0.0, PAPER_FRACTIONS[2]]
    assert [s.dilation for s in st] == [dilation_for(7, k1), 1]
    model = AsViT_at(k1, 32)
    for s in st:
        model.set_tokenization(s.stride, s.dilation)
        assert min(model.stage_grids()[0]) >= 5
    # 64 px: cap 15 -> 15, 8, 4 stay distinct
    assert [s.stride for s in token_stages(k1, 64)] == [15, 8, 4]
    # 20 px: everything caps to 4: a single stage
    assert sd(token_stages(k1, 20)) == [(4, 1)]


def test_dilation_rule():
    assert [dilation_for(s, 4) for s in (16, 8, 4)] == [5, 2, 1]
    assert [dilation_for(s, 8) for s in (16, 8, 4)] == [2, 1, 1]
    assert dilation_for(4, 1) == 3  # kernel 1: no division by zero


def test_parse_stages_forms():
    assert sd(parse_stages("none", 8, 32)) == [(4, 1)]
    st = parse_stages("0:16:5,0.5:4:1", 4, 224)
    assert st == [TokenStage(0.0, 16, 5), TokenStage(0.5, 4, 1)]
    assert stage_epochs(st, 10) == [0, 5]
    # default dilation from the kernel; spaces around parts are fine
    assert parse_stages("0:16, 0.5:4", 4, 224) == st
    assert sd(parse_stages("0:16,0.5:4", 8, 224)) == [(16, 2), (4, 1)]
    # equal consecutive stages merge
    assert parse_stages("0:8:2,0.3:8:2,0.6:4", 4, 224) == [TokenStage(0.0, 8, 2), TokenStage(0.6, 4, 1)]


@pytest.mark.parametrize("text, match", [
    ("bad", "'bad' is not FRACTION:STRIDE"),
    ("0:16:5:1", "'0:16:5:1' is not FRACTION:STRIDE"),
    ("0:x", "'0:x' is not"),
    ("0:8,", "'' is not"),
    ("", "'' is not"),
    ("0:16,0.5:8,0.3:4", "must increase"),
    ("0:16,0.5:8,0.5:4", "must increase"),
    ("0:16,1.0:4", "must increase"),
    ("0.1:16,0.5:4", "must start at 0"),
    ("0:0", "stride and dilation must be >= 1"),
    ("0:8:0", "stride and dilation must be >= 1"),
    ("0:8,0.5:4", "stride 8 gives a 4-token grid side at 32 px"),
])
def test_parse_stages_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_stages(text, 8, 32)


def test_schedule_argument_errors():
    with pytest.raises(TypeError):
        parse_stages(None, 4, 224)
    for bad in (dict(kernel=0, img_size=224), dict(kernel=4, img_size=True), dict(kernel=4.0, img_size=224)):
        with pytest.raises(ValueError):
            token_stages(**bad)
    with pytest.raises(ValueError, match="equal length"):
        token_stages(4, 224, fractions=(0.0, 0.5), multipliers=(4,))
    with pytest.raises(TypeError):
        Retokenize([])
    with pytest.raises(TypeError):
        Retokenize([(0.0, 4, 1)])


def test_stage_at_skips_empty_stages():
    r = Retokenize(token_stages(4, 224))
    assert [r.stage_at(e, 300) for e in (0, 79, 80, 129, 130, 299)] == [0, 0, 1, 1, 2, 2]
    # 2 epochs: the starts round to 0, 1, 1: the middle stage gets no epoch
    assert stage_epochs(r.stages, 2) == [0, 1, 1]
    assert [r.stage_at(e, 2) for e in (0, 1)] == [0, 2]
    assert r.schedule_text(2) == "epochs [0, 1): stride 16 dilation 5; epochs [1, 2): stride 4 dilation 1"
    assert r.describe() == {"strategy": "retokenize", "stage": 0, "stride": 16, "dilation": 5}
    with pytest.raises(ValueError, match="retokenization stages"):
        r.load_state_dict(Retokenize(parse_stages("none", 4, 224)).state_dict())
    r.load_state_dict(Retokenize(token_stages(4, 224)).state_dict())


# ----------------------------------------------------------------------------- in a Trainer

THREE = "0:7,0.34:6,0.67:4"  # 3 epochs: one epoch per stage (starts 0, 1, 2)


def test_retokenize_in_a_trainer(tmp_path):
    stages = parse_stages(THREE, 8, 32)
    assert stage_epochs(stages, 3) == [0, 1, 2]
    probe = Probe(stages)
    trainer = Trainer(tiny_model(), small_digits(), config(epochs=3), strategy=probe, run_dir=tmp_path)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    want = [(7, dilation_for(7, 8)), (6, dilation_for(6, 8)), (4, 1)]
    # the model and every EMA copy trained / were evaluated at the stage's tokenization
    assert probe.seen == [(e, want[e], [want[e]] * 2) for e in range(3)]
    events = [r for r in trainer.history if r.get("event") == "retokenize"]
    assert [(r["epoch"], r["stage"], r["stride"], r["dilation"]) for r in events] == \
           [(1, 1, *want[1]), (2, 2, *want[2])]
    stage_text = [r["stage"] for r in trainer.history if r.get("kind") == "epoch"]
    assert len(stage_text) == 3
    for e, text in enumerate(stage_text):  # e.g. "stage 0, stride 7, dilation 1"
        assert re.search(rf"stage\W+{e}\b.*stride\W+{want[e][0]}\b.*dilation\W+{want[e][1]}\b", text), text
    assert trainer.model.tokenization == (4, 1) and all(e.module.tokenization == (4, 1) for e in trainer.emas)
    assert summary["strategy"] == {"strategy": "retokenize", "stage": 2, "stride": 4, "dilation": 1}


def test_retokenize_resumed_between_stages(tmp_path):
    """Paused after epoch 1 (stage 1) and resumed: the new model starts in stage 1 (the epoch
    just finished), then moves to stage 2 with exactly one event, EMAs included."""
    stages = parse_stages(THREE, 8, 32)
    Trainer(tiny_model(), small_digits(), config(epochs=3), strategy=Probe(stages),
            run_dir=tmp_path).fit(max_epochs_this_call=2)
    probe = Probe(stages)
    trainer = Trainer(tiny_model(), small_digits(), config(epochs=3), strategy=probe, run_dir=tmp_path)
    trainer.fit()
    assert probe.seen == [(2, (4, 1), [(4, 1)] * 2)]
    assert [r["epoch"] for r in trainer.history if r.get("event") == "retokenize"] == [1, 2]


def test_retokenize_needs_an_asvit():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    trainer = Trainer(model, small_digits(), config(epochs=1), strategy=Retokenize(parse_stages("none", 8, 32)))
    with pytest.raises(TypeError, match="set_tokenization"):
        trainer.fit()


class _EmaAtSwitch(Retokenize):
    """Retokenize that records, at each epoch start, whether every EMA copy equals the model."""

    def __init__(self, stages, **kw):
        super().__init__(stages, **kw)
        self.equal: list[tuple[int, bool]] = []

    def on_epoch_start(self, trainer, epoch):
        super().on_epoch_start(trainer, epoch)
        model = trainer.model.state_dict()
        self.equal.append((epoch, all(torch.equal(e.module.state_dict()[k], v) for e in trainer.emas
                                      for k, v in model.items())))


@pytest.mark.parametrize("mode, reseeded, warming, event", [("keep", False, False, "kept"),
                                                             ("reseed", True, False, "reseeded"),
                                                             ("restart", True, True, "restarted")])
def test_ema_at_switch(tmp_path, mode, reseeded, warming, event):
    """"reseed" and "restart" restart every EMA copy from the model's weights at each switch
    (epochs 1 and 2), "restart" with a warm-up; "keep" goes on averaging. Epoch 0 (no switch) is
    the same fresh copy either way."""
    strategy = _EmaAtSwitch(parse_stages(THREE, 8, 32), ema_at_switch=mode)
    trainer = Trainer(tiny_model(), small_digits(256, 64), config(epochs=3), strategy=strategy, run_dir=tmp_path)
    trainer.fit()
    assert strategy.equal == [(0, True), (1, reseeded), (2, reseeded)]
    assert all(e.warming == warming for e in trainer.emas)
    events = [r for r in trainer.history if r.get("event") == "retokenize"]
    assert [r["ema"] for r in events] == [event] * 2


@pytest.mark.parametrize("mode, epochs_first_call", [("reseed", 2), ("restart", 2), ("restart", 3)])
def test_ema_at_switch_resume_between_epochs_matches_a_straight_run(tmp_path, mode, epochs_first_call):
    """Paused right before the switch (after epoch 2) or during the warm-up after it (after epoch
    3) and resumed: the reset happens on resume from the same saved weights, a warm-up goes on
    where it was, so the EMA ends bit-identical to an uninterrupted run's."""
    data, stages = small_digits(256, 64), parse_stages("0:7,0.5:4", 8, 32)  # the switch before epoch 2 of 4
    straight = Trainer(tiny_model(), data, config(epochs=4), strategy=Retokenize(stages, ema_at_switch=mode),
                       run_dir=tmp_path / "a")
    straight.fit()
    Trainer(tiny_model(), data, config(epochs=4), strategy=Retokenize(stages, ema_at_switch=mode),
            run_dir=tmp_path / "b").fit(max_epochs_this_call=epochs_first_call)
    resumed = Trainer(tiny_model(), data, config(epochs=4), strategy=Retokenize(stages, ema_at_switch=mode),
                      run_dir=tmp_path / "b")
    resumed.fit()
    for a, b in zip(straight.emas, resumed.emas):
        for k, v in a.module.state_dict().items():
            assert torch.equal(v, b.module.state_dict()[k]), k


def test_ema_at_switch_errors(tmp_path):
    stages = parse_stages(THREE, 8, 32)
    with pytest.raises(ValueError, match="ema_at_switch must be one of"):
        Retokenize(stages, ema_at_switch="forget")
    data = small_digits(256, 64)
    Trainer(tiny_model(), data, config(epochs=3), strategy=Retokenize(stages, ema_at_switch="keep"),
            run_dir=tmp_path).fit(max_epochs_this_call=1)
    with pytest.raises(ValueError, match="ema_at_switch='keep'.*'reseed'"):
        Trainer(tiny_model(), data, config(epochs=3), strategy=Retokenize(stages, ema_at_switch="reseed"),
                run_dir=tmp_path).fit()
    old = Retokenize(stages)  # a checkpoint from before the option: no key, it kept the EMA
    old.load_state_dict({"stages": old.state_dict()["stages"]})
    with pytest.raises(ValueError, match="ema_at_switch"):
        Retokenize(stages, ema_at_switch="reseed").load_state_dict({"stages": old.state_dict()["stages"]})
