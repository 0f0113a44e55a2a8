"""Breakdown rows add up to the report's totals and survive CSV, Markdown and JSON unchanged."""

import csv
import io
import json

import pytest
import torch
from torch import nn

import micronet_score as ms
from micronet_score import breakdown


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.head.weight[0].zero_()
        return ms.count(net, torch.randn(2, 8), track="cifar100")


def test_hand_derived_totals(report):
    # Per sample: 2 blocks x (64 mults + 56 adds + 8 bias adds + 8 relu mults + 8 residual adds)
    # + head: 16 nonzero weights -> 16 mults, 3 outputs x (16/3 - 1) adds.
    assert report.mults == pytest.approx(2 * (64 + 8) + 16)
    assert report.adds == pytest.approx(2 * (56 + 8 + 8) + 16 - 3)


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_module_rows_sum_to_totals(report, depth):
    rows = breakdown.module_rows(report, depth)
    total = breakdown.totals(report)
    for column in ("storage", "mults", "adds", "others", "operations"):
        assert sum(r[column] for r in rows) == pytest.approx(total[column])
    assert total["storage"] == report.storage and total["operations"] == report.operations


def test_depth_groups_by_path_prefix(report):
    names = {r["name"] for r in breakdown.module_rows(report, depth=1)}
    assert names <= {"", "blocks", "head"} and {"blocks", "head"} <= names
    head = next(r for r in breakdown.module_rows(report, depth=1) if r["name"] == "head")
    assert head["parameters"] == 24 and head["nonzeros"] == 16 and head["density"] == pytest.approx(16 / 24)


def test_op_rows_sum_to_totals(report):
    rows = breakdown.op_rows(report)
    assert sum(r["operations"] for r in rows) == pytest.approx(report.operations)
    assert {"dot_product", "relu", "add"} <= {r["name"] for r in rows}


def test_sort_and_top(report):
    rows = breakdown.select(breakdown.module_rows(report), sort="ops", top=2)
    assert len(rows) == 2 and rows[0]["operations"] >= rows[1]["operations"]


def test_csv_parses_back_to_the_same_numbers(report):
    rows = breakdown.module_rows(report)
    total = breakdown.totals(report)
    parsed = list(csv.DictReader(io.StringIO(breakdown.to_csv(rows, total, "module"))))
    assert [p["name"] for p in parsed] == [r["name"] for r in rows] + ["total"]
    for p, r in zip(parsed, [*rows, total]):
        for column in ("parameters", "storage", "mults", "adds", "operations", "share"):
            assert float(p[column]) == r[column]


def test_markdown_parses_back_to_the_same_numbers(report):
    rows = breakdown.op_rows(report)
    total = breakdown.totals(report, "op")
    lines = breakdown.to_markdown(rows, total, "op").splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert header == list(breakdown.OP_COLUMNS)
    for cells, r in zip(body, [*rows, total]):
        assert float(cells[header.index("operations")]) == r["operations"]


def test_json_round_trip(report):
    rows = breakdown.module_rows(report)
    data = json.loads(breakdown.to_json(rows, breakdown.totals(report)))
    assert data["total"]["operations"] == report.operations and len(data["rows"]) == len(rows)
    # the schema-1 keys, one release: params was the raw count in these rows, flops the operations
    assert data["total"]["flops"] == report.operations and data["total"]["params"] == report.parameters


def test_raw_parameters_are_the_stored_values(report):
    # Net: 2 blocks x (8x8 weight + 8 bias) + head 3x8 (no bias) = 168 stored values
    assert report.parameters == 2 * (64 + 8) + 24
    assert breakdown.totals(report)["parameters"] == report.parameters


def test_score_parts_add_up_to_the_score(report):
    # cifar100 baseline: 36.5M storage, 10.49G operations (the rules' published WideResNet-28-10 figures)
    parts = breakdown.score_parts(report, ms.load_rules(), depth=1)
    assert sum(p["storage"] + p["operations"] for p in parts) == pytest.approx(report.score)
    head = next(p for p in parts if p["name"] == "head")
    assert head["storage"] == pytest.approx(report.layer("head").storage / 36.5e6)
