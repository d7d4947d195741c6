"""Every script imports without side effects and its parser builds without loading a model."""

from __future__ import annotations

import importlib

import pytest

import engines
import models

SCRIPTS = ["download_models", "benchmark", "demo_chat", "finetune_demo", "speculative_demo"]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded while building a parser")
    monkeypatch.setattr(engines, "load", refuse)  # llama.cpp loads do not pass through models.load
    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "build_twin", refuse)


@pytest.mark.parametrize("script", SCRIPTS)
def test_parser_builds_and_help_exits_cleanly(script, no_model_loads, capsys):
    module = importlib.import_module(script)
    parser = module.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--output-dir" in help_text
    assert callable(module.main) and module.__doc__ and "python " + script + ".py" in module.__doc__


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "download_models"])
def test_common_flags_are_spelled_the_same(script, no_model_loads):
    parser = importlib.import_module(script).build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for flag in ("--device", "--dtype", "--quantize", "--seed", "--output-dir", "--trust-remote-code"):
        assert flag in flags, (script, flag)
    assert flags & {"--model", "--models", "--target"}, script


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "download_models"])
def test_bad_choice_is_a_parser_error(script, no_model_loads, capsys):
    parser = importlib.import_module(script).build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--dtype", "fp8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
