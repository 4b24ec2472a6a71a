"""train.trainer: the learning-rate schedule, TrainConfig / Trainer argument checks, checkpoints,
bit-for-bit resume (between epochs, after SIGTERM mid-epoch, after a crash past a mid-epoch
checkpoint), the non-finite-loss stop, settings checks on resume, fresh restarts, EmaModel, and a
real learning check on the bundled digits.

Every run uses one thread (bit-for-bit comparisons need the same reduction order in every run)."""
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _train_runner import Crash, Probe, config, digits, metrics, small_digits, tensors_equal, tiny_model

from asvit_kernels.train import NonFiniteLossError, Strategy, TrainConfig, Trainer
from asvit_kernels.train import checkpoint as ckpt
from asvit_kernels.train import trainer as trainer_mod
from asvit_kernels.train.ema import EmaModel
from asvit_kernels.train.trainer import lr_at

FINAL_FILES = ("model.safetensors", "model_ema.safetensors")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def make(run_dir, strategy=None, cfg=None, model=None, data=None):
    return Trainer(tiny_model() if model is None else model, small_digits() if data is None else data,
                   config() if cfg is None else cfg, strategy=Probe() if strategy is None else strategy,
                   run_dir=run_dir)


def final_weights(run_dir):
    return {f: load_file(str(run_dir / f)) for f in FINAL_FILES}


def assert_same_weights(a_dir, b_dir):
    a, b = final_weights(a_dir), final_weights(b_dir)
    for f in FINAL_FILES:
        assert a[f], f
        assert tensors_equal(a[f], b[f]) == [], f


