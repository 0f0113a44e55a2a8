"""JAIST's QRNN language model for WikiText-103 (MicroNet 2019), in plain PyTorch.

The layout is awd-lstm-lm's ``RNNModel`` with ``torchqrnn`` layers and the split (adaptive) softmax of its
``SplitCrossEntropyLoss``, so that state dicts saved by that code load as they are:

* ``encoder.weight`` (V, E): the embedding, tied with ``decoder.weight``; ``decoder.bias`` (V) is not tied.
* ``rnns.N.linear.module.weight_raw`` (3H, window*I) and ``.bias`` (3H): one fused affine map per layer
  (``weight_raw`` is the name awd-lstm's WeightDrop wrapper gives the weight). Rows are the gates Z, F, O.
* ``criterion.tail_vectors`` (K, E) and ``criterion.tail_bias`` (K): the split softmax's tombstone vectors.

Per layer and time step (window 2 in the first layer, 1 in the others)::

    s_t = [x_t ; x_{t-1}]            (current token first; x_{-1} is carried across calls, zeros at the start)
    z, f, o = tanh(W_z s_t + b_z), sigmoid(W_f s_t + b_f), sigmoid(W_o s_t + b_o)
    c_t = f * z + (1 - f) * c_{t-1}  (ForgetMult)
    h_t = o * c_t                    (output gate)

The last layer's hidden width equals the embedding width (weights are tied). The carried state is each layer's
cell ``c_T`` and its last input ``x_T``.

Split softmax with splits ``s_1 < ... < s_K`` (WikiText-103: 2800, 20000, 76000): the head scores the words
``[0, s_1)`` plus K tombstones (the tail vectors); a word in cluster k (``[s_k, s_{k+1})``) has log-probability
``head[-k] + log_softmax(cluster k)``: tombstones are indexed from the end, so cluster 1 uses the last tail vector.
Word ids are awd-lstm's: order of first appearance in train.txt, then valid.txt, then test.txt, with ``<eos>``
ending every line (the WikiText-103 data pipeline builds that vocabulary).

Accepted checkpoint formats (see :func:`split_state_dict`): a flat state dict with the model keys and the criterion
keys prefixed ``criterion.``, or ``{'model': model_state_dict, 'criterion': criterion_state_dict}``. JAIST's own
``WT103.12hr.QRNN.pt`` is a whole-object pickle of ``[model, criterion, optimizer]``; micronet-score never unpickles
arbitrary objects, so such a file must first be converted to one of these formats (by running, in a trusted
environment with awd-lstm-lm importable, ``torch.save({'model': model.state_dict(), 'criterion':
criterion.state_dict()}, path)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from micronet_score.models.registry import ModelSpec, register
from torch import Tensor, nn
from torch.nn import functional as F

from micronet_score.checkpoint import fit_problems
from micronet_score.errors import MicronetError

WT103_VOCABULARY = 267_735
WT103_SPLITS = (2800, 20000, 76000)
"""awd-lstm-lm's splits for vocabularies above 75,000 words (WikiText-103)."""

DEFAULT_CONFIG: dict[str, Any] = {
    "vocabulary": WT103_VOCABULARY,
    "emsize": 300,
    "nhid": 1800,
    "nlayers": 4,
    "splits": list(WT103_SPLITS),
}


def default_splits(vocabulary: int) -> list[int]:
    """awd-lstm-lm's choice of splits: [2800, 20000, 76000] above 75,000 words, none below."""
    return list(WT103_SPLITS) if vocabulary > 75_000 else []


class RawLinear(nn.Module):
    """An affine map whose weight is called ``weight_raw``, as awd-lstm's WeightDrop stores it (no dropout here)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_raw = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_raw, self.bias)


class WeightDropShell(nn.Module):
    """The WeightDrop wrapper's place in the key layout (``linear.module.*``); evaluation uses no dropout."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


