"""recipes/*.toml: every file parses into its commands' flags, and flags on the command line win."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gemma3_export.cli import build_parser, main
from gemma3_export.errors import UserError
from gemma3_export.recipes import COMMAND_TABLES, parse_args, read_recipe, recipe_values

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def _dest(parser: argparse.ArgumentParser, command: str, key: str) -> tuple[str, object]:
    """The namespace attribute a recipe key sets, and the value a recipe `true` gives it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    action = next(a for a in sub._actions if f"--{key.replace('_', '-')}" in a.option_strings)
    return action.dest, getattr(action, "const", None)


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"270m-onnx-int4b32.toml", "1b-coreml-int4.toml", "1b-executorch-8da4w.toml", "1b-qat-int4b32.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_into_its_commands(path):
    recipe = read_recipe(path)
    commands = [c for c in COMMAND_TABLES if c in recipe]
    assert commands, f"{path.name} has no [export] or [qat] table"
    for command in commands:
        parser = build_parser()
        args = parse_args(parser, [command, "--recipe", str(path)])  # required flags come from the recipe
        assert args.command == command
        for key, value in recipe_values(recipe, command).items():
            dest, const = _dest(parser, command, key)
            got = getattr(args, dest)
            assert got == (const if value is True and const is not None else value), (key, got)


def test_flags_override_recipe_values():
    path = str(Path(__file__).resolve().parents[1] / "recipes" / "1b-qat-int4b32.toml")
    args = parse_args(build_parser(), ["export", "--recipe", path, "--quant", "fp16", "--context", "512"])
    assert (args.model, args.target, args.quant, args.context) == ("1b", "onnx", "fp16", 512)
    assert args.checkpoint == "runs/1b-qat-int4b32" and args.validate is True
    args = parse_args(build_parser(), ["qat", "--recipe", path, "--steps", "3", "--model", "270m", "--top-k", "64"])
    assert (args.steps, args.model, args.top_k, args.scheme, args.seq_len) == (3, "270m", 64, "int4b32", 512)
    assert args.activation_checkpointing is True and args.resume is False


def test_recipe_mistakes_are_one_sentence(tmp_path, capsys):
    cases = {
        "unknown key": ('model = "1b"\n[export]\ntarget = "onnx"\nquantize = "int4"\n', "unknown key 'quantize'"),
        "bad choice": ('model = "2b"\n[export]\ntarget = "onnx"\n', "is not one of tiny"),
        "bad bool": ('[export]\nno-validate = "yes"\n', "true or false"),
        "bad table": ('[train]\nsteps = 3\n', "unknown tables train"),
        "not toml": ('model = \n', "not a valid TOML"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.toml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            parse_args(build_parser(), ["export", "--recipe", str(path)])
    path = tmp_path / "ok.toml"
    path.write_text('model = "tiny"\n[export]\ntarget = "onnx"\nno-validate = true\n')
    assert parse_args(build_parser(), ["export", "--recipe", str(path)]).validate is False
    assert main(["--recipe", str(tmp_path / "missing.toml")]) == 2  # `export` is the default command
    assert capsys.readouterr().err.strip() == f"gemma3-export: No recipe file at {tmp_path / 'missing.toml'}."
