"""The decoding options ``captioner caption`` and ``captioner serve`` share: one explicit table.

Each row names the option, its type, its help text, the CLI flag (``captioner caption
--beam-size``) and the HTTP query/form parameter (``POST /caption?beam-size=``). Defaults are
never written here: they are read from :class:`~captioner.configs.decode.DecodeConfig`, the one
source of the decoding defaults. The CLI builds its argparse options from the table
(:func:`captioner.cli.caption.add_decoding_options`), the server parses request fields with it
(:mod:`captioner.serve.requests`), and both lay what was given over a model's default decoding
with :func:`decode_config`.

Torch-free and argparse-free, like the rest of :mod:`captioner.configs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from captioner.configs.decode import DecodeConfig
from captioner.errors import UserError


@dataclass(frozen=True)
class DecodeOption:
    """One decoding option, as the CLI and the server spell it."""

    name: str  # the key in the given options: a DecodeConfig field, or "sample"
    type: type[int] | type[float] | type[bool]  # bool: a true/false flag
    flag: str  # on the command line; a bool also has its --no- form
    query: str  # in a POST /caption query string or form (also spelled with "_")
    help: str  # "{default}" is replaced by the default read from DecodeConfig

    @property
    def default(self) -> Any:
        """The value when the option is not given, read from :class:`DecodeConfig`; ``sample``
        is whether its default strategy samples."""
        defaults = DecodeConfig()
        if self.name == "sample":
            return defaults.strategy == "sample"
        return getattr(defaults, self.name)

    @property
    def help_text(self) -> str:
        return self.help.format(default=self.default)


DECODE_OPTIONS: tuple[DecodeOption, ...] = (
    DecodeOption(
        "beam_size",
        int,
        "--beam-size",
        "beam-size",
        "beam search with this many beams; 1: greedy (with --n-best alone: {default}, "
        "or n-best if larger)",
    ),
    DecodeOption("n_best", int, "--n-best", "n-best", "beam: print the n best ({default})"),
    DecodeOption(
        "length_penalty",
        float,
        "--length-penalty",
        "length-penalty",
        "beam: GNMT alpha ({default})",
    ),
    DecodeOption(
        "suppress_unk",
        bool,
        "--suppress-unk",
        "suppress-unk",
        "never emit <unk> (on by default where captions are shown; false / --no-suppress-unk: "
        "let the model say it)",
    ),
    DecodeOption("sample", bool, "--sample", "sample", "sample instead of greedy/beam"),
    DecodeOption("temperature", float, "--temperature", "temperature", "sampling ({default})"),
    DecodeOption("top_k", int, "--top-k", "top-k", "sample from the k most likely words (0: all)"),
    DecodeOption("top_p", float, "--top-p", "top-p", "nucleus sampling threshold ({default})"),
    DecodeOption("seed", int, "--seed", "seed", "make sampling reproducible"),
    DecodeOption(
        "max_len",
        int,
        "--max-len",
        "max-len",
        "max caption length in tokens, <end> included ({default})",
    ),
)


def decode_config(given: Mapping[str, Any], base: DecodeConfig | None = None) -> DecodeConfig:
    """The options ``given`` (by :attr:`DecodeOption.name`) laid over ``base`` (default: greedy).

    ``sample`` samples. ``beam_size`` > 1 searches a beam and ``beam_size`` 1 is greedy (the n
    best reset to 1). ``n_best`` > 1 alone searches a beam of at least n. ``sample`` false over a
    sampling default is greedy. With none of them, ``base``'s strategy is kept. A bad value is a
    :class:`UserError` naming it."""
    given = dict(given)
    sample = given.pop("sample", None)
    options = {**asdict(base or DecodeConfig()), **given}
    if "beam_size" in given:
        if given["beam_size"] <= 1 and "n_best" not in given:
            options["n_best"] = 1
        options["strategy"] = (
            "beam" if given["beam_size"] > 1 or options["n_best"] > 1 else "greedy"
        )
    elif given.get("n_best", 1) > 1:
        options["beam_size"] = max(options["beam_size"], given["n_best"])
        options["strategy"] = "beam"
    elif sample is False and options["strategy"] == "sample":
        options["strategy"] = "greedy"
    if sample:
        if given.get("beam_size", 1) > 1:
            raise UserError("--sample and --beam-size are exclusive")
        options["strategy"] = "sample"
    return DecodeConfig.from_dict(options, "decoding options")