@dataclass
class LayerState:
    """What one QRNN layer carries to the next call: its cell (B, H) and its last input (B, I)."""

    cell: Tensor
    prev_x: Tensor


class QRNNLayer(nn.Module):
    """One QRNN-fo layer with an output gate; window 1 or 2."""

    def __init__(self, input_size: int, hidden_size: int, window: int):
        super().__init__()
        if window not in (1, 2):
            raise ValueError("window must be 1 or 2")
        self.input_size, self.hidden_size, self.window = input_size, hidden_size, window
        self.linear = WeightDropShell(RawLinear(window * input_size, 3 * hidden_size))

    def forward(self, x: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        """x: (T, B, I) -> h: (T, B, H) and the state after the last step."""
        batch = x.shape[1]
        if state is None:
            state = LayerState(x.new_zeros(batch, self.hidden_size), x.new_zeros(batch, self.input_size))
        if self.window == 2:
            previous = torch.cat([state.prev_x.unsqueeze(0), x[:-1]], dim=0)
            source = torch.cat([x, previous], dim=2)
        else:
            source = x
        z, f, o = self.linear(source).chunk(3, dim=2)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        cell = state.cell
        cells = []
        for t in range(x.shape[0]):
            cell = f[t] * z[t] + (1 - f[t]) * cell
            cells.append(cell)
        c = torch.stack(cells)
        return o * c, LayerState(cell, x[-1])


class SplitSoftmax(nn.Module):
    """The tombstone parameters of awd-lstm's SplitCrossEntropyLoss (its keys: tail_vectors, tail_bias); like
    awd-lstm's, it has none without splits (an empty criterion state dict)."""

    def __init__(self, emsize: int, clusters: int):
        super().__init__()
        if clusters:
            self.tail_vectors = nn.Parameter(torch.empty(clusters, emsize))
            self.tail_bias = nn.Parameter(torch.empty(clusters))


class QRNNLanguageModel(nn.Module):
    """Embedding, stacked QRNN layers, tied split softmax: log-probabilities of every word for every token.

    Streaming interface (what a language-model evaluator needs; time first, word ids as in the vocabulary):

    * ``model(tokens, state) -> (log_probs, state)``: tokens (T, B) long; log_probs (T, B, V), natural-log
      probabilities of the *next* word after each input token, the whole distribution (this is what gets counted);
    * ``model.score(tokens, targets, state) -> (target_log_probs, state)``: targets (T, B), usually the tokens
      shifted by one; target_log_probs (T, B) = log p(targets[t] | tokens[..t]);
    * ``state``: ``None`` (or :meth:`init_state`) starts from zeros; pass the returned state to the next call to
      continue the stream, so that splitting a sequence into segments gives the same numbers as one call. It is a
      list with one :class:`LayerState` (cell c_T and last input x_T) per layer; reset it at the start of a stream.

    Evaluate under ``torch.no_grad()`` (the state then holds no graph). Perplexity of a stream of N + 1 word ids
    ``ids``: feed ``ids[:-1]`` as tokens and ``ids[1:]`` as targets, in segments of any length, and take
    ``exp(-sum(target_log_probs) / N)``.
    """

    vocabulary_order = "first"
    """awd-lstm-lm's word ids: order of first appearance over train, valid, test (not training frequency)."""

    def __init__(self, vocabulary: int, emsize: int, nhid: int, nlayers: int, splits: Sequence[int]):
        super().__init__()
        splits = list(splits)
        if splits != sorted(set(splits)) or (splits and (splits[0] <= 0 or splits[-1] >= vocabulary)):
            raise MicronetError(f"QRNN splits {splits} must increase strictly within (0, {vocabulary})")
        self.vocabulary, self.emsize, self.nhid, self.nlayers = vocabulary, emsize, nhid, nlayers
        self.splits = splits
        self.encoder = nn.Embedding(vocabulary, emsize)
        widths = [emsize] + [nhid] * (nlayers - 1) + [emsize]
        self.rnns = nn.ModuleList(
            QRNNLayer(widths[i], widths[i + 1], window=2 if i == 0 else 1) for i in range(nlayers)
        )
        self.decoder = nn.Linear(emsize, vocabulary)
        self.decoder.weight = self.encoder.weight
        self.criterion = SplitSoftmax(emsize, len(splits))

    def forward(
        self, tokens: Tensor, state: list[LayerState] | None = None
    ) -> tuple[Tensor, list[LayerState]]:
        """tokens: (T, B) word ids, time first -> log-probabilities (T, B, V) of the next word, and the state."""
        x = self.encoder(tokens)
        new_state = []
        for i, layer in enumerate(self.rnns):
            x, layer_state = layer(x, None if state is None else state[i])
            new_state.append(layer_state)
        return self.log_probs(x), new_state

    def init_state(self, batch: int = 1, device: torch.device | str | None = None) -> list[LayerState]:
        """The zero state of every layer (what ``state=None`` means): the start of a stream."""
        device = device if device is not None else self.encoder.weight.device
        widths = [self.emsize] + [self.nhid] * (self.nlayers - 1) + [self.emsize]
        return [
            LayerState(torch.zeros(batch, widths[i + 1], device=device), torch.zeros(batch, widths[i], device=device))
            for i in range(self.nlayers)
        ]

    def score(
        self, tokens: Tensor, targets: Tensor, state: list[LayerState] | None = None
    ) -> tuple[Tensor, list[LayerState]]:
        """tokens, targets: (T, B) -> log-probabilities (T, B) of each target given the tokens up to it, and the
        state after the last token."""
        if targets.shape != tokens.shape:
            raise MicronetError(f"targets {list(targets.shape)} must have the tokens' shape {list(tokens.shape)}")
        log_probs, state = self(tokens, state)
        return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), state

    def log_probs(self, hidden: Tensor) -> Tensor:
        """The split softmax's full distribution over all V words: head, then every tail cluster."""
        weight, bias = self.decoder.weight, self.decoder.bias
        bounds = [0, *self.splits, self.vocabulary]
        head_logits = F.linear(hidden, weight[: bounds[1]], bias[: bounds[1]])
        if not self.splits:
            return F.log_softmax(head_logits, dim=-1)
        tombstones = F.linear(hidden, self.criterion.tail_vectors, self.criterion.tail_bias)
        head = F.log_softmax(torch.cat([head_logits, tombstones], dim=-1), dim=-1)
        pieces = [head[..., : bounds[1]]]
        for k in range(1, len(bounds) - 1):
            logits = F.linear(hidden, weight[bounds[k] : bounds[k + 1]], bias[bounds[k] : bounds[k + 1]])
            pieces.append(head[..., -k : head.shape[-1] - k + 1] + F.log_softmax(logits, dim=-1))
        return torch.cat(pieces, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def split_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """One flat state dict (model keys plus ``criterion.*``) from either accepted format."""
    if set(state) >= {"model", "criterion"} and all(isinstance(state[k], Mapping) for k in ("model", "criterion")):
        flat = dict(state["model"])
        flat.update({f"criterion.{key}": value for key, value in state["criterion"].items()})
        return flat
    return dict(state)


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    vocabulary, emsize, nhid, nlayers = (config[k] for k in ("vocabulary", "emsize", "nhid", "nlayers"))
    widths = [emsize] + [nhid] * (nlayers - 1) + [emsize]
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (vocabulary, emsize)}
    for i in range(nlayers):
        window = 2 if i == 0 else 1
        shapes[f"rnns.{i}.linear.module.weight_raw"] = (3 * widths[i + 1], window * widths[i])
        shapes[f"rnns.{i}.linear.module.bias"] = (3 * widths[i + 1],)
    shapes["decoder.bias"] = (vocabulary,)
    clusters = len(config["splits"])
    if clusters:
        shapes["criterion.tail_vectors"] = (clusters, emsize)
        shapes["criterion.tail_bias"] = (clusters,)
    return shapes


