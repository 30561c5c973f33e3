"""The Lightning callback on a real `lightning.Trainer` (CPU, a few steps, a tiny MLP): a clean model trains, a
planted zero layer stops `fit` before its first step with the finding in the exception."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.tiny_training import mlp, regression_data

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402

from initaudit.integrations.errors import InitAuditFailed  # noqa: E402
from initaudit.integrations.lightning import InitAuditCallback  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, zero_layer: bool):
        super().__init__()
        self.net = mlp(zero_layer)
        self.steps_run = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TextExperiment(Logger):
    """A logger whose experiment takes text, as TensorBoard's SummaryWriter does (`add_text`)."""

    def __init__(self):
        super().__init__()
        self.texts: list[tuple[str, str]] = []

    name = property(lambda self: "text")
    version = property(lambda self: 0)
    experiment = property(lambda self: self)

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(module: Tiny, callback: InitAuditCallback, *loggers: Logger) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=list(loggers), callbacks=[callback],
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(regression_data(), batch_size=4))


def logged_counts(logger: CSVLogger) -> dict[str, str]:
    header, *values = open(f"{logger.log_dir}/metrics.csv", encoding="utf-8").read().splitlines()
    return {k: v for row in values for k, v in zip(header.split(","), row.split(",")) if v}


def test_a_clean_model_trains_and_its_counts_reach_the_trainer_logger(tmp_path):
    module, callback, logger = Tiny(zero_layer=False), InitAuditCallback(write_report=True), CSVLogger(tmp_path, "run")
    fit(module, callback, logger)
    assert module.steps_run == 2, "training should proceed past a clean audit"
    assert callback.report is not None and callback.report.summary["errors"] == 0
    counts = logged_counts(logger)
    assert counts["initaudit/errors"] == "0" and counts["initaudit/layers"] == "3"
    written = json.loads((tmp_path / "run" / "version_0" / "initaudit.json").read_text())
    assert written["summary"] == callback.report.summary


def test_a_planted_zero_layer_stops_fit_with_the_finding(tmp_path):
    module, logger, text = Tiny(zero_layer=True), CSVLogger(tmp_path, "run"), TextExperiment()
    with pytest.raises(InitAuditFailed) as raised:
        fit(module, InitAuditCallback(), logger, text)
    assert [(f.rule, f.layer) for f in raised.value.findings] == [("zero-weights", "net.2")]
    assert "net.2: IA101 zero-weights error" in str(raised.value)
    assert module.steps_run == 0, "the run should stop before its first step"
    assert logged_counts(logger)["initaudit/errors"] == "1"
    (tag, findings), = text.texts
    assert tag == "initaudit" and "net.2: IA101 zero-weights error" in findings