def checkpoint_dirs(run_dir):
    return sorted(p.name for p in ckpt.checkpoint_dir(run_dir).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resume is compared with: 4 epochs x 8 steps, two
    re-tokenization stages (the change at epoch 2), drop path 0.1, two EMA copies."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = make(run_dir)
    summary = trainer.fit()
    assert summary["status"] == "finished" and (summary["epoch"], summary["step"]) == (4, 32)
    return run_dir, trainer, summary


# ----------------------------------------------------------------------------- lr_at

def test_lr_at_warmup_then_cosine():
    total, warm, lr, low = 100, 10, 1e-3, 1e-5
    got = [lr_at(s, total, warm, lr, low) for s in range(total + 1)]
    # linear warmup from lr / warm, reaching lr on the last warmup step
    for s in range(warm):
        assert got[s] == pytest.approx(lr * (s + 1) / warm, rel=1e-12)
    assert got[warm - 1] == pytest.approx(lr, rel=1e-12)
    assert all(b > a for a, b in zip(got[:warm], got[1:warm]))
    # cosine from lr down to min_lr, never increasing
    assert got[warm] == pytest.approx(lr, rel=1e-12)
    assert all(b <= a for a, b in zip(got[warm:], got[warm + 1:]))
    assert got[total] == pytest.approx(low, rel=1e-12)
    assert low < got[total - 1] < low + 1e-3 * (lr - low)
    mid = warm + (total - warm) // 2
    assert got[mid] == pytest.approx((lr + low) / 2, rel=1e-12)
    assert lr_at(10 * total, total, warm, lr, low) == pytest.approx(low, rel=1e-12)  # clamped past the end


def test_lr_at_without_warmup():
    total, lr, low = 40, 2e-3, 0.0
    got = [lr_at(s, total, 0, lr, low) for s in range(total + 1)]
    assert got[0] == lr
    assert all(b < a for a, b in zip(got, got[1:]))
    assert got[total] == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", -1), ("lr", 0), ("lr", -1e-3), ("amp", "x"), ("ema_decays", (1.0,)),
    ("ema_decays", (0.5, -0.1)), ("crop_scale", (0.5, 0.2)), ("crop_scale", (0.0, 1.0)), ("clip_grad", 0),
    ("epochs", True), ("epochs", 2.0), ("warmup_epochs", -1), ("label_smoothing", 1.5), ("drop_path", 1.0),
    ("log_every", 0), ("checkpoint_every", -1), ("eval_batches", 0), ("min_lr", -1.0),
    ("lr", math.inf), ("lr", math.nan), ("warmup_epochs", math.inf), ("weight_decay", math.inf),
    ("clip_grad", math.inf), ("min_lr", math.nan),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_config_min_lr_must_not_exceed_lr():
    with pytest.raises(ValueError, match=r"min_lr \(0.1\) must not exceed lr \(0.01\)"):
        TrainConfig(lr=0.01, min_lr=0.1)
    assert TrainConfig(lr=0.01, min_lr=0.01).min_lr == 0.01


def test_config_normalises():
    cfg = TrainConfig(ema_decays=(0.999, 0.9, 0.99), crop_scale=(1, 1), clip_grad=None, eval_batches=3)
    assert cfg.ema_decays == (0.9, 0.99, 0.999)  # sorted: the slowest last
    assert cfg.crop_scale == (1.0, 1.0) and isinstance(cfg.crop_scale[0], float)
    assert TrainConfig(ema_decays=[]).ema_decays == ()
    d = cfg.to_dict()
    assert d["ema_decays"] == [0.9, 0.99, 0.999] and json.loads(json.dumps(d)) == d


def test_trainer_argument_errors():
    data = small_digits()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Trainer(lambda x: x, data, config())
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(tiny_model(), data, {"epochs": 1})
    with pytest.raises(TypeError, match="Strategy"):
        Trainer(tiny_model(), data, config(), strategy=object())
    with pytest.raises(TypeError, match="ImageData"):
        Trainer(tiny_model(), (data.train, data.val), config())
    with pytest.raises(ValueError, match=r"batch_size=513 .*512 training images"):
        Trainer(tiny_model(), data, config(batch_size=513))
    with pytest.raises(ValueError, match="bf16.*CUDA"):
        Trainer(tiny_model(), data, config(amp="bf16"), device="cpu")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Trainer(tiny_model(), data, config(amp="fp16"), device="cpu")
    Trainer(tiny_model(), data, config(batch_size=512))  # exactly one batch is enough


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_files(reference):
    run_dir, trainer, summary = reference
    keys = set(tiny_model().state_dict())
    latest = ckpt.latest(run_dir)
    assert latest.name == ckpt.tag(4, 32) == "e0004-s00000032"
    assert json.loads((ckpt.checkpoint_dir(run_dir) / "latest.json").read_text()) == {"dir": latest.name}
    assert len(checkpoint_dirs(run_dir)) == 2 and checkpoint_dirs(run_dir)[-1] == latest.name  # keep=2
    assert sorted(p.name for p in latest.iterdir()) == ["model.safetensors", "rng-rank0.safetensors",
                                                        "state.json", "state.safetensors"]
    for path in (latest / "model.safetensors", run_dir / "model.safetensors", run_dir / "model_ema.safetensors"):
        assert set(load_file(str(path))) == keys, path
    # the checkpoint's model is the trainer's final model; model_ema is the slowest EMA (0.99)
    assert tensors_equal(load_file(str(latest / "model.safetensors")), trainer.model.state_dict()) == []
    assert [e.decay for e in trainer.emas] == [0.9, 0.99]
    assert tensors_equal(load_file(str(run_dir / "model_ema.safetensors")),
                         trainer.emas[-1].module.state_dict()) == []
    state = json.loads((latest / "state.json").read_text())
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (4, 32, 0)
    assert state["ema_decays"] == [0.9, 0.99]
    st = load_file(str(latest / "state.safetensors"))
    assert any(k.startswith("optim.") for k in st) and any(k.startswith("ema.1.") for k in st)
    info = json.loads((run_dir / "train.json").read_text())
    assert info["steps_per_epoch"] == 8 and info["strategy"] == "retokenize" and info["world_size"] == 1
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(run_dir) for f in files if f.endswith(".tmp")]
    assert leftovers == []
    # one metrics record per epoch plus the one retokenization event, as in the history
    recs = metrics(run_dir, drop=())
    assert recs == json.loads(json.dumps(trainer.history))
    assert [r.get("kind", r.get("event")) for r in recs] == ["epoch", "epoch", "retokenize", "epoch", "epoch"]
    assert all(math.isfinite(r["val_acc"]) and math.isfinite(r["train_loss"]) for r in summary["epochs"])


