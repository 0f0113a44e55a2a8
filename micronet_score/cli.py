"""The ``micronet-score`` command line: parse, call the library, render. No counting logic lives here."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer 0.2x vendors click; older typer uses click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - typer < 0.20
    from click.exceptions import UsageError

from micronet_score import __version__, breakdown, interrupts
from micronet_score.errors import MicronetError
from micronet_score.evaluate_lm import resolve_device
from micronet_score.options import CountOptions
from micronet_score.progress import steps
from micronet_score.render import (
    MAX_LINE,
    console,
    error_console,
    printable,
    render_audit,
    render_breakdown,
    render_comparison,
    render_models,
    render_report,
    render_rules,
    safe,
)
from micronet_score.report import Report
from micronet_score.ruleset import DEFAULT_RULES, bundled_rule_names, load_rules
from micronet_score.scoring import (
    Interrupted,
    measure_directory,
    measure_example,
    measure_images,
    measure_lm,
    track_of,
)
from micronet_score.warning_groups import warning_lines


class _Group(TyperGroup):
    """Turns a MicronetError into one clear line on stderr and exit code 2 (a traceback only with --debug); Ctrl-C
    into one line starting "interrupted", with the progress so far where a measurement had made some, and exit
    code 130."""

    def invoke(self, ctx: typer.Context):
        try:
            with interrupts.raising():
                result = super().invoke(ctx)
                interrupts.check()  # an interrupt that library code swallowed still ends the command
            return result
        except (Interrupted, KeyboardInterrupt) as exc:
            text = str(exc) if isinstance(exc, Interrupted) else "interrupted"
            _error_line(f"[bold red]{safe(text)}[/]")
            raise typer.Exit(130) from None
        except MicronetError as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            _error_line(f"[bold red]error:[/] {escape(printable(str(exc), MAX_LINE))}")
            raise typer.Exit(2) from None
        except UsageError as exc:  # a bad flag or value (--bits 0): the same one line, with where to find usage
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _error_line(f"[bold red]error:[/] {safe(exc.format_message())} (see {safe(where)} --help)")
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in _OUTPUT_ERRORS:
                raise
            raise typer.Exit(interrupts.output_failed(exc)) from None

    def get_params(self, ctx: typer.Context):
        return _flags_as_flags(super().get_params(ctx))

    def get_command(self, ctx: typer.Context, name: str):
        command = super().get_command(ctx, name)
        if command is not None:
            _flags_as_flags(command.get_params(ctx))
        return command


def _flags_as_flags(params: list) -> list:
    """Help shows a boolean flag as a flag (``--json``), not as an option taking a value (``--json <bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


_OUTPUT_ERRORS = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors of the output (a closed pipe, a full disk): see micronet_score.interrupts.flush_stdout."""


def _error_line(markup: str) -> None:
    error_console().print(markup, highlight=False, soft_wrap=True)


app = typer.Typer(
    cls=_Group,
    name="micronet-score",
    help="Score PyTorch models by the NeurIPS 2019 MicroNet Challenge rules: storage, operations, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"micronet-score {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Score PyTorch models by the NeurIPS 2019 MicroNet Challenge rules."""


@app.command("rules")
def rules_command(
    name: Annotated[
        str, typer.Argument(help="A bundled rule set name or the path of a rule file (.toml).")
    ] = DEFAULT_RULES,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rule set as JSON.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the bundled rule sets.")] = False,
) -> None:
    """Show a rule set: tracks and baselines, bit-width policies, and the price of every op family.

    Examples:

      micronet-score rules

      micronet-score rules micronet-2019 --json

      micronet-score rules ./my-rules.toml
    """
    if list_:
        for bundled in bundled_rule_names():
            print(bundled)
        return
    rules = load_rules(name)
    if as_json:
        sys.stdout.write(json.dumps(rules.model_dump(mode="json"), indent=2) + "\n")
    else:
        render_rules(rules, console())


# --- options shared by the measuring commands ---------------------------------------------------------------

Rules = Annotated[str, typer.Option("--rules", help="Rule set: a bundled name or a .toml file.")]
Track = Annotated[str | None, typer.Option("--track", help="imagenet, cifar100 or wikitext103 (default: the "
                                                              "bundled model's track).")]
Bits = Annotated[int | None, typer.Option("--bits", min=1, max=32, help="Declared weight width in bits.")]
ActBits = Annotated[int | None, typer.Option("--act-bits", min=1, max=32, help="Declared activation width.")]
Freebie = Annotated[bool, typer.Option("--freebie", help="Unquantized entry: params and mults at 16 bits, "
                                                         "adds at 32.")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail if any op has no price in the rule set.")]
Config = Annotated[Path | None, typer.Option("--config", help="The authors' config.yaml (cache size, theta, "
                                                                 "lambda, bits...).")]
ModelName = Annotated[str | None, typer.Option("--model", help="Architecture of a state dict or safetensors file: "
                                                                  "a bundled name (see `micronet-score models`) or "
                                                                  "your own package.module:factory.")]
ModelArgs = Annotated[str | None, typer.Option("--model-args", help="Keyword arguments of your factory, as a JSON "
                                                                    "object: '{\"width\": 64}'.")]
Inputs = Annotated[list[str] | None, typer.Option("--input", help="Example input to count on: a float tensor "
                                                                  "1x3x224x224, or token ids ids:1x128; repeat "
                                                                  "for several arguments.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow a fully pickled model (runs code from "
                                                                  "the file).")]
Data = Annotated[Path | None, typer.Option("--data", help="Test data: a WikiText directory, the CIFAR-100 "
                                                             "test file/folder, or an ImageNet image folder.")]
Split = Annotated[str, typer.Option("--split", help="WikiText split to evaluate.")]
LimitTokens = Annotated[int | None, typer.Option("--limit-tokens", min=1, help="Stop after N predictions "
                                                                                  "(a quick look).")]
Vocab = Annotated[Path | None, typer.Option("--vocab", help="Vocabulary file (the authors' sorted_vocab.npy "
                                                               "or one word per line).")]
Labels = Annotated[Path | None, typer.Option("--labels", help="ImageNet labels file for an image folder.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")]
class Stored(str, Enum):
    auto = "auto"
    dense = "dense"
    masked = "masked"
    block = "block"


RepresentationOption = Annotated[Stored, typer.Option(
    "--representation", help="How tensors with zeros are stored: auto (the cheapest by the score; by storage without "
    "a track), dense, masked (nonzeros + 1-bit mask) or block (one bit per block); dot products follow.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="List every warning (by default the same finding on many "
                                                         "tensors is one line with a count and examples).")]
ShapeOnly = Annotated[bool, typer.Option("--shape-only", help="Count from shapes on a meta copy, computing nothing "
                                                              "(same totals; not for data-dependent models).")]
Stream = Annotated[bool, typer.Option("--stream", help="Count a Hugging Face model directory from its files without "
                                                       "loading it (automatic when the weights exceed half the free "
                                                       "memory, or when there are none).")]


def _options(rules: str, track: str | None, bits: int | None, act_bits: int | None, freebie: bool,
             strict: bool, representation: Stored = Stored.auto) -> CountOptions:
    """The options, with the rule set read and the track checked before any model is loaded."""
    options = CountOptions(rules=load_rules(rules), track=track, bits=bits, act_bits=act_bits, freebie=freebie,
                           strict=strict, representation=representation.value)
    options.track_name()
    return options


def _load(checkpoint: Path | None, model: str | None, config: Path | None, device: str, trust_pickle: bool,
          model_args: str | None = None):
    from micronet_score.checkpoint import load_model

    return load_model(checkpoint, model=model, config=config, device=resolve_device(device),
                      trust_pickle=trust_pickle, model_args=model_args)


def _measure(loaded, options: CountOptions, data: Path | None, split: str, limit_tokens: int | None,
             vocab: Path | None, labels: Path | None, device: str, progress: bool | None,
             inputs: list[str] | None = None, shape_only: bool = False) -> Report:
    if data is None:
        return measure_example(loaded, options, device=resolve_device(device), shape_only=shape_only, inputs=inputs)
    if inputs or shape_only:
        raise MicronetError("--data measures on the data: leave out --input and --shape-only")
    track = track_of(loaded, options)
    per = options.rules.track(track).per if track else "sample"
    if per == "token":
        return measure_lm(loaded, options, data, split, vocab_file=vocab, limit_tokens=limit_tokens,
                          device=device, progress=progress)
    return measure_images(loaded, options, data, labels=labels, device=device, progress=progress)


def _load_and_measure(checkpoint: Path, model: str | None, config: Path | None, device: str, trust_pickle: bool,
                      options: CountOptions, data: Path | None, split: str, limit_tokens: int | None,
                      vocab: Path | None, labels: Path | None, show: bool | None, model_args: str | None = None,
                      inputs: list[str] | None = None, shape_only: bool = False):
    """(loaded model, report): measured over the data (with the evaluation's own progress bar), else on the
    example input; the steps show on a terminal."""
    with steps(2 if data is None else 1, show=show) as bar:
        bar.step(f"loading {checkpoint}")
        loaded = _load(checkpoint, model, config, device, trust_pickle, model_args)
        if data is None:
            bar.step("counting the example input")
            return loaded, _measure(loaded, options, None, split, limit_tokens, vocab, labels, device, show,
                                    inputs, shape_only)
    return loaded, _measure(loaded, options, data, split, limit_tokens, vocab, labels, device, show, inputs,
                            shape_only)


def _audited(loaded, options: CountOptions, block_shape=None):
    """The audit of the loaded model against the declared widths, as :meth:`CountOptions.declared_by` resolves
    them (per tensor where the model declares its own weights' widths, as the MIT model does, at --bits or its
    configuration's bits), with the tensors stored as ``options.representation`` says."""
    from micronet_score.audit import audit

    declared = options.declared_by(loaded.config)
    return audit(loaded.model, bits=declared.bits, weight_bits=declared.weight_bits, act_bits=declared.act_bits,
                 rules=declared.rules, block_shape=block_shape, representation=declared.representation)


def _declared_widths_checked(loaded, options: CountOptions, report: Report) -> Report:
    """With --bits or --act-bits, audit the declaration: violations become warnings (an error with --strict)."""
    if not options.declares_widths:
        return report
    from micronet_score.audit import declared_width_warnings

    declared = options.declared_by(loaded.config)
    warnings = declared_width_warnings(loaded.model, bits=declared.bits, act_bits=declared.act_bits,
                                       weight_bits=declared.weight_bits, rules=declared.rules, strict=declared.strict)
    return report.model_copy(update={"warnings": [*report.warnings, *warnings]}) if warnings else report


def _streamed(checkpoint: Path, stream: bool) -> bool:
    """Count from the files: asked for, or a model directory whose weights are absent or exceed the memory
    budget."""
    from micronet_score.streamed_count import is_model_directory, weights_exceed_memory
    from micronet_score.streaming import weight_files

    if not is_model_directory(checkpoint):
        if stream:
            raise MicronetError(f"--stream counts a Hugging Face model directory (config.json and safetensors "
                                f"files); {checkpoint} is not one")
        return False
    return stream or not weight_files(checkpoint) or weights_exceed_memory(checkpoint)


def _assumed_noted(loaded, report: Report) -> Report:
    """Say which settings were assumed: those neither the checkpoint's shapes nor a config file gave (the MIT
    model's cache size, for one, changes its operations per token several times over)."""
    assumed = loaded.meta.get("assumed") or {}
    if not assumed:
        return report
    shown = ", ".join(f"{key}={value}" for key, value in assumed.items())
    note = (f"settings assumed ({loaded.name} defaults; neither the checkpoint nor a config file gives them): "
            f"{shown}; pass the model's config file with --config to count it as trained")
    return report.model_copy(update={"warnings": [note, *report.warnings]})


def _progress(as_json: bool) -> bool | None:
    return False if as_json else None


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint (default: the bundled demo).")] = None,
    data: Data = None,
    split: Split = "test",
    bits: Bits = None,
    act_bits: ActBits = None,
    freebie: Freebie = False,
    rules: Rules = DEFAULT_RULES,
    track: Track = None,
    config: Config = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    device: Device = "cpu",
    limit_tokens: LimitTokens = None,
    vocab: Vocab = None,
    labels: Labels = None,
    strict: Strict = False,
    representation: RepresentationOption = Stored.auto,
    trust_pickle: TrustPickle = False,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Quality metric, storage, operations and score, with the verdict against the track's threshold.

    Operations are counted in the same pass over the test data, so data-dependent costs (adaptive-embedding
    bins, cache fill) are averaged over the data. With no checkpoint, the bundled demo (a tiny MIT-HAN-Lab model in
    its authors' format, with a small corpus) is evaluated.

    Examples:

      micronet-score eval

      micronet-score eval model-1.pth --config config.yaml --data wikitext-103 --vocab sorted_vocab.npy

      micronet-score eval wrn.pt --model wrn-28-10 --data cifar-100-python --json
    """
    if checkpoint is None:
        from micronet_score.models.mit_lm import demo_paths

        checkpoint, demo_config, demo_data = demo_paths()
        config, data = config or demo_config, data or demo_data
    options = _options(rules, track, bits, act_bits, freebie, strict, representation)
    if data is None:
        raise MicronetError("eval needs the test data (--data); `micronet-score count` counts without data")
    loaded, report = _load_and_measure(checkpoint, model, config, device, trust_pickle, options, data, split,
                                       limit_tokens, vocab, labels, _progress(as_json), model_args)
    report = _assumed_noted(loaded, _declared_widths_checked(loaded, options, report))
    _emit(report, as_json, f"{loaded.name}: {checkpoint}", verbose)


@app.command("count")
def count_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or Hugging Face model directory.")],
    inputs: Inputs = None,
    data: Data = None,
    split: Split = "test",
    limit_tokens: LimitTokens = None,
    vocab: Vocab = None,
    labels: Labels = None,
    bits: Bits = None,
    act_bits: ActBits = None,
    freebie: Freebie = False,
    rules: Rules = DEFAULT_RULES,
    track: Track = None,
    config: Config = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    device: Device = "cpu",
    strict: Strict = False,
    trust_pickle: TrustPickle = False,
    shape_only: ShapeOnly = False,
    stream: Stream = False,
    representation: RepresentationOption = Stored.auto,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Storage, operations and score, on an example input (or averaged over --data).

    The example input is --input where given; else the track's input shape in the rule set (one image), the
    bundled architecture's (language models: one stream whose adaptive-embedding bins follow the WikiText-103 test
    set's frequencies), or the inputs a `.pt2` program was exported with.

    Examples:

      micronet-score count model-1.pth --config config.yaml

      micronet-score count exported.pt2 --track cifar100 --bits 8

      micronet-score count weights.safetensors --model mynet:build --model-args '{"width": 64}' --input 1x3x32x32

      micronet-score count ./my-hf-model --input ids:1x128 --track wikitext103

      micronet-score count wrn.pt --shape-only

      micronet-score count llama-7b-pruned/ --stream
    """
    options = _options(rules, track, bits, act_bits, freebie, strict, representation)
    if _streamed(checkpoint, stream):
        if model or config or model_args or inputs or data:
            raise MicronetError("--model, --model-args, --config, --input and --data do not apply to a model "
                                "directory counted from its files (the architecture comes from its config.json)")
        report = measure_directory(checkpoint, options, progress=_progress(as_json))
        _emit(report, as_json, f"{checkpoint} (counted from its files)", verbose)
        return
    loaded, report = _load_and_measure(checkpoint, model, config, device, trust_pickle, options, data, split,
                                       limit_tokens, vocab, labels, _progress(as_json), model_args, inputs,
                                       shape_only)
    report = _assumed_noted(loaded, _declared_widths_checked(loaded, options, report))
    _emit(report, as_json, f"{loaded.name}: {checkpoint}", verbose)


class By(str, Enum):
    module = "module"
    op = "op"


class SortBy(str, Enum):
    ops = "ops"
    operations = "operations"
    storage = "storage"
    parameters = "parameters"
    params = "params"  # schema-1 name of storage, kept one release
    name = "name"


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    md = "md"
    svg = "svg"
    png = "png"


@app.command("breakdown")
def breakdown_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    by: Annotated[By, typer.Option("--by", help="One row per module or per op family.")] = By.module,
    depth: Annotated[int | None, typer.Option("--depth", min=0, help="Sum modules up to this path depth.")] = None,
    sort: Annotated[SortBy | None, typer.Option("--sort", help="Sort rows by operations (ops), storage, raw "
                                                               "parameters or name (params: storage, as before)."
                                                )] = None,
    top: Annotated[int | None, typer.Option("--top", min=1, help="Keep the K first rows.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="table, json, csv, md, or a chart of where the score goes "
                                                         "per module: svg or png.")] = Format.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file (svg and png; "
                                                                        "default: stdout).")] = None,
    inputs: Inputs = None,
    data: Data = None,
    split: Split = "test",
    limit_tokens: LimitTokens = None,
    vocab: Vocab = None,
    labels: Labels = None,
    bits: Bits = None,
    act_bits: ActBits = None,
    freebie: Freebie = False,
    rules: Rules = DEFAULT_RULES,
    track: Track = None,
    config: Config = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    device: Device = "cpu",
    strict: Strict = False,
    representation: RepresentationOption = Stored.auto,
    trust_pickle: TrustPickle = False,
) -> None:
    """Tables per layer or per op: parameters, nonzeros, density, bits, storage, mults, adds, others, operations
    and share, with a totals row equal to eval's (measured over --data when given, else the example input).

    Examples:

      micronet-score breakdown model-1.pth --config config.yaml --depth 2 --sort ops --top 10

      micronet-score breakdown wrn.pt --model wrn-28-10 --by op --format csv > ops.csv

      micronet-score breakdown model-1.pth --config config.yaml --format svg -o where-the-score-goes.svg
    """
    options = _options(rules, track, bits, act_bits, freebie, strict, representation)
    _, report = _load_and_measure(checkpoint, model, config, device, trust_pickle, options, data, split,
                                  limit_tokens, vocab, labels, _progress(fmt in (Format.json, Format.csv, Format.md)),
                                  model_args, inputs)
    if fmt in (Format.svg, Format.png):
        from micronet_score.plots import breakdown_image

        picture = breakdown_image(report, options.rules, depth=1 if depth is None else depth, top=top or 12,
                                  fmt=fmt.value)
        _write_picture(picture, output, fmt.value)
        return
    by_ = by.value
    rows = breakdown.op_rows(report) if by_ == "op" else breakdown.module_rows(report, depth)
    rows = breakdown.select(rows, sort.value if sort else None, top)
    total = breakdown.totals(report, by_)
    if fmt == Format.table:
        render_breakdown(rows, total, by_, report, console())
    else:
        writer = {"json": lambda: breakdown.to_json(rows, total), "csv": lambda: breakdown.to_csv(rows, total, by_),
                  "md": lambda: breakdown.to_markdown(rows, total, by_)}[fmt.value]
        sys.stdout.write(writer())


@app.command("compare")
def compare_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoint files or model directories.")],
    inputs: Inputs = None,
    data: Data = None,
    split: Split = "test",
    limit_tokens: LimitTokens = None,
    vocab: Vocab = None,
    labels: Labels = None,
    config: Config = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Draw score against quality (needs --data) with the "
                                                             "track's threshold into this .svg or .png file.")] = None,
    bits: Bits = None,
    act_bits: ActBits = None,
    freebie: Freebie = False,
    rules: Rules = DEFAULT_RULES,
    track: Track = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    device: Device = "cpu",
    representation: RepresentationOption = Stored.auto,
    trust_pickle: TrustPickle = False,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Checkpoints side by side (storage, operations, score), with the differences from the first.

    With --data every checkpoint is evaluated (quality and verdict), and --plot draws the trade-off.

    Examples:

      micronet-score compare dense.pt pruned.pt --model wrn-28-10

      micronet-score compare a.pth b.pth c.pth --config config.yaml --data wikitext-103 --plot tradeoff.svg

      micronet-score compare dense.safetensors pruned.safetensors --model mynet:build --input 1x3x32x32
    """
    if len(checkpoints) < 2:
        raise MicronetError("compare needs at least two checkpoints")
    if plot is not None and data is None:
        raise MicronetError("compare --plot draws score against quality: give the test data with --data")
    if plot is not None:
        from micronet_score.plots import image_format

        image_format(plot)  # a bad file name fails before any measuring
    options = _options(rules, track, bits, act_bits, freebie, False, representation)
    reports = {}
    with steps(len(checkpoints), show=_progress(as_json)) as bar:
        for path in checkpoints:
            bar.step(f"measuring {path}")
            loaded = _load(path, model, config, device, trust_pickle, model_args)
            with bar.paused() if data is not None else contextlib.nullcontext():
                reports[str(path)] = _assumed_noted(loaded, _measure(loaded, options, data, split, limit_tokens,
                                                                     vocab, labels, device, _progress(as_json),
                                                                     inputs))
    if plot is not None:
        _plot_tradeoff(reports, options, plot)
    if as_json:
        sys.stdout.write(json.dumps({name: r.model_dump(mode="json", exclude={"layers", "tensors"})
                                     for name, r in reports.items()}, indent=2) + "\n")
    else:
        render_comparison(reports, console())
        for name, report in reports.items():
            for warning in warning_lines(report.warnings, verbose):
                error_console().print(f"[yellow]warning:[/] {escape(name)}: {escape(warning)}", soft_wrap=True)


@app.command("report")
def report_command(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint (default: the bundled demo, evaluated on "
                                                           "its corpus).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    inputs: Inputs = None,
    data: Data = None,
    split: Split = "test",
    limit_tokens: LimitTokens = None,
    vocab: Vocab = None,
    labels: Labels = None,
    bits: Bits = None,
    act_bits: ActBits = None,
    freebie: Freebie = False,
    rules: Rules = DEFAULT_RULES,
    track: Track = None,
    config: Config = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    device: Device = "cpu",
    strict: Strict = False,
    representation: RepresentationOption = Stored.auto,
    trust_pickle: TrustPickle = False,
) -> None:
    """A self-contained HTML page: the headline (score, storage, operations, quality and verdict), charts of where
    the score goes per module (hover, click into), the sortable per-layer table, the audit, uncounted ops and
    warnings. One file, everything inline: it opens without a network.

    Measured over --data when given (with the quality and verdict), else on the example input.

    Examples:

      micronet-score report -o demo.html

      micronet-score report model-1.pth --config config.yaml --data wikitext-103 --bits 9 -o mit.html
    """
    from micronet_score.html_report import write_html

    if checkpoint is None:
        from micronet_score.models.mit_lm import demo_paths

        checkpoint, demo_config, demo_data = demo_paths()
        config, data = config or demo_config, data or demo_data
    options = _options(rules, track, bits, act_bits, freebie, strict, representation)
    loaded, report = _load_and_measure(checkpoint, model, config, device, trust_pickle, options, data, split,
                                       limit_tokens, vocab, labels, None, model_args, inputs)
    report = _assumed_noted(loaded, _declared_widths_checked(loaded, options, report))
    with steps(2) as bar:
        bar.step("auditing bits and sparsity")
        findings = _audited(loaded, options)
        bar.step(f"writing {output}")
        try:
            write_html(report, output, title=f"{loaded.name}: {checkpoint.name}", audit=findings,
                       rules=options.rules)
        except OSError as exc:
            raise MicronetError(f"cannot write {output}: {exc.strerror or exc}") from None
    error_console().print(f"wrote {escape(str(output))} (score {report.score:.6g})" if report.score is not None
                          else f"wrote {escape(str(output))}", soft_wrap=True)


@app.command("audit")
def audit_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.")],
    bits: Bits = None,
    act_bits: ActBits = None,
    block: Annotated[str | None, typer.Option("--block", help="Declared block sparsity, ROWSxCOLS (e.g. 4x4).")] = None,
    rules: Rules = DEFAULT_RULES,
    config: Config = None,
    model: ModelName = None,
    model_args: ModelArgs = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2 when a declared width does not hold.")] = False,
    representation: RepresentationOption = Stored.auto,
    trust_pickle: TrustPickle = False,
    as_json: AsJson = False,
) -> None:
    """Per tensor: declared versus measured bit-width and sparsity, and every violation of the declaration.

    Widths are measured from the values (levels on a uniform symmetric or affine grid, per tensor and per row);
    sparsity from zeros, pruning masks and masks saved beside weights; activation widths from fake-quantizers.

    Examples:

      micronet-score audit model.pt --bits 8

      micronet-score audit model-1.pth --config config.yaml --bits 9 --json
    """

    block_shape = _block(block) if block else None
    with steps(2, show=_progress(as_json)) as bar:
        bar.step(f"loading {checkpoint}")
        loaded = _load(checkpoint, model, config, "cpu", trust_pickle, model_args)
        bar.step("auditing bits and sparsity")
        options = CountOptions(rules=load_rules(rules), bits=bits, act_bits=act_bits,
                               representation=representation.value)
        result = _audited(loaded, options, block_shape)
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        render_audit(result, console())
    if strict:
        result.raise_if_violations()


MAX_BLOCK = 4096


def _block(text: str) -> tuple[int, int]:
    """``--block ROWSxCOLS``: two whole numbers from 1 to MAX_BLOCK."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 9 for p in parts):
        raise MicronetError(f"--block takes ROWSxCOLS such as 4x4, got {printable(text[:40])!r}")
    rows, cols = (int(p) for p in parts)
    if not (1 <= rows <= MAX_BLOCK and 1 <= cols <= MAX_BLOCK):
        raise MicronetError(f"--block {rows}x{cols}: each side must be from 1 to {MAX_BLOCK}")
    return rows, cols


