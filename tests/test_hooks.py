"""The trainer's hooks: a custom hook sees every event with the state it is documented to see, default
hooks can be removed, hooks run in a defined order, and label noise works through its hook."""
import dataclasses
import json
import math

import pytest
import torch

from ksl_ops.data import render_synthetic
from ksl_ops.engine import TrainConfig, Trainer
from ksl_ops.engine.hooks import (
    Checkpoint,
    Diagnostics,
    Evaluation,
    HookBase,
    LabelNoise,
    LRSchedule,
    Metrics,
    NaNGuard,
    Progress,
    default_hooks,
)

# 6 train ids x 2 cameras x 3 images (36 train images), 4 test ids; 32x16 pixels.
SYNTH = dict(num_train_ids=6, num_test_ids=4, num_cams=2, images_per_cam=3)
EVENTS = ("before_train", "before_epoch", "before_step", "after_step", "record_epoch", "after_epoch", "after_train")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    render_synthetic(root, height=32, width=16, **SYNTH)
    return root


def _config(root, out, **kw):
    base = dict(data_root=str(root), synthetic=dict(SYNTH), height=32, width=16, batch_size=8, num_instances=2,
                epochs=2, max_iters_per_epoch=2, workers=0, backend="reference", output_dir=str(out),
                progress="off", seed=3, eval_batch_size=16)
    base.update(kw)
    return TrainConfig.from_preset("cpu", **base)


class Recorder(HookBase):
    """Logs every event with the trainer state it sees, and adds an entry to every epoch record."""

    def __init__(self, name="rec", calls=None):
        self.name = name
        self.calls = [] if calls is None else calls

    def _log(self, event, **state):
        self.calls.append((self.name, event, state))

    def before_train(self):
        self._log("before_train", start=self.trainer.start_epoch, history=len(self.trainer.history))

    def before_epoch(self):
        t = self.trainer
        self._log("before_epoch", epoch=t.epoch, iters=t.iters, record=dict(t.record), training=t.model.training)

    def before_step(self):
        t = self.trainer
        self._log("before_step", epoch=t.epoch, iter=t.iter, batch=tuple(t.batch.images.shape),
                  labels=t.batch.labels.tolist(), indices=t.batch.indices.tolist(),
                  lr=t.optimizer.param_groups[0]["lr"])

    def after_step(self):
        t = self.trainer
        out = t.step_output
        self._log("after_step", epoch=t.epoch, iter=t.iter, total=float(out.loss.total.detach()),
                  branches=len(out.logits), running=t.running_loss())

    def record_epoch(self):
        t = self.trainer
        self._log("record_epoch", epoch=t.epoch, keys=list(t.record), in_history=len(t.history))
        t.record["custom/epoch_sq"] = (t.epoch + 1) ** 2

    def after_epoch(self):
        t = self.trainer
        self._log("after_epoch", epoch=t.epoch, keys=list(t.record), is_last=t.history[-1] is t.record,
                  checkpoint=(t.output_dir / t.CHECKPOINT).exists())

    def after_train(self):
        self._log("after_train", final=self.trainer.final, epochs=len(self.trainer.history))


def _events(calls, name="rec"):
    return [(e, s.get("epoch"), s.get("iter")) for n, e, s in calls if n == name]


