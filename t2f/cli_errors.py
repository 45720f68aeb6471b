"""User errors, shown by the command-line tools as one `Error:` line with a non-zero exit."""

from __future__ import annotations

import contextlib
import logging

import click


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]):
    """Turn the library's user-facing errors (and `extra` types) into click errors, with third-party logging muted."""
    from .clip import ClipLoadError
    from .download import DownloadError
    from .io import WeightsError
    from .mapper import MissingMapperError

    logging.disable(logging.ERROR)
    try:
        yield
    except (WeightsError, DownloadError, ClipLoadError, MissingMapperError, ValueError, *extra) as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    finally:
        logging.disable(logging.NOTSET)