@app.command("models")
def models_command(as_json: AsJson = False) -> None:
    """The bundled architectures: name, track and what they are.

    Example:

      micronet-score models
    """
    from micronet_score.models import registry

    specs = [registry.get(name) for name in registry.names()]
    if as_json:
        sys.stdout.write(json.dumps([{"name": s.name, "title": s.title, "track": s.track, "aliases": list(s.aliases)}
                                     for s in specs], indent=2) + "\n")
    else:
        render_models(specs, console())


@app.command("schema")
def schema_command() -> None:
    """The JSON schema of the report that `eval --json` and `count --json` print.

    Example:

      micronet-score schema > report.schema.json
    """
    sys.stdout.write(json.dumps(Report.model_json_schema(mode="serialization"), indent=2) + "\n")


def _emit(report: Report, as_json: bool, title: str, verbose: bool = False) -> None:
    if as_json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        render_report(report, title, console())
        for warning in warning_lines(report.warnings, verbose):
            error_console().print(f"[yellow]warning:[/] {escape(printable(warning, MAX_LINE))}", soft_wrap=True)


def _write_picture(picture: bytes, output: Path | None, fmt: str) -> None:
    """A picture to its file, or to stdout (a PNG only when stdout is not a terminal)."""
    if output is None:
        if fmt == "png" and sys.stdout.isatty():
            raise MicronetError("a PNG is binary: write it to a file with -o chart.png (or redirect stdout)")
        sys.stdout.buffer.write(picture)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(picture)
    except OSError as exc:
        raise MicronetError(f"cannot write {output}: {exc.strerror or exc}") from None
    error_console().print(f"wrote {escape(str(output))}", soft_wrap=True)


def _plot_tradeoff(reports: dict[str, Report], options: CountOptions, plot: Path) -> None:
    from micronet_score.plots import Point, image_format, tradeoff_image

    first = next(iter(reports.values()))
    tracks = {r.track for r in reports.values()}
    if first.track is None or len(tracks) > 1:
        raise MicronetError("compare --plot needs every checkpoint on one track (give --track)")
    points = [Point(name, r.score, r.quality.value, r.quality.verdict) for name, r in reports.items()
              if r.quality is not None and r.score is not None]
    picture = tradeoff_image(points, options.rules.track(first.track), first.track, fmt=image_format(plot))
    _write_picture(picture, plot, image_format(plot))


def main() -> None:
    """The ``micronet-score`` command: the app, then standard output flushed here, where a failure to write it
    (a full disk, a closed pipe) can still become one line and its exit code, then the process ends at once
    (see micronet_score.interrupts)."""
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    failed = interrupts.flush_stdout()
    interrupts.leave(failed if failed is not None else code)