def test_a_custom_hook_runs_at_every_event_with_the_state(synth_root, tmp_path):
    trainer = Trainer(_config(synth_root, tmp_path, eval_every=1), log=lambda s: None)
    rec = Recorder()
    trainer.register_hooks(rec)
    assert trainer.hooks[-1] is rec and rec.trainer is trainer
    result = trainer.fit()

    want = [("before_train", None, None)]
    for epoch in range(2):
        want.append(("before_epoch", epoch, None))
        for it in range(2):
            want += [("before_step", epoch, it), ("after_step", epoch, it)]
        want += [("record_epoch", epoch, None), ("after_epoch", epoch, None)]
    want.append(("after_train", None, None))
    assert _events(rec.calls) == want

    states = {(e, s.get("epoch"), s.get("iter")): s for _, e, s in rec.calls}
    assert states[("before_train", None, None)] == {"start": 0, "history": 0}
    # before_epoch: the model in training mode, the record started with the epoch's number, lr and sampler.
    s = states[("before_epoch", 1, None)]
    assert s["iters"] == 2 and s["training"]
    assert s["record"] == {"epoch": 2, "lr": result["history"][1]["lr"], "sampler": "pk", "iters": 2}
    # before_step: the batch, its labels (the true identities: no label noise) and indices into dataset.train.
    clean = [pid for _, pid, _ in trainer.dataset.train]
    for epoch in range(2):
        for it in range(2):
            s = states[("before_step", epoch, it)]
            assert s["batch"] == (8, 3, 32, 16)
            assert s["labels"] == [clean[i] for i in s["indices"]]
    # The schedule (LRSchedule, which runs first) has set the step's lr before the custom hook runs.
    sched = trainer.scheduler
    assert states[("before_step", 0, 1)]["lr"] == pytest.approx(0.01 * sched.factor(0.5))
    # after_step: the step's loss and outputs; the running mean includes this step.
    s = states[("after_step", 1, 1)]
    assert math.isfinite(s["total"]) and s["branches"] == 3
    assert s["running"]["total"] == pytest.approx(result["history"][1]["loss"]["total"])
    # record_epoch: the losses are in the record, evaluation (an after_epoch hook) not yet; not in history.
    s = states[("record_epoch", 0, None)]
    assert {"loss", "diag", "time_s"} <= set(s["keys"]) and "eval" not in s["keys"] and s["in_history"] == 0
    # after_epoch: the record is history's last, evaluated (every epoch here), checkpointed before the
    # custom hook (registered after the defaults) runs.
    for epoch in range(2):
        s = states[("after_epoch", epoch, None)]
        assert s["is_last"] and "eval" in s["keys"] and s["checkpoint"]
    s = states[("after_train", None, None)]
    assert s["epochs"] == 2 and s["final"] is result["final"] and s["final"]["R1"] >= 0

    # The custom entry is in the records, in metrics.json and in the checkpoint's history.
    assert [h["custom/epoch_sq"] for h in result["history"]] == [1, 4]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["custom/epoch_sq"] for h in metrics["history"]] == [1, 4]
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert [h["custom/epoch_sq"] for h in state["metrics"]["history"]] == [1, 4]


def test_removing_default_hooks(synth_root, tmp_path):
    trainer = Trainer(_config(synth_root, tmp_path / "a"), log=lambda s: None)
    removed = trainer.remove_hooks(Checkpoint)
    assert len(removed) == 1 and isinstance(removed[0], Checkpoint)
    assert not any(isinstance(h, Checkpoint) for h in trainer.hooks)
    result = trainer.fit()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["curves.png", "metrics.json"]  # no last.ckpt
    assert result["final"] is not None

    # No hooks at all: the steps alone. No files, no evaluation, no diagnostics, a constant learning rate.
    bare = Trainer(_config(synth_root, tmp_path / "b"), log=lambda s: None, hooks=[])
    lr = bare.optimizer.param_groups[0]["lr"]
    result = bare.fit()
    assert list((tmp_path / "b").iterdir()) == [] and result["final"] is None
    assert [h["lr"] for h in result["history"]] == [lr, lr] and "diag" not in result["history"][0]
    assert all(math.isfinite(h["loss"]["total"]) for h in result["history"])

    # Without the diagnostics hook's per-step part, the record keeps the head BN variances only.
    quiet = Trainer(_config(synth_root, tmp_path / "c", diagnostics=False, epochs=1), log=lambda s: None)
    assert next(h for h in quiet.hooks if isinstance(h, Diagnostics)).per_step is False
    diag = quiet.train_epoch(0)["diag"]
    assert diag and all(k.startswith("bn_var/") for k in diag)


