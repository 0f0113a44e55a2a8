"""The loop API counts inference: a model in training gives the cost of the model as deployed, its training
state untouched, backward never counted; the trainer callbacks log what count() says."""

import copy

import pytest
import torch
from torch import nn

import micronet_score as ms

# Linear(8, 8) -> BatchNorm1d(8) -> Dropout -> Linear(8, 2), counted by hand per sample at inference:
#   Linear(8, 8): 8 outputs x (8 mults + 7 adds) + 8 bias adds           = 64 mults + 64 adds
#   BatchNorm1d after a linear folds into its bias: 1 add per element     =  8 adds
#   Dropout at inference: nothing
#   Linear(8, 2): 2 outputs x (8 mults + 7 adds) + 2 bias adds            = 16 mults + 16 adds
HAND_MULTS, HAND_ADDS = 64 + 16, 64 + 8 + 16
# storage: 64 + 8 weights and bias, one folded value per batch-norm channel (8), 16 + 2: all fp32, dense
HAND_STORAGE = 64 + 8 + 8 + 16 + 2


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def assert_hand_count(report: ms.Report) -> None:
    assert (report.mults, report.adds, report.others) == (HAND_MULTS, HAND_ADDS, 0)
    assert report.flops == HAND_MULTS + HAND_ADDS and report.params == HAND_STORAGE
    assert not report.warnings and not report.uncounted


def train_state(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    assert a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("how", ["count", "count_shape_only", "snapshot", "snapshot_real"])
def test_train_mode_model_reports_its_inference_cost(how):
    torch.manual_seed(0)
    model, x = small_net().train(), torch.randn(16, 8)
    before = train_state(model)
    if how.startswith("count"):
        report = ms.count(model, x, shape_only=how == "count_shape_only")
    else:
        report = ms.Counter(model).snapshot(x, shape_only=how == "snapshot")
    assert_hand_count(report)
    assert_same_state(train_state(model), before)
    assert report == ms.count(copy.deepcopy(model).eval(), x)  # its eval-mode twin


def test_training_graph_on_request_and_said():
    torch.manual_seed(0)
    model, x = small_net().train(), torch.randn(16, 8)
    before = train_state(model)
    report = ms.count(model, x, training=True)
    assert_same_state(train_state(model), before)  # batch statistics and dropout's random draws given back
    assert report.flops > HAND_MULTS + HAND_ADDS  # batch statistics and the dropout mask are training work
    assert any("training-mode forward" in w for w in report.warnings)


def test_backward_work_never_appears():
    torch.manual_seed(0)
    model, x = small_net().eval(), torch.randn(16, 8)
    counter = ms.Counter(model)
    with counter.measure():
        y = model(x)
        y.backward(torch.ones_like(y))  # ones_like is free: what is counted is the forward alone
    report = counter.report()
    assert (report.mults, report.adds) == (HAND_MULTS, HAND_ADDS)
    assert any("backward pass ran while measuring" in w for w in report.warnings)
    assert all(p.grad is not None for p in model.parameters())  # the backward did run


def test_measure_of_a_training_forward_says_so():
    torch.manual_seed(0)
    model, x = small_net().train(), torch.randn(16, 8)
    counter = ms.Counter(model)
    with counter.measure():
        model(x)
    assert any("training-mode forward" in w and "'1'" in w for w in counter.report().warnings)
    assert_hand_count(counter.snapshot(x))  # a snapshot is its own report, from the inference graph


def _train(measured: bool) -> tuple:
    torch.manual_seed(0)
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(16, 8), torch.randint(0, 2, (16,))) for _ in range(3)]
    counter = ms.Counter(model, track="cifar100") if measured else None
    for x, y in data:
        model.train()
        optimizer.zero_grad()
        if counter is None:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        else:
            counter.snapshot(x)
            with counter.measure():
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            counter.snapshot(x, shape_only=False)
            ms.count(model, x)
        optimizer.step()
        if counter is not None:
            assert_hand_count(counter.snapshot(x).model_copy(update={"warnings": []}))
    return train_state(model)


def test_measuring_inside_a_training_loop_leaves_training_bit_identical():
    assert_same_state(_train(measured=True), _train(measured=False))


def test_observers_of_fake_quantization_are_left_alone():
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(tq.QuantStub(), nn.Linear(8, 4), tq.DeQuantStub())
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    model = tq.prepare_qat(model.train())
    model(torch.randn(4, 8))  # observers hold some statistics
    x = torch.randn(4, 8) * 10  # would move them
    before = train_state(model)
    ms.count(model, x)
    ms.Counter(model).snapshot(x, shape_only=False)
    ms.Counter(model).snapshot(x)
    assert_same_state(train_state(model), before)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(self.embed(ids))


# per token: the lookup is free; the head is 50 x (16 mults + 15 adds) + 50 bias adds = 800 mults + 800 adds
TOKEN_FLOPS = 1600


