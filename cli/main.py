"""The ``featbank`` command group, and the one place where errors become exit codes."""

from __future__ import annotations

import sys
import warnings

import click

from featbank import __version__

__all__ = ["cli", "main", "FeatbankGroup", "EXIT_CODES_HELP"]

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    unexpected internal error (a bug: please report the traceback)
  2    user error: bad option, bad input, refusal to overwrite (the message says what to do)
  3    --strict and some images were skipped (the cache was still written)
  130  interrupted (Ctrl-C); finished work is kept, rerun to resume
"""


class FeatbankGroup(click.Group):
    """Turns featbank errors into messages and exit codes."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from featbank.errors import FeatbankError

        try:
            return super().invoke(ctx)
        except FeatbankError as e:
            click.secho(f"Error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="yellow", err=True)
            ctx.exit(130)


@click.group(cls=FeatbankGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featbank")
def cli() -> None:
    """featbank: embed an image folder once, then fit heads in seconds.

    \b
    Examples:
      featbank extract data/elpv
      featbank fit --head linear
      featbank backbones
    """


def _register() -> None:
    from . import backbones as _backbones
    from . import extract as _extract

    cli.add_command(_extract.extract)
    cli.add_command(_backbones.backbones)
    for mod in ("fit", "evaluate", "predict", "finetune", "export", "cache", "compare", "doctor", "audit"):
        try:
            module = __import__(f"featbank.cli.{mod}", fromlist=[mod])
        except ModuleNotFoundError as e:
            if e.name == f"featbank.cli.{mod}":
                continue
            raise
        cli.add_command(getattr(module, mod))


_register()


def _showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def main() -> None:
    from featbank.errors import FeatbankWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, FeatbankWarning):
            _showwarning(message, category, filename, lineno)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    cli(prog_name="featbank")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
