"""The command classes of the ``curvkit`` app: how it reports a command line it cannot parse.

Click (which recent Typer releases vendor as ``typer._click``) raises a
:class:`~click.UsageError` for a command line it cannot parse: an unknown command
or option, a bad value, a missing argument. :func:`curvkit.cli.main.main` turns it
into one line naming the help of the command concerned (:func:`usage_error_line`),
as it does curvkit's own errors. The parser reports an option missing its value
without a context; :class:`CurvkitCommand` and :class:`CurvkitGroup` give it the
command's, so that its line names the right help.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup

try:  # recent Typer releases vendor click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - an earlier Typer, built on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

UsageError = click_exceptions.UsageError
ClickException = click_exceptions.ClickException


def _with_context(exc: Any, ctx: Any) -> None:
    """Give a usage error the context of the command being parsed, where it has none."""
    if exc.ctx is None:
        exc.ctx, exc.cmd = ctx, ctx.command


class CurvkitCommand(TyperCommand):
    """A ``curvkit`` command: its usage errors carry its context."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            _with_context(exc, ctx)
            raise


class CurvkitGroup(TyperGroup):
    """The ``curvkit`` group of commands: its usage errors carry its context."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            _with_context(exc, ctx)
            raise


def usage_error_line(exc: Any) -> str:
    """A usage error as one line: click's message, then where the command's help is.

    Click prints the usage line, a hint and the message on three lines (Typer draws
    the message in a box); this is the message and the hint.
    """
    message = " ".join(exc.format_message().split())  # one line, whatever click's message holds
    ctx = exc.ctx
    if ctx is None or ctx.command.get_help_option(ctx) is None:
        return message
    if not message.endswith((".", "?", "!")):
        message += "."
    return f"{message} Try '{ctx.command_path} {ctx.help_option_names[0]}' for help."
