"""The commands as a user runs them: run.py alone in an empty folder with numpy only,
`twofile run` and `twofile chat`, and their errors."""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twofile import run

# Blocks third-party imports, as on a machine with only numpy (and maybe numba) installed.
BLOCKED = ('jinja2', 'twofile', 'torch', 'transformers', 'gguf', 'numba', 'tokenizers', 'markupsafe')
ALONE = """
import sys, importlib.abc
class Only(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Only())
sys.argv = ['run.py'] + sys.argv[1:]
import runpy
runpy.run_path('run.py', run_name='__main__')
"""


def run_alone(folder, *args, stdin=None, allow=()):
    code = ALONE.format(blocked=tuple(b for b in BLOCKED if b not in allow))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=folder, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_run_py_alone_with_numpy_only(tmp_path, tiny_gguf):
    shutil.copy(run.__file__, tmp_path / "run.py")
    shutil.copy(tiny_gguf[0], tmp_path / "model.gguf")
    args = ["model.gguf", "-p", "The quick", "-n", "12", "--seed", "3", "--temperature", "0.8"]
    a, b = run_alone(tmp_path, *args), run_alone(tmp_path, *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and len(a.stdout) > 0  # same seed, same text
    assert "tok/s" in a.stderr and "load" in a.stderr
    # chat without jinja2: the ChatML template is rendered as ChatML
    chat = run_alone(tmp_path, "model.gguf", "--chat", "-n", "8", "--seed", "1", stdin="hello\nhow are you?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("\n") >= 2


@pytest.mark.skipif(run.numba is None, reason="numba is not installed")
def test_run_py_alone_with_numba_writes_the_same_text(tmp_path, tiny_gguf):
    """With numba importable, run.py compiles its kernels (caching them beside itself) and
    greedy generation gives the numpy-only text."""
    shutil.copy(run.__file__, tmp_path / "run.py")
    shutil.copy(tiny_gguf[0], tmp_path / "model.gguf")
    args = ["model.gguf", "-p", "The quick", "-n", "16", "--temperature", "0", "--threads", "2"]
    fast, slow = run_alone(tmp_path, *args, allow=("numba",)), run_alone(tmp_path, *args)
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert "(numba, 2 threads)" in fast.stderr and "(numpy)" in slow.stderr
    assert fast.stdout == slow.stdout and fast.stdout
    assert list((tmp_path / "__pycache__").glob("run.*.nbi"))  # the compiled kernels are cached


def test_twofile_commands(tmp_path, tiny_gguf):
    env = {**os.environ, "PYTHONPATH": str(Path(run.__file__).parents[1])}
    cmd = [sys.executable, "-m", "twofile"]
    r = subprocess.run([*cmd, "run", str(tiny_gguf[0]), "-p", "Hello", "-n", "5", "--temperature", "0"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout, r.stderr
    chat = subprocess.run([*cmd, "chat", str(tiny_gguf[0]), "-n", "5", "--system", "Be nice."],
                          input="hi\n/reset\nagain\n", capture_output=True, text=True, env=env)
    assert chat.returncode == 0, chat.stderr
    for bad, message in ((["--top-p", "2"], "--top-p 2.0 is out of range"),
                         (["--temperature", "-1"], "--temperature -1.0 is out of range"),
                         (["--threads", "0"], "--threads 0 is out of range"),
                         (["-p", ""], "no tokens to run: the prompt is empty")):
        r = subprocess.run([*cmd, "run", str(tiny_gguf[0]), *bad], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and r.stderr.strip() == f"error: {message}", r.stderr


@pytest.mark.slow
def test_default_model_demo(smollm2_path):
    """`twofile run` with no arguments: the default model (already in the cache) continues
    the demo prompt with real English."""
    r = subprocess.run([sys.executable, "-m", "twofile", "run", "-n", "12", "--temperature", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(", ") and len(r.stdout.split()) >= 8, r.stdout


def subcommands(parser):
    """Every (name, parser) below a parser, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from subcommands(sub)


def test_every_flag_says_its_default_and_train_defaults_are_train_configs():
    from twofile import cli, train

    checked = 0
    for name, sub in subcommands(cli.build_parser()):
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.required or "(default: " in (action.help or ""), (name, action.option_strings)
            if action.choices:
                assert all(str(c) in sub.format_help() for c in action.choices)
            checked += 1
    assert checked > 40
    fields = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    for flag, (_, _, default, _) in cli.TRAIN_FLAGS.items():
        assert fields[{"steps": "max_steps", "time": "time_budget"}.get(flag, flag)] == default, flag
    from twofile import finetune

    fields = {f.name: f.default for f in dataclasses.fields(finetune.FinetuneConfig)}
    for flag, (_, _, default, _) in cli.FINETUNE_FLAGS.items():
        assert fields[{"steps": "max_steps", "time": "time_budget"}.get(flag, flag)] == default, flag