@pytest.mark.parametrize("scale", [1e-3, 1.0, float("inf"), float("nan")])
def test_clip_grad_norm_is_torchs(scale):
    g = torch.Generator().manual_seed(0)
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 16), (16,), (3, 3)]]
    for p in ours:
        p.grad = torch.randn(p.shape, generator=g) * (1.0 if math.isnan(scale) else min(scale, 1.0))
    ours[0].grad[0, 0] = scale  # within the norm, above it, or non-finite
    ours.append(nn.Parameter(torch.ones(2)))  # no gradient
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = None if a.grad is None else a.grad.clone()
    trainer_mod._clip_grad_norm(ours, 5.0)
    nn.utils.clip_grad_norm_(theirs, 5.0)
    assert all(a.grad is b.grad is None or torch.equal(a.grad, b.grad) or
               (a.grad.isnan() == b.grad.isnan()).all() and torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())
               for a, b in zip(ours, theirs))


def test_write_tensors_is_a_safetensors_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f64": torch.randn(5, dtype=torch.float64, generator=g),
               "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), "u8": torch.arange(7, dtype=torch.uint8),
               "transposed": torch.randn(4, 6, generator=g).t(), "bool": torch.tensor([True, False, True]),
               "bf16": torch.randn(3, generator=g).bfloat16(), "f16": torch.randn(2, 2, generator=g).half(),
               "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "i8": torch.tensor(-7, dtype=torch.int8)}
    tensors["row"] = tensors["f32"][1]  # shares f32's storage: written as its own tensor
    for name, group in (("ours", tensors), ("other dtypes", {**tensors, "c64": torch.ones(2, dtype=torch.complex64)})):
        path = tmp_path / f"{name}.safetensors"
        sha = ckpt.write_tensors(path, group)
        for back in (load_file(str(path)), ckpt.read_tensors(path, sha)):
            assert set(back) == set(group), name
            assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in group.items()), name
    ckpt.write_tensors(tmp_path / "none.safetensors", {})
    assert load_file(str(tmp_path / "none.safetensors")) == {}


# ----------------------------------------------------------------------------- resume

def test_resume_between_epochs_is_bit_for_bit(reference, tmp_path):
    ref_dir = reference[0]
    first = make(tmp_path).fit(max_epochs_this_call=2)
    assert (first["status"], first["epoch"], first["step"]) == ("paused", 2, 16)
    assert not (tmp_path / "model.safetensors").exists()  # final weights only when finished
    second_trainer = make(tmp_path)  # a new model (same seed), trainer and strategy
    second = second_trainer.fit()
    assert (second["status"], second["epoch"], second["step"]) == ("finished", 4, 32)
    assert len(second["epochs"]) == 4  # the history of the first call came back too
    assert_same_weights(ref_dir, tmp_path)
    assert metrics(tmp_path) == metrics(ref_dir)
    # the stage change (epoch 2) happened in the second call, logged once
    assert [r for r in second_trainer.history if r.get("event") == "retokenize"] == \
           [{"epoch": 2, "step": 16, "event": "retokenize", "stage": 1, "stride": 4, "dilation": 1, "ema": "kept"}]
    # resuming a finished run trains no more and keeps the result
    again = make(tmp_path).fit()
    assert (again["status"], again["epoch"], again["step"]) == ("finished", 4, 32)
    assert_same_weights(ref_dir, tmp_path)
    assert metrics(tmp_path) == metrics(ref_dir)


def test_resume_is_sensitive_to_the_rng_restore(reference, tmp_path, monkeypatch):
    """Control for the test above: without restoring the RNG (drop path draws) the resumed run
    differs, so the bit-for-bit equality really covers the RNG state."""
    make(tmp_path).fit(max_epochs_this_call=2)
    monkeypatch.setattr(trainer_mod, "_set_rng_state", lambda state, device: None)
    make(tmp_path).fit()
    a, b = final_weights(reference[0]), final_weights(tmp_path)
    assert tensors_equal(a["model.safetensors"], b["model.safetensors"]) != []