def config_from_state_dict(state: Mapping[str, Any], splits: Sequence[int] | None = None) -> dict[str, Any]:
    """emsize, nhid, layers and V from the shapes; the splits from awd-lstm's rule unless given."""
    flat = split_state_dict(state)
    needed = ["encoder.weight", "rnns.0.linear.module.weight_raw"]
    missing = [key for key in needed if key not in flat]
    if missing:
        raise MicronetError(f"not a QRNN language-model state dict: missing {', '.join(missing)}")
    vocabulary, emsize = tuple(flat["encoder.weight"].shape)
    nlayers = 0
    while f"rnns.{nlayers}.linear.module.weight_raw" in flat:
        nlayers += 1
    if nlayers < 2:
        raise MicronetError(f"a QRNN language model needs at least 2 layers (found {nlayers})")
    nhid = flat["rnns.0.linear.module.weight_raw"].shape[0] // 3
    if splits is None:
        splits = default_splits(vocabulary)
        clusters = flat["criterion.tail_vectors"].shape[0] if "criterion.tail_vectors" in flat else len(splits)
        if clusters != len(splits):
            raise MicronetError(
                f"the checkpoint has {clusters} tail clusters but awd-lstm's rule gives {len(splits)} splits for "
                f"V={vocabulary}; give the splits explicitly"
            )
    return {"vocabulary": vocabulary, "emsize": emsize, "nhid": nhid, "nlayers": nlayers, "splits": list(splits)}


