"""t2f.cli: what every command line shares: user errors shown as one `Error:` line with a non-zero exit, the click
option types and the model options. The core package (t2f/) never imports click; its tools do, through here."""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import click


@contextlib.contextmanager
def user_errors(output: str | None = None):
    """Every command's one error adapter: t2f's own errors (T2FError) and a file that cannot be read or written
    (OSError) become one `Error:` line with exit code 1 (click.ClickException); a value of a model option found wrong
    only when it is used (t2f.config.FieldError: a mapper path that is not a directory) is a usage error on that
    option (click.BadParameter, exit code 2), as when the option is parsed. Anything else keeps its traceback: a
    plain ValueError is a bug, not a user's mistake. Third-party logging is muted below ERROR inside the block (the
    level before it is put back after).

    `output` names what the command writes ("the run directory"): an OSError then reads "cannot write FILE: REASON",
    FILE the error's own file name where it has one (an output t2f refuses, t2f.files.OutputPathError, reads so too);
    without it, an OSError is its own message.
    """
    from t2f.config import FieldError
    from t2f.errors import T2FError
    from t2f.files import OutputPathError

    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.ERROR))
    try:
        yield
    except FieldError as e:
        raise click.BadParameter(" ".join(str(e).split()), param_hint=f"--{e.field}") from None
    except T2FError as e:
        written = output is not None and isinstance(e, OutputPathError)
        raise click.ClickException(("cannot write " if written else "") + " ".join(str(e).split())) from None
    except OSError as e:
        if output is None:
            raise click.ClickException(" ".join(str(e).split())) from None
        # Disk full, permissions: one line naming the file; atomic writes leave nothing partial behind.
        raise click.ClickException(f"cannot write {e.filename or output}: {e.strerror or e}") from None
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------
# Option types shared by every command.


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN and infinity (a NaN passes every range comparison).

    Every float option of every t2f command uses it: FiniteFloatRange() is any finite float.
    """

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def nonempty_path(ctx, param, value):
    """click callback: refuse an empty path (which would otherwise mean the current directory or nothing)."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must not be empty", ctx=ctx, param=param)
    return value


class PrecisionChoice(click.Choice):
    """--precision: fp32, fp16, bf16 or (with auto=True) auto; converts to a Precision, or None for auto.

    Whether the precision runs on the command's device is checked once, by `check_precision_device`.
    """

    def __init__(self, auto: bool = True):
        from t2f.precision import PRECISIONS

        super().__init__((("auto",) if auto else ()) + PRECISIONS)

    def convert(self, value, param, ctx):
        from t2f.precision import Precision

        if value is None or isinstance(value, Precision):
            return value
        value = super().convert(value, param, ctx)
        return None if value == "auto" else Precision(value)


class DeviceParam(click.ParamType):
    """--device: auto, cpu, cuda or cuda:N; converts to "auto" or a torch.device that exists here."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        from t2f.devices import resolve_device

        if isinstance(value, torch.device) or value == "auto":
            return value
        try:
            return resolve_device(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def check_precision_device(precision, device, param_hint: str = "--precision") -> None:
    """click.BadParameter (exit 2, one line) where `precision` cannot run on `device` ("auto" = the device auto gives)."""
    from t2f.devices import resolve_device

    if precision is None:
        return
    try:
        precision.check_device(resolve_device(device))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param_hint) from None


def check_writable(path: str, param: str, directory: bool = False) -> None:
    """Refuse an output that could not be written: an unwritable or non-directory parent, or the wrong kind of path."""
    import os

    from t2f.files import OutputPathError, check_output_dir, check_output_file

    try:                            # an existing directory output is a directory; a file output, a regular file
        (check_output_dir if directory else check_output_file)(path)
    except OutputPathError as e:
        raise click.BadParameter(str(e), param_hint=param) from None
    if directory and os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise click.BadParameter(f"cannot write to {path}", param_hint=param)
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise click.BadParameter(f"cannot write to {parent}", param_hint=param)


def write_files(files: dict[str, bytes]) -> None:
    """t2f.files.write_all (every file or none), with an OSError as one "cannot write" line (user_errors)."""
    from t2f.files import write_all

    with user_errors(output="output"):
        write_all(files)


# ----------------------------------------------------------------------------
# The model options: declared once, for every command that loads a generator, a CLIP and a mapper.

MAPPER_HELP = "Mapper: a t2f-train run directory, hf-hub:ORG/NAME[@REVISION] (the Hugging Face Hub), or tiny (random weights)"


def model_options(mapper_default: str | None = None):
    """click decorator: --mapper, --generator, --clip and --cache, passed to the command as one
    t2f.sources.ModelSources argument `models` (a value it refuses is a usage error on its option: exit code 2)."""
    from t2f.presets import TINY

    recorded = f"[default: the one the mapper was trained for (its config.json records it; {TINY} for --mapper {TINY})]"
    options = [
        click.option("--mapper",    help=MAPPER_HELP, metavar="DIR|hf-hub:ID", default=mapper_default, show_default=mapper_default is not None),
        click.option("--generator", help=f"Generator preset, directory, NVIDIA .pkl or rosinality .pt {recorded}", metavar="NAME|PATH"),
        click.option("--clip",      help=f"open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or tiny {recorded}", metavar="SPEC"),
        click.option("--cache",     help="Download cache of generators and CLIPs [default: $T2F_CACHE or ~/.cache/t2f; Hub mappers: "
                                         "the Hugging Face cache, $HF_HOME]", metavar="DIR", type=click.Path(file_okay=False)),
    ]

    def decorate(f):
        @functools.wraps(f)
        def command(mapper, generator, clip, cache, **kw):
            from t2f.config import FieldError
            from t2f.sources import ModelSources

            try:
                models = ModelSources(mapper=mapper, generator=generator, clip=clip, cache=cache)
            except FieldError as e:
                raise click.BadParameter(str(e), param_hint=f"--{e.field}") from None
            return f(models=models, **kw)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate
