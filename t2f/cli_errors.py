"""User errors, shown by the command-line tools as one `Error:` line with a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import math

import click


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]):
    """Turn the library's user-facing errors (and `extra` types) into click errors, with third-party logging muted."""
    from .clip import ClipLoadError
    from .download import DownloadError
    from .io import DirectoryInUse, WeightsError
    from .mapper import MissingMapperError

    logging.disable(logging.ERROR)
    try:
        yield
    except (WeightsError, DirectoryInUse, DownloadError, ClipLoadError, MissingMapperError, ValueError, *extra) as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    finally:
        logging.disable(logging.NOTSET)


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
