"""Recipe files: TOML whose keys are a command's CLI flags; they become that command's defaults.

    model = "1b"              # top-level keys: every command the recipe is used with
    [export]                  # keys for `gemma3-export export` (the default command)
    target = "onnx"
    quant = "int4b32"
    [qat]                     # keys for `gemma3-export qat`
    scheme = "int4b32"
    seq-len = 512             # spelled like the flag (`seq_len` works too)

Flags given on the command line override recipe values. A boolean flag takes `true`/`false`
(`no-validate = true`). Unknown keys, and values outside a flag's choices, are one-sentence errors.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from .errors import UserError

COMMAND_TABLES = ("export", "qat")


def read_recipe(path: str | Path) -> dict:
    """The parsed TOML file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"No recipe file at {path}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid TOML recipe ({e}).") from None


def recipe_values(recipe: dict, command: str, path: str | Path = "the recipe") -> dict:
    """Top-level keys plus the `[command]` table's keys (the latter win); other tables are ignored."""
    shared = {k: v for k, v in recipe.items() if not isinstance(v, dict)}
    unknown = [k for k, v in recipe.items() if isinstance(v, dict) and k not in COMMAND_TABLES]
    if unknown:
        raise UserError(f"{path} has unknown tables {', '.join(unknown)}; recipes take [{'], ['.join(COMMAND_TABLES)}].")
    return {**shared, **recipe.get(command, {})}


def apply_recipe(parser: argparse.ArgumentParser, values: dict, path: str | Path = "the recipe") -> None:
    """Make `values` the defaults of `parser`'s flags (a flag they supply is no longer required)."""
    actions = {}
    for action in parser._actions:  # argparse keeps its actions here; there is no public accessor
        for opt in action.option_strings:
            if opt.startswith("--"):
                actions[opt[2:]] = action
    for key, value in values.items():
        flag = key.replace("_", "-")
        action = actions.get(flag) or actions.get(key)
        if action is None or flag in ("recipe", "help"):
            names = sorted(k for k in actions if k not in ("recipe", "help"))
            raise UserError(f"{path} has an unknown key {key!r} for `{parser.prog}`; it takes {', '.join(names)}.")
        action.default = _value(action, flag, value, path)
        action.required = False


def _value(action: argparse.Action, flag: str, value, path):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{path}: {flag} must be true or false.")
        return action.const if value else action.default
    if action.nargs in ("+", "*"):
        value = value if isinstance(value, list) else [value]
        return [_convert(action, flag, v, path) for v in value]
    return _convert(action, flag, value, path)


def _convert(action: argparse.Action, flag: str, value, path):
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise UserError(f"{path}: {flag} = {value!r} is not a valid {action.type.__name__}.") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{path}: {flag} = {value!r} is not one of {', '.join(map(str, action.choices))}.")
    return value


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("the parser has no subcommands")


def _recipe_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--recipe":
            if i + 1 == len(argv):
                raise UserError("--recipe needs a FILE.")
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)` where a `--recipe FILE` after a subcommand supplies that command's defaults."""
    path = _recipe_path(argv)
    if path is not None and argv and argv[0] in COMMAND_TABLES:
        command = argv[0]
        apply_recipe(_subparser(parser, command), recipe_values(read_recipe(path), command, path), path)
    return parser.parse_args(argv)
