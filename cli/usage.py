"""The command classes of the ``curvkit`` app: its help, and how it reports a command line it cannot parse.

**Help.** The installed Typer labels each value in the help by its Python type
hint: ``--top-k <int>``, ``--curvature <list[str]>``, ``<bool>`` after every flag
(``--help`` too), an argument ``checkpoints... <list[str]>`` and, in the usage
line, ``{checkpoints}...``. :class:`CurvkitCommand` and :class:`CurvkitGroup`
show them as click does: ``--top-k INTEGER``, ``--tol FLOAT``, ``--data TEXT``,
``-o PATH``, nothing after a flag, ``CHECKPOINTS...`` (``[NAME]`` for an optional
argument). A ``metavar=`` given to ``typer.Option`` is shown as given.

**Usage errors.** Click (which recent Typer releases vendor as ``typer._click``)
raises a :class:`~click.UsageError` for a command line it cannot parse: an unknown
command or option, a bad value, a missing argument. :func:`curvkit.cli.main.main`
turns it into one line naming the help of the command concerned
(:func:`usage_error_line`), as it does curvkit's own errors. The parser reports an
option missing its value without a context; the command classes give it theirs,
so that its line names the right help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # recent Typer releases vendor click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - an earlier Typer, built on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

UsageError = click_exceptions.UsageError
ClickException = click_exceptions.ClickException

_VALUE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}
"""Click's names of the values of these types."""


class _Option(TyperOption):
    """An option shown as click shows it: ``INTEGER``, ``FLOAT``, ``TEXT`` or ``PATH``; nothing for a flag."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        descriptor = self.type_descriptor
        annotation = get_args(descriptor.annotation)[0] if descriptor.is_list else descriptor.annotation
        name = "PATH" if descriptor.is_path else _VALUE_NAMES.get(annotation)
        if name is None or descriptor.is_choice or descriptor.is_tuple:  # Typer's label says more
            return super().display_type_rich(ctx)
        return name


class _Argument(TyperArgument):
    """An argument shown as click shows it: its name in capitals, ``...`` when it takes several values,
    in brackets in the usage line when optional, and no type."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar if self.metavar is not None else (self.name or "").upper()

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return [name if self.required else f"[{name}]"]


def _click_style(param: Any) -> None:
    """Show Typer's own option or argument as click does (:class:`_Option`, :class:`_Argument`).

    The parameter keeps its state; only the methods that display it change, so
    Typer's parameters (and the ``--help`` option click adds) are converted where
    they are made instead of being built again.
    """
    if type(param) is TyperOption:
        param.__class__ = _Option
    elif type(param) is TyperArgument:
        param.__class__ = _Argument


class _ClickStyle:
    """What :class:`CurvkitCommand` and :class:`CurvkitGroup` add to Typer's classes."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _click_style(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _click_style(option)
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except UsageError as exc:
            if exc.ctx is None:  # an option missing its value: the command being parsed
                exc.ctx, exc.cmd = ctx, ctx.command
            raise


class CurvkitCommand(_ClickStyle, TyperCommand):
    """A ``curvkit`` command: click's help, and usage errors that carry the command's context."""


class CurvkitGroup(_ClickStyle, TyperGroup):
    """The ``curvkit`` group of commands: click's help, and usage errors that carry its context."""


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
