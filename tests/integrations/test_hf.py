"""The Hugging Face callback on a real `transformers.Trainer` (CPU, two steps, a tiny MLP that returns its loss,
offline, reporting to nothing): a clean model trains, a planted zero layer stops `train()` before its first step
with the finding in the exception."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.tiny_training import mlp, regression_data

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (initaudit's `hf` extra installs it)
from transformers import Trainer, TrainingArguments  # noqa: E402

from initaudit.integrations.errors import InitAuditFailed  # noqa: E402
from initaudit.integrations.hf import InitAuditCallback  # noqa: E402


class Regressor(torch.nn.Module):
    def __init__(self, zero_layer: bool):
        super().__init__()
        self.net = mlp(zero_layer)
        self.steps_run = 0

    def forward(self, x, labels=None):
        if self.training:
            self.steps_run += 1
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.data = regression_data()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "labels": y}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def trainer(tmp_path, model: Regressor, callback: InitAuditCallback) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", max_steps=2, use_cpu=True,
                             per_device_train_batch_size=4, save_strategy="no", logging_steps=1, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback])


def test_a_clean_model_trains_and_its_counts_reach_the_trainer_state(tmp_path):
    model, callback = Regressor(zero_layer=False), InitAuditCallback(write_report=True)
    run = trainer(tmp_path, model, callback)
    run.train()
    assert run.state.global_step == 2 and model.steps_run == 2, "training should proceed past a clean audit"
    counts = [entry for entry in run.state.log_history if "initaudit/errors" in entry]
    assert counts == [{"initaudit/layers": 3, "initaudit/errors": 0, "initaudit/warnings": 0,
                       "initaudit/infos": callback.report.summary["infos"], "step": 0}]
    written = json.loads((tmp_path / "out" / "initaudit.json").read_text())
    assert written["summary"] == callback.report.summary and written["format"] == "torch-module"


def test_a_planted_zero_layer_stops_train_with_the_finding(tmp_path):
    model = Regressor(zero_layer=True)
    run = trainer(tmp_path, model, InitAuditCallback())
    with pytest.raises(InitAuditFailed) as raised:
        run.train()
    assert [(f.rule, f.layer) for f in raised.value.findings] == [("zero-weights", "net.2")]
    assert model.steps_run == 0 and run.state.global_step == 0, "the run should stop before its first step"
    assert not (tmp_path / "out" / "initaudit.json").exists(), "no report was asked for"