def check_state_dict(flat: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Every expected key present with its shape, and nothing unknown; all problems in one message."""
    problems = fit_problems(_expected_shapes(config), flat, allowed={"decoder.weight"})
    if "decoder.weight" in flat:
        decoder, encoder = flat["decoder.weight"], flat.get("encoder.weight")
        if encoder is not None and tuple(decoder.shape) != tuple(encoder.shape):
            problems.append(f"decoder.weight has shape {list(decoder.shape)}, expected the tied {list(encoder.shape)}")
        elif encoder is not None and not decoder.is_meta and not torch.equal(decoder, encoder):
            problems.append("decoder.weight differs from encoder.weight, but the QRNN model ties them")
    if problems:
        raise MicronetError("invalid QRNN checkpoint: " + "; ".join(problems))


def build(config: Mapping[str, Any]) -> QRNNLanguageModel:
    """The model for a configuration (vocabulary, emsize, nhid, nlayers, splits), uninitialised weights."""
    return QRNNLanguageModel(
        config["vocabulary"], config["emsize"], config["nhid"], config["nlayers"], config["splits"]
    )


def load_qrnn(state: Mapping[str, Any], splits: Sequence[int] | None = None) -> QRNNLanguageModel:
    """The evaluation-mode model from a state dict in an accepted format (shapes give the configuration)."""
    flat = split_state_dict(state)
    config = config_from_state_dict(flat, splits)
    check_state_dict(flat, config)
    flat.setdefault("decoder.weight", flat["encoder.weight"])
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(flat, strict=True, assign=True)
    model.decoder.weight = model.encoder.weight
    return model.eval()


def example_inputs(model: QRNNLanguageModel) -> tuple[Tensor]:
    """One token, batch 1, time first: the online setting of the WikiText-103 track."""
    return (torch.zeros(1, 1, dtype=torch.long),)


register(
    ModelSpec(
        name="jaist-qrnn",
        title="JAIST QRNN language model (4 layers, emsize 300, nhid 1800), WikiText-103",
        track="wikitext103",
        build=build,
        default_config=DEFAULT_CONFIG,
        config_from_state_dict=config_from_state_dict,
        example_inputs=example_inputs,
        load=load_qrnn,
        load_settings=("splits",),
        aliases=("qrnn",),
    )
)
