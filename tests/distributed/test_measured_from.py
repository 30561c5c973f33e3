"""pipeline.analyse(measured_from=...): a live model's report built from its parameters' merged summaries (as the
ranks of a sharded model would send them) is the report of the model itself, ties included."""

from __future__ import annotations

import json
import math

import torch

from initaudit.config import Options
from initaudit.load import modules
from initaudit.measure import stats, summary
from initaudit.measure.tensors import summary_targets
from initaudit.pipeline import analyse, build_graph


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool, vocab: int = 500, width: int = 64, depth: int = 3):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width),
                                                              torch.nn.GELU(), torch.nn.Linear(4 * width, width))
                                          for _ in range(depth))
        self.head = torch.nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight
        else:  # a tie broken the way FSDP2 or a careless copy breaks it: equal values, two tensors
            self.head.weight = torch.nn.Parameter(self.wte.weight.detach().clone())

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def from_summaries(model: torch.nn.Module, ranks: int) -> str:
    """The report of `model` from summaries of its parameters cut into `ranks` row blocks, one Finished per
    stored tensor (tied names share it)."""
    loaded, options = modules.from_module(model, None), Options()
    targets = summary_targets(build_graph(loaded, options))
    by_object: dict[int, summary.Finished] = {}
    found = {}
    for key, (units, axis) in targets.items():
        tensor = loaded.tensors[key]
        storage = tensor.untyped_storage().data_ptr()
        if storage not in by_object:
            rows = tensor.shape[0]
            step = stats.chunk_rows(math.prod(tensor.shape[1:]))
            cuts = sorted({0, rows, *(rows * i // ranks // step * step for i in range(1, ranks))})
            rest = (0,) * (tensor.dim() - 1)
            pieces = [summary.summarize(tensor[a:b], key, tuple(tensor.shape), (a, *rest), units=units, unit_axis=axis)
                      for a, b in zip(cuts, cuts[1:])]
            by_object[storage] = summary.finish(summary.merge(pieces))
        found[key] = by_object[storage]
    return json.dumps(analyse(loaded, options, measured_from=found).report.to_dict(), indent=2)


def direct(model: torch.nn.Module) -> str:
    return json.dumps(analyse(modules.from_module(model, None), Options()).report.to_dict(), indent=2)


def test_a_tied_model_from_summaries_is_the_model_itself():
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    report = from_summaries(model, 2)
    assert report == direct(model)
    assert "tied-weights-diverged" not in {f["rule"] for f in json.loads(report)["findings"]}


def test_a_broken_tie_is_found_from_summaries_as_from_the_model():
    torch.manual_seed(0)
    model = TinyLM(tied=False)
    report = from_summaries(model, 4)
    assert report == direct(model)
    assert "tied-weights-diverged" in {f["rule"] for f in json.loads(report)["findings"]}
