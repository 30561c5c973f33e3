"""The verdicts the fixture models (fixtures/models.py) are built to get: every rule fires on its fault."""

from __future__ import annotations

MISMATCH, VARIANCE = "init-activation-mismatch", "variance-out-of-range"
HIDDEN = [str(2 * i) for i in range(11)]  # the 11 hidden Linear layers of the 12-layer MLPs

# fixture -> (activation a user names for bare state_dicts, expected findings at warning or above)
EXPECTED = {
    "deep_relu_xavier": ("relu", {(MISMATCH, layer, "error") for layer in HIDDEN}),
    "deep_relu_kaiming": ("relu", set()),
    # ... and its gradient going back shrinks 6x in variance per layer: out of the band below the 11th layer (blamed on it: its weights hand it down).
    "deep_relu_default": ("relu", {(VARIANCE, layer, "warning") for layer in HIDDEN} | {("signal-vanishing", "10", "error")}),
    # layer 0 (64→128): Kaiming's std is 4 % from Xavier's with tanh's gain, and 8192 draws tell them apart.
    "deep_tanh_kaiming": ("tanh", {(MISMATCH, layer, "error") for layer in HIDDEN}),
    "deep_tanh_xavier": ("tanh", set()),
    "zero_layer": ("relu", {("zero-weights", "4", "error")}),
    "ones_layer": ("relu", {("constant-weights", "2", "error")}),
    "nan_layer": ("relu", {("non-finite", "6", "error")}),
    "dead_units": ("relu", {("dead-units", "2", "error")}),
    "deep_cnn_kaiming": ("relu", set()),
    "resnet_style_bn": ("relu", set()),
    "duplicate_filters": ("relu", {("duplicate-units", "features.8", "warning")}),
    "shallow_default": ("relu", set()),
}


def serious(report) -> set[tuple[str, str, str]]:
    """(rule, layer, severity) of each finding above info."""
    return {(f.rule, f.layer, f.severity) for f in report.findings if f.severity != "info"}