def test_token_track_counts_every_token_position():
    torch.manual_seed(0)
    model = TinyLM()
    for shape in ((4, 64), (1, 256)):
        ids = torch.randint(0, 50, shape)
        assert ms.count(model, ids, track="wikitext103").flops == TOKEN_FLOPS
        counter = ms.Counter(model, track="wikitext103")
        with counter.measure():
            model(ids)
        report = counter.report()
        assert report.samples == 256 and report.flops == TOKEN_FLOPS
        assert counter.snapshot(ids).flops == TOKEN_FLOPS


def test_token_track_that_cannot_tell_names_the_fix():
    model = nn.Linear(16, 50)
    with pytest.raises(ms.MicronetError, match="samples="):
        ms.count(model, torch.randn(4, 16), track="wikitext103")
    counter = ms.Counter(model, track="wikitext103")
    with pytest.raises(ms.MicronetError, match="samples="), counter.measure():
        model(torch.randn(4, 16))
    assert ms.count(model, torch.randn(4, 16), track="wikitext103", samples=4).flops == TOKEN_FLOPS


def test_declared_widths_the_model_does_not_hold_are_warned():
    torch.manual_seed(0)
    model = small_net().eval()
    report = ms.count(model, torch.randn(2, 8), bits=8, act_bits=8)
    audit = [w for w in report.warnings if w.startswith("audit:")]
    # random fp32 tensors of more than 2 values lie on no uniform grid; any two values do (3.bias), and the
    # batch norm's fresh ones and zeros too; and there is no activation quantizer at all
    for name in ("0.weight", "0.bias", "3.weight"):
        assert any(w.startswith(f"audit: {name}:") and "declared as 8 bits" in w for w in audit), name
    assert any("no activation quantizer" in w for w in audit) and len(audit) == 4
    with pytest.raises(ms.MicronetError, match="do not hold"):
        ms.count(model, torch.randn(2, 8), bits=8, strict=True)


def test_declared_widths_warnings_equal_the_cli(cli, tmp_path):
    import json

    from micronet_score.models import registry

    from micronet_score.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    config = {"depth": 10, "widen": 1, "num_classes": 10}
    net = registry.get("wrn-28-10").build(config)
    path = save_checkpoint(tmp_path / "wrn.pt", "wrn-28-10", config, net.state_dict())
    code, out, err = cli("count", str(path), "--bits", "8", "--act-bits", "8", "--json")
    assert code == 0, err
    by_cli = [w for w in json.loads(out)["warnings"] if w.startswith("audit:")]
    loaded = load_model(path)
    example = registry.get("wrn-28-10").example_inputs(loaded.model)
    by_api = [w for w in ms.count(loaded.model, *example, bits=8, act_bits=8).warnings if w.startswith("audit:")]
    assert by_cli and by_api == by_cli


def _lightning_module():
    pl = pytest.importorskip("pytorch_lightning", reason="the [lightning] extra is not installed")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return pl, Module()


def test_lightning_callback_logs_what_count_says(tmp_path):
    pl, module = _lightning_module()
    import csv

    from pytorch_lightning.loggers import CSVLogger

    from micronet_score.integrations.lightning import MicronetCallback

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    example = torch.randn(4, 8)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        callbacks=[MicronetCallback(example, track="cifar100")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    expected = ms.count(module, example, track="cifar100")
    assert expected.flops == HAND_MULTS + HAND_ADDS and expected.params == HAND_STORAGE
    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = [r for r in rows if r.get("micronet/score")]
    assert len(logged) == 2  # one per epoch, through the trainer's logger
    for row in logged:
        assert float(row["micronet/operations"]) == pytest.approx(expected.flops)
        assert float(row["micronet/storage"]) == pytest.approx(expected.params)
        assert float(row["micronet/score"]) == pytest.approx(expected.score)


def test_hugging_face_callback_logs_what_count_says(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    from micronet_score.integrations.huggingface import MicronetCallback

    class LM(TinyLM):
        def forward(self, input_ids, labels=None):
            logits = super().forward(input_ids)
            loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            return {"loss": loss, "logits": logits}

    torch.manual_seed(0)
    model = LM()
    ids = torch.randint(0, 50, (16, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    example = {"input_ids": ids[:2]}
    trainer.add_callback(MicronetCallback(trainer, example, track="wikitext103"))
    trainer.train()
    expected = ms.count(model, **example, track="wikitext103")
    assert expected.flops == TOKEN_FLOPS
    logged = [h for h in trainer.state.log_history if "micronet/score" in h]
    assert len(logged) == 2  # one per evaluation, through trainer.log (every reporter and the log history)
    for entry in logged:
        assert entry["micronet/operations"] == pytest.approx(expected.flops)
        assert entry["micronet/storage"] == pytest.approx(expected.params)
        assert entry["micronet/score"] == pytest.approx(expected.score)
    assert trainer.evaluate()["micronet/operations"] == pytest.approx(expected.flops)
