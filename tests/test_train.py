import pytest

from fastdiff import checkpoint
from fastdiff.files import write_json
from fastdiff.data import load_digits
from fastdiff.schedule import NoiseSchedule
from fastdiff.train import TrainConfig, Trainer

from conftest import TINY


def make(tmp_path, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup=5, ckpt_every=kw.pop("ckpt_every", 1000), **kw)
    return Trainer(load_digits(8), TINY, NoiseSchedule(), cfg, tmp_path)


def test_loss_falls(tmp_path):
    losses = make(tmp_path, 80).fit(progress=False)
    assert sum(losses[-15:]) / 15 < 0.6 * sum(losses[:5]) / 5


def test_resume_is_exact(tmp_path):
    straight = make(tmp_path / "a", 12).fit(progress=False)
    first = make(tmp_path / "b", 12, ckpt_every=5)
    first.config = TrainConfig(**{**first.config.__dict__, "steps": 7})  # "killed" after the checkpoint at step 5
    first.fit(progress=False)
    resumed = make(tmp_path / "b", 12)
    resumed.resume()
    assert resumed.step == 7
    assert resumed.fit(progress=False) == straight


def test_class_conditional_v_prediction_trains(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, label_dropout=0.5)
    model_cfg = TINY.__class__(**{**TINY.to_dict(), "num_classes": 10})
    trainer = Trainer(load_digits(8), model_cfg, NoiseSchedule(prediction_type="v_prediction"), cfg, tmp_path)
    assert len(trainer.fit(progress=False)) == 3
    model, schedule, _ = checkpoint.load_model(tmp_path)
    assert model.config.num_classes == 10 and schedule.prediction_type == "v_prediction"


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make(tmp_path, 2)
    trainer.fit(progress=False)
    before = (tmp_path / checkpoint.WEIGHTS).read_bytes()

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash)
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert (tmp_path / checkpoint.WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_resume_with_other_model_config_fails(tmp_path):
    make(tmp_path, 2).fit(progress=False)
    cfg = TrainConfig(steps=4, batch_size=16)
    other = Trainer(load_digits(8), TINY.__class__(**{**TINY.to_dict(), "ch": 64}), NoiseSchedule(), cfg, tmp_path)
    with pytest.raises(ValueError, match="model config"):
        other.resume()


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_model(tmp_path)
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable"):
        checkpoint.load_model(tmp_path)


def test_config_not_matching_weights(tmp_path):
    make(tmp_path, 1).fit(progress=False)
    config = checkpoint.json.loads((tmp_path / checkpoint.CONFIG).read_text())
    config["model"]["num_res_blocks"] = 2
    write_json(tmp_path / checkpoint.CONFIG, config)
    with pytest.raises(ValueError, match="does not match the weights"):
        checkpoint.load_model(tmp_path)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(lr=-1.0), dict(amp="fp8"), dict(ema_decay=1.0)])
def test_bad_train_options(kwargs):
    with pytest.raises(ValueError, match="--" + next(iter(kwargs)).replace("_", "-")):
        TrainConfig(**kwargs)


def test_image_size_mismatch(tmp_path):
    with pytest.raises(ValueError, match="the model expects"):
        Trainer(load_digits(16), TINY, NoiseSchedule(), TrainConfig(steps=1), tmp_path)