def test_sigterm_on_the_last_step_of_an_epoch(reference, tmp_path):
    first = make(tmp_path, strategy=Probe(sigterm_at=16)).fit()
    assert (first["status"], first["epoch"], first["step"]) == ("interrupted", 1, 16)
    state = json.loads((ckpt.latest(tmp_path) / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (1, 8)  # the epoch's record is still due
    assert len(metrics(tmp_path)) == 1
    make(tmp_path).fit()
    assert_same_weights(reference[0], tmp_path)
    assert [(r.get("kind"), r["epoch"]) for r in metrics(tmp_path)] == \
           [(r.get("kind"), r["epoch"]) for r in metrics(reference[0])]


def test_sigterm_mid_epoch_then_resume_is_bit_for_bit(reference, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    first = make(tmp_path, strategy=Probe(sigterm_at=11)).fit()  # epoch 1, its 3rd of 8 steps
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert (first["status"], first["epoch"], first["step"]) == ("interrupted", 1, 11)
    latest = ckpt.latest(tmp_path)
    assert latest.name == "e0001-s00000011"
    state = json.loads((latest / "state.json").read_text())
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 11, 3)
    assert not (tmp_path / "model.safetensors").exists()
    second = make(tmp_path).fit()
    assert (second["status"], second["step"]) == ("finished", 32)
    assert_same_weights(reference[0], tmp_path)


@pytest.mark.parametrize("at", [11, 16], ids=["mid-epoch", "last-step-of-epoch"])
def test_sigterm_then_resume_metrics_match(reference, tmp_path, at):
    """The epoch records of a run resumed mid-epoch equal the uninterrupted run's (wall-clock
    fields aside): in particular the resumed epoch's train_loss is the mean over all its steps
    (stopped on an epoch's last step, the resumed run trains no step of it before its record)."""
    make(tmp_path, strategy=Probe(sigterm_at=at)).fit()
    assert ckpt.latest(tmp_path).name == ckpt.tag(1, at)
    make(tmp_path).fit()
    got, want = metrics(tmp_path), metrics(reference[0])
    assert [(r.get("kind"), r["epoch"]) for r in got] == [(r.get("kind"), r["epoch"]) for r in want]
    for g, w in zip(got, want):
        if g.get("kind") == "epoch":  # summation order may differ: equal up to rounding
            assert g.pop("train_loss") == pytest.approx(w.pop("train_loss"), rel=1e-9), g["epoch"]
    assert got == want


def test_checkpoint_every_then_crash_resume_is_bit_for_bit(reference, tmp_path):
    cfg = config(checkpoint_every=3)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Crash, match="simulated crash after step 13"):
        make(tmp_path, strategy=Probe(crash_at=13), cfg=cfg).fit()
    assert signal.getsignal(signal.SIGTERM) is before  # put back on the way out of an exception too
    # mid-epoch checkpoints at steps 3, 6 (epoch 0), 9, 12 (epoch 1), the epoch end at 8; two kept
    assert checkpoint_dirs(tmp_path) == ["e0001-s00000009", "e0001-s00000012"]
    assert ckpt.latest(tmp_path).name == "e0001-s00000012"
    assert len(metrics(tmp_path)) == 1  # epoch 0 only
    second = make(tmp_path, cfg=cfg).fit()
    assert (second["status"], second["step"]) == ("finished", 32)
    assert checkpoint_dirs(tmp_path) == ["e0003-s00000030", "e0004-s00000032"]
    # checkpointing does not change the training: equal to the reference (checkpoint_every=0)
    assert_same_weights(reference[0], tmp_path)


def test_non_finite_loss_keeps_the_last_good_checkpoint(reference, tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        make(tmp_path, strategy=Probe(nan_at=10)).fit()  # epoch 1, its 3rd step
    good = ckpt.checkpoint_dir(tmp_path) / "e0001-s00000008"
    assert json.loads((ckpt.checkpoint_dir(tmp_path) / "latest.json").read_text()) == {"dir": good.name}
    assert str(good) in str(info.value) and "epoch 2" in str(info.value)
    assert checkpoint_dirs(tmp_path) == [good.name]  # nothing written from the diverged weights
    weights = load_file(str(good / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(v).all() for v in load_file(str(good / "state.safetensors")).values())
    # the kept checkpoint is the uninterrupted run's epoch-1 state: resuming from it gives its result
    make(tmp_path).fit()
    assert_same_weights(reference[0], tmp_path)
    assert metrics(tmp_path) == metrics(reference[0])


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paused")
    assert make(run_dir).fit(max_epochs_this_call=1)["status"] == "paused"
    return run_dir


@pytest.mark.parametrize("key, saved, now", [("lr", 0.002, 0.001), ("seed", 0, 1), ("label_smoothing", 0.1, 0.2),
                                             ("crop_scale", [0.35, 1.0], [0.5, 1.0])])
def test_resume_with_other_config_names_the_key(paused_run, key, saved, now):
    before = sorted(p.name for p in paused_run.rglob("*"))
    value = tuple(now) if isinstance(now, list) else now
    with pytest.raises(ValueError, match="other settings") as info:
        make(paused_run, cfg=config(**{key: value})).fit()
    msg = str(info.value)
    assert sorted(p.name for p in paused_run.rglob("*")) == before  # nothing touched
    # the message must say which option differs, and its two values
    assert key in msg and shown(saved, msg) and shown(now, msg), msg


def shown(value, msg):
    forms = {json.dumps(value), str(value)} | ({str(tuple(value))} if isinstance(value, list) else set())
    return any(f in msg for f in forms)


def test_resume_with_other_model_or_strategy(paused_run):
    with pytest.raises(ValueError, match="parameters"):
        make(paused_run, model=tiny_model(genotype="8,2,3,1|4,1,2,1|4,1,4,1|4,1,6,1|32,4")).fit()
    with pytest.raises(ValueError, match="strategy"):
        make(paused_run, strategy=Strategy()).fit()
    # a resume may change what does not change the run (progress bars, workers, eval batch size)
    summary = make(paused_run, cfg=config(eval_batch_size=32, progress=False)).fit(max_epochs_this_call=0)
    assert (summary["status"], summary["epoch"], summary["step"]) == ("paused", 1, 8)


def test_fresh_run_in_a_used_run_dir_starts_over(reference, tmp_path):
    make(tmp_path).fit(max_epochs_this_call=2)
    assert len(metrics(tmp_path)) == 2
    t = make(tmp_path)
    summary = t.fit(resume=False, max_epochs_this_call=1)
    assert (summary["status"], summary["epoch"], summary["step"]) == ("paused", 1, 8)
    assert len(summary["epochs"]) == 1 and len(t.history) == 1
    assert metrics(tmp_path) == metrics(reference[0])[:1]  # the log restarted, as the fresh run's
    assert ckpt.latest(tmp_path).name == "e0001-s00000008"
    # and it trains as the reference did from there
    make(tmp_path).fit()
    assert_same_weights(reference[0], tmp_path)
    assert metrics(tmp_path) == metrics(reference[0])


def test_fresh_run_killed_before_its_first_checkpoint_does_not_resume_the_old_run(tmp_path):
    """resume=False discards the earlier run; if the fresh run dies before it wrote a checkpoint,
    a later resume must not pick up the discarded run (whose metrics log is already gone)."""
    cfg = config(epochs=2)
    make(tmp_path, cfg=cfg).fit()  # an old, finished run
    with pytest.raises(Crash, match="simulated crash"):
        make(tmp_path, cfg=cfg, strategy=Probe(crash_at=2)).fit(resume=False)
    t = make(tmp_path, cfg=cfg)
    summary = t.fit()
    recs = metrics(tmp_path, drop=()) if (tmp_path / "metrics.jsonl").exists() else []
    assert recs == json.loads(json.dumps(t.history))  # the log and the run agree
    assert [r["epoch"] for r in recs if r.get("kind") == "epoch"] == [0, 1]
    assert summary["status"] == "finished"


def test_fit_in_several_calls_equals_one_call(reference, tmp_path):
    """fit(max_epochs_this_call=...) called repeatedly on one Trainer continues the run: the
    result is the one-call result, with a run directory (resumed from its checkpoint) and without
    one (nothing to resume: the trainer's own state carries over)."""
    t = make(tmp_path)
    assert [t.fit(max_epochs_this_call=2)["status"], t.fit()["status"]] == ["paused", "finished"]
    assert_same_weights(reference[0], tmp_path)
    t = make(None)
    t.fit(max_epochs_this_call=2)
    t.fit()
    assert t.step == 32
    assert tensors_equal(t.model.state_dict(), reference[1].model.state_dict()) == []


# ----------------------------------------------------------------------------- EmaModel

def test_ema_update_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    ema = EmaModel(model, 0.75)
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            expect[k] = 0.75 * expect[k] + 0.25 * v
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, expect[k], rtol=1e-6, atol=1e-6)
    # decay 0: the copy follows the model exactly
    e0 = EmaModel(model, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    e0.update(model)
    assert tensors_equal(e0.module.state_dict(), model.state_dict()) == []


def test_ema_warmup_after_a_reset_ramps_the_decay():
    """reset(warmup=True): update k after it uses min(decay, (1 + k) / (10 + k)) until that reaches
    the decay (then the fused path); the count survives a state round trip."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    ema = EmaModel(model, 0.5)
    ema.reset(model, warmup=True)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for k in range(3):  # decays 1/10, 2/11, 3/12
        d = min(0.5, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, v in model.state_dict().items():
            expect[name] = d * expect[name] + (1 - d) * v
        for name, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, expect[name], rtol=1e-6, atol=1e-6)
    other = EmaModel(model, 0.5)
    other.load_state_dict(ema.state_dict())
    other.warming = True  # what a strategy restores on resume
    assert other.current_decay() == pytest.approx(4 / 13) and ema.current_decay() == pytest.approx(4 / 13)
    assert int(ema.state_dict()["n_averaged"]) == 4
    ema.reset(model)  # a plain reset: no warm-up
    assert not ema.warming and ema.current_decay() == 0.5


def test_ema_reset_copies_and_state_round_trip():
    torch.manual_seed(1)
    model = nn.Linear(3, 3)
    ema = EmaModel(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert not torch.equal(ema.module.weight, model.weight)
    ema.reset(model)
    assert torch.equal(ema.module.weight, model.weight) and torch.equal(ema.module.bias, model.bias)
    with torch.no_grad():
        model.weight.fill_(4.0)  # a copy, not the same tensor
    assert torch.equal(ema.module.weight, torch.full((3, 3), 2.0))
    ema.update(model)  # after reset the first update is an EMA step, not a copy
    torch.testing.assert_close(ema.module.weight, torch.full((3, 3), 0.9 * 2.0 + 0.1 * 4.0))
    other = EmaModel(nn.Linear(3, 3), 0.9)
    other.load_state_dict(ema.state_dict())
    assert tensors_equal(other.state_dict(), ema.state_dict()) == []
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="decay"):
            EmaModel(model, bad)


# ----------------------------------------------------------------------------- learning

def test_plain_training_learns_digits():
    """Default strategy, the full digits split, 3 epochs: far above chance (10%)."""
    torch.manual_seed(0)
    model = tiny_model()
    cfg = TrainConfig(epochs=3, batch_size=64, lr=2e-3, warmup_epochs=1, ema_decays=(0.9,), num_workers=0,
                      drop_path=0.0, progress=False)
    trainer = Trainer(model, digits(), cfg)  # no run_dir: nothing written, nothing resumed
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["step"] == 3 * (1438 // 64)
    assert summary["final_acc"] > 30.0, summary["epochs"]
    assert summary["best_acc"] >= summary["final_acc"]
    assert math.isfinite(summary["final_acc_ema"])
    losses = [r["train_loss"] for r in summary["epochs"]]
    assert losses[-1] < losses[0] < math.log(10) + 0.1, losses
    assert summary["strategy"] == {"strategy": "none"}


def test_no_ema_copies(tmp_path):
    summary = make(tmp_path, strategy=Strategy(), cfg=config(epochs=1, ema_decays=())).fit()
    assert summary["status"] == "finished" and summary["final_acc_ema"] is None
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model_ema.safetensors").exists()


# ----------------------------------------------------------------------------- SIGINT, damaged checkpoints

def test_sigint_mid_epoch_checkpoints_then_resume_is_bit_for_bit(reference, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    first = make(tmp_path, strategy=Probe(sigint_at=11)).fit()  # Ctrl-C: like SIGTERM, no traceback
    assert signal.getsignal(signal.SIGINT) is before
    assert (first["status"], first["signal"], first["step"]) == ("interrupted", "SIGINT", 11)
    assert ckpt.latest(tmp_path).name == "e0001-s00000011"
    assert make(tmp_path).fit()["status"] == "finished"
    assert_same_weights(reference[0], tmp_path)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A run paused after 2 epochs: checkpoints e0001-s00000008 and e0002-s00000016 (latest)."""
    run_dir = tmp_path_factory.mktemp("two_epochs")
    assert make(run_dir).fit(max_epochs_this_call=2)["status"] == "paused"
    assert checkpoint_dirs(run_dir) == ["e0001-s00000008", "e0002-s00000016"]
    return run_dir


def _flip_finite(path):
    """Overwrite 16 bytes of the last tensor with other finite float32 values (0.5)."""
    data = bytearray(path.read_bytes())
    data[-16:] = b"\x00\x00\x00?" * 4
    path.write_bytes(bytes(data))


def _edit_state(path):
    state = json.loads(path.read_text())
    state["epoch"] = 3  # still valid JSON with every key: only the digest can tell
    path.write_text(json.dumps(state))


def _drop_key(path):
    state = json.loads(path.read_text())
    del state["optimizer"]
    path.write_text(json.dumps(state))


DAMAGE = {
    "flip": _flip_finite,
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_text("{not json"),
    "edit": _edit_state,
    "drop_key": _drop_key,
    "delete": lambda p: p.unlink(),
}


@pytest.mark.parametrize("file, how", [
    ("model.safetensors", "flip"), ("model.safetensors", "truncate"), ("model.safetensors", "empty"),
    ("state.safetensors", "flip"), ("state.safetensors", "truncate"), ("rng-rank0.safetensors", "flip"),
    ("state.json", "garbage"), ("state.json", "edit"), ("state.json", "drop_key"), ("state.json", "delete"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_epochs, tmp_path, caplog, file, how):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    bad = ckpt.checkpoint_dir(run_dir) / "e0002-s00000016"
    DAMAGE[how](bad / file)
    trainer = make(run_dir)
    with caplog.at_level("WARNING", logger="asvit_kernels.train.trainer"):
        trainer.fit(max_epochs_this_call=0)  # resume only
    assert (trainer.epoch, trainer.step) == (1, 8)  # the previous checkpoint
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "e0002-s00000016" in warned and file in warned and "damaged" in warned
    assert ckpt.latest(run_dir).name == "e0001-s00000008"
    assert checkpoint_dirs(run_dir) == ["e0001-s00000008", "e0002-s00000016.damaged"]
    assert len(metrics(run_dir)) == 1  # the records of the lost epoch are dropped


def test_fall_back_then_finish_equals_the_uninterrupted_run(reference, two_epochs, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    _flip_finite(ckpt.checkpoint_dir(run_dir) / "e0002-s00000016" / "model.safetensors")
    assert make(run_dir).fit()["status"] == "finished"
    assert_same_weights(reference[0], run_dir)
    assert metrics(run_dir) == metrics(reference[0])


def test_no_good_checkpoint_left_is_one_line_naming_the_file(two_epochs, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    for name in ("e0001-s00000008", "e0002-s00000016"):
        _flip_finite(ckpt.checkpoint_dir(run_dir) / name / "model.safetensors")
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        make(run_dir).fit()
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert str(ckpt.checkpoint_dir(run_dir) / "e0001-s00000008" / "model.safetensors") in msg
    assert "no earlier good checkpoint" in msg and "--no-resume" in msg


@pytest.mark.parametrize("fix_checksums", [False, True])
def test_nan_weights_say_the_checkpoint_is_damaged(two_epochs, tmp_path, fix_checksums):
    import shutil
    from safetensors.torch import save
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    for name in ("e0001-s00000008", "e0002-s00000016"):
        path = ckpt.checkpoint_dir(run_dir) / name
        weights = load_file(str(path / "model.safetensors"))
        first = sorted(weights)[0]
        weights[first] = torch.full_like(weights[first], float("nan"))
        data = save(weights)
        (path / "model.safetensors").write_bytes(data)
        if fix_checksums:  # checksums that match: the finiteness check must still catch it
            state = json.loads((path / "state.json").read_text())
            sums = {**state.pop("checksums"), "model.safetensors": ckpt.sha256(data)}
            state.pop("sha256")
            ckpt.write_state(path / "state.json", state, sums)
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        make(run_dir).fit()
    msg = str(info.value)
    assert "damaged" in msg and "model.safetensors" in msg and "Lower the learning rate" not in msg
    assert ("NaN or inf" in msg) == fix_checksums


def test_checksums_are_recorded_for_every_file(reference):
    latest = ckpt.latest(reference[0])
    state = json.loads((latest / "state.json").read_text())
    files = sorted(p.name for p in latest.iterdir() if p.name != "state.json")
    assert sorted(state["checksums"]) == files
    for name in files:
        assert state["checksums"][name] == ckpt.sha256((latest / name).read_bytes())


@pytest.mark.parametrize("content, needle", [("", "not valid JSON"), ("[1, 2]", "JSON object"),
                                             ('{"x": 1}', "'dir'"), ('{"dir": "../../etc"}', "'dir' must name")])
def test_damaged_latest_json_names_the_file(two_epochs, tmp_path, content, needle):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    pointer = ckpt.checkpoint_dir(run_dir) / "latest.json"
    pointer.write_text(content)
    with pytest.raises(ValueError, match=needle) as info:
        make(run_dir).fit()
    assert str(pointer) in str(info.value) and "\n" not in str(info.value)