def test_hook_order(synth_root, tmp_path):
    cfg = _config(synth_root, tmp_path, label_noise=0.2)
    assert [type(h) for h in default_hooks(cfg)] == [LRSchedule, LabelNoise, NaNGuard, Diagnostics, Evaluation,
                                                     Progress, Checkpoint, Metrics]
    assert LabelNoise not in [type(h) for h in default_hooks(_config(synth_root, tmp_path))]

    calls = []
    first, second = Recorder("first", calls), Recorder("second", calls)
    trainer = Trainer(_config(synth_root, tmp_path, epochs=1), log=lambda s: None, hooks=[first])
    trainer.register_hooks(second)
    assert trainer.hooks == [first, second]
    trainer.fit()
    names = [n for n, _, _ in calls]
    assert names == ["first", "second"] * (len(calls) // 2)  # every event: first, then second
    assert _events(calls, "first") == _events(calls, "second")

    # The default order: the epoch is evaluated before it is checkpointed and logged.
    logs = []
    run = Trainer(_config(synth_root, tmp_path / "d", epochs=1), log=logs.append)
    run.fit()
    state = torch.load(tmp_path / "d" / "last.ckpt", weights_only=True)
    assert "eval" in state["metrics"]["history"][-1]
    assert any(line.startswith("epoch   1/1") and "mAP" in line for line in logs)


def test_bad_hooks_are_refused(synth_root, tmp_path):
    trainer = Trainer(_config(synth_root, tmp_path), log=lambda s: None, hooks=[])
    with pytest.raises(TypeError, match="a hook must be a ksl_ops.engine.hooks.HookBase, got function"):
        trainer.register_hooks(lambda: None)
    with pytest.raises(ValueError, match=r"no Checkpoint hook is registered; the hooks are \[\]"):
        trainer.remove_hooks(Checkpoint)
    with pytest.raises(ValueError, match=r"no Metrics hook is registered to insert before; the hooks are \[\]"):
        trainer.register_hooks(Recorder(), before=Metrics)
    assert trainer.hooks == []  # nothing registered by a refused call
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"LabelNoise: fraction must be a number in \[0, 1\), got"):
            LabelNoise(bad)
    with pytest.raises(ValueError, match="NaNGuard: every must be an integer >= 1, got 0"):
        NaNGuard(0)
    with pytest.raises(ValueError, match="Checkpoint: every must be an integer >= 1, got 0"):
        Checkpoint(0)
    with pytest.raises(ValueError, match="Evaluation: every must be an integer >= 0, got -1"):
        Evaluation(-1)


class _RelabelItems(HookBase):
    """Label noise the other way: the loader's items rewritten with the epoch's labels."""

    def __init__(self, noise):
        self.noise = noise

    def before_epoch(self):
        t = self.trainer
        images = t.loader.dataset.images
        images.items = [(p, y, c) for (p, _, c), y in zip(t.dataset.train, self.noise.labels(t.epoch))]


def test_label_noise_through_the_hook(synth_root, tmp_path):
    cfg = _config(synth_root, tmp_path / "n", label_noise=0.25, epochs=3, max_iters_per_epoch=3)
    trainer = Trainer(cfg, log=lambda s: None)
    noise = next(h for h in trainer.hooks if isinstance(h, LabelNoise))
    rec = Recorder()
    trainer.register_hooks(rec)
    seen_by_loss = []
    trainer.criterion.register_forward_hook(lambda m, args, out: seen_by_loss.append(args[2].tolist()))
    result = trainer.fit()

    clean = [pid for _, pid, _ in trainer.dataset.train]
    steps = [s for _, e, s in rec.calls if e == "before_step"]
    assert len(steps) == 9
    wrong = 0
    for s, labels in zip(steps, seen_by_loss):
        noisy = noise.labels(s["epoch"])
        assert s["labels"] == labels == [noisy[i] for i in s["indices"]]  # the step trains on the noisy ones
        wrong += sum(y != clean[i] for y, i in zip(labels, s["indices"]))
    assert wrong > 0
    share = round(0.25 * len(clean)) / len(clean)
    assert [h["label_noise"] for h in result["history"]] == [pytest.approx(share)] * 3
    assert [pid for _, pid, _ in trainer.dataset.train] == clean  # the dataset is left clean
    assert trainer.train_loader(0).dataset.items == trainer.dataset.train

    # Bit for bit the training of a run whose loader's items carry the noisy labels instead.
    other = Trainer(dataclasses.replace(cfg, output_dir=str(tmp_path / "items")), log=lambda s: None)
    other.remove_hooks(LabelNoise)
    other.register_hooks(_RelabelItems(noise), before=NaNGuard)
    assert [type(h) for h in other.hooks][:3] == [LRSchedule, _RelabelItems, NaNGuard]
    again = other.fit()
    for a, b in zip(result["history"], again["history"], strict=True):
        assert a["loss"] == b["loss"] and a["diag"] == b["diag"]
    assert (result["final"]["R1"], result["final"]["mAP"]) == (again["final"]["R1"], again["final"]["mAP"])
    for k, v in other.model.state_dict().items():
        torch.testing.assert_close(v, trainer.model.state_dict()[k], rtol=0, atol=0, msg=k)
